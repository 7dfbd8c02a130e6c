//! `flotilla_nats::connect` against a real nats-server that requires credentials or TLS: the
//! right settings connect and JetStream works; wrong ones fail at once with an error naming
//! what to fix, instead of retrying forever.

use std::time::Duration;

use flotilla_nats::{
    ClientCertificate, ConnectError, NatsArgs, NatsAuth, NatsOptions, NatsTls, Secret, Topology,
    TopologyConfig,
};
use flotilla_testkit::{NatsServer, free_port};

/// Long enough for a connect on a loaded machine, far shorter than "forever".
const GIVE_UP: Duration = Duration::from_secs(15);

fn user(user: &str, password: &str) -> NatsOptions {
    NatsOptions {
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: Secret::new(password),
        },
        ..Default::default()
    }
}

async fn connect(
    nats: &NatsServer,
    options: &NatsOptions,
) -> Result<async_nats::Client, ConnectError> {
    tokio::time::timeout(
        GIVE_UP,
        flotilla_nats::connect(&nats.url(), "test", options),
    )
    .await
    .expect("connect must succeed or fail, not wait, when the server answers")
}

/// JetStream works on this connection: the whole topology can be created.
async fn assert_jetstream_works(client: async_nats::Client) {
    // In memory, the default limits add up to more than the server may reserve.
    let config = TopologyConfig {
        storage: async_nats::jetstream::stream::StorageType::Memory,
        log_max_bytes: 64 << 20,
        artifacts_max_bytes: 64 << 20,
        ..Default::default()
    };
    let topology = Topology::ensure(client, config).await.unwrap();
    // A KV write goes through JetStream and waits for its acknowledgement.
    topology.nodes.put("probe", "up".into()).await.unwrap();
    let entry = topology.nodes.get("probe").await.unwrap();
    assert_eq!(entry.as_deref(), Some(&b"up"[..]));
}

#[tokio::test]
async fn the_right_password_connects_and_jetstream_works() {
    let nats = NatsServer::builder()
        .user_password("flotilla", "correct-horse")
        .start()
        .await
        .unwrap();
    let client = connect(&nats, &user("flotilla", "correct-horse"))
        .await
        .unwrap();
    assert_jetstream_works(client).await;
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_with_a_clear_error() {
    let nats = NatsServer::builder()
        .user_password("flotilla", "correct-horse")
        .start()
        .await
        .unwrap();
    let error = connect(&nats, &user("flotilla", "wrong-battery"))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, ConnectError::Refused { source, .. }
            if source.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "{error:?}"
    );
    assert!(message.contains("refused"), "{message}");
    assert!(message.contains("FLOTILLA_NATS_USER"), "{message}");
    assert!(message.contains(&nats.url()), "{message}");
    assert!(
        !message.contains("wrong-battery"),
        "the password leaked: {message}"
    );
}

#[tokio::test]
async fn no_credentials_fail_at_once_and_say_which_to_set() {
    let nats = NatsServer::builder()
        .user_password("flotilla", "correct-horse")
        .start()
        .await
        .unwrap();
    let error = connect(&nats, &NatsOptions::default()).await.unwrap_err();
    assert!(matches!(error, ConnectError::Refused { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("no credentials"), "{message}");
    assert!(message.contains("FLOTILLA_NATS_CREDS"), "{message}");
}

#[tokio::test]
async fn a_token_connects_and_a_wrong_one_is_refused() {
    let nats = NatsServer::builder()
        .token("s3cret-token")
        .start()
        .await
        .unwrap();
    let right = NatsOptions {
        auth: NatsAuth::Token(Secret::new("s3cret-token")),
        ..Default::default()
    };
    assert_jetstream_works(connect(&nats, &right).await.unwrap()).await;
    let wrong = NatsOptions {
        auth: NatsAuth::Token(Secret::new("guessed")),
        ..Default::default()
    };
    let error = connect(&nats, &wrong).await.unwrap_err();
    assert!(matches!(error, ConnectError::Refused { .. }), "{error:?}");
    assert!(error.to_string().contains("FLOTILLA_NATS_TOKEN"), "{error}");
}

#[tokio::test]
async fn an_nkey_seed_connects() {
    let pair = nkeys::KeyPair::new_user();
    let nats = NatsServer::builder()
        .config(&format!(
            "authorization {{ users = [ {{ nkey: {:?} }} ] }}",
            pair.public_key()
        ))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed");
    std::fs::write(&seed, format!("{}\n", pair.seed().unwrap())).unwrap();
    let options = NatsArgs {
        nkey_file: Some(seed),
        ..Default::default()
    }
    .into_options_with_env(|_| None)
    .unwrap();
    assert_jetstream_works(connect(&nats, &options).await.unwrap()).await;

    // Another key is refused.
    let other = NatsOptions {
        auth: NatsAuth::NKey {
            path: "other".into(),
            seed: Secret::new(nkeys::KeyPair::new_user().seed().unwrap()),
        },
        ..Default::default()
    };
    let error = connect(&nats, &other).await.unwrap_err();
    assert!(matches!(error, ConnectError::Refused { .. }), "{error:?}");
    assert!(
        error.to_string().contains("FLOTILLA_NATS_NKEY_FILE"),
        "{error}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_waited_for() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let connecting =
        tokio::spawn(
            async move { flotilla_nats::connect(&url, "test", &NatsOptions::default()).await },
        );
    // Nothing listens yet: the connect keeps trying instead of failing.
    let nats = NatsServer::builder().port(port).start().await.unwrap();
    let client = tokio::time::timeout(GIVE_UP, connecting)
        .await
        .expect("connected once the server started")
        .unwrap()
        .unwrap();
    assert_jetstream_works(client).await;
    drop(nats);
}

fn tls(nats: &NatsServer, client_certificate: bool) -> NatsTls {
    let files = nats.tls_files().unwrap();
    NatsTls {
        ca: Some(files.ca.clone()),
        client: client_certificate.then(|| ClientCertificate {
            cert: files.client_cert.clone(),
            key: files.client_key.clone(),
        }),
        required: true,
    }
}

#[tokio::test]
async fn tls_with_the_servers_ca_connects_and_jetstream_works() {
    let nats = NatsServer::builder()
        .tls()
        .user_password("flotilla", "correct-horse")
        .start()
        .await
        .unwrap();
    let options = NatsOptions {
        tls: tls(&nats, false),
        ..user("flotilla", "correct-horse")
    };
    let client = connect(&nats, &options).await.unwrap();
    assert_jetstream_works(client).await;
}

#[tokio::test]
async fn tls_without_the_servers_ca_fails_at_once() {
    let nats = NatsServer::builder().tls().start().await.unwrap();
    // The system roots do not know the test CA.
    let error = connect(&nats, &NatsOptions::default()).await.unwrap_err();
    assert!(matches!(error, ConnectError::Tls { .. }), "{error:?}");
    assert!(
        error.to_string().contains("FLOTILLA_NATS_TLS_CA"),
        "{error}"
    );
}

#[tokio::test]
async fn a_server_that_verifies_clients_needs_the_client_certificate() {
    let nats = NatsServer::builder()
        .verify_clients()
        .start()
        .await
        .unwrap();
    let with_certificate = NatsOptions {
        tls: tls(&nats, true),
        ..Default::default()
    };
    assert_jetstream_works(connect(&nats, &with_certificate).await.unwrap()).await;

    let without = NatsOptions {
        tls: tls(&nats, false),
        ..Default::default()
    };
    let error = connect(&nats, &without).await.unwrap_err();
    assert!(matches!(error, ConnectError::Tls { .. }), "{error:?}");
}

#[tokio::test]
async fn requiring_tls_from_a_plain_server_fails_at_once() {
    let nats = NatsServer::start().await.unwrap();
    let options = NatsOptions {
        tls: NatsTls {
            required: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let error = connect(&nats, &options).await.unwrap_err();
    assert!(matches!(error, ConnectError::Tls { .. }), "{error:?}");
}

#[tokio::test]
async fn a_ca_or_a_client_certificate_implies_tls() {
    let nats = NatsServer::builder()
        .verify_clients()
        .start()
        .await
        .unwrap();
    let files = nats.tls_files().unwrap();
    let options = NatsArgs {
        tls_ca: Some(files.ca.clone()),
        ..Default::default()
    }
    .into_options_with_env(|_| None)
    .unwrap();
    assert!(options.tls.required);
    let options = NatsArgs {
        tls_cert: Some(files.client_cert.clone()),
        tls_key: Some(files.client_key.clone()),
        ..Default::default()
    }
    .into_options_with_env(|_| None)
    .unwrap();
    assert!(options.tls.required);
    assert!(options.tls.ca.is_none());
}
