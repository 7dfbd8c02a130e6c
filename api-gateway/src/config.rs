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
    /// When set (with `api_key`), only this key may change the shared configuration (`PUT` and
    /// `DELETE /configs/...`); it also works everywhere `api_key` does.
    pub admin_api_key: Option<String>,
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
        self.admin_api_key = self.admin_api_key.filter(|key| !key.is_empty());
        self.check_keys()?;
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

    fn check_keys(&self) -> Result<(), ConfigError> {
        let refuse = |why: &str| Err(ConfigError(why.to_owned()));
        if self.api_key.as_ref().is_some_and(|key| key.len() < 16) {
            return refuse("the API key must be at least 16 characters");
        }
        let Some(admin) = &self.admin_api_key else {
            return Ok(());
        };
        if admin.len() < 16 {
            return refuse(
                "the admin API key (FLOTILLA_ADMIN_API_KEY) must be at least 16 characters",
            );
        }
        match &self.api_key {
            // Without an API key nothing is authenticated, so an admin key would guard nothing.
            None => refuse("FLOTILLA_ADMIN_API_KEY needs FLOTILLA_API_KEY to be set too"),
            Some(key) if key == admin => {
                refuse("FLOTILLA_ADMIN_API_KEY must differ from FLOTILLA_API_KEY")
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "submit-key-0123456789";
    const ADMIN: &str = "admin-key-0123456789";

    fn config(api_key: Option<&str>, admin_api_key: Option<&str>) -> Config {
        Config {
            listen: "127.0.0.1:8420".parse().unwrap(),
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats: Default::default(),
            api_key: api_key.map(str::to_owned),
            admin_api_key: admin_api_key.map(str::to_owned),
            allow_unauthenticated_public: false,
            max_body_bytes: 8 << 20,
            engines_dir: "engines".into(),
            profiles_dir: "profiles".into(),
            limits: Limits::default(),
            topology: Default::default(),
        }
    }

    fn refusal(api_key: Option<&str>, admin_api_key: Option<&str>) -> String {
        config(api_key, admin_api_key)
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_admin_key_is_optional_and_distinct_from_the_api_key() {
        let both = config(Some(KEY), Some(ADMIN)).validate().unwrap();
        assert_eq!(both.admin_api_key.as_deref(), Some(ADMIN));
        // Empty means unset, as for the API key.
        let empty = config(Some(KEY), Some("")).validate().unwrap();
        assert_eq!(empty.admin_api_key, None);
        assert!(config(None, None).validate().is_ok());

        let short = refusal(Some(KEY), Some("admin-short"));
        assert!(
            short.contains("(FLOTILLA_ADMIN_API_KEY) must be at least 16"),
            "{short}"
        );
        let same = refusal(Some(KEY), Some(KEY));
        assert!(same.contains("must differ from FLOTILLA_API_KEY"), "{same}");
        let alone = refusal(None, Some(ADMIN));
        assert!(alone.contains("needs FLOTILLA_API_KEY"), "{alone}");
        let short_api = refusal(Some("short"), Some(ADMIN));
        assert!(
            short_api.contains("the API key must be at least 16"),
            "{short_api}"
        );
    }
}
