//! The job network when jobs may call the llm-gateway: an internal Docker bridge (no route out,
//! no container-to-container traffic, no IPv6) plus a host firewall chain that lets its
//! containers reach exactly one thing on the host, the llm-gateway's port on the bridge address.
//!
//! Docker's `internal` flag only blocks forwarding; the host itself stays reachable from the
//! bridge (NATS, the Docker API if bound to TCP, anything listening on 0.0.0.0). The INPUT
//! chain below closes that for IPv4; an ip6tables chain drops all IPv6 from the bridge (the
//! gateway is reached over IPv4), in case a runtime or a later Docker gives containers IPv6.
//!
//! [`prepare`] sets all this up at start; [`check`] verifies it is all still there, since
//! anyone with root on the host (a firewall reload, `docker network rm`) can undo it later.

use std::{collections::HashMap, net::Ipv4Addr, path::Path};

use bollard::{
    Docker,
    models::{NetworkCreateRequest, NetworkInspect},
};
use flotilla_proto::names;

const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("docker network {network}: {source}")]
    Docker {
        network: String,
        source: bollard::errors::Error,
    },
    #[error(
        "docker network {0} is not internal: job containers on it could reach anything; remove it or name another network"
    )]
    NotInternal(String),
    #[error(
        "docker network {0} lets containers reach each other ({ICC_OPTION} is not false): remove it or name another network"
    )]
    IccEnabled(String),
    #[error(
        "docker network {0} has IPv6 enabled, which the fence does not cover: remove it or name another network"
    )]
    Ipv6Enabled(String),
    #[error("docker network {0} has no IPv4 gateway address")]
    NoGateway(String),
    #[error(
        "firewall: `{binary} {args}` failed: {reason} (the agent-node needs root and iptables to fence the job network)"
    )]
    Firewall {
        binary: &'static str,
        args: String,
        reason: String,
    },
    #[error("firewall rule `{binary} {rule}` is gone: the job network is no longer fenced")]
    RuleMissing { binary: &'static str, rule: String },
}

/// Creates the network if need be, checks it is safe, fences it; returns the llm-gateway's
/// base URL as job containers see it.
pub(super) async fn prepare(
    docker: &Docker,
    network: &str,
    cluster: &str,
    port: u16,
) -> Result<String, NetworkError> {
    let info = ensure_network(docker, network, cluster).await?;
    let fence = Fence::of(network, &info, port)?;
    fence.install().await?;
    let (bridge, gateway) = (&fence.bridge, fence.gateway);
    tracing::info!(%network, %bridge, %gateway, port, "job network fenced: containers reach only the llm-gateway");
    Ok(fence.url())
}

/// Checks, without changing anything, that the network is still internal, without ICC or
/// IPv6, and that every firewall rule of its fence is in place; returns the gateway's URL as
/// containers see it (a network re-created meanwhile may have another).
pub(super) async fn check(
    docker: &Docker,
    network: &str,
    port: u16,
) -> Result<String, NetworkError> {
    let info = docker
        .inspect_network(network, None)
        .await
        .map_err(|source| NetworkError::Docker {
            network: network.to_owned(),
            source,
        })?;
    let fence = Fence::of(network, &info, port)?;
    fence.verify().await?;
    Ok(fence.url())
}

async fn ensure_network(
    docker: &Docker,
    network: &str,
    cluster: &str,
) -> Result<NetworkInspect, NetworkError> {
    let fail = |source| NetworkError::Docker {
        network: network.to_owned(),
        source,
    };
    if let Ok(info) = docker.inspect_network(network, None).await {
        return Ok(info);
    }
    let request = NetworkCreateRequest {
        name: network.to_owned(),
        driver: Some("bridge".to_owned()),
        internal: Some(true),
        // Said even where it is the default: the fence is written for IPv4.
        enable_ipv6: Some(false),
        options: Some(HashMap::from([(
            // Jobs must not reach each other.
            ICC_OPTION.to_owned(),
            "false".to_owned(),
        )])),
        labels: Some(HashMap::from([
            (names::LABEL_MANAGED.to_owned(), "true".to_owned()),
            (names::LABEL_CLUSTER.to_owned(), cluster.to_owned()),
        ])),
        ..Default::default()
    };
    // Another node on this host may create it at the same moment: then inspect wins.
    if let Err(e) = docker.create_network(request).await {
        tracing::debug!(error = %e, "network create raced");
    }
    docker.inspect_network(network, None).await.map_err(fail)
}

/// The fence of one job network: what it must be, and the rules that keep it so.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    bridge: String,
    chain: String,
    gateway: Ipv4Addr,
    port: u16,
}

/// One firewall rule: its table's tool, chain, match, and whether it goes first.
struct Rule {
    binary: &'static str,
    chain: String,
    spec: Vec<String>,
    first: bool,
}

impl Fence {
    /// The fence `info` needs, once its settings are checked safe.
    fn of(network: &str, info: &NetworkInspect, port: u16) -> Result<Self, NetworkError> {
        if info.internal != Some(true) {
            return Err(NetworkError::NotInternal(network.to_owned()));
        }
        let icc = info.options.as_ref().and_then(|o| o.get(ICC_OPTION));
        if icc.map(String::as_str) != Some("false") {
            return Err(NetworkError::IccEnabled(network.to_owned()));
        }
        if info.enable_ipv6 == Some(true) {
            return Err(NetworkError::Ipv6Enabled(network.to_owned()));
        }
        let gateway = info
            .ipam
            .as_ref()
            .and_then(|ipam| ipam.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.gateway.as_deref())
            .find_map(|g| g.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| NetworkError::NoGateway(network.to_owned()))?;
        let id = info.id.clone().unwrap_or_default();
        let bridge = info
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
            .unwrap_or_else(|| format!("br-{}", &id[..id.len().min(12)]));
        Ok(Self {
            bridge,
            chain: names::job_network_chain(&id),
            gateway,
            port,
        })
    }

    fn url(&self) -> String {
        format!("http://{}:{}", self.gateway, self.port)
    }

    /// From the bridge: IPv4 TCP to the gateway address on `port` accepted, all else dropped;
    /// all IPv6 dropped when the host has an IPv6 stack.
    fn rules(&self) -> Vec<Rule> {
        let rule = |binary, chain: &str, spec: &[&str], first| Rule {
            binary,
            chain: chain.to_owned(),
            spec: spec.iter().map(|s| (*s).to_owned()).collect(),
            first,
        };
        let (gateway, port) = (self.gateway.to_string(), self.port.to_string());
        let accept = [
            "-p", "tcp", "-d", &gateway, "--dport", &port, "-j", "ACCEPT",
        ];
        let jump = ["-i", &self.bridge, "-j", &self.chain];
        let mut rules = vec![
            rule("iptables", &self.chain, &accept, true),
            rule("iptables", &self.chain, &["-j", "DROP"], false),
            rule("iptables", "INPUT", &jump, true),
        ];
        if host_has_ipv6() {
            rules.push(rule("ip6tables", &self.chain, &["-j", "DROP"], false));
            rules.push(rule("ip6tables", "INPUT", &jump, true));
        }
        rules
    }

    /// Installs the rules idempotently, without a window where a chain is empty.
    async fn install(&self) -> Result<(), NetworkError> {
        // Create the chains (fails harmlessly if they exist).
        let _ = xtables("iptables", &["-N", &self.chain]).await;
        if host_has_ipv6() {
            let _ = xtables("ip6tables", &["-N", &self.chain]).await;
        }
        for rule in self.rules() {
            rule.ensure().await?;
        }
        Ok(())
    }

    async fn verify(&self) -> Result<(), NetworkError> {
        for rule in self.rules() {
            if xtables(rule.binary, &rule.args("-C")).await.is_err() {
                return Err(NetworkError::RuleMissing {
                    binary: rule.binary,
                    rule: rule.args("-C").join(" "),
                });
            }
        }
        Ok(())
    }
}

impl Rule {
    /// The arguments of `op` (`-C`, `-I` at the top, `-A`) on this rule.
    fn args<'a>(&'a self, op: &'a str) -> Vec<&'a str> {
        let mut args = vec![op, self.chain.as_str()];
        if op == "-I" {
            args.push("1");
        }
        args.extend(self.spec.iter().map(String::as_str));
        args
    }

    /// Adds the rule unless it is there; at the top if `first`, else at the end.
    async fn ensure(&self) -> Result<(), NetworkError> {
        if xtables(self.binary, &self.args("-C")).await.is_ok() {
            return Ok(());
        }
        xtables(
            self.binary,
            &self.args(if self.first { "-I" } else { "-A" }),
        )
        .await
    }
}

/// Whether the host runs an IPv6 stack (then its bridges can carry IPv6 to the host).
fn host_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

async fn xtables(binary: &'static str, args: &[&str]) -> Result<(), NetworkError> {
    let failed = |reason: String| NetworkError::Firewall {
        binary,
        args: args.join(" "),
        reason,
    };
    let output = tokio::process::Command::new(binary)
        // Wait for the xtables lock rather than fail when Docker holds it.
        .arg("-w")
        .args(args)
        .output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{Ipam, IpamConfig};

    use super::*;

    fn inspect(internal: bool, icc: Option<&str>, ipv6: Option<bool>) -> NetworkInspect {
        let mut options = HashMap::new();
        if let Some(icc) = icc {
            options.insert(ICC_OPTION.to_owned(), icc.to_owned());
        }
        NetworkInspect {
            id: Some("0123456789abcdef0123".to_owned()),
            internal: Some(internal),
            enable_ipv6: ipv6,
            options: Some(options),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    gateway: Some("172.30.0.1".to_owned()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_safe_network_gives_its_fence() {
        let fence = Fence::of("jobs", &inspect(true, Some("false"), Some(false)), 8421).unwrap();
        assert_eq!(fence.bridge, "br-0123456789ab");
        assert_eq!(
            fence.chain,
            names::job_network_chain("0123456789abcdef0123")
        );
        assert_eq!(fence.url(), "http://172.30.0.1:8421");
        let rules: Vec<String> = fence
            .rules()
            .iter()
            .map(|r| format!("{} {}", r.binary, r.args("-C").join(" ")))
            .collect();
        let chain = &fence.chain;
        assert_eq!(
            rules[..3],
            [
                format!("iptables -C {chain} -p tcp -d 172.30.0.1 --dport 8421 -j ACCEPT"),
                format!("iptables -C {chain} -j DROP"),
                format!("iptables -C INPUT -i br-0123456789ab -j {chain}"),
            ]
        );
        if host_has_ipv6() {
            assert_eq!(
                rules[3..],
                [
                    format!("ip6tables -C {chain} -j DROP"),
                    format!("ip6tables -C INPUT -i br-0123456789ab -j {chain}"),
                ]
            );
        }
    }

    #[test]
    fn icc_ipv6_and_external_networks_are_refused() {
        let refused = |info: NetworkInspect| Fence::of("jobs", &info, 8421).unwrap_err();
        assert!(matches!(
            refused(inspect(false, Some("false"), None)),
            NetworkError::NotInternal(_)
        ));
        for icc in [None, Some("true"), Some("1")] {
            assert!(matches!(
                refused(inspect(true, icc, None)),
                NetworkError::IccEnabled(_)
            ));
        }
        assert!(matches!(
            refused(inspect(true, Some("false"), Some(true))),
            NetworkError::Ipv6Enabled(_)
        ));
    }
}
