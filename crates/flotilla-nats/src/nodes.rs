//! The fleet's node heartbeats, kept in memory from one watch on the nodes bucket.
//!
//! Listing the bucket's keys creates a JetStream consumer each time; a dashboard or a test
//! polling `GET /engines` could create them faster than the server removes them and reach its
//! consumer limit. A [`NodeDirectory`] holds one watch per service instead and answers from
//! memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    kv::{Entry, Operation, Store},
};
use chrono::{DateTime, Utc};
use flotilla_proto::{Encoding, NodeInfo, names};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Topology;

/// How long a fresh watch may deliver nothing before its replay counts as done.
const REPLAY_QUIET: Duration = Duration::from_secs(2);

/// A node's last heartbeat and the KV revision it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub key: String,
    pub info: NodeInfo,
    pub revision: u64,
}

/// The last heartbeat of every node in the bucket, as one watch last reported it.
pub struct NodeDirectory {
    heartbeats: Mutex<HashMap<String, Heartbeat>>,
    /// True once the watch delivered everything the bucket held when it started.
    synced: watch::Sender<bool>,
}

impl NodeDirectory {
    /// Starts following the topology's nodes bucket until `stop`.
    pub fn start(topology: &Topology, stop: CancellationToken) -> Arc<Self> {
        let directory = Arc::new(Self {
            heartbeats: Mutex::default(),
            synced: watch::Sender::new(false),
        });
        let (js, nodes) = (topology.js.clone(), topology.nodes.clone());
        tokio::spawn(directory.clone().follow(js, nodes, stop));
        directory
    }

    /// Waits up to `within` for the first full load; false if it did not come.
    pub async fn synced(&self, within: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        tokio::time::timeout(within, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether the first full load is in.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Every node's last heartbeat, live or not, in node id order.
    pub fn all(&self) -> Vec<Heartbeat> {
        let mut all: Vec<Heartbeat> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.info.node_id.cmp(&b.info.node_id));
        all
    }

    /// The nodes whose heartbeat is fresh at `now`, in node id order.
    pub fn live(&self, now: DateTime<Utc>) -> Vec<NodeInfo> {
        self.all()
            .into_iter()
            .map(|h| h.info)
            .filter(|info| info.is_live(now))
            .collect()
    }

    /// Whether the bucket holds a heartbeat under `key` (fresh or not).
    pub fn contains(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Heartbeat>> {
        self.heartbeats.lock().expect("node directory lock")
    }

    /// Watches the bucket, re-watching from scratch when the watch breaks. A fresh watch
    /// replays each key's last value, so the map is rebuilt aside and swapped in once the
    /// replay is done: keys deleted while the watch was down do not linger.
    async fn follow(
        self: Arc<Self>,
        js: jetstream::Context,
        nodes: Store,
        stop: CancellationToken,
    ) {
        let stream = format!("KV_{}", names::BUCKET_NODES);
        loop {
            // Read now: the store's own status is the one cached when it was opened.
            let replay_empty = js
                .get_stream(&stream)
                .await
                .is_ok_and(|s| s.cached_info().state.messages == 0);
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = nodes.watch_with_history(">") => watch,
            };
            let mut events = match watch {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch node heartbeats, retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let mut replay: Option<HashMap<String, Heartbeat>> = Some(HashMap::new());
            if replay_empty {
                self.finish_replay(&mut replay);
            }
            // A watch that delivers nothing for a while has nothing to replay (the bucket
            // emptied between the count and the watch).
            let quiet = tokio::time::sleep(REPLAY_QUIET);
            tokio::pin!(quiet);
            loop {
                let entry = tokio::select! {
                    () = stop.cancelled() => return,
                    () = &mut quiet, if replay.is_some() => {
                        self.finish_replay(&mut replay);
                        continue;
                    }
                    entry = events.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => self.apply(entry, &mut replay),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "node heartbeat watch failed, re-watching");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// Applies one change: to the replay map while a replay is under way, to the live map
    /// after.
    fn apply(&self, entry: Entry, replay: &mut Option<HashMap<String, Heartbeat>>) {
        let done = entry.seen_current;
        match replay {
            Some(map) => change(map, entry),
            None => change(&mut self.lock(), entry),
        }
        if done {
            self.finish_replay(replay);
        }
    }

    fn finish_replay(&self, replay: &mut Option<HashMap<String, Heartbeat>>) {
        if let Some(map) = replay.take() {
            *self.lock() = map;
            self.synced.send_replace(true);
        }
    }
}

fn change(map: &mut HashMap<String, Heartbeat>, entry: Entry) {
    if entry.operation != Operation::Put {
        map.remove(&entry.key);
        return;
    }
    match flotilla_proto::decode::<NodeInfo>(&entry.value, Encoding::MessagePack) {
        Ok(info) => {
            let heartbeat = Heartbeat {
                key: entry.key.clone(),
                info,
                revision: entry.revision,
            };
            map.insert(entry.key, heartbeat);
        }
        Err(e) => {
            tracing::warn!(key = entry.key, error = %e, "undecodable node heartbeat");
            map.remove(&entry.key);
        }
    }
}
