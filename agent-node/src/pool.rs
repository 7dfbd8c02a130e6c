//! The warm pool: containers created, attached and started ahead of time, each blocked on its
//! stdin until it receives exactly one job. Taking one costs a write to a socket instead of a
//! `docker create` + `start` (about 160-190 ms here). A container serves one job and is then
//! removed; every take starts a refill at once, and the number kept ready grows with the
//! recent arrival rate (up to [`GROWTH`] times the configured size) so that bursts do not
//! empty it.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::PoolMetrics,
    runtime::{ContainerRuntime, ContainerSpec, JobRef, Owner, Prepared, Role},
};

/// A key's pool may grow to this many times its configured size when jobs arrive faster than
/// that many refills can follow.
pub(crate) const GROWTH: usize = 4;
/// Takes are counted over this window to size the pool.
const RATE_WINDOW: Duration = Duration::from_secs(3);

pub(crate) struct Pool {
    runtime: Arc<dyn ContainerRuntime>,
    node_id: String,
    cluster: String,
    /// Keys kept warm and how many containers each.
    targets: Vec<(ContainerSpec, usize)>,
    /// The node's job slots: more warm containers per key than jobs that can run at once
    /// would only add Docker work when Docker is what limits the node.
    slots: usize,
    max_idle: Duration,
    idle: Mutex<HashMap<ContainerSpec, VecDeque<Prepared>>>,
    /// Containers (warm or cold) running a job on this node.
    active: Mutex<HashSet<String>>,
    /// Hits, misses and refill times, shared with the node's metrics.
    metrics: PoolMetrics,
    refills: AtomicU64,
    refill_micros: AtomicU64,
    refill_needed: tokio::sync::Notify,
    /// When containers were taken, over the last [`RATE_WINDOW`].
    takes: Mutex<VecDeque<Instant>>,
}

/// Pool figures for heartbeats.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolStats {
    pub(crate) warm: BTreeMap<String, u32>,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) refill_avg_ms: f64,
}

impl Pool {
    pub(crate) fn new(
        runtime: Arc<dyn ContainerRuntime>,
        node_id: String,
        cluster: String,
        targets: Vec<(ContainerSpec, usize)>,
        slots: usize,
        max_idle: Duration,
        metrics: PoolMetrics,
    ) -> Self {
        Self {
            runtime,
            node_id,
            cluster,
            targets,
            slots,
            max_idle,
            idle: Mutex::new(HashMap::new()),
            active: Mutex::new(HashSet::new()),
            metrics,
            refills: AtomicU64::new(0),
            refill_micros: AtomicU64::new(0),
            refill_needed: tokio::sync::Notify::new(),
            takes: Mutex::new(VecDeque::new()),
        }
    }

    /// A warm container for `key`, if one is ready. It moves from idle to active under the
    /// pool lock, so the reaper never sees it in neither set.
    pub(crate) fn acquire(&self, key: &ContainerSpec) -> Option<Prepared> {
        let mut idle = self.idle.lock().expect("pool lock");
        let taken = idle.get_mut(key).and_then(VecDeque::pop_front);
        if let Some(prepared) = &taken {
            self.active
                .lock()
                .expect("active lock")
                .insert(prepared.id.clone());
        }
        drop(idle);
        if taken.is_some() {
            self.metrics.hits.inc();
        } else {
            self.metrics.misses.inc();
        }
        // A miss counts as demand too: the pool grows to meet it.
        self.note_take();
        self.refill_needed.notify_one();
        taken
    }

    /// Registers a cold-started container as running a job.
    pub(crate) fn track(&self, id: &str) {
        self.active
            .lock()
            .expect("active lock")
            .insert(id.to_owned());
    }

    /// The job on `id` is over.
    pub(crate) fn untrack(&self, id: &str) {
        self.active.lock().expect("active lock").remove(id);
    }

    /// Whether `id` waits in the pool or runs a job: anything else of this node is an orphan.
    pub(crate) fn owns(&self, id: &str) -> bool {
        // Same lock order as `acquire` (idle, then active).
        let idle = self.idle.lock().expect("pool lock");
        idle.values().flatten().any(|p| p.id == id)
            || self.active.lock().expect("active lock").contains(id)
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let idle = self.idle.lock().expect("pool lock");
        let mut warm = BTreeMap::new();
        for (key, containers) in idle.iter() {
            *warm.entry(key.image.clone()).or_insert(0) += containers.len() as u32;
        }
        PoolStats {
            warm,
            hits: self.metrics.hits.get(),
            misses: self.metrics.misses.get(),
            refill_avg_ms: self.refill_avg_ms(),
        }
    }

    fn refill_avg_ms(&self) -> f64 {
        let refills = self.refills.load(Ordering::Relaxed);
        let micros = self.refill_micros.load(Ordering::Relaxed);
        if refills == 0 {
            0.0
        } else {
            micros as f64 / refills as f64 / 1000.0
        }
    }

    /// The owner recorded on every container this node prepares (warm, cold, probes).
    pub(crate) fn owner(&self, role: Role, job: Option<JobRef>) -> Owner {
        Owner {
            node_id: self.node_id.clone(),
            cluster: self.cluster.clone(),
            role,
            job,
        }
    }

    /// Keeps every key at its target, recycles containers idle too long and drops dead ones,
    /// until `stop`; then removes every idle container. Each missing container is prepared on
    /// its own, so a take during a refill starts another one at once.
    pub(crate) async fn maintain(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        let mut check_liveness = false;
        let mut preparing = FuturesUnordered::new();
        let mut in_flight = vec![0; self.targets.len()];
        // After a failed prepare, a key waits for the next tick: no retry storm on Docker.
        let mut failed = vec![false; self.targets.len()];
        loop {
            self.recycle(check_liveness).await;
            if check_liveness {
                failed.fill(false);
            }
            for (i, (key, configured)) in self.targets.iter().enumerate() {
                if failed[i] {
                    continue;
                }
                let have = self.idle_len(key) + in_flight[i];
                for _ in have..self.wanted(*configured) {
                    in_flight[i] += 1;
                    preparing.push(self.prepare(i, key));
                }
            }
            check_liveness = tokio::select! {
                () = stop.cancelled() => break,
                () = self.refill_needed.notified() => false,
                _ = ticker.tick() => true,
                Some((i, prepared)) = preparing.next() => {
                    in_flight[i] -= 1;
                    failed[i] |= prepared.is_err();
                    self.add(&self.targets[i].0, prepared);
                    false
                }
            };
        }
        // Containers still being prepared are removed as they come.
        while let Some((_, prepared)) = preparing.next().await {
            if let Ok(prepared) = prepared {
                self.runtime.remove(&prepared.id).await;
            }
        }
        let all: Vec<Prepared> = self
            .idle
            .lock()
            .expect("pool lock")
            .drain()
            .flat_map(|(_, q)| q)
            .collect();
        for prepared in all {
            self.runtime.remove(&prepared.id).await;
        }
    }

    fn idle_len(&self, key: &ContainerSpec) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .get(key)
            .map_or(0, VecDeque::len)
    }

    /// How many containers a key with `configured` should keep: enough to cover the takes
    /// expected while one refill runs, twice over, within [`GROWTH`] times `configured` and
    /// the node's slots (never below `configured`).
    fn wanted(&self, configured: usize) -> usize {
        let per_s = {
            let mut takes = self.takes.lock().expect("takes lock");
            while takes.front().is_some_and(|t| t.elapsed() > RATE_WINDOW) {
                takes.pop_front();
            }
            takes.len() as f64 / RATE_WINDOW.as_secs_f64()
        };
        let refill_s = self.refill_avg_ms() / 1000.0;
        let needed = (per_s * refill_s * 2.0).ceil() as usize;
        let ceiling = (configured * GROWTH).min(self.slots).max(configured);
        needed.clamp(configured, ceiling)
    }

    fn note_take(&self) {
        let mut takes = self.takes.lock().expect("takes lock");
        takes.push_back(Instant::now());
        // Bounded: only the count over the window matters.
        if takes.len() > 10_000 {
            takes.pop_front();
        }
    }

    /// Prepares one warm container for the key at `index` of the targets.
    async fn prepare(
        &self,
        index: usize,
        key: &ContainerSpec,
    ) -> (usize, Result<Prepared, crate::runtime::RuntimeError>) {
        let started = Instant::now();
        let name = format!("flotilla-warm-{}-{}", self.node_id, uuid_suffix());
        let owner = self.owner(Role::Warm, None);
        let prepared = self.runtime.prepare(key, &name, &owner).await;
        if prepared.is_ok() {
            let took = started.elapsed();
            self.refills.fetch_add(1, Ordering::Relaxed);
            self.refill_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            self.metrics.refill_seconds.observe(took.as_secs_f64());
        }
        (index, prepared)
    }

    fn add(&self, key: &ContainerSpec, prepared: Result<Prepared, crate::runtime::RuntimeError>) {
        match prepared {
            Ok(prepared) => self
                .idle
                .lock()
                .expect("pool lock")
                .entry(key.clone())
                .or_default()
                .push_back(prepared),
            Err(e) => tracing::warn!(error = %e, "cannot prepare a warm container"),
        }
    }

    /// Removes containers that waited longer than the max idle time and, when asked, those
    /// that died.
    async fn recycle(&self, check_liveness: bool) {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().expect("pool lock");
            for queue in idle.values_mut() {
                while queue
                    .front()
                    .is_some_and(|p| p.prepared_at.elapsed() > self.max_idle)
                {
                    expired.extend(queue.pop_front());
                }
            }
        }
        for prepared in expired {
            self.runtime.remove(&prepared.id).await;
        }
        if !check_liveness {
            return;
        }
        let ids: Vec<String> = self
            .idle
            .lock()
            .expect("pool lock")
            .values()
            .flatten()
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            if !self.runtime.is_running(&id).await {
                tracing::warn!(container = %id, "warm container died; replacing it");
                self.idle
                    .lock()
                    .expect("pool lock")
                    .values_mut()
                    .for_each(|q| q.retain(|p| p.id != id));
                self.runtime.remove(&id).await;
            }
        }
    }
}

fn uuid_suffix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::runtime::{
        Network,
        fake::{Behaviour, Event, FakeRuntime},
    };

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "img".to_owned(),
            memory_bytes: 1 << 30,
            nano_cpus: 1_000_000_000,
            pids_limit: 64,
            workspace_bytes: 1 << 20,
            network: Network::None,
            runtime_class: None,
        }
    }

    /// A pool of `target` warm containers on `fake`, maintained until the token is cancelled.
    fn maintained(
        fake: &FakeRuntime,
        target: usize,
        slots: usize,
    ) -> (Arc<Pool>, CancellationToken, tokio::task::JoinHandle<()>) {
        let pool = Arc::new(Pool::new(
            Arc::new(fake.clone()),
            "node-1".to_owned(),
            "test".to_owned(),
            vec![(spec(), target)],
            slots,
            Duration::from_secs(3600),
            PoolMetrics::default(),
        ));
        let stop = CancellationToken::new();
        let maintain = tokio::spawn({
            let (pool, stop) = (pool.clone(), stop.clone());
            async move { pool.maintain(stop).await }
        });
        (pool, stop, maintain)
    }

    async fn until_warm(pool: &Pool, count: u32) {
        while pool.stats().warm.values().sum::<u32>() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_its_target_replaces_dead_containers_and_empties_on_stop() {
        let fake = FakeRuntime::new(Behaviour::exit(0));
        let (pool, stop, maintain) = maintained(&fake, 2, 2);
        until_warm(&pool, 2).await;
        let warm = fake.containers();
        assert_eq!(warm.len(), 2);
        assert!(warm.iter().all(|c| c.owner == pool.owner(Role::Warm, None)));
        assert!(warm.iter().all(|c| pool.owns(&c.id)));

        // The liveness check (every 5 s) finds the dead one and prepares another.
        fake.kill(&warm[0].id).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        until_warm(&pool, 2).await;
        let removed = Event::Removed {
            id: warm[0].id.clone(),
        };
        assert!(fake.events().contains(&removed));
        assert!(!pool.owns(&warm[0].id));

        // Taken: a hit, and the pool refills behind it.
        let taken = pool.acquire(&spec()).expect("a warm container");
        assert!(pool.owns(&taken.id));
        assert_eq!(pool.stats().hits, 1);
        until_warm(&pool, 2).await;

        stop.cancel();
        maintain.await.unwrap();
        let left: Vec<String> = fake.containers().into_iter().map(|c| c.id).collect();
        assert_eq!(left, [taken.id]);
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_arriving_faster_than_refills_grow_the_pool_within_its_bound() {
        let fake = FakeRuntime::new(Behaviour::exit(0));
        fake.set_prepare_delay(Duration::from_millis(500));
        let (pool, stop, maintain) = maintained(&fake, 1, 8);
        until_warm(&pool, 1).await;
        // 10 jobs a second for 5 s, each refill taking 0.5 s: one warm container is not enough.
        for _ in 0..50 {
            pool.acquire(&spec());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(pool.wanted(1), GROWTH, "10/s × 0.5 s × 2 is over the bound");
        // One container refilled every 0.5 s would have served at most 11 of the 50.
        let stats = pool.stats();
        assert!(
            stats.hits > 25,
            "hits {} misses {}",
            stats.hits,
            stats.misses
        );

        // Quiet again: back to the configured size once the window has passed.
        tokio::time::sleep(RATE_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(pool.wanted(1), 1);
        stop.cancel();
        maintain.await.unwrap();
    }
}
