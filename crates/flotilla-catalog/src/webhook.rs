//! SSRF guard for webhook URLs: a client must not be able to make the fleet call into its own
//! network. Run at submit and again right before sending, since DNS answers can change.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use url::{Host, Url};

pub(crate) const MAX_WEBHOOK_CHARS: usize = 2048;
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks that `url` is an http(s) URL whose host is public. With `allow_private` (tests only)
/// the host is not resolved nor classified.
pub async fn check_webhook_url(url: &str, allow_private: bool) -> Result<(), String> {
    if crate::rules::too_long(url, MAX_WEBHOOK_CHARS) {
        return Err(format!(
            "webhook_url must be at most {MAX_WEBHOOK_CHARS} characters"
        ));
    }
    let parsed = Url::parse(url).map_err(|e| format!("webhook_url is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("webhook_url must use http or https".to_owned());
    }
    let Some(host) = parsed.host() else {
        return Err("webhook_url must have a host".to_owned());
    };
    if allow_private {
        return Ok(());
    }
    let refuse = |class: &str| format!("webhook_url must not point to a {class} address");
    match host {
        Host::Ipv4(ip) => forbidden_class(IpAddr::V4(ip)).map_or(Ok(()), |c| Err(refuse(c))),
        Host::Ipv6(ip) => forbidden_class(IpAddr::V6(ip)).map_or(Ok(()), |c| Err(refuse(c))),
        Host::Domain(name) => {
            let name = name.trim_end_matches('.');
            if name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost")
            {
                return Err(refuse("loopback"));
            }
            let port = parsed.port_or_known_default().unwrap_or(80);
            let addrs = tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((name, port)))
                .await
                .map_err(|_| "webhook_url host could not be resolved in time".to_owned())?
                .map_err(|_| "webhook_url host does not resolve".to_owned())?;
            let mut resolved = false;
            for addr in addrs {
                resolved = true;
                if let Some(class) = forbidden_class(addr.ip()) {
                    // The address itself stays out of the message: it may be internal detail.
                    return Err(format!("webhook_url host resolves to a {class} address"));
                }
            }
            if resolved {
                Ok(())
            } else {
                Err("webhook_url host does not resolve".to_owned())
            }
        }
    }
}

/// The kind of non-public address `ip` is, if it is one.
fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
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
    use super::*;

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
