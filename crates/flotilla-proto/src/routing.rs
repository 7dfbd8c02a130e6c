//! Where a job may run and how soon: its priority and its class.
//!
//! Jobs that need the same things from a node (engine, image, labels, runtime) share a
//! [`JobClass`], and each class has one queue subject per [`Priority`]. A node pulls only from
//! the queues of the classes it can serve, so it never takes a job it would have to hand back.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{JobRecord, JobRequest, NodeInfo};

/// How soon a job starts relative to others waiting for the same nodes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// Share of starts a priority gets while every priority has work waiting: high jobs go
    /// first most of the time, and low ones still start (no starvation).
    pub fn weight(self) -> u32 {
        match self {
            Priority::High => 6,
            Priority::Normal => 3,
            Priority::Low => 1,
        }
    }

    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /images/prefetch`, as nodes hear it on [`crate::names::SUBJECT_PREFETCH`]: nodes that
/// offer all of `labels` (all nodes when empty) pull `image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prefetch {
    pub image: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Prefetch {
    pub fn is_for(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| node_labels.get(k) == Some(v))
    }
}

/// Whether `text` may be a label's key or value: `^[A-Za-z0-9_.-]{1,64}$`.
pub fn is_valid_label(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What a node must offer to run a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobClass {
    pub engine: String,
    /// `None`: the node's own worker image.
    #[serde(default)]
    pub image: Option<String>,
    /// Node labels the job needs, all of them.
    #[serde(default)]
    pub requires: BTreeMap<String, String>,
    /// A Docker runtime by name (`runsc`); `None`: the node's default.
    #[serde(default)]
    pub runtime: Option<String>,
}

impl JobClass {
    pub fn of(request: &JobRequest) -> Self {
        Self {
            engine: request.engine.clone(),
            image: request.image.clone(),
            requires: request.requires.clone(),
            runtime: request.runtime.clone(),
        }
    }

    pub fn of_record(record: &JobRecord) -> Self {
        Self {
            engine: record.engine.clone(),
            image: record.image.clone(),
            requires: record.requires.clone(),
            runtime: record.runtime.clone(),
        }
    }

    /// A subject token naming the class: the engine alone for a job that needs nothing else
    /// (most jobs, and readable in `nats stream` output), else the engine and a digest of the
    /// rest.
    pub fn id(&self) -> String {
        if self.image.is_none() && self.requires.is_empty() && self.runtime.is_none() {
            return self.engine.clone();
        }
        let mut digest = Sha256::new();
        for part in [self.image.as_deref(), self.runtime.as_deref()] {
            digest.update(part.unwrap_or("").as_bytes());
            digest.update([0]);
        }
        for (key, value) in &self.requires {
            digest.update(format!("{key}={value}\0").as_bytes());
        }
        let digest = hex::encode(digest.finalize());
        format!("{}-{}", self.engine, &digest[..12])
    }

    /// What `node` lacks to run jobs of this class, said as "offers ..." completes it (`gpu=a100`,
    /// `image ghcr.io/acme/x:1`); `None` if it can run them.
    pub fn unmet_by(&self, node: &NodeInfo) -> Option<String> {
        if let Some((key, value)) = self
            .requires
            .iter()
            .find(|(k, v)| node.labels.get(*k) != Some(*v))
        {
            return Some(format!("{key}={value}"));
        }
        if let Some(image) = &self.image
            && !node.images.contains(image)
        {
            return Some(format!("image {image}"));
        }
        if let Some(runtime) = &self.runtime
            && !node.runtimes.contains(runtime)
        {
            return Some(format!("runtime {runtime}"));
        }
        // The engine's binary is checked in the node's own image only.
        if self.image.is_none() && !node.engines.contains(&self.engine) {
            return Some(format!("engine {}", self.engine));
        }
        None
    }

    /// Why no node of `nodes` can run this class (for a pending job's `waiting_for`), or
    /// `None` if one can.
    pub fn waiting_for<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Option<String> {
        let mut first_unmet = None;
        for node in nodes {
            match self.unmet_by(node) {
                None => return None,
                Some(unmet) => {
                    first_unmet.get_or_insert(unmet);
                }
            }
        }
        Some(match first_unmet {
            Some(unmet) => format!("no live node offers {unmet}"),
            None => "no live node".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(requires: &[(&str, &str)]) -> JobClass {
        JobClass {
            engine: "shell".to_owned(),
            image: None,
            requires: requires
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            runtime: None,
        }
    }

    fn node(labels: &[(&str, &str)]) -> NodeInfo {
        let mut node = NodeInfo::example("n1");
        node.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        node
    }

    #[test]
    fn plain_classes_are_named_by_their_engine_and_others_by_a_stable_digest() {
        assert_eq!(class(&[]).id(), "shell");
        let gpu = class(&[("gpu", "a100")]);
        assert_eq!(gpu.id(), class(&[("gpu", "a100")]).id(), "stable");
        assert!(gpu.id().starts_with("shell-") && gpu.id().len() == 18);
        assert_ne!(gpu.id(), class(&[("gpu", "h100")]).id());
    }

    #[test]
    fn a_class_says_what_no_live_node_offers() {
        let gpu = class(&[("gpu", "a100")]);
        let plain = node(&[("region", "eu")]);
        assert_eq!(gpu.unmet_by(&plain).as_deref(), Some("gpu=a100"));
        assert_eq!(
            gpu.waiting_for([&plain]).as_deref(),
            Some("no live node offers gpu=a100")
        );
        assert_eq!(gpu.waiting_for([]).as_deref(), Some("no live node"));
        let big = node(&[("gpu", "a100"), ("region", "eu")]);
        assert_eq!(gpu.waiting_for([&plain, &big]), None);
        let mut lacking = node(&[]);
        lacking.engines.clear();
        assert_eq!(
            class(&[]).unmet_by(&lacking).as_deref(),
            Some("engine shell")
        );
    }

    #[test]
    fn priorities_parse_and_weigh_highest_first() {
        assert_eq!(Priority::parse("high"), Some(Priority::High));
        assert_eq!(Priority::parse("urgent"), None);
        assert!(Priority::High.weight() > Priority::Normal.weight());
        assert!(Priority::Low.weight() > 0, "low jobs must still start");
    }
}
