//! How a service authenticates to NATS and whether it speaks TLS: the flags every service
//! shares ([`NatsArgs`]), validated once into plain data ([`NatsOptions`]) that
//! [`crate::connect`] applies.
//!
//! Passwords and tokens never come from flags, so they cannot show in a process listing: they
//! are read from the environment (`FLOTILLA_NATS_PASSWORD`, `FLOTILLA_NATS_TOKEN`) or from a
//! file (`--nats-password-file`, `--nats-token-file`).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

pub const ENV_CREDS: &str = "FLOTILLA_NATS_CREDS";
pub const ENV_NKEY_FILE: &str = "FLOTILLA_NATS_NKEY_FILE";
pub const ENV_USER: &str = "FLOTILLA_NATS_USER";
/// Environment only (never a flag).
pub const ENV_PASSWORD: &str = "FLOTILLA_NATS_PASSWORD";
pub const ENV_PASSWORD_FILE: &str = "FLOTILLA_NATS_PASSWORD_FILE";
/// Environment only (never a flag).
pub const ENV_TOKEN: &str = "FLOTILLA_NATS_TOKEN";
pub const ENV_TOKEN_FILE: &str = "FLOTILLA_NATS_TOKEN_FILE";
pub const ENV_TLS_CA: &str = "FLOTILLA_NATS_TLS_CA";
pub const ENV_TLS_CERT: &str = "FLOTILLA_NATS_TLS_CERT";
pub const ENV_TLS_KEY: &str = "FLOTILLA_NATS_TLS_KEY";
pub const ENV_TLS_REQUIRED: &str = "FLOTILLA_NATS_TLS_REQUIRED";

/// NATS authentication and TLS settings, the same in every service. At most one
/// authentication method; the password or token itself comes from the environment or a file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS credentials file (`.creds`: a user JWT and its NKey seed), for operator/JWT setups.
    #[arg(long = "nats-creds", env = "FLOTILLA_NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an NKey seed (`SU...`), for NKey users.
    #[arg(
        long = "nats-nkey-file",
        env = "FLOTILLA_NATS_NKEY_FILE",
        value_name = "FILE"
    )]
    pub nkey_file: Option<PathBuf>,
    /// NATS user. Its password comes from FLOTILLA_NATS_PASSWORD (environment only, never a
    /// flag) or --nats-password-file.
    #[arg(long = "nats-user", env = "FLOTILLA_NATS_USER")]
    pub user: Option<String>,
    /// File holding the NATS password (a trailing newline is ignored).
    #[arg(
        long = "nats-password-file",
        env = "FLOTILLA_NATS_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// File holding a NATS token (a trailing newline is ignored). Or FLOTILLA_NATS_TOKEN
    /// (environment only, never a flag).
    #[arg(
        long = "nats-token-file",
        env = "FLOTILLA_NATS_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the NATS server's certificate, instead of the system
    /// roots. Implies --nats-tls-required.
    #[arg(
        long = "nats-tls-ca",
        env = "FLOTILLA_NATS_TLS_CA",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients; needs --nats-tls-key.
    /// Implies --nats-tls-required.
    #[arg(
        long = "nats-tls-cert",
        env = "FLOTILLA_NATS_TLS_CERT",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(
        long = "nats-tls-key",
        env = "FLOTILLA_NATS_TLS_KEY",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect unless the connection is TLS (otherwise TLS is used when the server
    /// asks for it or the URL is `tls://`).
    #[arg(long = "nats-tls-required", env = "FLOTILLA_NATS_TLS_REQUIRED")]
    pub tls_required: bool,
}

/// Validated NATS connection settings: plain data, passed in each service's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// How the service proves who it is to NATS. Secrets are loaded at validation, once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials: the server must allow anonymous clients.
    #[default]
    None,
    /// The content of a `.creds` file: a user JWT and its NKey seed.
    Credentials {
        path: PathBuf,
        content: Secret,
    },
    /// An NKey seed; the server knows the matching public key.
    NKey {
        path: PathBuf,
        seed: Secret,
    },
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

impl NatsAuth {
    /// What was offered, for error messages: names the setting, never the secret.
    pub fn describe(&self) -> String {
        match self {
            Self::None => format!(
                "no credentials (set {ENV_CREDS}, {ENV_NKEY_FILE}, {ENV_USER} with \
                 {ENV_PASSWORD} or {ENV_PASSWORD_FILE}, or {ENV_TOKEN} or {ENV_TOKEN_FILE})"
            ),
            Self::Credentials { path, .. } => {
                format!("the credentials file {} ({ENV_CREDS})", path.display())
            }
            Self::NKey { path, .. } => {
                format!("the NKey seed in {} ({ENV_NKEY_FILE})", path.display())
            }
            Self::UserPassword { user, .. } => format!(
                "user {user:?} ({ENV_USER}) and its password ({ENV_PASSWORD} or \
                 {ENV_PASSWORD_FILE})"
            ),
            Self::Token(_) => format!("the token ({ENV_TOKEN} or {ENV_TOKEN_FILE})"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Trusted CA certificates (PEM); `None` trusts the system roots.
    pub ca: Option<PathBuf>,
    /// Certificate and key presented to servers that verify clients.
    pub client: Option<ClientCertificate>,
    /// Never talk to the server without TLS.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A password, token or key. Its `Debug` never shows it and it has no `Display`, so it cannot
/// leak through a log line or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// An invalid combination of NATS settings, or a file they name that cannot be used. The
/// messages name the environment variables (each has a matching `--nats-*` flag).
#[derive(Debug, thiserror::Error)]
pub enum NatsOptionsError {
    #[error("more than one NATS authentication method is set ({0}): set exactly one")]
    SeveralMethods(String),
    #[error("{ENV_USER} is set but no password: set {ENV_PASSWORD} or {ENV_PASSWORD_FILE}")]
    UserWithoutPassword,
    #[error("a NATS password is set ({ENV_PASSWORD} or {ENV_PASSWORD_FILE}) but no {ENV_USER}")]
    PasswordWithoutUser,
    #[error("{0} and {1} are both set: use one")]
    Both(&'static str, &'static str),
    #[error("{ENV_TLS_CERT} and {ENV_TLS_KEY} go together: {0} is missing")]
    IncompleteClientCertificate(&'static str),
    #[error("cannot read {var} ({}): {source}", path.display())]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{var} ({}) is empty", path.display())]
    Empty { var: &'static str, path: PathBuf },
    #[error("{var} ({}) is not usable: {reason}", path.display())]
    Invalid {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl NatsArgs {
    /// Validates the settings with the process environment (for the password and token).
    pub fn into_options(self) -> Result<NatsOptions, NatsOptionsError> {
        self.into_options_with_env(|name| std::env::var(name).ok())
    }

    /// Validates the settings, reading environment-only values through `env`.
    pub fn into_options_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<NatsOptions, NatsOptionsError> {
        // Empty values count as unset, as for the other secrets in the environment.
        let env = |name: &str| env(name).filter(|value| !value.is_empty());
        let user = self.user.filter(|user| !user.is_empty());
        let (password_env, token_env) = (env(ENV_PASSWORD), env(ENV_TOKEN));

        // Conflicts first: they are the real mistake, whatever the files hold.
        let mut methods = Vec::new();
        if self.creds.is_some() {
            methods.push(ENV_CREDS);
        }
        if self.nkey_file.is_some() {
            methods.push(ENV_NKEY_FILE);
        }
        if user.is_some() || password_env.is_some() || self.password_file.is_some() {
            methods.push(ENV_USER);
        }
        if token_env.is_some() || self.token_file.is_some() {
            methods.push(ENV_TOKEN);
        }
        if methods.len() > 1 {
            return Err(NatsOptionsError::SeveralMethods(methods.join(", ")));
        }
        let password = one_secret(
            password_env,
            ENV_PASSWORD,
            self.password_file,
            ENV_PASSWORD_FILE,
        )?;
        let token = one_secret(token_env, ENV_TOKEN, self.token_file, ENV_TOKEN_FILE)?;

        let auth = if let Some(path) = self.creds {
            // Kept whole: the parser needs the newline that ends the file's last line.
            let content = read(ENV_CREDS, &path)?;
            let content = String::from_utf8(content)
                .map(Secret::new)
                .map_err(|_| invalid(ENV_CREDS, &path, "not UTF-8 text"))?;
            // Parsed now so that a damaged file fails at startup, not at the first connect.
            async_nats::ConnectOptions::new()
                .credentials(content.expose())
                .map_err(|e| invalid(ENV_CREDS, &path, e))?;
            NatsAuth::Credentials { path, content }
        } else if let Some(path) = self.nkey_file {
            let seed = read_secret(ENV_NKEY_FILE, &path)?;
            nkeys::KeyPair::from_seed(seed.expose())
                .map_err(|e| invalid(ENV_NKEY_FILE, &path, e))?;
            NatsAuth::NKey { path, seed }
        } else if user.is_some() || password.is_some() {
            match (user, password) {
                (Some(user), Some(password)) => NatsAuth::UserPassword { user, password },
                (Some(_), None) => return Err(NatsOptionsError::UserWithoutPassword),
                (None, _) => return Err(NatsOptionsError::PasswordWithoutUser),
            }
        } else if let Some(token) = token {
            NatsAuth::Token(token)
        } else {
            NatsAuth::None
        };

        if let Some(ca) = &self.tls_ca {
            check_certificates(ENV_TLS_CA, ca)?;
        }
        let client = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                check_certificates(ENV_TLS_CERT, &cert)?;
                let pem = read(ENV_TLS_KEY, &key)?;
                PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid(ENV_TLS_KEY, &key, e))?;
                Some(ClientCertificate { cert, key })
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(NatsOptionsError::IncompleteClientCertificate(ENV_TLS_KEY));
            }
            (None, Some(_)) => {
                return Err(NatsOptionsError::IncompleteClientCertificate(ENV_TLS_CERT));
            }
        };
        // Whoever names a CA or a client certificate means TLS: never fall back to plain text
        // because the server did not ask for it.
        let required = self.tls_required || self.tls_ca.is_some() || client.is_some();
        Ok(NatsOptions {
            auth,
            tls: NatsTls {
                ca: self.tls_ca,
                client,
                required,
            },
        })
    }
}

/// The value from the environment or from the file, not both.
fn one_secret(
    from_env: Option<String>,
    env_var: &'static str,
    file: Option<PathBuf>,
    file_var: &'static str,
) -> Result<Option<Secret>, NatsOptionsError> {
    match (from_env, file) {
        (Some(_), Some(_)) => Err(NatsOptionsError::Both(env_var, file_var)),
        (Some(value), None) => Ok(Some(Secret::new(value))),
        (None, Some(path)) => read_secret(file_var, &path).map(Some),
        (None, None) => Ok(None),
    }
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, NatsOptionsError> {
    std::fs::read(path).map_err(|source| NatsOptionsError::Read {
        var,
        path: path.to_owned(),
        source,
    })
}

/// A secret file's content without its trailing newline (`echo secret > file` adds one).
fn read_secret(var: &'static str, path: &Path) -> Result<Secret, NatsOptionsError> {
    let bytes = read(var, path)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(var, path, "not UTF-8 text"))?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(NatsOptionsError::Empty {
            var,
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(value))
}

/// At least one PEM certificate, and nothing undecodable.
fn check_certificates(var: &'static str, path: &Path) -> Result<(), NatsOptionsError> {
    let pem = read(var, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(var, path, e))?;
    if certificates.is_empty() {
        return Err(invalid(var, path, "no PEM certificate in it"));
    }
    Ok(())
}

fn invalid(var: &'static str, path: &Path, reason: impl fmt::Display) -> NatsOptionsError {
    NatsOptionsError::Invalid {
        var,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(argv: &[&str]) -> Result<NatsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("service").chain(argv.iter().copied())).map(|c| c.nats)
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn nothing_set_is_an_anonymous_plain_connection() {
        let options = parse(&[]).unwrap().into_options_with_env(env(&[])).unwrap();
        assert_eq!(options, NatsOptions::default());
    }

    #[test]
    fn passwords_and_tokens_have_no_flag_so_they_stay_out_of_argv() {
        for flag in ["--nats-password", "--nats-token"] {
            let error = parse(&[flag, "s3cret"]).unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{flag}"
            );
        }
    }

    #[test]
    fn user_and_password_from_the_environment() {
        let options = parse(&["--nats-user", "node"])
            .unwrap()
            .into_options_with_env(env(&[(ENV_PASSWORD, "s3cret")]))
            .unwrap();
        assert_eq!(
            options.auth,
            NatsAuth::UserPassword {
                user: "node".to_owned(),
                password: Secret::new("s3cret"),
            }
        );
        assert!(!options.tls.required);
    }

    #[test]
    fn a_password_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "password", "s3cret\n");
        let options = NatsArgs {
            user: Some("node".to_owned()),
            password_file: Some(path),
            ..Default::default()
        }
        .into_options_with_env(env(&[]))
        .unwrap();
        assert!(
            matches!(&options.auth, NatsAuth::UserPassword { password, .. } if password.expose() == "s3cret"),
            "{options:?}"
        );
    }

    #[test]
    fn a_token_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "token", "t0ken\r\n");
        let options = parse(&["--nats-token-file", path.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap();
        assert_eq!(options.auth, NatsAuth::Token(Secret::new("t0ken")));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let args = NatsArgs {
            user: Some("node".to_owned()),
            ..Default::default()
        };
        let options = args
            .into_options_with_env(env(&[(ENV_PASSWORD, "hunter2-password")]))
            .unwrap();
        let debug = format!("{options:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(***)"), "{debug}");
        let token = NatsAuth::Token(Secret::new("t0ken-value"));
        assert!(!format!("{token:?}").contains("t0ken"));
        assert!(!token.describe().contains("t0ken"));
    }

    #[test]
    fn a_user_without_a_password_is_refused_with_the_variables_to_set() {
        let error = parse(&["--nats-user", "node"])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(matches!(error, NatsOptionsError::UserWithoutPassword));
        let message = error.to_string();
        assert!(
            message.contains(ENV_PASSWORD) && message.contains(ENV_PASSWORD_FILE),
            "{message}"
        );
    }

    #[test]
    fn a_password_without_a_user_is_refused() {
        let error = parse(&[])
            .unwrap()
            .into_options_with_env(env(&[(ENV_PASSWORD, "s3cret")]))
            .unwrap_err();
        assert!(
            matches!(error, NatsOptionsError::PasswordWithoutUser),
            "{error}"
        );
    }

    #[test]
    fn two_authentication_methods_are_refused() {
        let error = parse(&["--nats-user", "node"])
            .unwrap()
            .into_options_with_env(env(&[(ENV_PASSWORD, "p"), (ENV_TOKEN, "t")]))
            .unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, NatsOptionsError::SeveralMethods(_)),
            "{message}"
        );
        assert!(
            message.contains(ENV_USER) && message.contains(ENV_TOKEN),
            "{message}"
        );
        assert!(
            !message.contains("\"p\"") && !message.contains("\"t\""),
            "{message}"
        );
    }

    #[test]
    fn a_secret_in_the_environment_and_in_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "token", "t");
        let error = parse(&["--nats-token-file", path.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[(ENV_TOKEN, "t")]))
            .unwrap_err();
        assert!(
            matches!(error, NatsOptionsError::Both(ENV_TOKEN, ENV_TOKEN_FILE)),
            "{error}"
        );
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let options = parse(&[])
            .unwrap()
            .into_options_with_env(env(&[(ENV_PASSWORD, ""), (ENV_TOKEN, "")]))
            .unwrap();
        assert_eq!(options.auth, NatsAuth::None);
    }

    #[test]
    fn unreadable_or_empty_files_name_their_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.creds");
        let error = parse(&["--nats-creds", missing.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(error, NatsOptionsError::Read { var: ENV_CREDS, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("missing.creds"), "{error}");

        let empty = file(&dir, "empty", "\n");
        let error = NatsArgs {
            user: Some("node".to_owned()),
            password_file: Some(empty),
            ..Default::default()
        }
        .into_options_with_env(env(&[]))
        .unwrap_err();
        assert!(
            matches!(
                error,
                NatsOptionsError::Empty {
                    var: ENV_PASSWORD_FILE,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn damaged_credentials_and_seeds_are_refused_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let creds = file(&dir, "user.creds", "not a creds file");
        let error = parse(&["--nats-creds", creds.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(error, NatsOptionsError::Invalid { var: ENV_CREDS, .. }),
            "{error}"
        );

        let seed = file(&dir, "seed", "SUNOTASEED");
        let error = parse(&["--nats-nkey-file", seed.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(
                error,
                NatsOptionsError::Invalid {
                    var: ENV_NKEY_FILE,
                    ..
                }
            ),
            "{error}"
        );
        let error = error.to_string();
        assert!(!error.contains("SUNOTASEED"), "{error}");
    }

    #[test]
    fn a_credentials_file_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        // The JWT is the server's business; the client only needs it well formed.
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let path = file(&dir, "user.creds", &text);
        let options = parse(&["--nats-creds", path.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap();
        assert!(
            matches!(&options.auth, NatsAuth::Credentials { content, .. } if content.expose() == text),
            "{options:?}"
        );
        assert!(!format!("{options:?}").contains(&seed));
    }

    #[test]
    fn a_valid_nkey_seed_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().unwrap();
        let path = file(&dir, "seed", &format!("{seed}\n"));
        let options = parse(&["--nats-nkey-file", path.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap();
        assert!(
            matches!(&options.auth, NatsAuth::NKey { seed: loaded, .. } if loaded.expose() == seed),
            "{options:?}"
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = file(&dir, "cert.pem", "");
        let error = parse(&["--nats-tls-cert", cert.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(
                error,
                NatsOptionsError::IncompleteClientCertificate(ENV_TLS_KEY)
            ),
            "{error}"
        );
        let error = parse(&["--nats-tls-key", cert.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(
                error,
                NatsOptionsError::IncompleteClientCertificate(ENV_TLS_CERT)
            ),
            "{error}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = file(&dir, "ca.pem", "hello\n");
        let error = parse(&["--nats-tls-ca", ca.to_str().unwrap()])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap_err();
        assert!(
            matches!(
                error,
                NatsOptionsError::Invalid {
                    var: ENV_TLS_CA,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn tls_required_flag() {
        let options = parse(&["--nats-tls-required"])
            .unwrap()
            .into_options_with_env(env(&[]))
            .unwrap();
        assert!(options.tls.required);
    }
}
