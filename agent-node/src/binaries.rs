//! Which engine binaries the worker image really has. A node lists an engine in its heartbeat
//! (and so `GET /engines` calls it available) only once a probe container found the engine's
//! binary on the image's PATH. Binaries of engines added at runtime are probed as they appear.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use crate::{
    Shared,
    runtime::{ContainerSpec, Role, RuntimeError},
};

#[derive(Default)]
pub(crate) struct Binaries {
    /// Binary → found in the image.
    found: Mutex<HashMap<String, bool>>,
    probing: Mutex<HashSet<String>>,
}

impl Binaries {
    /// `Some(true)` when the image has it, `None` while unknown.
    pub(crate) fn has(&self, binary: &str) -> Option<bool> {
        self.found.lock().expect("binaries").get(binary).copied()
    }

    /// Binaries in `wanted` that are neither known nor being probed (and marks them probing).
    fn claim(&self, wanted: impl IntoIterator<Item = String>) -> Vec<String> {
        let found = self.found.lock().expect("binaries");
        let mut probing = self.probing.lock().expect("binaries");
        wanted
            .into_iter()
            .filter(|b| !found.contains_key(b) && probing.insert(b.clone()))
            .collect()
    }
}

/// Probes every binary the catalogue names that is not known yet. A probe that fails (runtime
/// trouble) leaves them unknown, to be tried again at the next call.
pub(crate) async fn probe_new(shared: &Shared, key: &ContainerSpec) {
    let wanted: Vec<String> = shared
        .catalog
        .current()
        .engines()
        .map(|e| e.binary.clone())
        .collect();
    let batch = shared.binaries.claim(wanted);
    if batch.is_empty() {
        return;
    }
    let result = run_probe(shared, key, &batch).await;
    let mut found = shared.binaries.found.lock().expect("binaries");
    match result {
        Ok(present) => {
            for binary in &batch {
                let here = present.contains(binary);
                if !here {
                    tracing::warn!(%binary, image = %key.image, "engine binary not in the worker image: its engine is not offered by this node");
                }
                found.insert(binary.clone(), here);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot probe the worker image for engine binaries"),
    }
    let mut probing = shared.binaries.probing.lock().expect("binaries");
    for binary in &batch {
        probing.remove(binary);
    }
}

/// Asks the runtime which of `binaries` the image of `key` has, in a container of its own.
async fn run_probe(
    shared: &Shared,
    key: &ContainerSpec,
    binaries: &[String],
) -> Result<HashSet<String>, RuntimeError> {
    let name = format!(
        "flotilla-probe-{}-{}",
        shared.config.node_id,
        uuid::Uuid::new_v4().simple()
    );
    let owner = shared.pool.owner(Role::Cold, None);
    shared
        .runtime
        .find_binaries(key, &name, &owner, binaries)
        .await
}
