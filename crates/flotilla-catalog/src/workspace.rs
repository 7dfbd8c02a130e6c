//! `workspace.git`, `outputs` and `push`: what a job takes in and leaves behind. Checked at
//! submit, and the repository URL again on the node right before it fetches (DNS answers
//! change): [`resolve_git_url`] returns the addresses it checked, which the fetch is pinned to.

use std::net::{IpAddr, SocketAddr};

use flotilla_proto::{
    GitRequest, GitSource, PullRequest, PullRequestRequest, Push, PushRequest, WorkspaceRequest,
};
use url::{Host, Url};

use crate::rules;
use crate::validate::ValidationError;
use crate::webhook::{Resolve, forbidden_class, lookup_host};

pub const MAX_OUTPUTS: usize = 100;
const MAX_OUTPUT_CHARS: usize = 256;
const MAX_GIT_URL_CHARS: usize = 2048;
const MAX_REF_CHARS: usize = 255;
const MAX_BRANCH_CHARS: usize = 200;
const MAX_MESSAGE_CHARS: usize = 65_536;
const MAX_TITLE_CHARS: usize = 256;
const MAX_DEPTH: i64 = 1_000_000;

/// The repositories jobs may name (`FLOTILLA_GIT_ALLOWED_HOSTS`, comma-separated): host names
/// or addresses, compared without case; `file:///some/dir` entries allow `file://` URLs under
/// that directory of the node's host. Empty: no job may have `workspace.git`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitAllowList {
    hosts: Vec<String>,
    file_dirs: Vec<String>,
}

impl GitAllowList {
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut allow = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(dir) = entry.strip_prefix("file://") {
                if !dir.starts_with('/') || dir.split('/').any(|part| part == "..") {
                    return Err(format!(
                        "FLOTILLA_GIT_ALLOWED_HOSTS entry {entry:?}: a file:// entry names an \
                         absolute directory, like file:///srv/git"
                    ));
                }
                allow.file_dirs.push(dir.trim_end_matches('/').to_owned());
            } else if entry.contains(['/', ':', '@']) && entry.parse::<IpAddr>().is_err() {
                return Err(format!(
                    "FLOTILLA_GIT_ALLOWED_HOSTS entry {entry:?} is not a host name or address"
                ));
            } else {
                allow.hosts.push(entry.to_ascii_lowercase());
            }
        }
        Ok(allow)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.file_dirs.is_empty()
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    fn allows_file(&self, path: &str) -> bool {
        self.file_dirs
            .iter()
            .any(|dir| path == dir || path.starts_with(&format!("{dir}/")))
    }
}

/// Where a checked repository URL may be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitTarget {
    /// A directory on the node's host.
    File { path: String },
    /// A remote: connect to one of `addrs` (checked), keeping `host` for TLS and SSH.
    Remote {
        scheme: String,
        host: String,
        port: u16,
        addrs: Vec<SocketAddr>,
    },
}

/// Checks `url` against `allow` and the webhook rules, resolving its host once.
pub async fn resolve_git_url(
    url: &str,
    allow: &GitAllowList,
    resolver: &dyn Resolve,
) -> Result<GitTarget, String> {
    let parsed = parse_git_url(url)?;
    if parsed.scheme() == "file" {
        let path = parsed.path();
        if !allow.allows_file(path) {
            return Err(format!(
                "workspace.git.url {path:?} is not under a file:// directory of \
                 FLOTILLA_GIT_ALLOWED_HOSTS"
            ));
        }
        return Ok(GitTarget::File {
            path: path.to_owned(),
        });
    }
    let port = parsed.port().unwrap_or(match parsed.scheme() {
        "https" => 443,
        "ssh" => 22,
        _ => 9418,
    });
    let (host, ips) = match parsed.host() {
        Some(Host::Ipv4(ip)) => (ip.to_string(), vec![IpAddr::V4(ip)]),
        Some(Host::Ipv6(ip)) => (ip.to_string(), vec![IpAddr::V6(ip)]),
        // `git://` and `ssh://` are not special schemes: their hosts stay names, addresses too.
        Some(Host::Domain(name)) => match name.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => (ip.to_string(), vec![ip]),
            Err(_) => (name.to_owned(), Vec::new()),
        },
        None => return Err("workspace.git.url must have a host".to_owned()),
    };
    if !allow.allows_host(&host) {
        return Err(format!(
            "workspace.git.url host {} is not in FLOTILLA_GIT_ALLOWED_HOSTS",
            rules::clip(&host)
        ));
    }
    // An address listed as such (127.0.0.1 for local use) is the operator's explicit choice;
    // a listed name must still resolve to public addresses only.
    let ips = if ips.is_empty() {
        let ips = lookup_host(resolver, &host)
            .await
            .map_err(|e| format!("workspace.git.url host {e}"))?;
        if let Some(class) = ips.iter().find_map(|ip| forbidden_class(*ip)) {
            return Err(format!(
                "workspace.git.url host resolves to a {class} address"
            ));
        }
        ips
    } else {
        ips
    };
    let mut addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    addrs.dedup();
    Ok(GitTarget::Remote {
        scheme: parsed.scheme().to_owned(),
        host,
        port,
        addrs,
    })
}

fn parse_git_url(url: &str) -> Result<Url, String> {
    if rules::too_long(url, MAX_GIT_URL_CHARS) {
        return Err(format!(
            "workspace.git.url must be at most {MAX_GIT_URL_CHARS} characters"
        ));
    }
    let parsed =
        Url::parse(url).map_err(|e| format!("workspace.git.url is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "https" | "ssh" | "git" | "file") {
        return Err("workspace.git.url must use https, ssh, git or file".to_owned());
    }
    if !parsed.username().is_empty() && parsed.scheme() != "ssh" || parsed.password().is_some() {
        return Err(
            "workspace.git.url must not carry credentials: name one of the node's with \
             workspace.git.credential"
                .to_owned(),
        );
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("workspace.git.url must not have a query or a fragment".to_owned());
    }
    Ok(parsed)
}

/// `workspace.git` at submit: shape, and the URL against the allow-list.
pub(crate) async fn check_workspace(
    workspace: Option<WorkspaceRequest>,
    allow: &GitAllowList,
    resolver: &dyn Resolve,
) -> Result<Option<GitSource>, ValidationError> {
    let Some(GitRequest {
        url,
        git_ref,
        depth,
        credential,
    }) = workspace.and_then(|w| w.git)
    else {
        return Ok(None);
    };
    let Some(url) = url else {
        return Err(ValidationError::missing(
            "workspace.git.url",
            "workspace.git.url is required".to_owned(),
        ));
    };
    if allow.is_empty() {
        return Err(ValidationError::invalid(
            "workspace.git",
            "is not enabled on this fleet: the operator sets FLOTILLA_GIT_ALLOWED_HOSTS",
        ));
    }
    resolve_git_url(&url, allow, resolver)
        .await
        .map_err(|message| ValidationError::at("workspace.git.url", message))?;
    let source = GitSource {
        url,
        git_ref,
        depth: depth
            .map(|d| {
                if (1..=MAX_DEPTH).contains(&d) {
                    Ok(d as u32)
                } else {
                    Err(ValidationError::invalid(
                        "workspace.git.depth",
                        format!("must be between 1 and {MAX_DEPTH}"),
                    ))
                }
            })
            .transpose()?,
        credential,
        commit: None,
    };
    check_git_source(&source)?;
    Ok(Some(source))
}

/// What the node checks again on a queue message (it is not only the gateway that publishes).
pub(crate) fn check_git_source(source: &GitSource) -> Result<(), ValidationError> {
    parse_git_url(&source.url).map_err(|m| ValidationError::at("workspace.git.url", m))?;
    if let Some(git_ref) = &source.git_ref {
        check_ref_name("workspace.git.ref", git_ref, MAX_REF_CHARS)?;
    }
    if let Some(credential) = &source.credential {
        rules::check_safe_id(credential)
            .map_err(|e| ValidationError::invalid("workspace.git.credential", e))?;
    }
    let commit_id = |c: &String| c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit());
    if source.commit.as_ref().is_some_and(|c| !commit_id(c)) {
        return Err(ValidationError::invalid(
            "workspace.git.commit",
            "must be a 40-hex commit id",
        ));
    }
    Ok(())
}

/// A branch, tag or commit name git accepts and no command line mistakes for an option.
fn check_ref_name(field: &str, name: &str, max: usize) -> Result<(), ValidationError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    let valid = !name.is_empty()
        && name.len() <= max
        && valid_chars
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("/.");
    if valid {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            field,
            format!(
                "must be a git ref name of 1-{max} characters from [A-Za-z0-9._/-], not \
                 starting with - / or ., without .. or //"
            ),
        ))
    }
}

/// `outputs`: relative globs.
pub(crate) fn check_outputs(outputs: &[String]) -> Result<(), ValidationError> {
    if outputs.len() > MAX_OUTPUTS {
        return Err(ValidationError::invalid(
            "outputs",
            format!("must have at most {MAX_OUTPUTS} items"),
        ));
    }
    for (i, pattern) in outputs.iter().enumerate() {
        let field = format!("outputs[{i}]");
        let relative = !pattern.is_empty()
            && !pattern.starts_with('/')
            && !pattern
                .split('/')
                .any(|part| part == ".." || part.is_empty())
            && !pattern.contains(['\0', '\\']);
        if !relative || rules::too_long(pattern, MAX_OUTPUT_CHARS) {
            return Err(ValidationError::invalid(
                &field,
                format!(
                    "must be a glob relative to /workspace of at most {MAX_OUTPUT_CHARS} \
                     characters, without .. or empty parts"
                ),
            ));
        }
    }
    Ok(())
}

/// `push` at submit: defaults resolved; it needs a repository to push to.
pub(crate) fn check_push(
    push: Option<PushRequest>,
    job_id: &str,
    git: Option<&GitSource>,
) -> Result<Option<Push>, ValidationError> {
    let Some(PushRequest {
        branch,
        commit_message,
        pull_request,
    }) = push
    else {
        return Ok(None);
    };
    if git.is_none() {
        return Err(ValidationError::invalid(
            "push",
            "needs workspace.git: the repository to push to",
        ));
    }
    let push = Push {
        branch: branch.unwrap_or_else(|| format!("flotilla/{job_id}")),
        commit_message: commit_message.unwrap_or_else(|| format!("Flotilla job {job_id}")),
        pull_request: pull_request.map(pull_request_of).transpose()?,
    };
    check_push_bounds(&push)?;
    Ok(Some(push))
}

fn pull_request_of(request: PullRequestRequest) -> Result<PullRequest, ValidationError> {
    let Some(title) = request.title else {
        return Err(ValidationError::missing(
            "push.pull_request.title",
            "push.pull_request.title is required".to_owned(),
        ));
    };
    Ok(PullRequest {
        title,
        body: request.body.unwrap_or_default(),
        base: request.base,
    })
}

pub(crate) fn check_push_bounds(push: &Push) -> Result<(), ValidationError> {
    check_ref_name("push.branch", &push.branch, MAX_BRANCH_CHARS)?;
    check_plain_text(
        "push.commit_message",
        &push.commit_message,
        MAX_MESSAGE_CHARS,
    )?;
    if push.commit_message.trim().is_empty() {
        return Err(ValidationError::invalid(
            "push.commit_message",
            "must not be blank",
        ));
    }
    if let Some(pr) = &push.pull_request {
        check_plain_text("push.pull_request.title", &pr.title, MAX_TITLE_CHARS)?;
        if pr.title.trim().is_empty() {
            return Err(ValidationError::invalid(
                "push.pull_request.title",
                "must not be blank",
            ));
        }
        check_plain_text("push.pull_request.body", &pr.body, MAX_MESSAGE_CHARS)?;
        if let Some(base) = &pr.base {
            check_ref_name("push.pull_request.base", base, MAX_BRANCH_CHARS)?;
        }
    }
    Ok(())
}

fn check_plain_text(field: &str, text: &str, max: usize) -> Result<(), ValidationError> {
    if rules::too_long(text, max) || text.contains('\0') {
        return Err(ValidationError::invalid(
            field,
            format!("must be at most {max} characters, without NUL"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::Lookup;

    struct Answers(Vec<IpAddr>);

    impl Resolve for Answers {
        fn lookup<'a>(&'a self, _host: &'a str) -> Lookup<'a> {
            let ips = self.0.clone();
            Box::pin(async move { Ok(ips) })
        }
    }

    fn public() -> Answers {
        Answers(vec!["140.82.112.3".parse().unwrap()])
    }

    #[tokio::test]
    async fn only_listed_hosts_and_directories_are_fetched() {
        let allow = GitAllowList::parse("github.com, 127.0.0.1,file:///srv/git").unwrap();
        let target = resolve_git_url("https://GitHub.com/o/r.git", &allow, &public())
            .await
            .unwrap();
        assert!(
            matches!(target, GitTarget::Remote { port: 443, .. }),
            "{target:?}"
        );
        let local = resolve_git_url("git://127.0.0.1:9999/r", &allow, &public())
            .await
            .unwrap();
        assert!(matches!(local, GitTarget::Remote { port: 9999, .. }));
        assert!(
            resolve_git_url("file:///srv/git/r.git", &allow, &public())
                .await
                .is_ok()
        );
        for (url, says) in [
            (
                "https://gitlab.com/o/r",
                "not in FLOTILLA_GIT_ALLOWED_HOSTS",
            ),
            ("git://127.0.0.2/r", "not in FLOTILLA_GIT_ALLOWED_HOSTS"),
            ("file:///srv/gitx/r", "not under a file:// directory"),
            ("file:///etc/passwd", "not under a file:// directory"),
            ("http://github.com/o/r", "must use https, ssh, git or file"),
            ("https://u:p@github.com/o/r", "must not carry credentials"),
            ("https://github.com/o/r?x=1", "query"),
        ] {
            let e = resolve_git_url(url, &allow, &public()).await.unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn a_listed_name_must_resolve_to_public_addresses() {
        let allow = GitAllowList::parse("git.internal").unwrap();
        let private = Answers(vec!["10.0.0.7".parse().unwrap()]);
        let e = resolve_git_url("https://git.internal/r", &allow, &private)
            .await
            .unwrap_err();
        assert!(e.contains("private"), "{e}");
        let metadata = Answers(vec!["169.254.169.254".parse().unwrap()]);
        assert!(
            resolve_git_url("https://git.internal/r", &allow, &metadata)
                .await
                .is_err()
        );
    }

    #[test]
    fn allow_list_entries_are_checked() {
        assert!(GitAllowList::parse("").unwrap().is_empty());
        assert!(GitAllowList::parse("file://relative").is_err());
        assert!(GitAllowList::parse("https://github.com").is_err());
        assert!(GitAllowList::parse("::1").is_ok());
    }

    #[test]
    fn ref_names_cannot_be_options_or_escape() {
        for good in ["main", "v1.2.3", "feature/x-y", "0123abcd"] {
            assert!(check_ref_name("r", good, 255).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            "--upload-pack=x",
            "a..b",
            "a/",
            "/a",
            "a.lock",
            "a b",
            "a//b",
        ] {
            assert!(check_ref_name("r", bad, 255).is_err(), "{bad}");
        }
    }

    #[test]
    fn outputs_are_relative_globs() {
        assert!(check_outputs(&["dist/**".to_owned(), "report.md".to_owned()]).is_ok());
        for bad in ["/etc/passwd", "../x", "a//b", ""] {
            assert!(check_outputs(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_needs_a_repository_and_gets_defaults() {
        let git = GitSource {
            url: "git://127.0.0.1/r".to_owned(),
            git_ref: None,
            depth: None,
            credential: None,
            commit: None,
        };
        assert!(check_push(Some(PushRequest::default()), "j1", None).is_err());
        let push = check_push(Some(PushRequest::default()), "j1", Some(&git))
            .unwrap()
            .unwrap();
        assert_eq!(push.branch, "flotilla/j1");
        assert_eq!(push.commit_message, "Flotilla job j1");
    }
}
