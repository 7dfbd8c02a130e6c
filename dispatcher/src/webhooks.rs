//! Webhooks: once a job with a `webhook_url` ends, the leader POSTs its record there. The URL
//! is checked again just before each attempt (a name may have been re-pointed at a private
//! address since submission), and the attempt connects to the addresses that check resolved,
//! never to a second DNS answer (a name with TTL 0 may answer public, then private: DNS
//! rebinding). The URL still names the receiver (Host header, TLS SNI). Delivery is at least once: each attempt is claimed in the job
//! record first (`webhook.next_at` doubles as a lease), then its result is recorded; failures
//! are retried with a growing delay up to `WebhookDelivery::MAX_ATTEMPTS`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{Request, header};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use flotilla_nats::Topology;
use flotilla_proto::{JobRecord, WebhookDelivery, names};
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Signs every webhook (`Flotilla-Signature`) when set.
    pub secret: Option<String>,
    /// Lets webhooks target private addresses; for tests only.
    pub allow_private: bool,
    /// How long a receiver may take to answer.
    pub timeout: Duration,
}

/// When the job's webhook is due, if it is.
pub(crate) fn due(record: &JobRecord) -> Option<DateTime<Utc>> {
    if !record.status.is_terminal() || record.webhook_url.is_none() {
        return None;
    }
    match &record.webhook {
        None => Some(record.finished_at.unwrap_or(record.created_at)),
        Some(w) if w.delivered_at.is_some() => None,
        Some(w) => w.next_at,
    }
}

/// Delay before attempt `attempts + 1`: 2 s, 4 s, 8 s, 16 s.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(2u64 << attempts.saturating_sub(1).min(10))
}

enum Outcome {
    Answered(u16),
    /// Worth another attempt (connection failure, timeout).
    Failed(String),
    /// Not worth another attempt (the URL is no longer allowed).
    Refused(String),
}

pub(crate) struct Webhooks {
    topology: Topology,
    /// Fences each attempt: a replica that lost the lead sends nothing.
    lease: Arc<flotilla_nats::Lease>,
    sender: Sender,
    /// Jobs whose webhook is pending, with when it is due; kept from the job watch, so the
    /// leader's tick looks at these only, not at every job.
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
    in_flight: Mutex<HashSet<String>>,
}

impl Webhooks {
    pub(crate) fn new(
        topology: Topology,
        lease: Arc<flotilla_nats::Lease>,
        config: WebhookConfig,
    ) -> Result<Arc<Self>, std::io::Error> {
        Ok(Arc::new(Self {
            topology,
            lease,
            sender: Sender::new(config, Arc::new(flotilla_catalog::SystemResolver))?,
            pending: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
        }))
    }

    /// Records when `job_id`'s webhook is due (`None`: nothing to send).
    pub(crate) fn track(&self, job_id: &str, due: Option<DateTime<Utc>>) {
        let mut pending = self.pending.lock().expect("pending webhooks");
        match due {
            Some(at) => pending.insert(job_id.to_owned(), at),
            None => pending.remove(job_id),
        };
    }

    /// Starts an attempt for each webhook due by `now` and not already being delivered.
    pub(crate) fn start_due(self: &Arc<Self>, now: DateTime<Utc>) {
        let due: Vec<String> = self
            .pending
            .lock()
            .expect("pending webhooks")
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for job_id in due {
            if !self
                .in_flight
                .lock()
                .expect("in flight")
                .insert(job_id.clone())
            {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                this.attempt(&job_id).await;
                this.in_flight.lock().expect("in flight").remove(&job_id);
            });
        }
    }

    async fn attempt(&self, job_id: &str) {
        let now = Utc::now();
        let mut claimed = false;
        let record = self
            .topology
            .jobs
            .modify(job_id, |record| {
                if due(record).is_none_or(|at| at > now) {
                    return Ok::<bool, ()>(false);
                }
                let w = record.webhook.get_or_insert_with(WebhookDelivery::default);
                w.attempts += 1;
                // Also the lease: another leader retries only after this.
                w.next_at = Some(now + backoff(w.attempts));
                claimed = true;
                Ok(true)
            })
            .await;
        let record = match record {
            Ok(Some(Ok(versioned))) if claimed => versioned.record,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "cannot claim webhook attempt");
                return;
            }
        };
        let attempt = record.webhook.as_ref().map_or(1, |w| w.attempts);
        // After the claim: the attempt is counted, and the new leader retries it later.
        if !self.lease.confirm().await {
            tracing::info!(job_id, "no longer leading: webhook left to the new leader");
            return;
        }
        let outcome = self.sender.post(&record, attempt).await;
        let result = self
            .topology
            .jobs
            .modify(job_id, |r| {
                let w = r.webhook.get_or_insert_with(WebhookDelivery::default);
                match &outcome {
                    Outcome::Answered(code) if (200..300).contains(code) => {
                        w.delivered_at = Some(Utc::now());
                        w.status_code = Some(*code);
                        w.last_error = None;
                        w.next_at = None;
                    }
                    Outcome::Answered(code) => {
                        w.status_code = Some(*code);
                        w.last_error = Some(format!("the receiver answered {code}"));
                        // A client error other than timeout/rate limit will not get better.
                        if (400..500).contains(code) && *code != 408 && *code != 429 {
                            w.next_at = None;
                        }
                    }
                    Outcome::Failed(e) => w.last_error = Some(e.clone()),
                    Outcome::Refused(e) => {
                        w.last_error = Some(e.clone());
                        w.next_at = None;
                    }
                }
                if w.delivered_at.is_none() && w.attempts >= WebhookDelivery::MAX_ATTEMPTS {
                    w.next_at = None;
                }
                Ok::<bool, ()>(true)
            })
            .await;
        match (&outcome, result) {
            (_, Err(e)) => tracing::warn!(job_id, error = %e, "cannot record webhook attempt"),
            (Outcome::Answered(code), _) => {
                tracing::info!(job_id, attempt, code, "webhook answered")
            }
            (Outcome::Failed(e) | Outcome::Refused(e), _) => {
                tracing::warn!(job_id, attempt, error = %e, "webhook failed")
            }
        }
    }
}

/// Sends webhooks: checks each URL, then connects only where the check said.
struct Sender {
    http: flotilla_http::PinnedClients,
    /// How a URL's host is resolved, once per attempt.
    resolver: Arc<dyn flotilla_catalog::Resolve>,
    config: WebhookConfig,
}

impl Sender {
    fn new(
        config: WebhookConfig,
        resolver: Arc<dyn flotilla_catalog::Resolve>,
    ) -> Result<Self, std::io::Error> {
        Ok(Self {
            http: flotilla_http::PinnedClients::new(Duration::from_secs(10))?,
            resolver,
            config,
        })
    }

    async fn post(&self, record: &JobRecord, attempt: u32) -> Outcome {
        let Some(url) = record.webhook_url.as_deref() else {
            return Outcome::Refused("no webhook_url".to_owned());
        };
        let target = flotilla_catalog::resolve_webhook_url(
            url,
            self.config.allow_private,
            self.resolver.as_ref(),
        )
        .await;
        let target = match target {
            Ok(target) => target,
            Err(e) => return Outcome::Refused(format!("webhook_url refused before sending: {e}")),
        };
        let request = match self.request(url, record, attempt) {
            Ok(request) => request,
            Err(e) => return Outcome::Refused(format!("webhook_url is not usable: {e}")),
        };
        let client = self.http.to(&target.addrs);
        match tokio::time::timeout(self.config.timeout, client.request(request)).await {
            Ok(Ok(response)) => Outcome::Answered(response.status().as_u16()),
            Ok(Err(e)) => Outcome::Failed(format!("cannot reach the receiver: {e}")),
            Err(_) => Outcome::Failed(format!(
                "the receiver did not answer within {}s",
                self.config.timeout.as_secs()
            )),
        }
    }

    /// The POST of `record` to `url`, signed when a secret is set.
    fn request(
        &self,
        url: &str,
        record: &JobRecord,
        attempt: u32,
    ) -> Result<Request<flotilla_http::Full<Bytes>>, axum::http::Error> {
        // The body is the job as `GET /jobs/{id}` shows it, plus Parpaing's `logs` (the output's
        // last 2000 characters), which its webhook receivers read.
        let mut body = serde_json::to_value(record).unwrap_or_default();
        if let Some(fields) = body.as_object_mut() {
            fields.remove("webhook");
            let tail = record
                .result
                .as_ref()
                .map(|r| r.logs_tail.as_str())
                .unwrap_or_default();
            let skip = tail.chars().count().saturating_sub(2000);
            let logs: String = tail.chars().skip(skip).collect();
            fields.insert("logs".to_owned(), serde_json::Value::String(logs));
        }
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut request = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("flotilla-dispatcher/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                names::HEADER_WEBHOOK_EVENT,
                format!("job.{}", record.status),
            )
            .header(
                names::HEADER_WEBHOOK_DELIVERY,
                format!("{}.{attempt}", record.job_id),
            )
            .header(names::HEADER_WEBHOOK_IDEMPOTENCY, &record.job_id);
        if let Some(secret) = &self.config.secret {
            request = request.header(names::HEADER_WEBHOOK_SIGNATURE, sign(secret, &body));
        }
        request.body(flotilla_http::Full::new(body))
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn sign(secret: &str, body: &[u8]) -> String {
    let t = Utc::now().timestamp();
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, net::IpAddr};

    use futures::FutureExt as _;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A name with TTL 0: each lookup gets the next answer.
    struct Rebinding {
        answers: Mutex<VecDeque<IpAddr>>,
        lookups: Mutex<u32>,
    }

    impl flotilla_catalog::Resolve for Rebinding {
        fn lookup<'a>(&'a self, _host: &'a str) -> flotilla_catalog::Lookup<'a> {
            *self.lookups.lock().unwrap() += 1;
            let answer = self.answers.lock().unwrap().pop_front();
            Box::pin(async move { Ok(answer.into_iter().collect()) })
        }
    }

    /// Answers one request with 200; returns what it read.
    async fn receive(listener: &TcpListener) -> String {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-request");
            seen.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    }

    fn finished_job(url: &str) -> JobRecord {
        let request: flotilla_proto::JobRequest = serde_json::from_value(serde_json::json!({
            "job_id": "hook-1", "agent_id": "a", "engine": "shell", "profile": "default",
            "prompt": "true", "timeout_seconds": 60, "created_at": Utc::now(),
            "resources": {"memory_bytes": 1 << 30, "nano_cpus": 1_000_000_000},
            "webhook_url": url,
        }))
        .unwrap();
        JobRecord::pending(&request)
    }

    #[tokio::test]
    async fn a_rebinding_name_cannot_move_the_webhook_to_another_address() {
        // The checked answer is 127.0.0.1; the name then rebinds to 127.0.0.2, where another
        // listener waits on the same port. (Loopback both, so nothing leaves this machine:
        // allow_private skips the address classes, which `flotilla_catalog` tests, not the pin.)
        let checked = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = checked.local_addr().unwrap().port();
        let Ok(rebound) = TcpListener::bind(("127.0.0.2", port)).await else {
            panic!("127.0.0.2:{port} is taken; run the test again");
        };
        let resolver = Arc::new(Rebinding {
            answers: Mutex::new(VecDeque::from([
                "127.0.0.1".parse().unwrap(),
                "127.0.0.2".parse().unwrap(),
            ])),
            lookups: Mutex::new(0),
        });
        let config = WebhookConfig {
            secret: None,
            allow_private: true,
            timeout: Duration::from_secs(10),
        };
        let sender = Sender::new(config, resolver.clone()).unwrap();
        let url = format!("http://rebind.invalid:{port}/hook");
        let record = finished_job(&url);
        // Whichever listener the request reaches answers it.
        let answered = tokio::spawn(async move {
            tokio::select! {
                seen = receive(&checked) => ("the checked address", seen),
                seen = receive(&rebound) => ("the rebound address", seen),
            }
        });
        let outcome = sender.post(&record, 1).await;
        let (reached, seen) = answered.await.unwrap();
        assert_eq!(reached, "the checked address", "{seen}");
        assert!(matches!(outcome, Outcome::Answered(200)), "{seen}");
        // The name is the receiver's: it is the Host header (and would be the TLS name).
        let host = format!("host: rebind.invalid:{port}\r\n");
        assert!(seen.to_ascii_lowercase().contains(&host), "{seen}");
        assert_eq!(
            *resolver.lookups.lock().unwrap(),
            1,
            "resolved once, at the check"
        );
    }

    #[tokio::test]
    async fn a_name_that_resolves_private_is_refused_without_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let resolver = Arc::new(Rebinding {
            answers: Mutex::new(VecDeque::from(["127.0.0.1".parse().unwrap()])),
            lookups: Mutex::new(0),
        });
        let config = WebhookConfig {
            secret: None,
            allow_private: false,
            timeout: Duration::from_secs(10),
        };
        let sender = Sender::new(config, resolver).unwrap();
        let record = finished_job(&format!("http://rebind.invalid:{port}/hook"));
        match sender.post(&record, 1).await {
            Outcome::Refused(e) => assert!(e.contains("loopback"), "{e}"),
            _ => panic!("a loopback answer must be refused"),
        }
        assert!(listener.accept().now_or_never().is_none());
    }

    #[test]
    fn retries_back_off() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(16));
    }

    #[test]
    fn signatures_cover_the_timestamp_and_body() {
        let signature = sign("s3cret", b"{}");
        let (t, v1) = signature.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(format!("{t}.{{}}").as_bytes());
        assert_eq!(v1, hex::encode(mac.finalize().into_bytes()));
    }
}
