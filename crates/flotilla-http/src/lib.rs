//! The client Flotilla's services use to call out (the llm-gateway to LLM providers, the
//! dispatcher to webhooks): HTTP/1.1 over rustls with ring (what async-nats already builds) and
//! the system's root certificates, or plain HTTP. hyper follows no redirects, so nothing is
//! ever sent on to a host the caller did not choose.
//!
//! [`PinnedClients`] are for callers that check where a URL points before sending to it (the
//! webhook SSRF guard): their connections go only to the addresses that were checked, never to
//! a fresh DNS answer, while the URL's host still names the server.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

pub use http_body_util::Full;
use hyper_rustls::ConfigBuilderExt as _;
use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};

pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    Full<bytes::Bytes>,
>;

/// A client that connects only to the addresses it was made for (see [`PinnedClients::to`]).
pub type PinnedClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector<Pinned>>,
    Full<bytes::Bytes>,
>;

/// A client that connects within `connect_timeout`, with Nagle off (small streamed writes go
/// out at once). Without the system's root certificates (no `ca-certificates` package) HTTPS
/// calls fail and say so, while plain HTTP still works; the error is only for a broken TLS
/// setup.
pub fn client(connect_timeout: Duration) -> Result<Client, std::io::Error> {
    let connector = HttpConnector::new();
    Ok(build(tls_config()?, connector, connect_timeout))
}

/// Makes [`PinnedClient`]s, all with one TLS configuration (the system's roots are read once).
#[derive(Clone)]
pub struct PinnedClients {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl PinnedClients {
    /// As [`client`]: fails only for a broken TLS setup.
    pub fn new(connect_timeout: Duration) -> Result<Self, std::io::Error> {
        Ok(Self {
            tls: Arc::new(tls_config()?),
            connect_timeout,
        })
    }

    /// A client whose connections all go to one of `addrs` (tried in order, as DNS answers
    /// are), whatever the request URL's host resolves to by then. The URL is sent unchanged:
    /// its host is the `Host` header, the TLS server name and the name the certificate must
    /// match. A URL with an IP address host connects to that address, as it says.
    pub fn to(&self, addrs: &[SocketAddr]) -> PinnedClient {
        let connector = HttpConnector::new_with_resolver(Pinned(addrs.into()));
        build((*self.tls).clone(), connector, self.connect_timeout)
    }
}

/// The resolver of a [`PinnedClient`]: every name "resolves" to the pinned addresses, so the
/// connection never depends on a DNS answer given after the caller's check.
#[derive(Debug, Clone)]
pub struct Pinned(Arc<[SocketAddr]>);

/// The pinned addresses, in order, as a resolver's answer.
#[derive(Debug)]
pub struct PinnedAddrs {
    addrs: Arc<[SocketAddr]>,
    next: usize,
}

impl Iterator for PinnedAddrs {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        let addr = self.addrs.get(self.next).copied();
        self.next += 1;
        addr
    }
}

impl tower_service::Service<Name> for Pinned {
    type Response = PinnedAddrs;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _name: Name) -> Self::Future {
        std::future::ready(Ok(PinnedAddrs {
            addrs: self.0.clone(),
            next: 0,
        }))
    }
}

/// rustls on ring with the system's roots, or with none (HTTPS then fails, HTTP works).
fn tls_config() -> Result<rustls::ClientConfig, std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    match builder.clone().with_native_roots() {
        Ok(builder) => Ok(builder.with_no_client_auth()),
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates: HTTPS calls will fail");
            Ok(builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth())
        }
    }
}

fn build<R>(
    tls: rustls::ClientConfig,
    mut connector: HttpConnector<R>,
    connect_timeout: Duration,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector<R>>,
    Full<bytes::Bytes>,
>
where
    R: tower_service::Service<Name> + Clone + Send + Sync + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    connector.enforce_http(false);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// Answers one request with 204 and returns what it read of it (the head, maybe some body).
    async fn answer_once(listener: TcpListener) -> String {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the client closed before the end of its request head"
            );
            head.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn a_pinned_client_connects_to_its_address_and_keeps_the_url_s_host() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(answer_once(listener));
        // `.invalid` never resolves (RFC 6761): only the pin can get this request anywhere.
        let url = format!("http://hook.invalid:{}/path?q=1", addr.port());
        let clients = PinnedClients::new(Duration::from_secs(5)).unwrap();
        let request = http::Request::post(&url)
            .body(Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let response = clients.to(&[addr]).request(request).await.unwrap();
        assert_eq!(response.status(), 204);
        let head = server.await.unwrap();
        assert!(head.starts_with("POST /path?q=1 HTTP/1.1\r\n"), "{head}");
        let host = format!("host: hook.invalid:{}\r\n", addr.port());
        assert!(head.to_ascii_lowercase().contains(&host), "{head}");
    }

    #[tokio::test]
    async fn a_pinned_client_tries_each_address_in_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(answer_once(listener));
        // Nothing listens on the first address (127.0.0.2, same port): the second one answers.
        let closed = SocketAddr::from(([127, 0, 0, 2], port));
        let open = SocketAddr::from(([127, 0, 0, 1], port));
        let clients = PinnedClients::new(Duration::from_secs(5)).unwrap();
        let request = http::Request::get(format!("http://hook.invalid:{port}/"))
            .body(Full::default())
            .unwrap();
        let response = clients.to(&[closed, open]).request(request).await.unwrap();
        assert_eq!(response.status(), 204);
        server.await.unwrap();
    }
}
