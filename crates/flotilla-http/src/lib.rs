//! The client Flotilla's services use to call out (the llm-gateway to LLM providers, the
//! dispatcher to webhooks): HTTP/1.1 over rustls with ring (what async-nats already builds) and
//! the system's root certificates, or plain HTTP. hyper follows no redirects, so nothing is
//! ever sent on to a host the caller did not choose.

use std::time::Duration;

pub use http_body_util::Full;

pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<bytes::Bytes>,
>;

/// A client that connects within `connect_timeout`, with Nagle off (small streamed writes go
/// out at once). Without the system's root certificates (no `ca-certificates` package) HTTPS
/// calls fail and say so, while plain HTTP still works; the error is only for a broken TLS
/// setup.
pub fn client(connect_timeout: Duration) -> Result<Client, std::io::Error> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.enforce_http(false);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(builder) => builder,
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates: HTTPS calls will fail");
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(std::io::Error::other)?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    let https = builder
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}
