//! Several agent-nodes sharing one queue.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_testkit::Fleet;
use serde_json::json;

use crate::{LogReader, js_context, submit, wait};

#[tokio::test]
async fn two_nodes_share_the_queue_and_no_job_runs_twice() {
    let fleet = Fleet::builder().nodes(2).slots(2).start().await.unwrap();
    let js = js_context(&fleet).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = json!({
            "agent_id": "fleet",
            "engine": "shell",
            "prompt": format!("sleep 0.3; echo job {i}"),
        });
        ids.push(submit(&fleet, body).await);
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let job = wait(&fleet, id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["attempt"], 1, "ran more than once: {job}");
        assert_eq!(job["result"]["text"], format!("job {i}\n"));
        *per_node
            .entry(job["node_id"].as_str().unwrap().to_owned())
            .or_default() += 1;

        // Exactly one attempt streamed output and ended.
        let mut logs = LogReader::open(&js, id).await;
        let chunks = logs.until_end().await;
        let attempts: BTreeSet<u32> = chunks.iter().map(|c| c.attempt).collect();
        assert_eq!(attempts, BTreeSet::from([1]));
    }
    println!("jobs per node: {per_node:?}");
    let nodes: BTreeSet<&String> = per_node.keys().collect();
    let expected: BTreeSet<&String> = fleet.node_ids.iter().collect();
    assert_eq!(
        nodes, expected,
        "both nodes should have run jobs: {per_node:?}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}
