//! The node's git: a mirror cache per repository, the checkout a job starts from, the change it
//! made, and the push of that change. Only the node talks to remotes (job containers have no
//! network). Every command runs the host's `git` with a clean environment, no user or system
//! configuration, only the transports the URL needs, and the address the allow-list check
//! resolved (no second DNS lookup); secrets travel in the environment, never in argv.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_catalog::{GitAllowList, GitTarget, SystemResolver, resolve_git_url};
use flotilla_proto::{DiffStat, GitSource, Push};
use sha2::{Digest, Sha256};

use crate::forge::{self, Credential, Credentials};

/// Shared checkouts kept on a node (see [`Git::shared_checkout`]).
const CHECKOUTS_KEPT: usize = 32;
/// Longest a fetch or push may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a local command (checkout, diff, commit) may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(300);

/// The node's git settings, validated at start.
#[derive(Debug, Clone)]
pub struct GitConfig {
    /// Mirrors (one bare repository per URL and credential) and scratch checkouts.
    pub cache_dir: PathBuf,
    pub credentials: Credentials,
    pub author_name: String,
    pub author_email: String,
    /// A repository whose packed objects exceed this fails its job.
    pub max_repo_bytes: u64,
}

/// Why a git step failed: `Refused` fails the job (the same request fails everywhere),
/// `Unavailable` is worth another attempt (the remote or the network).
#[derive(Debug, thiserror::Error)]
pub(crate) enum GitError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The node's repositories.
pub(crate) struct Git {
    config: GitConfig,
    allowed: GitAllowList,
    /// One lock per mirror and per shared checkout: fetches into the same mirror, and the
    /// making of a checkout, take turns.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Shared checkouts jobs are using, with how many: never evicted.
    in_use: InUse,
}

type InUse = Arc<Mutex<HashMap<PathBuf, usize>>>;

/// A job's hold on a shared checkout.
struct SharedCheckout {
    dir: PathBuf,
    in_use: InUse,
}

impl SharedCheckout {
    fn hold(in_use: &InUse, dir: PathBuf) -> Self {
        *in_use
            .lock()
            .expect("checkouts in use")
            .entry(dir.clone())
            .or_default() += 1;
        Self {
            dir,
            in_use: in_use.clone(),
        }
    }
}

impl Drop for SharedCheckout {
    fn drop(&mut self) {
        let mut in_use = self.in_use.lock().expect("checkouts in use");
        if let Some(count) = in_use.get_mut(&self.dir) {
            *count -= 1;
            if *count == 0 {
                in_use.remove(&self.dir);
            }
        }
    }
}

/// A job's checkout on the node's host: `repo` is what the container gets (work tree and a
/// `.git` holding only the base commit); the node keeps it to compute the change.
pub(crate) struct Checkout {
    shared: SharedCheckout,
    /// The job's own: its index and excludes.
    scratch: tempfile::TempDir,
    pub(crate) base: String,
    remote: Remote,
    /// Where the checked-out ref came from, when it names a branch (a pull request's base).
    pub(crate) git_ref: Option<String>,
}

/// Where and how to reach a repository: the pinned URL, the transport's extra options, and
/// the credential's secret (in the environment only).
#[derive(Clone)]
struct Remote {
    url: String,
    /// The URL as the job gave it (for messages and the checkout's `origin`).
    shown: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    secret: Option<String>,
    credential: Option<Credential>,
    path: String,
}

impl Git {
    pub(crate) fn new(config: GitConfig, allowed: GitAllowList) -> Self {
        Self {
            config,
            allowed,
            locks: Mutex::default(),
            in_use: InUse::default(),
        }
    }

    /// Fetches `source` into its mirror (only what is new) and checks out its commit in a
    /// fresh scratch directory.
    pub(crate) async fn checkout(&self, source: &GitSource) -> Result<Checkout, GitError> {
        let remote = self.remote(source).await?;
        let mirror = self.mirror_path(source);
        let base = {
            let lock = self.lock(&mirror);
            let _held = lock.lock().await;
            self.fetch(&mirror, &remote, source).await?
        };
        let branch = source
            .git_ref
            .as_deref()
            .filter(|r| !is_commit_id(r))
            .map(|r| r.trim_start_matches("refs/heads/").to_owned());
        let shared = self
            .shared_checkout(&mirror, &base, branch.as_deref(), &remote)
            .await?;
        let scratch = tempfile::Builder::new()
            .prefix("job-")
            .tempdir_in(self.scratch_root()?)
            .map_err(|e| unavailable("cannot make a scratch directory", e))?;
        Ok(Checkout {
            shared,
            scratch,
            base,
            remote,
            git_ref: branch,
        })
    }

    /// The checkout of `base` (as `branch`, or detached) and its tar, made once per node and
    /// shared by the jobs that start from it: the next job on the same commit starts at once.
    /// Jobs never write to it (their changes come back as a tar); the node stages each job's
    /// change in an index of that job's own, and commits add objects, which git allows at once.
    async fn shared_checkout(
        &self,
        mirror: &Path,
        base: &str,
        branch: Option<&str>,
        remote: &Remote,
    ) -> Result<SharedCheckout, GitError> {
        let key = format!("{}\n{base}\n{}", mirror.display(), branch.unwrap_or(""));
        let digest = hex::encode(&Sha256::digest(key.as_bytes())[..12]);
        let dir = self.config.cache_dir.join("checkouts").join(digest);
        let lock = self.lock(&dir);
        let _held = lock.lock().await;
        let shared = SharedCheckout::hold(&self.in_use, dir.clone());
        if dir.join("in.tar").exists() {
            touch(&dir);
            return Ok(shared);
        }
        let _ = std::fs::remove_dir_all(&dir);
        let repo = dir.join("repo");
        let mirror_url = format!("file://{}", mirror.display());
        run(git(None).args(["init", "-q"]).arg(&repo), LOCAL_TIMEOUT).await?;
        run(
            git(Some(&repo))
                .args(["-c", "protocol.file.allow=always"])
                .args(["fetch", "-q", "--no-tags", "--depth=1"])
                .arg(&mirror_url)
                .arg(base),
            LOCAL_TIMEOUT,
        )
        .await?;
        let checkout = match branch {
            Some(name) => vec!["checkout", "-q", "-B", name, "FETCH_HEAD"],
            None => vec!["checkout", "-q", "--detach", "FETCH_HEAD"],
        };
        run(git(Some(&repo)).args(checkout), LOCAL_TIMEOUT).await?;
        run(
            git(Some(&repo)).args(["remote", "add", "origin", &remote.shown]),
            LOCAL_TIMEOUT,
        )
        .await?;
        let (from, partial) = (repo.clone(), dir.join("in.tar.partial"));
        tokio::task::spawn_blocking(move || pack(&from, &partial))
            .await
            .map_err(|e| unavailable("packing the checkout", e))?
            .map_err(|e| unavailable("cannot pack the checkout", e))?;
        std::fs::rename(dir.join("in.tar.partial"), dir.join("in.tar"))
            .map_err(|e| unavailable("cannot pack the checkout", e))?;
        self.evict(&dir);
        Ok(shared)
    }

    /// Keeps at most [`CHECKOUTS_KEPT`] shared checkouts, the least recently used going first
    /// unless a job still uses them.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(self.config.cache_dir.join("checkouts")) else {
            return;
        };
        let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if dirs.len() <= CHECKOUTS_KEPT {
            return;
        }
        dirs.sort();
        let in_use = self.in_use.lock().expect("checkouts in use");
        let excess = dirs.len() - CHECKOUTS_KEPT;
        for (_, dir) in dirs
            .into_iter()
            .filter(|(_, d)| d != keep && !in_use.contains_key(d))
            .take(excess)
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn scratch_root(&self) -> Result<PathBuf, GitError> {
        let root = self.config.cache_dir.join("scratch");
        std::fs::create_dir_all(&root).map_err(|e| unavailable("cannot make the git cache", e))?;
        Ok(root)
    }

    /// Mirrors are per URL and credential: a job without the credential must not be served
    /// what another job fetched with it.
    fn mirror_path(&self, source: &GitSource) -> PathBuf {
        let key = format!(
            "{}\n{}",
            source.url,
            source.credential.as_deref().unwrap_or("")
        );
        let digest = hex::encode(&Sha256::digest(key.as_bytes())[..12]);
        self.config
            .cache_dir
            .join("mirrors")
            .join(format!("{digest}.git"))
    }

    fn lock(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("git locks");
        locks.entry(mirror.to_owned()).or_default().clone()
    }

    /// The remote of `source`, checked against the allow-list once more and pinned to the
    /// addresses that check resolved.
    async fn remote(&self, source: &GitSource) -> Result<Remote, GitError> {
        let target = resolve_git_url(&source.url, &self.allowed, &SystemResolver)
            .await
            .map_err(GitError::Refused)?;
        let credential = match &source.credential {
            Some(name) => Some(self.config.credentials.get(name).cloned().ok_or_else(|| {
                GitError::Refused(format!(
                    "workspace.git.credential {name:?} is not held by this node"
                ))
            })?),
            None => None,
        };
        let url = url::Url::parse(&source.url)
            .map_err(|e| GitError::Refused(format!("workspace.git.url: {e}")))?;
        let mut remote = Remote {
            url: source.url.clone(),
            shown: source.url.clone(),
            args: vec!["-c".to_owned(), "protocol.allow=never".to_owned()],
            env: Vec::new(),
            secret: None,
            credential: credential.clone(),
            path: url.path().to_owned(),
        };
        remote.pin(&target, &url);
        if let Some(credential) = &credential {
            remote.authenticate(credential, url.scheme())?;
        }
        Ok(remote)
    }

    /// Fetches the ref into the mirror, under a ref of the mirror's own so that the next
    /// fetch sends it as a "have" and gets only what is new; returns the commit id.
    async fn fetch(
        &self,
        mirror: &Path,
        remote: &Remote,
        source: &GitSource,
    ) -> Result<String, GitError> {
        if !mirror.join("HEAD").exists() {
            std::fs::create_dir_all(mirror)
                .map_err(|e| unavailable("cannot make the git mirror", e))?;
            run(
                git(None).args(["init", "-q", "--bare"]).arg(mirror),
                LOCAL_TIMEOUT,
            )
            .await?;
        }
        let wanted = source.git_ref.as_deref().unwrap_or("HEAD");
        if is_commit_id(wanted) && has_commit(mirror, wanted).await {
            return Ok(wanted.to_owned());
        }
        if let Some(pinned) = &source.commit
            && has_commit(mirror, pinned).await
        {
            return Ok(pinned.clone());
        }
        let local = format!("refs/flotilla/{}", wanted.trim_start_matches("refs/"));
        let mut fetch = git(Some(mirror));
        fetch
            .args(&remote.args)
            .args(["fetch", "-q", "--no-tags", "--no-write-fetch-head"]);
        if let Some(depth) = source.depth {
            fetch.arg(format!("--depth={depth}"));
        }
        fetch
            .arg("--")
            .arg(&remote.url)
            .arg(format!("+{wanted}:{local}"))
            .envs(remote.env.iter().map(|(k, v)| (k, v)));
        run_remote(&mut fetch, remote, wanted).await?;
        self.check_size(mirror, &remote.shown).await?;
        let commit = output(git(Some(mirror)).args([
            "rev-parse",
            "--verify",
            "-q",
            &format!("{local}^{{commit}}"),
        ]))
        .await?;
        match &source.commit {
            Some(pinned) if has_commit(mirror, pinned).await => Ok(pinned.clone()),
            Some(pinned) => Err(GitError::Refused(format!(
                "commit {pinned} is no longer in {wanted} of {}",
                remote.shown
            ))),
            None => Ok(commit.trim().to_owned()),
        }
    }

    async fn check_size(&self, mirror: &Path, shown: &str) -> Result<(), GitError> {
        let counts = output(git(Some(mirror)).args(["count-objects", "-v"])).await?;
        let kib: u64 = counts
            .lines()
            .filter_map(|l| {
                let (key, value) = l.split_once(": ")?;
                matches!(key, "size" | "size-pack").then(|| value.parse::<u64>().ok())?
            })
            .sum();
        let bytes = kib * 1024;
        if bytes > self.config.max_repo_bytes {
            return Err(GitError::Refused(format!(
                "repository {shown} is {} MiB, over this node's limit of {} MiB \
                 (FLOTILLA_GIT_MAX_REPO_MB)",
                bytes >> 20,
                self.config.max_repo_bytes >> 20
            )));
        }
        Ok(())
    }

    pub(crate) fn author(&self) -> (&str, &str) {
        (&self.config.author_name, &self.config.author_email)
    }
}

impl Remote {
    /// Connects where the allow-list check resolved, never resolving the name again.
    fn pin(&mut self, target: &GitTarget, url: &url::Url) {
        let GitTarget::Remote {
            scheme,
            host,
            port,
            addrs,
        } = target
        else {
            self.args
                .extend(["-c".to_owned(), "protocol.file.allow=always".to_owned()]);
            return;
        };
        let addr = addrs[0];
        let ip = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            std::net::IpAddr::V4(ip) => ip.to_string(),
        };
        self.args
            .extend(["-c".to_owned(), format!("protocol.{scheme}.allow=always")]);
        match scheme.as_str() {
            "https" => {
                // The name stays in the URL (TLS checks it); curl is told its address.
                self.args.extend([
                    "-c".to_owned(),
                    format!("http.curloptResolve={host}:{port}:{}", addr.ip()),
                    // A redirect would take the credential's header elsewhere.
                    "-c".to_owned(),
                    "http.followRedirects=false".to_owned(),
                ]);
            }
            "ssh" => {
                let mut pinned = url.clone();
                let _ = pinned.set_host(Some(&ip));
                self.url = pinned.to_string();
                self.env.push((
                    "GIT_SSH_COMMAND".to_owned(),
                    format!("ssh -o HostKeyAlias={host} -o BatchMode=yes"),
                ));
            }
            _ => {
                let mut pinned = url.clone();
                let _ = pinned.set_host(Some(&ip));
                self.url = pinned.to_string();
            }
        }
    }

    fn authenticate(&mut self, credential: &Credential, scheme: &str) -> Result<(), GitError> {
        match scheme {
            "https" => {
                let token = credential.token().map_err(GitError::Refused)?;
                let header = forge::basic_auth_header(credential.username(), &token);
                // Configuration from the environment: not in argv, not written anywhere.
                self.env.extend([
                    ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
                    ("GIT_CONFIG_KEY_0".to_owned(), "http.extraHeader".to_owned()),
                    ("GIT_CONFIG_VALUE_0".to_owned(), header),
                ]);
                self.secret = Some(token);
            }
            "ssh" => {
                let key = credential.ssh_key_file().ok_or_else(|| {
                    GitError::Refused("the credential has no ssh_key_file for ssh://".to_owned())
                })?;
                let known = credential
                    .known_hosts_file()
                    .map(|f| format!(" -o UserKnownHostsFile={}", f.display()))
                    .unwrap_or_default();
                for (name, value) in &mut self.env {
                    if name == "GIT_SSH_COMMAND" {
                        value.push_str(&format!(
                            " -o IdentitiesOnly=yes -i {}{known}",
                            key.display()
                        ));
                    }
                }
            }
            _ => {
                // git:// and file:// have no authentication: a token would be sent nowhere.
                if credential.has_token() {
                    self.secret = credential.token().ok();
                }
            }
        }
        Ok(())
    }

    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) if !secret.is_empty() => text.replace(secret.as_str(), "***"),
            _ => text.to_owned(),
        }
    }
}

impl Checkout {
    /// The work tree and `.git` the container gets.
    pub(crate) fn repo(&self) -> PathBuf {
        self.shared.dir.join("repo")
    }

    /// The tar of the checkout, for the container.
    pub(crate) fn archive(&self) -> PathBuf {
        self.shared.dir.join("in.tar")
    }

    /// Stages the final work tree `worktree` (the container's `/workspace`, without `.git`)
    /// in an index of the node's own, starting from the base commit so that tracked files
    /// stay tracked and `.gitignore` (and `ignore`) only keep untracked files out.
    pub(crate) async fn stage(&self, worktree: &Path, ignore: &[String]) -> Result<(), GitError> {
        let index = self.index();
        let _ = std::fs::remove_file(&index);
        // The engine's own files: ignored like .gitignore's, from a file the job cannot touch.
        std::fs::write(self.excludes(), ignore.join("\n") + "\n")
            .map_err(|e| unavailable("cannot write the checkout's excludes", e))?;
        run(
            self.in_worktree(worktree).args(["read-tree", &self.base]),
            LOCAL_TIMEOUT,
        )
        .await?;
        run(
            self.in_worktree(worktree).args(["add", "-A"]),
            LOCAL_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// The whole patch and its figures, against the base commit (after [`stage`]).
    pub(crate) async fn diff(&self, worktree: &Path) -> Result<(Vec<u8>, DiffStat), GitError> {
        let diff = [
            "diff",
            "--cached",
            "--find-renames",
            "--no-ext-diff",
            "--no-textconv",
        ];
        let patch = output_bytes(
            self.in_worktree(worktree)
                .args(diff)
                .args(["--binary", &self.base]),
        )
        .await?;
        let numstat = output(
            self.in_worktree(worktree)
                .args(diff)
                .args(["--numstat", &self.base]),
        )
        .await?;
        Ok((patch, parse_numstat(&numstat)))
    }

    /// Commits the staged change on top of the base commit and pushes it to `push.branch`
    /// (never forced); returns the commit id.
    pub(crate) async fn push(
        &self,
        repos: &Git,
        worktree: &Path,
        push: &Push,
    ) -> Result<String, GitError> {
        let tree = output(self.in_worktree(worktree).arg("write-tree")).await?;
        let (name, email) = repos.author();
        let mut commit = self.in_worktree(worktree);
        commit
            .args(["commit-tree", tree.trim(), "-p", &self.base, "-F", "-"])
            .envs([
                ("GIT_AUTHOR_NAME", name),
                ("GIT_AUTHOR_EMAIL", email),
                ("GIT_COMMITTER_NAME", name),
                ("GIT_COMMITTER_EMAIL", email),
            ]);
        let commit = output_with_input(&mut commit, push.commit_message.as_bytes()).await?;
        let commit = commit.trim().to_owned();
        let mut cmd = git(Some(&self.repo()));
        cmd.args(&self.remote.args)
            .args(["push", "-q", "--"])
            .arg(&self.remote.url)
            .arg(format!("{commit}:refs/heads/{}", push.branch))
            .envs(self.remote.env.iter().map(|(k, v)| (k, v)));
        run_remote(&mut cmd, &self.remote, &push.branch).await?;
        Ok(commit)
    }

    /// Opens the pull request of a pushed branch through the credential's forge.
    pub(crate) async fn pull_request(
        &self,
        push: &Push,
        request: &flotilla_proto::PullRequest,
    ) -> Result<String, GitError> {
        let credential = self.remote.credential.as_ref().ok_or_else(|| {
            GitError::Refused(
                "push.pull_request needs workspace.git.credential: the forge account".to_owned(),
            )
        })?;
        let base = request
            .base
            .clone()
            .or_else(|| self.git_ref.clone())
            .ok_or_else(|| {
                GitError::Refused(
                    "push.pull_request.base is needed when workspace.git.ref names no branch"
                        .to_owned(),
                )
            })?;
        forge::open_pull_request(
            credential,
            &self.remote.path,
            &forge::PullRequestSpec {
                title: &request.title,
                body: &request.body,
                head: &push.branch,
                base: &base,
            },
        )
        .await
    }

    fn index(&self) -> PathBuf {
        self.scratch.path().join("index")
    }

    fn excludes(&self) -> PathBuf {
        self.scratch.path().join("exclude")
    }

    /// A git command on the checkout's repository with `worktree` as its work tree and the
    /// node's own index.
    fn in_worktree(&self, worktree: &Path) -> tokio::process::Command {
        let mut cmd = git(None);
        cmd.env("GIT_DIR", self.repo().join(".git"))
            .env("GIT_WORK_TREE", worktree)
            .env("GIT_INDEX_FILE", self.index())
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "core.excludesFile")
            .env("GIT_CONFIG_VALUE_0", self.excludes());
        cmd
    }
}

/// `git` with a clean environment: no user or system configuration, no prompts, no pager,
/// no hooks, no transport unless the command allows it.
fn git(dir: Option<&Path>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS", "/bin/false")
        .env("LC_ALL", "C")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd
}

/// A network command: its failure says whether the ref is missing (the job fails) or the
/// remote did not answer (another attempt may do better).
async fn run_remote(
    cmd: &mut tokio::process::Command,
    remote: &Remote,
    wanted: &str,
) -> Result<(), GitError> {
    let out = tokio::time::timeout(NETWORK_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            GitError::Unavailable(format!(
                "{} did not answer within {} s",
                remote.shown,
                NETWORK_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| unavailable("cannot run git (is git installed on the node's host?)", e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = remote.scrub(&String::from_utf8_lossy(&out.stderr));
    let stderr = stderr.trim();
    let missing = ["couldn't find remote ref", "not our ref", "no such ref"];
    if missing.iter().any(|m| stderr.contains(m)) {
        return Err(GitError::Refused(format!(
            "ref {wanted} does not exist in {}",
            remote.shown
        )));
    }
    let refused = [
        "Authentication failed",
        "Permission denied",
        "access denied",
        "non-fast-forward",
        "rejected",
        "not found",
        "does not appear to be a git repository",
    ];
    let message = format!("git with {} failed: {stderr}", remote.shown);
    if refused.iter().any(|m| stderr.contains(m)) {
        Err(GitError::Refused(message))
    } else {
        Err(GitError::Unavailable(message))
    }
}

async fn run(cmd: &mut tokio::process::Command, limit: Duration) -> Result<(), GitError> {
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| GitError::Unavailable("a local git command timed out".to_owned()))?
        .map_err(|e| unavailable("cannot run git (is git installed on the node's host?)", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GitError::Unavailable(format!(
            "git failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

async fn output(cmd: &mut tokio::process::Command) -> Result<String, GitError> {
    let bytes = output_bytes(cmd).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn output_bytes(cmd: &mut tokio::process::Command) -> Result<Vec<u8>, GitError> {
    let out = tokio::time::timeout(LOCAL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| GitError::Unavailable("a local git command timed out".to_owned()))?
        .map_err(|e| unavailable("cannot run git (is git installed on the node's host?)", e))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(GitError::Unavailable(format!(
            "git failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

async fn output_with_input(
    cmd: &mut tokio::process::Command,
    input: &[u8],
) -> Result<String, GitError> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| unavailable("cannot run git", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .await
            .map_err(|e| unavailable("cannot write to git", e))?;
    }
    let out = tokio::time::timeout(LOCAL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| GitError::Unavailable("a local git command timed out".to_owned()))?
        .map_err(|e| unavailable("git failed", e))?;
    if !out.status.success() {
        return Err(GitError::Unavailable(format!(
            "git failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn has_commit(mirror: &Path, commit: &str) -> bool {
    git(Some(mirror))
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn is_commit_id(name: &str) -> bool {
    name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `git diff --numstat`: "added<TAB>deleted<TAB>path" per file, `-` for binary files.
fn parse_numstat(numstat: &str) -> DiffStat {
    let mut stat = DiffStat::default();
    for line in numstat.lines().filter(|l| !l.is_empty()) {
        let mut fields = line.split('\t');
        let added = fields.next().and_then(|n| n.parse::<u64>().ok());
        let deleted = fields.next().and_then(|n| n.parse::<u64>().ok());
        stat.files += 1;
        stat.insertions += added.unwrap_or(0);
        stat.deletions += deleted.unwrap_or(0);
    }
    stat
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> GitError {
    GitError::Unavailable(format!("{what}: {e}"))
}

/// Marks a shared checkout as just used (eviction goes by the directory's modification time).
fn touch(dir: &Path) {
    let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// Tars the checkout for the container: its top-level entries (not `.` itself, which the
/// unprivileged job user could not stamp), symlinks kept as symlinks.
fn pack(repo: &Path, archive: &Path) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::fs::File::create(archive)?);
    builder.follow_symlinks(false);
    for entry in std::fs::read_dir(repo)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            builder.append_dir_all(&name, entry.path())?;
        } else {
            builder.append_path_with_name(entry.path(), &name)?;
        }
    }
    builder.into_inner()?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numstat_counts_text_and_binary_files() {
        let stat = parse_numstat("3\t1\tsrc/a.rs\n-\t-\tlogo.png\n0\t5\told.txt\n");
        assert_eq!(
            stat,
            DiffStat {
                files: 3,
                insertions: 3,
                deletions: 6
            }
        );
    }

    #[test]
    fn commit_ids_are_forty_hex_digits() {
        assert!(is_commit_id("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_id("main"));
        assert!(!is_commit_id("0123456"));
    }
}
