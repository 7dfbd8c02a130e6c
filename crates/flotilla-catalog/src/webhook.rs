//! SSRF guard for webhook URLs: a client must not be able to make the fleet call into its own
//! network. Run at submit and again right before sending, since DNS answers can change. The
//! check before sending also gives the addresses it checked ([`WebhookTarget`]): the sender
//! connects to those and never resolves the name again, so a name that answers a public address
//! to the check and a private one a moment later (DNS rebinding, TTL 0) reaches nothing private.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use url::{Host, Url};

pub(crate) const MAX_WEBHOOK_CHARS: usize = 2048;
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// A lookup in flight.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Resolves a webhook's host name: the system's resolver ([`SystemResolver`]) in production, a
/// scripted one in tests.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a>;
}

/// The host's resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|addr| addr.ip()).collect())
        })
    }
}

/// Where a checked webhook URL may be sent: every address its host resolved to when it was
/// checked, with the URL's port. Connect there, keeping the URL (Host header, TLS name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub addrs: Vec<SocketAddr>,
}

/// Checks that `url` is an http(s) URL whose host is public. With `allow_private` (tests only)
/// the host is not resolved nor classified.
pub async fn check_webhook_url(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return parse(url).map(drop);
    }
    resolve_webhook_url(url, false, &SystemResolver)
        .await
        .map(drop)
}

/// Checks `url` as [`check_webhook_url`] does, resolving its host once with `resolver`, and
/// returns the addresses it checked. With `allow_private` (tests only) the addresses are not
/// classified, but the target is pinned all the same.
pub async fn resolve_webhook_url(
    url: &str,
    allow_private: bool,
    resolver: &dyn Resolve,
) -> Result<WebhookTarget, String> {
    let parsed = parse(url)?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let refuse = |class: &str| format!("webhook_url must not point to a {class} address");
    let ips = match parsed.host() {
        Some(Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.');
            let lower = name.to_ascii_lowercase();
            if !allow_private && (lower == "localhost" || lower.ends_with(".localhost")) {
                return Err(refuse("loopback"));
            }
            let ips = lookup(resolver, name).await?;
            if !allow_private && let Some(class) = ips.iter().find_map(|ip| forbidden_class(*ip)) {
                // The address itself stays out of the message: it may be internal detail.
                return Err(format!("webhook_url host resolves to a {class} address"));
            }
            return Ok(target(&ips, port));
        }
        None => return Err("webhook_url must have a host".to_owned()),
    };
    if !allow_private && let Some(class) = forbidden_class(ips[0]) {
        return Err(refuse(class));
    }
    Ok(target(&ips, port))
}

/// The URL, if it is one a webhook may have: length, scheme, host.
fn parse(url: &str) -> Result<Url, String> {
    if crate::rules::too_long(url, MAX_WEBHOOK_CHARS) {
        return Err(format!(
            "webhook_url must be at most {MAX_WEBHOOK_CHARS} characters"
        ));
    }
    let parsed = Url::parse(url).map_err(|e| format!("webhook_url is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("webhook_url must use http or https".to_owned());
    }
    if parsed.host().is_none() {
        return Err("webhook_url must have a host".to_owned());
    }
    Ok(parsed)
}

async fn lookup(resolver: &dyn Resolve, name: &str) -> Result<Vec<IpAddr>, String> {
    lookup_host(resolver, name)
        .await
        .map_err(|e| format!("webhook_url host {e}"))
}

/// The addresses `name` resolves to; the error completes "<host> ...".
pub(crate) async fn lookup_host(resolver: &dyn Resolve, name: &str) -> Result<Vec<IpAddr>, String> {
    let ips = tokio::time::timeout(DNS_TIMEOUT, resolver.lookup(name))
        .await
        .map_err(|_| "could not be resolved in time".to_owned())?
        .map_err(|_| "does not resolve".to_owned())?;
    if ips.is_empty() {
        return Err("does not resolve".to_owned());
    }
    Ok(ips)
}

fn target(ips: &[IpAddr], port: u16) -> WebhookTarget {
    let mut addrs: Vec<SocketAddr> = Vec::with_capacity(ips.len());
    for ip in ips {
        let addr = SocketAddr::new(*ip, port);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    WebhookTarget { addrs }
}

/// The kind of non-public address `ip` is, if it is one.
pub(crate) fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if a == 0 {
        // 0.0.0.0 reaches the local host on Linux; the rest of 0/8 is not routable anyway.
        Some("unspecified")
    } else if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() {
        Some("private")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("carrier-grade NAT")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if a == 198 && (b & 0xfe) == 18 {
        // 198.18.0.0/15: network benchmarking, routed inside labs and some clouds.
        Some("benchmarking")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        // 192.0.0.0/24: IETF protocol assignments (DS-Lite, NAT64 discovery, ...).
        Some("IETF protocol")
    } else if a >= 240 {
        // 240.0.0.0/4: reserved (broadcast is caught above).
        Some("reserved")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Some("cloud metadata")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if seg[0] & 0xfe00 == 0xfc00 || seg[0] & 0xffc0 == 0xfec0 {
        Some("private")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if seg[..3] == [0x64, 0xff9b, 1] {
        // 64:ff9b:1::/48: local-use NAT64 (RFC 8215), a translator into some private IPv4 space.
        Some("local NAT64")
    } else if seg[0] == 0x2002 {
        // 2002::/16: 6to4, whose relays reach the IPv4 address it embeds.
        Some("6to4")
    } else if let Some(v4) = embedded_v4(ip) {
        v4_class(v4)
    } else {
        None
    }
}

/// The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) or
/// NAT64 (64:ff9b::a.b.c.d) address: each can reach the IPv4 host it embeds.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let prefix_ok = matches!(
        seg[..6],
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0, 0] | [0x64, 0xff9b, 0, 0, 0, 0]
    );
    prefix_ok.then(|| {
        let [.., a, b, c, d] = ip.octets();
        Ipv4Addr::new(a, b, c, d)
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, net::SocketAddr, sync::Mutex};

    use super::*;

    /// Answers each lookup with the next of its answers, as a name with TTL 0 can.
    struct Rebinding {
        answers: Mutex<VecDeque<Vec<IpAddr>>>,
        asked: Mutex<Vec<String>>,
    }

    impl Rebinding {
        fn new(answers: &[&[&str]]) -> Self {
            let answers = answers
                .iter()
                .map(|ips| ips.iter().map(|ip| ip.parse().unwrap()).collect())
                .collect();
            Self {
                answers: Mutex::new(answers),
                asked: Mutex::default(),
            }
        }
    }

    impl Resolve for Rebinding {
        fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a> {
            self.asked.lock().unwrap().push(host.to_owned());
            let answer = self.answers.lock().unwrap().pop_front().unwrap_or_default();
            Box::pin(async move { Ok(answer) })
        }
    }

    #[tokio::test]
    async fn the_target_is_the_checked_answer_whatever_the_name_answers_next() {
        let resolver = Rebinding::new(&[&["93.184.216.34", "2606:4700::1111"], &["127.0.0.1"]]);
        let target = resolve_webhook_url("https://rebind.example:8443/hook", false, &resolver)
            .await
            .unwrap();
        let expected: Vec<SocketAddr> = vec![
            "93.184.216.34:8443".parse().unwrap(),
            "[2606:4700::1111]:8443".parse().unwrap(),
        ];
        assert_eq!(target.addrs, expected);
        assert_eq!(*resolver.asked.lock().unwrap(), ["rebind.example"]);
        // Asked again, the name now answers loopback: that answer is refused, never connected to.
        let again = resolve_webhook_url("https://rebind.example:8443/hook", false, &resolver).await;
        assert_eq!(
            again.unwrap_err(),
            "webhook_url host resolves to a loopback address"
        );
    }

    #[tokio::test]
    async fn one_private_answer_among_public_ones_refuses_the_url() {
        let resolver = Rebinding::new(&[&["93.184.216.34", "10.0.0.7"]]);
        let error = resolve_webhook_url("http://mixed.example/", false, &resolver)
            .await
            .unwrap_err();
        assert_eq!(error, "webhook_url host resolves to a private address");
    }

    #[tokio::test]
    async fn literals_are_targets_without_a_lookup_and_private_ones_only_when_allowed() {
        let resolver = Rebinding::new(&[]);
        let target = resolve_webhook_url("http://93.184.216.34/h", false, &resolver)
            .await
            .unwrap();
        assert_eq!(
            target.addrs,
            ["93.184.216.34:80".parse::<SocketAddr>().unwrap()]
        );
        let target = resolve_webhook_url("http://[::1]:9000/h", true, &resolver)
            .await
            .unwrap();
        assert_eq!(target.addrs, ["[::1]:9000".parse::<SocketAddr>().unwrap()]);
        assert!(resolver.asked.lock().unwrap().is_empty());
        // Allowed private targets are still pinned to what the name answered.
        let resolver = Rebinding::new(&[&["127.0.0.1"], &["127.0.0.2"]]);
        let target = resolve_webhook_url("http://localhost:9000/h", true, &resolver)
            .await
            .unwrap();
        assert_eq!(
            target.addrs,
            ["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]
        );
        let none = Rebinding::new(&[&[]]);
        let error = resolve_webhook_url("http://gone.example/", false, &none)
            .await
            .unwrap_err();
        assert_eq!(error, "webhook_url host does not resolve");
    }

    #[tokio::test]
    async fn refuses_reserved_benchmarking_and_translation_ranges() {
        let bad = [
            ("http://198.18.0.1/", "benchmarking"),
            ("http://198.19.255.255/", "benchmarking"),
            ("http://192.0.0.1/", "IETF protocol"),
            ("http://192.0.0.255/", "IETF protocol"),
            ("http://240.0.0.1/", "reserved"),
            ("http://254.1.2.3/", "reserved"),
            ("http://[64:ff9b:1::1]/", "NAT64"),
            ("http://[64:ff9b:1:ffff::a00:1]/", "NAT64"),
            ("http://[2002:c000:204::1]/", "6to4"),
            ("http://[2002::1]/", "6to4"),
        ];
        for (url, class) in bad {
            let error = check_webhook_url(url, false).await.unwrap_err();
            assert!(error.contains(class), "{url}: {error}");
        }
        // Their neighbours are public.
        for url in [
            "http://198.17.255.255/",
            "http://198.20.0.1/",
            "http://192.0.1.1/",
            "http://223.255.255.254/",
            "http://[64:ff9b:2::1]/",
            "http://[2003::1]/",
        ] {
            assert_eq!(check_webhook_url(url, false).await, Ok(()), "{url}");
        }
    }

    #[tokio::test]
    async fn refuses_non_public_literals_and_localhost() {
        let bad = [
            "http://127.0.0.1/hook",
            "http://127.1.2.3:8080/",
            "http://0x7f000001/",
            "http://localhost:8080/x",
            "http://LOCALHOST./x",
            "http://api.localhost/x",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://169.254.1.1/",
            "http://0.0.0.0/",
            "http://255.255.255.255/",
            "http://100.64.0.1/",
            "http://100.127.255.255/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://[fc00::1]/",
            "http://[fd00:ec2::254]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[64:ff9b::a00:1]/",
        ];
        for url in bad {
            assert!(check_webhook_url(url, false).await.is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn accepts_public_literals() {
        for url in [
            "https://93.184.216.34/hook",
            "http://100.128.0.1/",
            "http://172.32.0.1/",
            "http://[2606:4700::1111]/",
        ] {
            assert_eq!(check_webhook_url(url, false).await, Ok(()), "{url}");
        }
    }

    #[tokio::test]
    async fn scheme_host_and_length_rules() {
        for (url, want) in [
            ("ftp://93.184.216.34/", "http or https"),
            ("file:///etc/passwd", "http or https"),
            ("not a url", "not a valid URL"),
            ("http://", "not a valid URL"),
        ] {
            let err = check_webhook_url(url, false).await.unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
        let long = format!("https://93.184.216.34/{}", "a".repeat(MAX_WEBHOOK_CHARS));
        assert!(
            check_webhook_url(&long, true)
                .await
                .unwrap_err()
                .contains("at most 2048")
        );
    }

    #[tokio::test]
    async fn allow_private_skips_address_checks_only() {
        assert_eq!(
            check_webhook_url("http://127.0.0.1:9000/hook", true).await,
            Ok(())
        );
        assert_eq!(
            check_webhook_url("http://localhost:9000/hook", true).await,
            Ok(())
        );
        assert!(check_webhook_url("ftp://127.0.0.1/", true).await.is_err());
    }
}
