//! One configuration everywhere. Engine and profile files live in the `flotilla_config` KV
//! bucket (key = the file's path, value = its text). The first service to start seeds the
//! bucket from its `engines/` and `profiles/` directories; every service then loads its
//! catalogue from the bucket and watches it, so a change made once (through `PUT /configs/...`
//! or any KV client) reaches every gateway, dispatcher and node without a restart. A change
//! that does not load is refused at the API and ignored (with an error log) by watchers, so a
//! bad file never replaces a good catalogue.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    kv::{self, Operation, Store},
};
use flotilla_catalog::{Catalog, CatalogError};
use flotilla_proto::names;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

/// Configuration files by path (`engines/x.toml`, `profiles/y.toml`, `profiles/templates/z`).
pub type Files = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config store unavailable: {0}")]
    Nats(String),
    #[error("cannot read config files: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Invalid(#[from] CatalogError),
    #[error(
        "this service's validation limits differ from the fleet's: the fleet runs with \
         {found}, this service with {wanted}. Give it the same FLOTILLA_DEFAULT_*, \
         FLOTILLA_MAX_JOB_*, FLOTILLA_ALLOW_PRIVATE_WEBHOOKS and FLOTILLA_GIT_ALLOWED_HOSTS as \
         the other services, or start it once with FLOTILLA_TOPOLOGY_UPDATE=true to make its \
         limits the fleet's"
    )]
    LimitsDiffer { found: String, wanted: String },
}

fn nats(e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Nats(e.to_string())
}

/// The catalogue in force, swapped in place when the configuration changes.
pub struct LiveCatalog {
    current: RwLock<Arc<Catalog>>,
    /// KV revision of the newest change applied: every service on the same revision runs the
    /// same configuration.
    version: AtomicU64,
    store: Store,
    js: jetstream::Context,
}

impl LiveCatalog {
    /// Seeds the bucket from the directories if it is empty, loads the catalogue from it and
    /// keeps it current until `stop`.
    pub async fn start(
        js: &jetstream::Context,
        engines_dir: &Path,
        profiles_dir: &Path,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, ConfigError> {
        let store = match js.get_key_value(names::BUCKET_CONFIG).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: names::BUCKET_CONFIG.to_owned(),
                    history: 10,
                    // Engine and profile files are small; bounded like every other bucket.
                    max_bytes: 64 << 20,
                    max_value_size: 1 << 20,
                    ..Default::default()
                })
                .await
                .map_err(nats)?,
        };
        seed_if_empty(&store, engines_dir, profiles_dir).await?;
        let (files, version) = read_all(&store).await?;
        let catalog = build(&files)?;
        let live = Arc::new(Self {
            current: RwLock::new(Arc::new(catalog)),
            version: AtomicU64::new(version),
            store,
            js: js.clone(),
        });
        tokio::spawn(live.clone().follow(version, stop));
        Ok(live)
    }

    pub fn current(&self) -> Arc<Catalog> {
        self.current.read().expect("catalog lock").clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Checks this service's validation limits (`limits`, as text) against the fleet's,
    /// which the first service to start records in the bucket: HTTP and direct submissions
    /// and the nodes' rechecks must judge jobs alike. With `update`, records these instead.
    pub async fn check_limits(&self, limits: &str, update: bool) -> Result<(), ConfigError> {
        let wanted = bytes::Bytes::copy_from_slice(limits.as_bytes());
        for _ in 0..CHANGE_ATTEMPTS {
            let Some(found) = self.store.get(LIMITS).await.map_err(nats)? else {
                match self.store.create(LIMITS, wanted.clone()).await {
                    Ok(_) => return Ok(()),
                    // Another service recorded its limits meanwhile: compare with those.
                    Err(_) => continue,
                }
            };
            if found == wanted {
                return Ok(());
            }
            let found = String::from_utf8_lossy(&found).into_owned();
            if !update {
                return Err(ConfigError::LimitsDiffer {
                    found,
                    wanted: limits.to_owned(),
                });
            }
            tracing::warn!(%found, wanted = limits, "recording this service's validation limits as the fleet's (FLOTILLA_TOPOLOGY_UPDATE)");
            self.store.put(LIMITS, wanted).await.map_err(nats)?;
            return Ok(());
        }
        Err(ConfigError::Nats(
            "cannot record the validation limits".into(),
        ))
    }

    /// Every configuration file.
    pub async fn files(&self) -> Result<Files, ConfigError> {
        Ok(read_all(&self.store).await?.0)
    }

    /// Writes (or with `None`, deletes) one file after checking that the whole configuration
    /// still loads with the change. Returns the new version.
    ///
    /// The write carries the bucket's last sequence as a precondition, so two changes made at
    /// once cannot each pass their check and together break the configuration: the later one
    /// is refused by JetStream and checked again against the files as they now are.
    pub async fn change(&self, path: &str, content: Option<&str>) -> Result<u64, ConfigError> {
        for _ in 0..CHANGE_ATTEMPTS {
            let (mut files, version) = read_all(&self.store).await?;
            match content {
                Some(text) => files.insert(path.to_owned(), text.to_owned()),
                None => files.remove(path),
            };
            build(&files)?;
            match self.write_if_unchanged(path, content, version).await {
                Ok(revision) => {
                    self.reload(revision).await;
                    return Ok(revision);
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    tracing::debug!(path, "configuration changed meanwhile; checking again");
                }
                Err(e) => return Err(nats(e)),
            }
        }
        Err(ConfigError::Nats(format!(
            "the configuration changed {CHANGE_ATTEMPTS} times while this change was being \
             checked; try again"
        )))
    }

    /// Puts (or deletes) `path` unless the bucket moved past `version`; returns the revision.
    async fn write_if_unchanged(
        &self,
        path: &str,
        content: Option<&str>,
        version: u64,
    ) -> Result<u64, jetstream::context::PublishError> {
        // The KV's own subject for the key (no JetStream domain is used, so no API prefix).
        let store = &self.store;
        let subject = format!(
            "{}{path}",
            store.put_prefix.as_ref().unwrap_or(&store.prefix)
        );
        let mut message =
            jetstream::message::PublishMessage::build().expected_last_sequence(version);
        message = match content {
            Some(text) => message.payload(text.to_owned().into()),
            // A KV delete is an empty message marked as such (NATS' own KV header).
            None => message.header("KV-Operation", "DEL"),
        };
        let ack = self.js.send_publish(subject, message).await?.await?;
        Ok(ack.sequence)
    }

    /// Applies every change made in the bucket, from any service, as it happens.
    async fn follow(self: Arc<Self>, from: u64, stop: CancellationToken) {
        let mut next = from + 1;
        loop {
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = self.store.watch_all_from_revision(next) => watch,
            };
            let mut changes = match watch {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the configuration, retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let change = tokio::select! {
                    () = stop.cancelled() => return,
                    change = changes.next() => change,
                };
                match change {
                    Some(Ok(entry)) => {
                        next = entry.revision + 1;
                        self.reload(entry.revision).await;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "configuration watch failed, re-watching");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    async fn reload(&self, revision: u64) {
        if revision <= self.version() {
            return;
        }
        match read_all(&self.store)
            .await
            .and_then(|(files, _)| build(&files))
        {
            Ok(catalog) => {
                *self.current.write().expect("catalog lock") = Arc::new(catalog);
                self.version.fetch_max(revision, Ordering::SeqCst);
                tracing::info!(version = revision, "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(version = revision, error = %e, "new configuration refused; keeping the current one")
            }
        }
    }
}

/// Tries of a change that other changes keep overtaking, before giving up.
const CHANGE_ATTEMPTS: usize = 10;

/// Written after the last seeded file: services that find files but no marker wait for it, so
/// none loads a half-seeded configuration.
const SEEDED: &str = "_seeded";
/// The fleet's validation limits, recorded by the first service ([`LiveCatalog::check_limits`]).
const LIMITS: &str = "_limits";

async fn seed_if_empty(
    store: &Store,
    engines_dir: &Path,
    profiles_dir: &Path,
) -> Result<(), ConfigError> {
    let existing: Vec<String> = store
        .keys()
        .await
        .map_err(nats)?
        .try_collect()
        .await
        .map_err(nats)?;
    if !existing.is_empty() {
        return wait_until_seeded(store).await;
    }
    let mut files = Files::new();
    read_dir_into(engines_dir, "engines", &mut files)?;
    read_dir_into(profiles_dir, "profiles", &mut files)?;
    build(&files)?;
    for (path, text) in &files {
        // `create`: if another service seeds at the same moment, the first write wins.
        if let Err(e) = store.create(path, text.clone().into()).await
            && e.kind() != kv::CreateErrorKind::AlreadyExists
        {
            return Err(nats(e));
        }
    }
    if let Err(e) = store.create(SEEDED, "1".into()).await
        && e.kind() != kv::CreateErrorKind::AlreadyExists
    {
        return Err(nats(e));
    }
    tracing::info!(files = files.len(), "configuration seeded from disk");
    Ok(())
}

async fn wait_until_seeded(store: &Store) -> Result<(), ConfigError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if store.get(SEEDED).await.map_err(nats)?.is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ConfigError::Nats(
                "the configuration is still being seeded after 30 s".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_dir_into(dir: &Path, prefix: &str, files: &mut Files) -> Result<(), ConfigError> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = format!("{prefix}/{name}");
        if entry.file_type()?.is_dir() {
            read_dir_into(&entry.path(), &path, files)?;
        } else {
            files.insert(path, std::fs::read_to_string(entry.path())?);
        }
    }
    Ok(())
}

/// Every file, and the bucket's last revision taken *before* reading them: every change up to
/// it is included, and any later one reaches the watcher (which starts after it).
async fn read_all(store: &Store) -> Result<(Files, u64), ConfigError> {
    // `Store::status` answers from a copy cached when the store was opened: ask the server.
    let version = store
        .stream
        .get_info()
        .await
        .map_err(nats)?
        .state
        .last_sequence;
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(nats)?
        .try_collect()
        .await
        .map_err(nats)?;
    let mut files = Files::new();
    for key in keys
        .into_iter()
        .filter(|key| key != SEEDED && key != LIMITS)
    {
        if let Some(entry) = store.entry(key.clone()).await.map_err(nats)?
            && entry.operation == Operation::Put
        {
            files.insert(key, String::from_utf8_lossy(&entry.value).into_owned());
        }
    }
    Ok((files, version))
}

/// Loads a catalogue from files by writing them to a private directory: the disk loader and
/// its checks (template files, path rules) stay the one implementation.
fn build(files: &Files) -> Result<Catalog, ConfigError> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("engines"))?;
    std::fs::create_dir_all(dir.path().join("profiles"))?;
    for (path, text) in files {
        let safe = path
            .split('/')
            .all(|part| !part.is_empty() && part != ".." && part != ".");
        if !safe {
            continue;
        }
        let target = dir.path().join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, text)?;
    }
    Ok(Catalog::load(
        &dir.path().join("engines"),
        &dir.path().join("profiles"),
    )?)
}
