//! Named git credentials (`FLOTILLA_GIT_CREDENTIALS_FILE`) and the forges' REST APIs that open
//! pull requests with them. A credential's secret is read when a job needs it (so a rotated
//! token file is picked up) and only ever goes into a child process' environment or an HTTP
//! header: never argv, a log, the job record or the container.
//!
//! ```toml
//! [credentials.github]
//! token_file = "/run/secrets/github-token"   # or token = "..."
//! username = "x-access-token"                # https user name (the default)
//! forge = "github"                           # where pull requests are opened
//! api_url = "https://api.github.com"         # the default for github
//!
//! [credentials.deploy]
//! ssh_key_file = "/etc/flotilla/deploy_key"
//! known_hosts_file = "/etc/flotilla/known_hosts"
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::git::GitError;

/// The credentials a node holds, by name.
#[derive(Debug, Clone, Default)]
pub struct Credentials(BTreeMap<String, Credential>);

/// One named credential. `Debug` never shows the token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    ssh_key_file: Option<PathBuf>,
    #[serde(default)]
    known_hosts_file: Option<PathBuf>,
    #[serde(default)]
    forge: Option<ForgeKind>,
    #[serde(default)]
    api_url: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .field("username", &self.username)
            .field("ssh_key_file", &self.ssh_key_file)
            .field("forge", &self.forge)
            .field("api_url", &self.api_url)
            .finish()
    }
}

/// The forges whose pull-request API Flotilla speaks. GitLab's merge requests and Gitea's
/// pulls take the same inputs ([`PullRequestSpec`]); they slot in beside GitHub in
/// [`open_pull_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    Github,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    credentials: BTreeMap<String, Credential>,
}

impl Credentials {
    /// Reads and checks the credentials file; the secrets in `token_file`s are read later.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read git credentials {}: {e}", path.display()))?;
        let file: CredentialsFile = toml::from_str(&text)
            .map_err(|e| format!("git credentials {}: {e}", path.display()))?;
        for (name, credential) in &file.credentials {
            if !flotilla_proto::ids::is_safe_id(name, 64) {
                return Err(format!(
                    "git credential name {name:?} must match ^[A-Za-z0-9_-]{{1,64}}$"
                ));
            }
            if credential.token.is_some() && credential.token_file.is_some() {
                return Err(format!(
                    "git credential {name}: set token or token_file, not both"
                ));
            }
        }
        Ok(Self(file.credentials))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Credential> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl Credential {
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some() || self.token_file.is_some()
    }

    /// The token, read from its file now if it has one.
    pub(crate) fn token(&self) -> Result<String, String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let Some(file) = &self.token_file else {
            return Err("the credential has no token".to_owned());
        };
        std::fs::read_to_string(file)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("cannot read the credential's token_file: {e}"))
    }

    pub(crate) fn username(&self) -> &str {
        self.username.as_deref().unwrap_or("x-access-token")
    }

    pub(crate) fn ssh_key_file(&self) -> Option<&PathBuf> {
        self.ssh_key_file.as_ref()
    }

    pub(crate) fn known_hosts_file(&self) -> Option<&PathBuf> {
        self.known_hosts_file.as_ref()
    }
}

/// `Authorization: Basic ...` for git over https.
pub(crate) fn basic_auth_header(user: &str, token: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    format!("Authorization: Basic {encoded}")
}

/// What a pull request is made of, whatever the forge.
pub(crate) struct PullRequestSpec<'a> {
    pub(crate) title: &'a str,
    pub(crate) body: &'a str,
    pub(crate) head: &'a str,
    pub(crate) base: &'a str,
}

/// Opens a pull request on the repository at `repo_path` (`/owner/name.git`); returns its
/// web URL.
pub(crate) async fn open_pull_request(
    credential: &Credential,
    repo_path: &str,
    spec: &PullRequestSpec<'_>,
) -> Result<String, GitError> {
    let Some(ForgeKind::Github) = credential.forge else {
        return Err(GitError::Refused(
            "push.pull_request: the credential names no forge (forge = \"github\")".to_owned(),
        ));
    };
    let api = credential
        .api_url
        .as_deref()
        .unwrap_or("https://api.github.com")
        .trim_end_matches('/');
    let repo = repo_path.trim_matches('/').trim_end_matches(".git");
    let token = credential.token().map_err(GitError::Refused)?;
    let response = reqwest::Client::new()
        .post(format!("{api}/repos/{repo}/pulls"))
        .bearer_auth(&token)
        .header("Accept", "application/vnd.github+json")
        .header("User-Agent", "flotilla")
        .json(&serde_json::json!({
            "title": spec.title,
            "body": spec.body,
            "head": spec.head,
            "base": spec.base,
        }))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| GitError::Unavailable(format!("the forge did not answer: {e}")))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        let message = body["message"].as_str().unwrap_or("no message");
        let error = format!("the forge refused the pull request ({status}): {message}");
        return Err(if status.is_server_error() {
            GitError::Unavailable(error)
        } else {
            GitError::Refused(error)
        });
    }
    body["html_url"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| GitError::Refused("the forge's answer has no html_url".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_named_and_their_tokens_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("git.toml");
        std::fs::write(
            &path,
            "[credentials.gh]\ntoken = \"ghp_secret\"\nforge = \"github\"\n",
        )
        .unwrap();
        let credentials = Credentials::load(&path).unwrap();
        let gh = credentials.get("gh").unwrap();
        assert_eq!(gh.token().unwrap(), "ghp_secret");
        assert!(!format!("{credentials:?}").contains("ghp_secret"));
        std::fs::write(&path, "[credentials.\"bad name\"]\ntoken = \"x\"\n").unwrap();
        assert!(Credentials::load(&path).is_err());
    }
}
