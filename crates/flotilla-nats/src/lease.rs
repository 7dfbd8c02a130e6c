//! A lease among replicas of a service: one key in the dispatch bucket, held by refreshing
//! it with compare-and-set on its revision, lost when not refreshed for [`LEADER_LEASE`] (the
//! bucket's TTL). The dispatchers elect their leader with one
//! ([`flotilla_proto::names::KEY_LEADER`]); the api-gateways pick the one that exports the
//! fleet-wide metrics with another ([`flotilla_proto::names::KEY_FLEET_METRICS`]).
//!
//! A holder's actions with effects beyond its process (the dispatcher leader requeueing a
//! lost node's jobs, timing jobs out, sending a webhook, firing a schedule) are fenced by the
//! lease: each first refreshes it ([`Lease::confirm`]). A replica that was paused or cut off,
//! and whose lease another replica has taken meanwhile, fails that refresh and stands down
//! instead of acting late. What is left is a pause between the refresh and the action itself,
//! which would have to outlast a whole fresh lease.

use std::time::Duration;

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::LEADER_LEASE;

pub struct Lease {
    /// The dispatch bucket.
    store: Store,
    key: &'static str,
    /// This replica's id: the key's value while it holds the lease.
    me: Bytes,
    /// The key's revision as this replica last wrote it; `None` while not holding it.
    revision: Mutex<Option<u64>>,
    leading: watch::Sender<bool>,
}

/// How often the lease is refreshed: well within [`LEADER_LEASE`].
const REFRESH: Duration = Duration::from_millis(1000);

impl Lease {
    pub fn new(store: Store, key: &'static str) -> Self {
        Self {
            store,
            key,
            me: Bytes::from(uuid::Uuid::new_v4().to_string()),
            revision: Mutex::new(None),
            leading: watch::channel(false).0,
        }
    }

    /// `true` while this replica holds the lease (as of its last refresh).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Takes the lease when it is free and keeps it while this replica is alive; releases it
    /// at `stop` so that another replica takes over without waiting for it to expire.
    pub async fn hold(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            self.confirm().await;
        }
        let revision = self.revision.lock().await.take();
        if let Some(revision) = revision {
            let _ = self
                .store
                .delete_expect_revision(self.key, Some(revision))
                .await;
        }
        self.set_leading(false);
    }

    /// Refreshes the lease (or takes it, when free) and says whether this replica holds it.
    /// The fence before every action of the holder.
    pub async fn confirm(&self) -> bool {
        let mut revision = self.revision.lock().await;
        *revision = match *revision {
            Some(rev) => self.store.update(self.key, self.me.clone(), rev).await.ok(),
            None => self.store.create(self.key, self.me.clone()).await.ok(),
        };
        let leading = revision.is_some();
        self.set_leading(leading);
        leading
    }

    fn set_leading(&self, leading: bool) {
        if *self.leading.borrow() != leading {
            tracing::info!(lease = self.key, held = leading, "lease changed hands");
            self.leading.send_replace(leading);
        }
    }
}

/// The lease outlives a missed refresh or two.
const _: () = assert!(LEADER_LEASE.as_millis() >= 3 * REFRESH.as_millis());
