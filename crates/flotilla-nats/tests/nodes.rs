//! The node directory against a real nats-server: it loads what the bucket holds, follows
//! puts and deletes, and answers reads without creating a consumer each time.

use std::time::Duration;

use chrono::Utc;
use flotilla_nats::{NodeDirectory, Topology, TopologyConfig};
use flotilla_proto::{NodeInfo, names};
use flotilla_testkit::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

const WITHIN: Duration = Duration::from_secs(10);

fn heartbeat(node_id: &str) -> NodeInfo {
    NodeInfo::example(node_id)
}

async fn put(topology: &Topology, node_id: &str) {
    let value = flotilla_proto::encode(&heartbeat(node_id)).unwrap();
    topology
        .nodes
        .put(names::node_key(node_id), value)
        .await
        .unwrap();
}

fn ids(directory: &NodeDirectory) -> Vec<String> {
    let nodes = directory.live(Utc::now());
    nodes.into_iter().map(|n| n.node_id).collect()
}

#[tokio::test]
async fn the_directory_loads_the_bucket_and_follows_it_with_one_consumer() {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let topology = Topology::ensure(client, TopologyConfig::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();

    // An empty bucket is a complete load at once.
    let empty = NodeDirectory::start(&topology, stop.clone());
    assert!(empty.synced(WITHIN).await, "an empty bucket must load");
    assert!(ids(&empty).is_empty());

    put(&topology, "b").await;
    put(&topology, "a").await;
    let directory = NodeDirectory::start(&topology, stop.clone());
    assert!(directory.synced(WITHIN).await);
    assert_eq!(ids(&directory), ["a", "b"], "loaded, in node id order");
    wait_until(WITHIN, "the first directory to see both", || async {
        (ids(&empty).len() == 2).then_some(())
    })
    .await
    .unwrap();

    topology.nodes.delete(names::node_key("a")).await.unwrap();
    wait_until(WITHIN, "the deletion to be followed", || async {
        (ids(&directory) == ["b"]).then_some(())
    })
    .await
    .unwrap();
    assert!(!directory.contains(&names::node_key("a")));

    // Reads come from memory: no consumer per read.
    for _ in 0..50 {
        let _ = directory.live(Utc::now());
    }
    let mut stream = topology
        .js
        .get_stream(format!("KV_{}", names::BUCKET_NODES))
        .await
        .unwrap();
    let consumers = stream.info().await.unwrap().state.consumer_count;
    assert_eq!(consumers, 2, "one watch per directory, none per read");
    stop.cancel();
}
