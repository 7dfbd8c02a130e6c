//! Configuration changes against a real nats-server.

use std::path::Path;

use async_nats::jetstream;
use flotilla_config::{ConfigError, LiveCatalog};
use flotilla_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const ENGINE: &str = "engines/short-lived.toml";
const PROFILE: &str = "profiles/uses-short-lived.toml";

/// Two changes that each load alone but not together (drop an engine; add a profile that
/// needs it), made at the same moment: exactly one may land, whichever order they race in.
#[tokio::test]
async fn concurrent_changes_cannot_together_break_the_configuration() {
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
