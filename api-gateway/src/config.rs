use std::{net::SocketAddr, path::PathBuf};

use flotilla_catalog::Limits;
use flotilla_nats::TopologyConfig;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub nats_url: String,
    /// Credentials and TLS for NATS.
    pub nats: flotilla_nats::NatsOptions,
    /// When set, every non-public path needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Allow listening beyond loopback without an API key.
    pub allow_unauthenticated_public: bool,
    pub max_body_bytes: usize,
    pub engines_dir: PathBuf,
    pub profiles_dir: PathBuf,
    pub limits: Limits,
    pub topology: TopologyConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid api-gateway config: {0}")]
pub struct ConfigError(String);

impl Config {
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        self.api_key = self.api_key.filter(|key| !key.is_empty());
        if let Some(key) = &self.api_key
            && key.len() < 16
        {
            return Err(ConfigError(
                "the API key must be at least 16 characters".to_owned(),
            ));
        }
        if self.api_key.is_none()
            && !self.listen.ip().is_loopback()
            && !self.allow_unauthenticated_public
        {
            return Err(ConfigError(format!(
                "refusing to listen on {} without an API key: set FLOTILLA_API_KEY, listen on \
                 127.0.0.1, or pass --allow-unauthenticated-public",
                self.listen
            )));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError(
                "the body cap must be at least 1 KiB".to_owned(),
            ));
        }
        Ok(self)
    }
}
