//! Which run queues this node pulls from, and in what order.
//!
//! Every job class in the registry is checked against what this node offers (engines its
//! image has, labels, images, runtimes); the node pulls from the queues of the classes it can
//! run, and only those, so it never takes a job it would have to hand back.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer::PullConsumer;
use flotilla_nats::{ClassEvent, RegisteredClass};
use flotilla_proto::{Encoding, JobClass, NodeInfo, Priority, routing::Prefetch};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// One queue this node pulls from.
#[derive(Clone)]
pub(crate) struct Queue {
    pub(crate) priority: Priority,
    pub(crate) class: String,
    pub(crate) consumer: PullConsumer,
}

#[derive(Default)]
pub(crate) struct Routes {
    /// The registry, as followed.
    classes: Mutex<HashMap<String, JobClass>>,
    /// Job images found on this host (the worker image is always there).
    images: Mutex<BTreeSet<String>>,
    /// The queues of the classes this node serves, highest priority first.
    queues: watch::Sender<Arc<Vec<Queue>>>,
}

impl Routes {
    pub(crate) fn queues(&self) -> watch::Receiver<Arc<Vec<Queue>>> {
        self.queues.subscribe()
    }

    /// The ids of the classes this node serves now.
    pub(crate) fn served(&self) -> Vec<String> {
        let queues = self.queues.borrow();
        let ids: BTreeSet<&str> = queues.iter().map(|q| q.class.as_str()).collect();
        ids.into_iter().map(str::to_owned).collect()
    }

    /// The job images this node was found to hold.
    pub(crate) fn images(&self) -> Vec<String> {
        self.images
            .lock()
            .expect("images lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Follows the class registry until `stop`, re-checking what this node serves at each change.
pub(crate) async fn follow(shared: Arc<Shared>, stop: CancellationToken) {
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let registry = {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            shared
                .topology
                .queues
                .follow(stop, |event| {
                    let classes = &shared.routes.classes;
                    let mut classes = classes.lock().expect("classes lock");
                    match event {
                        ClassEvent::Restart => classes.clear(),
                        ClassEvent::Put(RegisteredClass { id, class }) => {
                            classes.insert(id, class);
                        }
                    }
                    let _ = changed.send(());
                })
                .await;
        })
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            change = changes.recv() => if change.is_none() { break },
        }
        while changes.try_recv().is_ok() {} // one refresh for a burst of changes
        refresh(&shared).await;
    }
    let _ = registry.await;
}

/// Re-checks every class against this node and publishes the queues to pull from. Also run
/// at each heartbeat: engines are probed and images pulled while the node runs.
pub(crate) async fn refresh(shared: &Shared) {
    let classes: Vec<(String, JobClass)> = {
        let classes = shared.routes.classes.lock().expect("classes lock");
        classes
            .iter()
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect()
    };
    find_images(
        shared,
        classes.iter().filter_map(|(_, c)| c.image.as_deref()),
    )
    .await;
    let offer = crate::node_info(shared);
    let mut served: Vec<&String> = classes
        .iter()
        .filter(|(_, class)| class.unmet_by(&offer).is_none())
        .map(|(id, _)| id)
        .collect();
    served.sort();
    let current = shared.routes.served();
    if served
        .iter()
        .map(|s| s.as_str())
        .eq(current.iter().map(|s| s.as_str()))
    {
        return;
    }
    let mut queues = Vec::new();
    let mut opened = Vec::new();
    for class in served {
        // All three queues of a class, or none: a class left out is tried again at the next
        // refresh, one half open would never be.
        match open_queues(shared, class).await {
            Ok(mut three) => {
                queues.append(&mut three);
                opened.push(class.clone());
            }
            Err(e) => tracing::warn!(class, error = %e, "cannot open a class's run queues"),
        }
    }
    queues.sort_by_key(|q| q.priority);
    tracing::info!(classes = ?opened, "pulling from the queues of these job classes");
    shared.routes.queues.send_replace(Arc::new(queues));
}

async fn open_queues(
    shared: &Shared,
    class: &str,
) -> Result<Vec<Queue>, flotilla_nats::TopologyError> {
    let mut queues = Vec::with_capacity(Priority::ALL.len());
    for priority in Priority::ALL {
        queues.push(Queue {
            priority,
            class: class.to_owned(),
            consumer: shared.topology.queues.consumer_for(priority, class).await?,
        });
    }
    Ok(queues)
}

/// Checks the images the classes name that this node has not found yet; with
/// `FLOTILLA_PULL_IMAGES`, pulls those it may.
async fn find_images<'a>(shared: &Shared, wanted: impl Iterator<Item = &'a str>) {
    for image in wanted {
        if shared
            .routes
            .images
            .lock()
            .expect("images lock")
            .contains(image)
        {
            continue;
        }
        match shared.runtime.image_exists(image).await {
            Ok(true) => found(shared, image),
            Ok(false) if shared.config.pull_images => {
                pull(shared, image).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(image, error = %e, "cannot look for a job image"),
        }
    }
}

fn found(shared: &Shared, image: &str) {
    tracing::info!(image, "job image found on this host");
    let mut images = shared.routes.images.lock().expect("images lock");
    images.insert(image.to_owned());
}

/// Pulls `image` if the fleet's allow-list admits it (the node checks again what the gateway
/// checked). True once it is here.
pub(crate) async fn pull(shared: &Shared, image: &str) -> bool {
    if !shared.config.job_limits.allowed_images.allows(image) {
        tracing::warn!(
            image,
            "not pulling an image FLOTILLA_ALLOWED_IMAGES does not allow"
        );
        return false;
    }
    let started = std::time::Instant::now();
    match shared.runtime.pull_image(image).await {
        Ok(()) => {
            tracing::info!(image, elapsed = ?started.elapsed(), "image pulled");
            found(shared, image);
            true
        }
        Err(e) => {
            tracing::warn!(image, error = %e, "cannot pull image");
            false
        }
    }
}

/// Pulls the images `POST /images/prefetch` asks for, when this node is one of those asked;
/// each pull runs on its own, and opens the queues of the classes that wanted the image.
pub(crate) async fn listen_for_prefetch(
    shared: Arc<Shared>,
    mut requests: async_nats::Subscriber,
    stop: CancellationToken,
) {
    use futures::StreamExt as _;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = requests.next() => message,
        };
        let Some(message) = message else { return };
        let prefetch: Prefetch =
            match flotilla_proto::decode(&message.payload, Encoding::MessagePack) {
                Ok(prefetch) => prefetch,
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable prefetch request");
                    continue;
                }
            };
        if !prefetch.is_for(&shared.config.labels) {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if pull(&shared, &prefetch.image).await {
                refresh(&shared).await;
            }
        });
    }
}

/// What the node offers, as its heartbeat says it; classes are checked against it.
pub(crate) fn offers(info: &mut NodeInfo, shared: &Shared) {
    info.labels = shared.config.labels.clone();
    let config = &shared.config;
    let mut images: BTreeSet<String> = shared.routes.images().into_iter().collect();
    images.extend(config.pool_images.iter().map(|(image, _)| image.clone()));
    images.remove(&config.image);
    info.images = std::iter::once(config.image.clone())
        .chain(images)
        .collect();
    info.runtimes = shared.runtimes.clone();
    info.classes = shared.routes.served();
}

/// The order a node tries its queues in when it has free slots: a smooth weighted round
/// robin over the priorities picks which goes first ([`Priority::weight`]), the rest follow
/// highest first; classes take turns within a priority.
#[derive(Default)]
pub(crate) struct PullOrder {
    credit: [i64; 3],
    turn: usize,
}

impl PullOrder {
    pub(crate) fn next<'a>(&mut self, queues: &'a [Queue]) -> Vec<&'a Queue> {
        let first = self.pick();
        self.turn = self.turn.wrapping_add(1);
        let mut order: Vec<Priority> = vec![first];
        order.extend(Priority::ALL.into_iter().filter(|p| *p != first));
        let mut out = Vec::with_capacity(queues.len());
        for priority in order {
            let same: Vec<&Queue> = queues.iter().filter(|q| q.priority == priority).collect();
            if same.is_empty() {
                continue;
            }
            let start = self.turn % same.len();
            out.extend(same[start..].iter().chain(&same[..start]));
        }
        out
    }

    fn pick(&mut self) -> Priority {
        let total: i64 = Priority::ALL.iter().map(|p| i64::from(p.weight())).sum();
        for (credit, p) in self.credit.iter_mut().zip(Priority::ALL) {
            *credit += i64::from(p.weight());
        }
        let (best, _) = self
            .credit
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
            .expect("three priorities");
        self.credit[best] -= total;
        Priority::ALL[best]
    }
}

/// How a node spreads `slots` pull credits over its queues while nothing waits: over its
/// normal queues only, one credit each, round and round. A credit in a long pull holds a slot
/// until the pull ends, and high and low jobs are rare enough that slots held for them would
/// sit idle while normal jobs wait; they are found by the next round's fetches instead (within
/// a pull's expiry when the node is idle).
pub(crate) fn spread(queues: &[Queue], slots: usize) -> Vec<(&Queue, usize)> {
    spread_by(queues, |q| q.priority, slots)
        .into_iter()
        .map(|(i, n)| (&queues[i], n))
        .collect()
}

fn spread_by<T>(
    items: &[T],
    priority: impl Fn(&T) -> Priority,
    slots: usize,
) -> Vec<(usize, usize)> {
    let mut normal: Vec<usize> = (0..items.len())
        .filter(|i| priority(&items[*i]) == Priority::Normal)
        .collect();
    if normal.is_empty() {
        // No normal queue (not expected): pull on what there is rather than not at all.
        normal = (0..items.len()).collect();
    }
    if normal.is_empty() {
        return Vec::new();
    }
    let mut credits = vec![0usize; normal.len()];
    for i in 0..slots {
        credits[i % normal.len()] += 1;
    }
    normal
        .into_iter()
        .zip(credits)
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_goes_first_most_often_and_low_still_gets_turns() {
        let mut order = PullOrder::default();
        let picks: Vec<Priority> = (0..100).map(|_| order.pick()).collect();
        let count = |p| picks.iter().filter(|x| **x == p).count();
        assert_eq!(count(Priority::High), 60);
        assert_eq!(count(Priority::Normal), 30);
        assert_eq!(count(Priority::Low), 10);
        // Never more than two picks in a row without high (a high job waits a start or two).
        assert!(picks.windows(3).all(|w| w.contains(&Priority::High)));
        // Low is never starved for long.
        assert!(picks.windows(10).all(|w| w.contains(&Priority::Low)));
    }

    #[test]
    fn waiting_credits_go_to_the_normal_queues_of_each_class() {
        use Priority::{High, Low, Normal};
        let one_class = [High, Normal, Low];
        assert_eq!(spread_by(&one_class, |p| *p, 4), [(1, 4)]);
        let two_classes = [High, High, Normal, Normal, Low, Low];
        assert_eq!(spread_by(&two_classes, |p| *p, 3), [(2, 2), (3, 1)]);
        assert_eq!(spread_by(&[High, Low], |p| *p, 4), [(0, 2), (1, 2)]);
        assert!(spread_by(&[] as &[Priority], |p| *p, 4).is_empty());
    }
}
