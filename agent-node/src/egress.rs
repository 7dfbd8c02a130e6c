// wired into job containers by the node in a later change
#![allow(dead_code)]

//! The egress proxy of job containers: one per node, on the job network. A job reaches the
//! outside only through it (`HTTPS_PROXY=http://<job_id>:<token>@proxy:port`), and only the
//! hosts of its own allow-list, on the allowed ports. Names are resolved once and the
//! connection goes to those addresses, as for webhooks: a name that answers differently a
//! moment later (DNS rebinding) reaches nothing new.
//!
//! One request per client connection: `CONNECT host:port` opens a tunnel; an absolute-form
//! `GET http://host/path` is forwarded with `Connection: close`, and the connection closes with
//! the response, so a client cannot slip a second request for another host onto it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use flotilla_catalog::Resolve;
use sha2::{Digest as _, Sha256};
use tokio::{
    io::BufReader,
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc::UnboundedSender,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use url::{Position, Url};

/// A request head larger than this is refused: the proxy never buffers more per connection.
const MAX_HEAD_BYTES: u64 = 16 * 1024;
/// A client that has not sent its whole request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers about one connection rather than the message (RFC 9110 §7.6.1), and the job's
/// credentials, which are for this proxy only.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// The ports jobs may reach.
    pub allowed_ports: Vec<u16>,
    /// Lets listed names resolve to loopback, private and link-local addresses (tests only).
    pub allow_private: bool,
    /// For the name lookup, and again for the connection to the target.
    pub connect_timeout: Duration,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allowed_ports: vec![80, 443],
            allow_private: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Decisions so far, for the node's metrics. Every request is counted once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressCounts {
    pub allowed: u64,
    pub not_allowed: u64,
    pub bad_port: u64,
    pub private_address: u64,
    /// Lookup or connection failed.
    pub connect_failed: u64,
    pub auth: u64,
    /// Malformed or unsupported requests.
    pub bad_request: u64,
}

#[derive(Debug, Default)]
struct Counters {
    allowed: AtomicU64,
    not_allowed: AtomicU64,
    bad_port: AtomicU64,
    private_address: AtomicU64,
    connect_failed: AtomicU64,
    auth: AtomicU64,
    bad_request: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> EgressCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EgressCounts {
            allowed: get(&self.allowed),
            not_allowed: get(&self.not_allowed),
            bad_port: get(&self.bad_port),
            private_address: get(&self.private_address),
            connect_failed: get(&self.connect_failed),
            auth: get(&self.auth),
            bad_request: get(&self.bad_request),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why a request for a target was not relayed.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("not in this job's allow-list")]
    NotAllowed,
    #[error("port {0} is not allowed")]
    BadPort(u16),
    #[error("resolves to a non-public address")]
    PrivateAddress,
    #[error("does not resolve")]
    Unresolvable,
    #[error("cannot connect: {0}")]
    ConnectFailed(String),
}

/// A request the proxy does not understand or support; the reason goes back to the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadRequest(&'static str);

/// A job the proxy lets through.
struct Job {
    id: String,
    token_digest: [u8; 32],
    hosts: Vec<String>,
    refusals: UnboundedSender<String>,
    /// Cancelled when the admission ends: the job's open tunnels end with it.
    gone: CancellationToken,
}

struct Inner {
    config: EgressConfig,
    resolver: Arc<dyn Resolve>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    counters: Counters,
}

#[derive(Clone)]
pub struct EgressProxy {
    inner: Arc<Inner>,
}

/// A job's right to use the proxy; dropping it revokes the right and closes its connections.
pub struct Admission {
    proxy: Arc<Inner>,
    job: Arc<Job>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut jobs = self.proxy.jobs.lock().expect("egress jobs lock poisoned");
        // A later admission of the same job id is not this one's to remove.
        if jobs
            .get(&self.job.id)
            .is_some_and(|j| Arc::ptr_eq(j, &self.job))
        {
            jobs.remove(&self.job.id);
        }
        drop(jobs);
        self.job.gone.cancel();
    }
}

impl EgressProxy {
    pub fn new(config: EgressConfig, resolver: Arc<dyn Resolve>) -> Self {
        let inner = Inner {
            config,
            resolver,
            jobs: Mutex::default(),
            counters: Counters::default(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Serves until `shutdown`, which also ends every open connection; returns when they are.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    connections.spawn(self.inner.clone().handle(stream, shutdown.clone()));
                }
                Err(e) => {
                    // Out of descriptors, typically: pause rather than spin.
                    tracing::warn!(error = %e, "egress proxy cannot accept");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        connections.close();
        connections.wait().await;
    }

    /// Lets `job_id` (no `:` in it) through with `token` to `hosts` (checked by the caller
    /// against the cluster's list) until the admission is dropped. Each refusal is sent to
    /// `refusals` as one line for the job's log.
    pub fn admit(
        &self,
        job_id: &str,
        token: &str,
        hosts: Vec<String>,
        refusals: UnboundedSender<String>,
    ) -> Admission {
        let job = Arc::new(Job {
            id: job_id.to_owned(),
            token_digest: Sha256::digest(token.as_bytes()).into(),
            hosts,
            refusals,
            gone: CancellationToken::new(),
        });
        let mut jobs = self.inner.jobs.lock().expect("egress jobs lock poisoned");
        jobs.insert(job_id.to_owned(), job.clone());
        Admission {
            proxy: self.inner.clone(),
            job,
        }
    }

    pub fn counts(&self) -> EgressCounts {
        self.inner.counters.snapshot()
    }
}

/// Whether `host` is on `patterns`. Names compare without case or trailing dot; `*.example.com`
/// matches every name under example.com, not example.com itself. Addresses match only an
/// entry that is that address.
pub fn host_allowed(patterns: &[String], host: &str) -> bool {
    let host = normalize(host);
    !host.is_empty() && patterns.iter().any(|p| matches(&normalize(p), &host))
}

fn matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // Names under the domain: not the domain itself, nor the digits of an address.
        Some(domain) => {
            let sub = host.strip_suffix(domain);
            host.parse::<IpAddr>().is_err() && sub.is_some_and(|s| s.len() > 1 && s.ends_with('.'))
        }
        None => pattern == host,
    }
}

/// Lower case, no trailing dot, no brackets around IPv6 addresses, addresses in one spelling.
fn normalize(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
    }
}

/// A request head: request line and header fields.
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        let mut named = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        named.next().map(|(_, v)| v.as_str())
    }
}

async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Head, BadRequest> {
    let mut limited = reader.take(MAX_HEAD_BYTES);
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let read = limited.read_until(b'\n', &mut line).await;
        if !matches!(read, Ok(n) if n > 0) || !line.ends_with(b"\n") {
            return Err(BadRequest("request head too large or cut short"));
        }
        let line = String::from_utf8(line).map_err(|_| BadRequest("not UTF-8"))?;
        let line = line.trim_end_matches('\n').trim_end_matches('\r');
        // A bare CR inside a field could end a line for the origin: header injection.
        if line.contains('\r') {
            return Err(BadRequest("stray carriage return"));
        }
        if line.is_empty() {
            break;
        }
        lines.push(line.to_owned());
    }
    parse_head(&lines).ok_or(BadRequest("malformed request head"))
}

fn parse_head(lines: &[String]) -> Option<Head> {
    let (request_line, fields) = lines.split_first()?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut headers = Vec::with_capacity(fields.len());
    for field in fields {
        let (name, value) = field.split_once(':')?;
        // Whitespace in or before a name (obsolete line folding included) is refused.
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return None;
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
    })
}

/// What a client asked for: a target, and for plain HTTP the request to send it.
struct Request {
    host: String,
    port: u16,
    forward: Option<Forward>,
}

struct Forward {
    head: Vec<u8>,
    body_len: u64,
}

fn parse_request(head: &Head) -> Result<Request, BadRequest> {
    if head.method == "CONNECT" {
        let bad = BadRequest("CONNECT needs host:port");
        let (host, port) = head.target.rsplit_once(':').ok_or(bad)?;
        let port = port.parse().map_err(|_| BadRequest("bad port"))?;
        let (host, forward) = (normalize(host), None);
        return Ok(Request {
            host,
            port,
            forward,
        });
    }
    let url = Url::parse(&head.target).map_err(|_| BadRequest("not a URL"))?;
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(BadRequest("URL without host"));
    };
    if url.scheme() != "http" {
        return Err(BadRequest("only http:// is forwarded; use CONNECT"));
    }
    let body_len = body_len(head)?;
    // The origin's Host is the URL's, whatever the client sent (RFC 9112 §3.2.2).
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let path = &url[Position::BeforePath..Position::AfterQuery];
    let forward = Some(Forward {
        head: upstream_head(head, path, &authority),
        body_len,
    });
    Ok(Request {
        host: normalize(host),
        port,
        forward,
    })
}

/// The request body's length. Chunked bodies are refused: without decoding them the proxy
/// could not tell where the request ends.
fn body_len(head: &Head) -> Result<u64, BadRequest> {
    if head.header("transfer-encoding").is_some() {
        return Err(BadRequest("request bodies need a Content-Length"));
    }
    let mut lengths = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    let len = match lengths.next() {
        None => 0,
        Some((_, v)) => v.parse().map_err(|_| BadRequest("bad Content-Length"))?,
    };
    if lengths.next().is_some() {
        return Err(BadRequest("more than one Content-Length"));
    }
    Ok(len)
}

/// The head sent to the origin: origin-form path, the URL's Host, no hop-by-hop fields.
fn upstream_head(head: &Head, path: &str, authority: &str) -> Vec<u8> {
    let named: Vec<String> = head
        .header("connection")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!("{} {path} HTTP/1.1\r\nHost: {authority}\r\n", head.method);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "host" || HOP_BY_HOP.contains(&lower.as_str()) || named.contains(&lower) {
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

impl Inner {
    async fn handle(self: Arc<Self>, stream: TcpStream, shutdown: CancellationToken) {
        let mut client = BufReader::new(stream);
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                bump(&self.counters.bad_request);
                return respond(&mut client, 400, &e.to_string()).await;
            }
            Err(_) => return,
        };
        let Some(job) = self.authenticate(&head) else {
            bump(&self.counters.auth);
            return respond(&mut client, 407, "proxy credentials missing or not valid").await;
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = job.gone.cancelled() => {}
            () = self.relay(&job, &head, client) => {}
        }
    }

    /// The admitted job whose credentials the request carries.
    fn authenticate(&self, head: &Head) -> Option<Arc<Job>> {
        let (scheme, encoded) = head.header("proxy-authorization")?.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (job_id, token) = decoded.split_once(':')?;
        let job = self
            .jobs
            .lock()
            .expect("egress jobs lock poisoned")
            .get(job_id)
            .cloned()?;
        // Digests are compared, not tokens: how long `==` takes tells nothing about the token.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        (digest == job.token_digest).then_some(job)
    }

    async fn relay(&self, job: &Job, head: &Head, mut client: BufReader<TcpStream>) {
        let request = match parse_request(head) {
            Ok(request) => request,
            Err(e) => {
                bump(&self.counters.bad_request);
                return respond(&mut client, 400, &e.to_string()).await;
            }
        };
        let upstream = match self.open(job, &request.host, request.port).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                let target = format!("{} {}:{}", head.method, request.host, request.port);
                return self.refuse(job, &target, &refusal, &mut client).await;
            }
        };
        bump(&self.counters.allowed);
        let relayed = match request.forward {
            None => tunnel(client, upstream).await,
            Some(forward) => relay_http(client, upstream, forward).await,
        };
        if let Err(e) = relayed {
            tracing::debug!(job_id = %job.id, error = %e, "egress connection ended");
        }
    }

    /// A connection to `host`, if the job may reach it, at the addresses checked.
    async fn open(&self, job: &Job, host: &str, port: u16) -> Result<TcpStream, Refusal> {
        let addrs = self.pin(job, host, port).await?;
        let connect = TcpStream::connect(&addrs[..]);
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Refusal::ConnectFailed(e.to_string())),
            Err(_) => Err(Refusal::ConnectFailed("timed out".to_owned())),
        }
    }

    /// Where `host` may be reached: checked against the job's list and the ports, resolved
    /// once. The caller connects there and nowhere else.
    async fn pin(&self, job: &Job, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        if !host_allowed(&job.hosts, host) {
            return Err(Refusal::NotAllowed);
        }
        if !self.config.allowed_ports.contains(&port) {
            return Err(Refusal::BadPort(port));
        }
        // A listed address is the operator's explicit choice, as for git remotes.
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let lookup = self.resolver.lookup(host);
        let ips = match tokio::time::timeout(self.config.connect_timeout, lookup).await {
            Ok(Ok(ips)) if !ips.is_empty() => ips,
            _ => return Err(Refusal::Unresolvable),
        };
        if !self.config.allow_private {
            for ip in &ips {
                if !is_public(*ip).await {
                    return Err(Refusal::PrivateAddress);
                }
            }
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    async fn refuse(
        &self,
        job: &Job,
        target: &str,
        refusal: &Refusal,
        client: &mut BufReader<TcpStream>,
    ) {
        let (counter, status) = match refusal {
            Refusal::NotAllowed => (&self.counters.not_allowed, 403),
            Refusal::BadPort(_) => (&self.counters.bad_port, 403),
            Refusal::PrivateAddress => (&self.counters.private_address, 403),
            Refusal::Unresolvable | Refusal::ConnectFailed(_) => {
                (&self.counters.connect_failed, 502)
            }
        };
        bump(counter);
        let line = format!("egress refused: {target} ({refusal})");
        tracing::info!(job_id = %job.id, "{line}");
        // The job's log may be closed already; the counter still has it.
        let _ = job.refusals.send(line.clone());
        respond(client, status, &line).await;
    }
}

/// Whether `ip` is public by the webhook rules. Their classifier is private to the catalog,
/// but its URL check classifies an address literal without any lookup.
async fn is_public(ip: IpAddr) -> bool {
    let url = format!("http://{}/", SocketAddr::new(ip, 80));
    let no_lookup = flotilla_catalog::SystemResolver;
    flotilla_catalog::resolve_webhook_url(&url, false, &no_lookup)
        .await
        .is_ok()
}

async fn tunnel(mut client: BufReader<TcpStream>, mut upstream: TcpStream) -> io::Result<()> {
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    // Through the BufReader: bytes the client sent right after its head are not lost.
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map(drop)
}

async fn relay_http(
    client: BufReader<TcpStream>,
    mut upstream: TcpStream,
    request: Forward,
) -> io::Result<()> {
    upstream.write_all(&request.head).await?;
    let (mut from_upstream, mut to_upstream) = upstream.split();
    let (from_client, mut to_client) = tokio::io::split(client);
    // Exactly the announced body goes up; anything after it would be another request.
    let send = async {
        let mut body = from_client.take(request.body_len);
        tokio::io::copy(&mut body, &mut to_upstream).await
    };
    // The origin was asked to close after its response, so its end is the response's end.
    let receive = async {
        tokio::io::copy(&mut from_upstream, &mut to_client).await?;
        to_client.shutdown().await
    };
    tokio::select! {
        received = receive => received,
        Err(e) = send => Err(e),
    }
}

async fn respond<W: AsyncWrite + Unpin>(client: &mut W, status: u16, body: &str) {
    let (reason, extra) = match status {
        400 => ("Bad Request", ""),
        403 => ("Forbidden", ""),
        407 => (
            "Proxy Authentication Required",
            "Proxy-Authenticate: Basic realm=\"flotilla-egress\"\r\n",
        ),
        _ => ("Bad Gateway", ""),
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    // A client gone already has nothing more to learn.
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use flotilla_catalog::Lookup;
    use tokio::sync::mpsc;

    use super::*;

    const TOKEN: &str = "s3cret";
    const IN_TIME: Duration = Duration::from_secs(10);

    /// Every name resolves to 127.0.0.1; lookups are counted.
    #[derive(Default)]
    struct Loopback {
        lookups: AtomicUsize,
    }

    impl Resolve for Loopback {
        fn lookup<'a>(&'a self, _host: &'a str) -> Lookup<'a> {
            self.lookups.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(vec![IpAddr::from([127, 0, 0, 1])]) })
        }
    }

    struct Proxy {
        proxy: EgressProxy,
        addr: SocketAddr,
        resolver: Arc<Loopback>,
        _stop: tokio_util::sync::DropGuard,
    }

    async fn start(allowed_ports: &[u16], allow_private: bool) -> Proxy {
        let config = EgressConfig {
            allowed_ports: allowed_ports.to_vec(),
            allow_private,
            connect_timeout: IN_TIME,
        };
        let resolver = Arc::new(Loopback::default());
        let proxy = EgressProxy::new(config, resolver.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(proxy.clone().serve(listener, stop.clone()));
        let _stop = stop.drop_guard();
        Proxy {
            proxy,
            addr,
            resolver,
            _stop,
        }
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| (*h).to_owned()).collect()
    }

    fn auth(job_id: &str, token: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{job_id}:{token}"));
        format!("Proxy-Authorization: Basic {encoded}\r\n")
    }

    /// Sends `request` and reads the answer until the proxy closes.
    async fn ask(proxy: SocketAddr, request: &str) -> String {
        let exchange = async {
            let mut stream = TcpStream::connect(proxy).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        tokio::time::timeout(IN_TIME, exchange)
            .await
            .expect("proxy answers in time")
    }

    async fn next_line(refusals: &mut mpsc::UnboundedReceiver<String>) -> String {
        let line = tokio::time::timeout(IN_TIME, refusals.recv()).await;
        line.expect("refusal reported in time")
            .expect("channel open")
    }

    /// A TCP server that echoes what it reads; its port.
    async fn echo_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        port
    }

    /// An HTTP server answering "hello" to one request; its port, and the head it received.
    async fn web_server() -> (u16, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, head) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            let mut received = String::new();
            while !received.ends_with("\r\n\r\n") {
                assert!(stream.read_line(&mut received).await.unwrap() > 0);
            }
            let _ = seen.send(received);
            let answer = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        (port, head)
    }

    #[tokio::test]
    async fn connect_tunnels_bytes_both_ways_until_the_admission_ends() {
        let port = echo_server().await;
        let p = start(&[port], true).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let admission = p.proxy.admit("job-1", TOKEN, hosts(&["echo.test"]), tx);
        let mut stream = BufReader::new(TcpStream::connect(p.addr).await.unwrap());
        let request = format!(
            "CONNECT ECHO.test.:{port} HTTP/1.1\r\n{}\r\n",
            auth("job-1", TOKEN)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            stream.read_line(&mut head).await.unwrap();
        }
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        stream.write_all(b"ping").await.unwrap();
        let mut echoed = [0; 4];
        tokio::time::timeout(IN_TIME, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, b"ping");
        assert_eq!(p.proxy.counts().allowed, 1);
        assert_eq!(p.resolver.lookups.load(Ordering::Relaxed), 1);
        // The tunnel ends with the job's admission.
        drop(admission);
        let mut rest = Vec::new();
        let end = tokio::time::timeout(IN_TIME, stream.read_to_end(&mut rest)).await;
        assert_eq!(end.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn unlisted_hosts_and_ports_are_refused_and_reported() {
        let p = start(&[443], true).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _admission = p.proxy.admit("job-1", TOKEN, hosts(&["pypi.org"]), tx);
        let creds = auth("job-1", TOKEN);
        let answer = ask(
            p.addr,
            &format!("CONNECT evil.example:443 HTTP/1.1\r\n{creds}\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.contains("evil.example"), "{answer}");
        let line = next_line(&mut rx).await;
        assert_eq!(
            line,
            "egress refused: CONNECT evil.example:443 (not in this job's allow-list)"
        );
        let answer = ask(
            p.addr,
            &format!("CONNECT pypi.org:22 HTTP/1.1\r\n{creds}\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(
            next_line(&mut rx)
                .await
                .ends_with("(port 22 is not allowed)")
        );
        let counts = p.proxy.counts();
        assert_eq!(
            (counts.not_allowed, counts.bad_port, counts.allowed),
            (1, 1, 0)
        );
        assert_eq!(p.resolver.lookups.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
        let (port, received) = web_server().await;
        let p = start(&[port, 80], true).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _admission = p.proxy.admit("job-1", TOKEN, hosts(&["web.test"]), tx);
        let creds = auth("job-1", TOKEN);
        let request = format!(
            "GET http://web.test:{port}/simple/?q=1 HTTP/1.1\r\nHost: elsewhere.test\r\n{creds}\
             Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
        );
        let answer = ask(p.addr, &request).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("hello"),
            "{answer}"
        );
        let head = received.await.unwrap();
        let expected =
            format!("GET /simple/?q=1 HTTP/1.1\r\nHost: web.test:{port}\r\nAccept: */*\r\n");
        assert_eq!(head, format!("{expected}Connection: close\r\n\r\n"));

        let refused = format!("GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n{creds}\r\n");
        let answer = ask(p.addr, &refused).await;
        assert!(
            answer.starts_with("HTTP/1.1 403") && answer.contains("other.test"),
            "{answer}"
        );
        assert_eq!(
            next_line(&mut rx).await,
            "egress refused: GET other.test:80 (not in this job's allow-list)"
        );
        let chunked = format!(
            "POST http://web.test:{port}/ HTTP/1.1\r\n{creds}Transfer-Encoding: chunked\r\n\r\n"
        );
        assert!(ask(p.addr, &chunked).await.starts_with("HTTP/1.1 400"));
        let counts = p.proxy.counts();
        assert_eq!(
            (counts.allowed, counts.not_allowed, counts.bad_request),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn missing_wrong_or_revoked_credentials_get_407() {
        let p = start(&[443], true).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let admission = p.proxy.admit("job-1", TOKEN, Vec::new(), tx);
        let connect = "CONNECT pypi.org:443 HTTP/1.1\r\n";
        let answer = ask(p.addr, &format!("{connect}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 407 "), "{answer}");
        assert!(answer.contains("Proxy-Authenticate: Basic realm=\"flotilla-egress\"\r\n"));
        let wrong = ask(p.addr, &format!("{connect}{}\r\n", auth("job-1", "guess"))).await;
        assert!(wrong.starts_with("HTTP/1.1 407 "), "{wrong}");
        // The right credentials get past authentication (to the allow-list)...
        let right = format!("{connect}{}\r\n", auth("job-1", TOKEN));
        assert!(ask(p.addr, &right).await.starts_with("HTTP/1.1 403 "));
        // ...until the admission ends.
        drop(admission);
        assert!(ask(p.addr, &right).await.starts_with("HTTP/1.1 407 "));
        let counts = p.proxy.counts();
        assert_eq!((counts.auth, counts.not_allowed), (3, 1));
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused_as_private() {
        let p = start(&[443], false).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _admission = p.proxy.admit("job-1", TOKEN, hosts(&["internal.test"]), tx);
        let request = format!(
            "CONNECT internal.test:443 HTTP/1.1\r\n{}\r\n",
            auth("job-1", TOKEN)
        );
        let answer = ask(p.addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        let line = next_line(&mut rx).await;
        assert_eq!(
            line,
            "egress refused: CONNECT internal.test:443 (resolves to a non-public address)"
        );
        assert_eq!(p.proxy.counts().private_address, 1);
    }

    #[test]
    fn patterns_match_names_and_subdomains_without_case_or_trailing_dot() {
        let list = hosts(&["pypi.org", "*.pythonhosted.org", "10.0.0.5", "[::1]"]);
        for host in [
            "pypi.org",
            "PyPI.org.",
            "files.pythonhosted.org",
            "a.b.PYTHONHOSTED.org.",
            "10.0.0.5",
            "::1",
            "[0:0::1]",
        ] {
            assert!(host_allowed(&list, host), "{host}");
        }
        for host in [
            "pythonhosted.org",
            "evilpythonhosted.org",
            "pypi.org.evil",
            "sub.pypi.org",
            "10.0.0.6",
            "",
            ".",
        ] {
            assert!(!host_allowed(&list, host), "{host}");
        }
        // Patterns match names only, never the digits of an address.
        assert!(!host_allowed(&hosts(&["*.0.5"]), "10.0.0.5"));
        assert!(host_allowed(&hosts(&["*.Example.COM."]), "x.example.com"));
    }
}
