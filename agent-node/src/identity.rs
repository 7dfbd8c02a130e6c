//! A node id names one live node. Two nodes under one id would take each other's jobs for
//! their own (the fencing is by node id), so a node whose id is live elsewhere refuses to
//! start.

use std::time::Duration;

use async_nats::jetstream::kv;
use flotilla_proto::{Encoding, NodeInfo, names};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
#[error(
    "node id {node_id} is in use: the node on host {host} (started {started_at}) sends its \
     heartbeats. Give this node another FLOTILLA_NODE_ID, or stop the other one"
)]
pub struct NodeIdInUse {
    pub node_id: String,
    pub host: String,
    pub started_at: String,
}

/// Returns once no other node is live under `node_id`: there is no heartbeat for it, the one
/// there is from this `host`, or it does not change for a whole `ttl` (a node that died
/// without removing it). Heartbeats are told apart by their revisions, not by clocks
/// of other hosts. Errors of the store count as "no other node": the check must not stop a
/// node that NATS cannot answer for.
pub(crate) async fn ensure_unique(
    nodes: &kv::Store,
    node_id: &str,
    host: &str,
    ttl: Duration,
) -> Result<(), NodeIdInUse> {
    let key = names::node_key(node_id);
    let Some(first) = heartbeat(nodes, &key).await else {
        return Ok(());
    };
    // This host's own heartbeat is this node's previous run (two nodes of one id on one host
    // would also share its outbox, which one of them cannot open): take it over at once, so a
    // restart after a crash is back before the dispatcher counts the node as lost.
    let info = flotilla_proto::decode::<NodeInfo>(&first.value, Encoding::MessagePack).ok();
    if info.as_ref().is_some_and(|info| info.host == host) {
        tracing::info!(
            node_id,
            "the heartbeat there is this host's: taking the node id over"
        );
        return Ok(());
    }
    tracing::info!(
        node_id,
        ?ttl,
        "a heartbeat of this node id is there: waiting to see whether it is live"
    );
    let deadline = Instant::now() + ttl;
    let poll = (ttl / 10).max(Duration::from_millis(50));
    while Instant::now() < deadline {
        tokio::time::sleep(poll).await;
        match heartbeat(nodes, &key).await {
            None => return Ok(()),
            Some(entry) if entry.revision != first.revision => {
                let info =
                    flotilla_proto::decode::<NodeInfo>(&entry.value, Encoding::MessagePack).ok();
                return Err(NodeIdInUse {
                    node_id: node_id.to_owned(),
                    host: info.as_ref().map_or("?".into(), |i| i.host.clone()),
                    started_at: info.map_or("?".into(), |i| i.started_at.to_rfc3339()),
                });
            }
            Some(_) => {}
        }
    }
    tracing::info!(
        node_id,
        "the heartbeat there is stale: taking the node id over"
    );
    Ok(())
}

async fn heartbeat(nodes: &kv::Store, key: &str) -> Option<kv::Entry> {
    match nodes.entry(key).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => Some(entry),
        _ => None,
    }
}
