//! NATS plumbing shared by the services: connecting (credentials, TLS), creating the JetStream topology
//! idempotently, the job store (KV with compare-and-set) and queueing jobs.
//!
//! Names come from `flotilla_proto::names`; this crate only decides how they are configured.

mod drift;
mod grants;
mod lease;
mod nodes;
mod options;
mod queues;
mod schedules;
mod store;
mod submit;
mod topology;

use std::time::Duration;

pub use drift::{Difference, Drift};
pub use grants::GrantStore;
pub use lease::Lease;
pub use nodes::{Heartbeat, NodeDirectory};
pub use options::{
    ClientCertificate, ENV_CREDS, ENV_NKEY_FILE, ENV_PASSWORD, ENV_PASSWORD_FILE, ENV_TLS_CA,
    ENV_TLS_CERT, ENV_TLS_KEY, ENV_TLS_REQUIRED, ENV_TOKEN, ENV_TOKEN_FILE, ENV_USER, NatsArgs,
    NatsAuth, NatsOptions, NatsOptionsError, NatsTls, Secret,
};
pub use queues::{ClassEvent, RegisteredClass, RunQueues};
pub use schedules::{ScheduleEvent, ScheduleStore, VersionedSchedule};
pub use store::{Applied, ApplyError, BoxError, JobStore, StoreError, Versioned, WatchEvent};
pub use submit::{SubmitError, Submitted, submit};
pub use topology::{LEADER_LEASE, Topology, TopologyArgs, TopologyConfig, TopologyError};

use async_nats::{ConnectErrorKind, jetstream};
use bytes::Bytes;
use flotilla_proto::{JobClass, JobRequest, names};

/// Why [`connect`] gave up. Only failures that retrying cannot fix end it: an unreachable
/// server is waited for.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "NATS at {url} refused {auth}: {}. Check the credentials against the server's \
         authorization settings",
        source.kind()
    )]
    Refused {
        url: String,
        /// What was offered, never the secret itself.
        auth: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "TLS with NATS at {url} failed: {source}. Check {ENV_TLS_CA} (the CA that signed the \
         server's certificate), {ENV_TLS_CERT} and {ENV_TLS_KEY} (when the server verifies \
         clients) and {ENV_TLS_REQUIRED}"
    )]
    Tls {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot connect to NATS at {url}: {source}")]
    Other {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot use the NATS credentials: {0}")]
    Credentials(std::io::Error),
    #[error(
        "bad NATS URL {url}: {source}. Give one URL or several separated by commas, \
         e.g. nats://n1:4222,nats://n2:4222,nats://n3:4222"
    )]
    BadUrl { url: String, source: std::io::Error },
}

/// The servers of `url`: one URL, or several separated by commas (the servers of a cluster;
/// the client picks one and fails over to the others).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    url.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse().map_err(|source| ConnectError::BadUrl {
                url: redact_url(part),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|addrs| {
            if addrs.is_empty() {
                Err(ConnectError::BadUrl {
                    url: String::new(),
                    source: std::io::Error::other("no server given"),
                })
            } else {
                Ok(addrs)
            }
        })
}

/// Connects with the settings every service wants, and `options` (credentials, TLS).
///
/// Waits for the server while it is unreachable (NATS may start after us), but fails at once
/// when it refuses the credentials or the TLS handshake fails: retrying would never help, and
/// a service that kept trying would look alive while doing nothing. Once connected, the client
/// reconnects forever; a refusal then (credentials revoked, say) is logged at error level on
/// every attempt. Replies come to the service's own inbox prefix
/// (`flotilla_proto::names::inbox_prefix` of the name's first word).
pub async fn connect(
    url: &str,
    name: &str,
    options: &NatsOptions,
) -> Result<async_nats::Client, ConnectError> {
    let addrs = server_addrs(url)?;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let error = match connect_options(name, options)?.connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(error) => error,
        };
        // Credentials can be part of the URL; no message shows them.
        let redacted = redact_url(url);
        let in_url = redacted != url;
        let url = redacted;
        match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                let auth = match options.auth {
                    NatsAuth::None if in_url => "the credentials in the URL".to_owned(),
                    _ => options.auth.describe(),
                };
                return Err(ConnectError::Refused {
                    url,
                    auth,
                    source: error,
                });
            }
            _ if is_tls_failure(&error) => return Err(ConnectError::Tls { url, source: error }),
            ConnectErrorKind::Tls => return Err(ConnectError::Tls { url, source: error }),
            ConnectErrorKind::ServerParse => {
                return Err(ConnectError::Other { url, source: error });
            }
            _ => {
                tracing::warn!(service = %name, %url, attempt, %error, "waiting for NATS");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn connect_options(
    name: &str,
    options: &NatsOptions,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let name_for_events = name.to_owned();
    // The service is the client name's first word ("agent-node <node id>").
    let service = name.split(' ').next().unwrap_or(name);
    let mut connect = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(names::inbox_prefix(service))
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // A server cut off from us (or from its cluster) is left after two missed pings,
        // about 3 s, for another of the URLs; the default (a minute) left a service hanging.
        .ping_interval(Duration::from_secs(1))
        .event_callback(move |event| {
            let service = name_for_events.clone();
            async move { log_event(&service, event) }
        });
    connect = match &options.auth {
        NatsAuth::None => connect,
        NatsAuth::Credentials { content, .. } => connect
            .credentials(content.expose())
            .map_err(ConnectError::Credentials)?,
        NatsAuth::NKey { seed, .. } => connect.nkey(seed.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            connect.user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::Token(token) => connect.token(token.expose().to_owned()),
    };
    if let Some(ca) = &options.tls.ca {
        connect = connect.add_root_certificates(ca.clone());
    }
    if let Some(client) = &options.tls.client {
        connect = connect.add_client_certificate(client.cert.clone(), client.key.clone());
    }
    Ok(connect.require_tls(options.tls.required))
}

/// A handshake rustls rejected (unknown issuer, wrong name, no client certificate...).
/// async-nats reports most of these as I/O errors, with the rustls error inside.
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(current) = source {
        if current.is::<async_nats::rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps: look inside explicitly.
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        source = current.source();
    }
    false
}

fn log_event(service: &str, event: async_nats::Event) {
    match event {
        async_nats::Event::Disconnected => tracing::warn!(%service, "nats disconnected"),
        async_nats::Event::Connected => tracing::info!(%service, "nats connected"),
        // The server refused this client's credentials or a subject it is not allowed to use:
        // an operator must act, so say it loudly.
        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
            tracing::error!(
                %service,
                "nats refused this service's credentials (authorization violation)"
            )
        }
        async_nats::Event::ServerError(error) if is_permissions_violation(&error) => {
            tracing::error!(%service, %error, "nats refused an operation: permissions violation");
        }
        async_nats::Event::ServerError(error) => {
            tracing::warn!(%service, %error, "nats server error");
        }
        async_nats::Event::ClientError(error) if is_refusal(&error) => {
            tracing::error!(
                %service,
                %error,
                "nats refused this service's credentials while reconnecting"
            );
        }
        other => tracing::debug!(%service, %other, "nats event"),
    }
}

/// A subject this user may not publish or subscribe to (nats-server's `-ERR 'Permissions
/// Violation for ...'`).
fn is_permissions_violation(error: &async_nats::ServerError) -> bool {
    error
        .to_string()
        .to_lowercase()
        .contains("permissions violation")
}

/// A refused connect in async-nats' reconnect loop, which reports it as the text of its
/// `ConnectErrorKind`.
fn is_refusal(error: &async_nats::ClientError) -> bool {
    let message = error.to_string();
    [
        ConnectErrorKind::AuthorizationViolation,
        ConnectErrorKind::Authentication,
    ]
    .iter()
    .any(|kind| message.contains(&kind.to_string()))
}

/// How long to wait before a message's next delivery after `delivered` failed ones: 1 s,
/// doubling each time, at most 32 s. Both the intake and the nodes NAK with it.
pub fn redelivery_delay(delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.clamp(1, 6) - 1).unwrap_or(0);
    Duration::from_secs(1 << exponent)
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot encode job: {0}")]
    Encode(#[from] flotilla_proto::CodecError),
    #[error("cannot make the job's queue: {0}")]
    Queues(#[from] TopologyError),
    #[error("job queue refused the job: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// Puts a validated job on its class's run queue at its priority and waits until JetStream
/// has stored it. Publishing the same job twice within the dedupe window stores it once.
/// `headers` travel with the message (the submitter's trace context, possibly none); the
/// job-id header is added here.
pub async fn enqueue(
    topology: &Topology,
    request: &JobRequest,
    mut headers: async_nats::HeaderMap,
) -> Result<(), QueueError> {
    let class = topology.queues.ensure(&JobClass::of(request)).await?;
    let payload: Bytes = flotilla_proto::encode(request)?;
    headers.insert(names::HEADER_JOB_ID, request.job_id.as_str());
    let message = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(names::run_msg_id(&request.job_id));
    let subject = names::run_subject(request.priority, &class);
    topology.js.send_publish(subject, message).await?.await?;
    Ok(())
}

/// Keeps a copy of a job message the fleet gave up on, with the reason, on the dead-letter
/// stream. Never redelivered; inspect it with any JetStream client.
pub async fn dead_letter(
    js: &jetstream::Context,
    job_id: &str,
    payload: Bytes,
    reason: &str,
) -> Result<(), jetstream::context::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_JOB_ID, job_id);
    headers.insert(names::HEADER_REJECT_REASON, header_safe(reason).as_str());
    js.publish_with_headers(names::dead_subject(job_id), headers, payload)
        .await?
        .await?;
    Ok(())
}

/// `url` (or a comma-separated list of them) with every `user:password@` or `token@` part
/// replaced by `***@`, for logs and error messages: credentials may be given in the URL.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// Header values hold one line: control characters become spaces, and the length is bounded.
pub fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

#[cfg(test)]
mod tests {
    use async_nats::{ClientError, ServerError};

    use super::*;

    #[test]
    fn redelivery_delay_grows_and_caps() {
        let delays: Vec<u64> = [1, 2, 3, 6, 7, 1000, 0]
            .into_iter()
            .map(|n| redelivery_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 32, 32, 32, 1]);
    }

    #[test]
    fn refusals_while_reconnecting_are_recognised() {
        // What async-nats' connector sends when a reconnect is refused.
        for kind in [
            ConnectErrorKind::AuthorizationViolation,
            ConnectErrorKind::Authentication,
        ] {
            assert!(is_refusal(&ClientError::Other(kind.to_string())), "{kind}");
        }
        for kind in [ConnectErrorKind::Io, ConnectErrorKind::TimedOut] {
            assert!(!is_refusal(&ClientError::Other(kind.to_string())), "{kind}");
        }
        assert!(!is_refusal(&ClientError::MaxReconnects));
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        let cases = [
            (
                "nats://alice:s3cret@nats.example:4222",
                "nats://***@nats.example:4222",
            ),
            // A lone user part is a token to NATS: secret too.
            ("tls://t0ken@nats.example", "tls://***@nats.example"),
            ("alice:s3cret@10.0.0.1:4222", "***@10.0.0.1:4222"),
            (
                "nats://a:b@one:4222,nats://two:4222, nats://c:d@three",
                "nats://***@one:4222,nats://two:4222, nats://***@three",
            ),
            // The password may hold an '@' itself: everything before the last one goes.
            ("nats://u:p@ss@host", "nats://***@host"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("ws://host:8080/path@x", "ws://host:8080/path@x"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[tokio::test]
    async fn connect_errors_never_show_the_url_s_credentials() {
        let nats = flotilla_testkit::NatsServer::builder()
            .user_password("flotilla", "correct-horse")
            .start()
            .await
            .unwrap();
        let url = format!("nats://flotilla:wrong-battery@127.0.0.1:{}", nats.port());
        let error = connect(&url, "test", &NatsOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(error, ConnectError::Refused { .. }), "{error:?}");
        let message = error.to_string();
        assert!(!message.contains("wrong-battery"), "{message}");
        assert!(!message.contains("flotilla:"), "{message}");
        let redacted = format!(
            "nats://***@127.0.0.1:{} refused the credentials in the URL",
            nats.port()
        );
        assert!(message.contains(&redacted), "{message}");
    }

    #[test]
    fn permissions_violations_are_recognised() {
        let violation =
            ServerError::Other("Permissions Violation for Publish to \"flotilla.jobs.run\"".into());
        assert!(is_permissions_violation(&violation));
        assert!(!is_permissions_violation(&ServerError::Other(
            "Maximum Payload Violation".into()
        )));
    }
}
