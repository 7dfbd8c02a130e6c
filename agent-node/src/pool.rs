//! The warm pool: containers created, attached and started ahead of time, each blocked on its
//! stdin until it receives exactly one job. Taking one costs a write to a socket instead of a
//! `docker create` + `start` (about 160-190 ms here). A container serves one job and is then
//! removed; the pool refills in the background.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::PoolMetrics,
    runtime::{ContainerRuntime, ContainerSpec, JobRef, Owner, Prepared, Role},
};

pub(crate) struct Pool {
    runtime: Arc<dyn ContainerRuntime>,
    node_id: String,
    cluster: String,
    /// Keys kept warm and how many containers each.
    targets: Vec<(ContainerSpec, usize)>,
    max_idle: Duration,
    idle: Mutex<HashMap<ContainerSpec, VecDeque<Prepared>>>,
    /// Containers (warm or cold) running a job on this node.
    active: Mutex<HashSet<String>>,
    /// Hits, misses and refill times, shared with the node's metrics.
    metrics: PoolMetrics,
    refills: AtomicU64,
    refill_micros: AtomicU64,
    refill_needed: tokio::sync::Notify,
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
        max_idle: Duration,
        metrics: PoolMetrics,
    ) -> Self {
        Self {
            runtime,
            node_id,
            cluster,
            targets,
            max_idle,
            idle: Mutex::new(HashMap::new()),
            active: Mutex::new(HashSet::new()),
            metrics,
            refills: AtomicU64::new(0),
            refill_micros: AtomicU64::new(0),
            refill_needed: tokio::sync::Notify::new(),
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
            self.refill_needed.notify_one();
        } else {
            self.metrics.misses.inc();
        }
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
        let refills = self.refills.load(Ordering::Relaxed);
        let micros = self.refill_micros.load(Ordering::Relaxed);
        PoolStats {
            warm,
            hits: self.metrics.hits.get(),
            misses: self.metrics.misses.get(),
            refill_avg_ms: if refills == 0 {
                0.0
            } else {
                micros as f64 / refills as f64 / 1000.0
            },
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
    /// until `stop`; then removes every idle container.
    pub(crate) async fn maintain(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        let mut check_liveness = false;
        loop {
            self.recycle(check_liveness).await;
            self.top_up(&stop).await;
            check_liveness = tokio::select! {
                () = stop.cancelled() => break,
                () = self.refill_needed.notified() => false,
                _ = ticker.tick() => true,
            };
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

    /// Prepares every missing container at once: a burst of jobs empties the pool faster than
    /// one-at-a-time refills could follow.
    async fn top_up(&self, stop: &CancellationToken) {
        for (key, target) in &self.targets {
            let have = self
                .idle
                .lock()
                .expect("pool lock")
                .get(key)
                .map_or(0, VecDeque::len);
            if have >= *target || stop.is_cancelled() {
                continue;
            }
            let owner = self.owner(Role::Warm, None);
            let prepared = futures::future::join_all((have..*target).map(|_| async {
                let started = Instant::now();
                let name = format!("flotilla-warm-{}-{}", self.node_id, uuid_suffix());
                let prepared = self.runtime.prepare(key, &name, &owner).await;
                (prepared, started.elapsed())
            }))
            .await;
            for (result, took) in prepared {
                match result {
                    Ok(prepared) => {
                        self.refills.fetch_add(1, Ordering::Relaxed);
                        self.refill_micros
                            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                        self.metrics.refill_seconds.observe(took.as_secs_f64());
                        self.idle
                            .lock()
                            .expect("pool lock")
                            .entry(key.clone())
                            .or_default()
                            .push_back(prepared);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot prepare a warm container"),
                }
            }
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

    async fn until_warm(pool: &Pool, count: u32) {
        while pool.stats().warm.values().sum::<u32>() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_its_target_replaces_dead_containers_and_empties_on_stop() {
        let fake = FakeRuntime::new(Behaviour::exit(0));
        let pool = Arc::new(Pool::new(
            Arc::new(fake.clone()),
            "node-1".to_owned(),
            "test".to_owned(),
            vec![(spec(), 2)],
            Duration::from_secs(3600),
            PoolMetrics::default(),
        ));
        let stop = CancellationToken::new();
        let maintain = tokio::spawn({
            let (pool, stop) = (pool.clone(), stop.clone());
            async move { pool.maintain(stop).await }
        });
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
}
