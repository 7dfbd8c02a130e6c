//! Configuration changes against a real nats-server.

use std::{path::Path, sync::Arc};

use async_nats::jetstream;
use flotilla_config::{ConfigError, LiveCatalog};
use flotilla_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// A server and a catalogue seeded from the shipped engines and profiles.
async fn start() -> (NatsServer, CancellationToken, Arc<LiveCatalog>) {
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let stop = CancellationToken::new();
    let live = LiveCatalog::start(
        &js,
        &root.join("engines"),
        &root.join("profiles"),
        stop.clone(),
    )
    .await
    .unwrap();
    (nats, stop, live)
}

const ENGINE: &str = "engines/short-lived.toml";
const PROFILE: &str = "profiles/uses-short-lived.toml";

/// Two changes that each load alone but not together (drop an engine; add a profile that
/// needs it), made at the same moment: exactly one may land, whichever order they race in.
#[tokio::test]
async fn concurrent_changes_cannot_together_break_the_configuration() {
    let (_nats, stop, live) = start().await;

    for round in 0..20 {
        live.change(ENGINE, Some("[engine]\nkind = \"shell\"\n"))
            .await
            .unwrap();
        let (dropped, added) = tokio::join!(
            live.change(ENGINE, None),
            live.change(PROFILE, Some("[agent]\nengine = \"short-lived\"\n")),
        );
        match (&dropped, &added) {
            (Ok(_), Err(ConfigError::Invalid(_))) | (Err(ConfigError::Invalid(_)), Ok(_)) => {}
            _ => panic!("round {round}: exactly one change may land: {dropped:?} / {added:?}"),
        }
        let files = live.files().await.unwrap();
        assert!(
            files.contains_key(ENGINE) || !files.contains_key(PROFILE),
            "round {round}: a profile names an engine that is gone"
        );
        // Back to the start for the next round.
        if added.is_ok() {
            live.change(PROFILE, None).await.unwrap();
        }
    }
    stop.cancel();
}

/// The first service records its validation limits; one with others refuses to start, saying
/// so, unless told to make its own the fleet's. The record is not a configuration file.
#[tokio::test]
async fn validation_limits_must_agree_across_services() {
    let (_nats, stop, live) = start().await;
    live.check_limits("max_cpus: 4", false).await.unwrap();
    live.check_limits("max_cpus: 4", false).await.unwrap();
    let refused = live.check_limits("max_cpus: 8", false).await.unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("max_cpus: 4") && message.contains("max_cpus: 8"),
        "{message}"
    );
    assert!(
        message.contains("FLOTILLA_TOPOLOGY_UPDATE=true"),
        "{message}"
    );
    live.check_limits("max_cpus: 8", true).await.unwrap();
    live.check_limits("max_cpus: 8", false).await.unwrap();
    assert!(live.check_limits("max_cpus: 4", false).await.is_err());
    let files = live.files().await.unwrap();
    assert!(
        files.keys().all(|k| !k.starts_with('_')),
        "{:?}",
        files.keys()
    );
    stop.cancel();
}
