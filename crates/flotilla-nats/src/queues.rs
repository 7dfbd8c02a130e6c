//! The run queues: one subject and one durable pull consumer per priority and job class, in
//! the one stream [`names::STREAM_JOBS`].
//!
//! A class's queues are made the first time a job of that class is queued (by whichever
//! service queues it), and the class is then put in [`names::BUCKET_CLASSES`]. Nodes follow
//! that bucket and pull only from the queues of the classes they can run.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{
    consumer::{self, PullConsumer},
    kv::{self, Operation},
    stream,
};
use flotilla_proto::{Encoding, JobClass, Priority, names};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::topology::{TopologyError, ensure_consumer};

/// A class as the registry holds it, with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredClass {
    pub id: String,
    pub class: JobClass,
}

/// A change seen by [`RunQueues::follow`].
#[derive(Debug)]
pub enum ClassEvent {
    Put(RegisteredClass),
    /// The watch starts over (after a NATS interruption): every class is put again.
    Restart,
}

#[derive(Clone)]
pub struct RunQueues {
    stream: stream::Stream,
    classes: kv::Store,
    /// Every queue's consumer settings; the name and filter are filled in per queue.
    template: consumer::pull::Config,
    update: bool,
    /// Classes whose queues this process has made sure of.
    ensured: Arc<Mutex<HashSet<String>>>,
}

impl RunQueues {
    pub(crate) fn new(
        stream: stream::Stream,
        classes: kv::Store,
        template: consumer::pull::Config,
        update: bool,
    ) -> Self {
        Self {
            stream,
            classes,
            template,
            update,
            ensured: Arc::default(),
        }
    }

    /// Makes sure `class` has its queues and is registered; once per class per process.
    /// Returns the class id.
    pub async fn ensure(&self, class: &JobClass) -> Result<String, TopologyError> {
        let id = class.id();
        if self.ensured.lock().expect("ensured lock").contains(&id) {
            return Ok(id);
        }
        for priority in Priority::ALL {
            self.consumer_for(priority, &id).await?;
        }
        // After the consumers: a node that sees the class finds its queues.
        let registry_error = |source: crate::BoxError| TopologyError::Inspect {
            name: format!("job class {id} in {}", names::BUCKET_CLASSES),
            source,
        };
        let value = flotilla_proto::encode(class).map_err(|e| registry_error(Box::new(e)))?;
        match self.classes.create(names::class_key(&id), value).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(registry_error(Box::new(e))),
        }
        self.ensured
            .lock()
            .expect("ensured lock")
            .insert(id.clone());
        Ok(id)
    }

    /// The queue of `class` at `priority` (made if missing).
    pub async fn consumer_for(
        &self,
        priority: Priority,
        class: &str,
    ) -> Result<PullConsumer, TopologyError> {
        let config = consumer::pull::Config {
            durable_name: Some(names::run_consumer(priority, class)),
            filter_subject: names::run_subject(priority, class),
            ..self.template.clone()
        };
        ensure_consumer(&self.stream, config, self.update).await
    }

    /// Feeds `apply` every registered class, then every new one, until `stop`.
    pub async fn follow(&self, stop: CancellationToken, mut apply: impl FnMut(ClassEvent)) {
        loop {
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = self.classes.watch_with_history(">") => watch,
            };
            let mut events = match watch {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch job classes, retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            apply(ClassEvent::Restart);
            loop {
                let entry = tokio::select! {
                    () = stop.cancelled() => return,
                    entry = events.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) if entry.operation == Operation::Put => {
                        if let Some(class) = decode_class(&entry) {
                            apply(ClassEvent::Put(class));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "job class watch failed, re-watching");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}

fn decode_class(entry: &kv::Entry) -> Option<RegisteredClass> {
    let id = entry.key.strip_prefix(&names::class_key(""))?.to_owned();
    match flotilla_proto::decode::<JobClass>(&entry.value, Encoding::MessagePack) {
        Ok(class) => Some(RegisteredClass { id, class }),
        Err(e) => {
            tracing::warn!(key = entry.key, error = %e, "undecodable job class");
            None
        }
    }
}
