//! The job network when jobs may call the llm-gateway: an internal Docker bridge (no route out,
//! no container-to-container traffic) plus a host firewall chain that lets its containers
//! reach exactly one thing on the host, the llm-gateway's port on the bridge address.
//!
//! Docker's `internal` flag only blocks forwarding; the host itself stays reachable from the
//! bridge (NATS, the Docker API if bound to TCP, anything listening on 0.0.0.0). The INPUT
//! chain below closes that.

use std::{collections::HashMap, net::Ipv4Addr};

use bollard::{
    Docker,
    models::{NetworkCreateRequest, NetworkInspect},
};
use flotilla_proto::names;

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
    #[error("docker network {0} has no IPv4 gateway address")]
    NoGateway(String),
    #[error(
        "firewall: `iptables {args}` failed: {reason} (the agent-node needs root and iptables to fence the job network)"
    )]
    Firewall { args: String, reason: String },
}

/// The llm-gateway's base URL as job containers see it.
pub(super) async fn prepare(
    docker: &Docker,
    network: &str,
    cluster: &str,
    port: u16,
) -> Result<String, NetworkError> {
    let info = ensure_network(docker, network, cluster).await?;
    if info.internal != Some(true) {
        return Err(NetworkError::NotInternal(network.to_owned()));
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
    fence(&bridge, &names::job_network_chain(&id), gateway, port).await?;
    tracing::info!(%network, %bridge, %gateway, port, "job network fenced: containers reach only the llm-gateway");
    Ok(format!("http://{gateway}:{port}"))
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
        options: Some(HashMap::from([(
            // Jobs must not reach each other.
            "com.docker.network.bridge.enable_icc".to_owned(),
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

/// Installs (idempotently, and without a window where the chain is empty) the rules: from the
/// bridge, accept TCP to the gateway address on `port`, drop everything else.
async fn fence(
    bridge: &str,
    chain: &str,
    gateway: Ipv4Addr,
    port: u16,
) -> Result<(), NetworkError> {
    let (gateway, port) = (gateway.to_string(), port.to_string());
    // Create the chain (fails harmlessly if it exists).
    let _ = iptables(&["-N", chain]).await;
    let accept = [
        "-p", "tcp", "-d", &gateway, "--dport", &port, "-j", "ACCEPT",
    ];
    ensure_rule(chain, &accept, true).await?;
    ensure_rule(chain, &["-j", "DROP"], false).await?;
    ensure_rule("INPUT", &["-i", bridge, "-j", chain], true).await
}

/// Adds `rule` to `chain` unless it is there; `first` inserts at the top, else appends.
async fn ensure_rule(chain: &str, rule: &[&str], first: bool) -> Result<(), NetworkError> {
    let with = |op: &'static str| {
        let position: &[&str] = if op == "-I" { &["1"] } else { &[] };
        [&[op, chain][..], position, rule].concat()
    };
    if iptables(&with("-C")).await.is_ok() {
        return Ok(());
    }
    iptables(&with(if first { "-I" } else { "-A" })).await
}

async fn iptables(args: &[&str]) -> Result<(), NetworkError> {
    let output = tokio::process::Command::new("iptables")
        // Wait for the xtables lock rather than fail when Docker holds it.
        .arg("-w")
        .args(args)
        .output()
        .await
        .map_err(|e| NetworkError::Firewall {
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Firewall {
            args: args.join(" "),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
