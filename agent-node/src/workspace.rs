//! A job's workspace across the container boundary. In: the checkout of `workspace.git`, as a
//! tar sent on the container's stdin right after the job script. Out: when the job has a
//! repository or `outputs`, the script ends by printing a marker and a tar of `/workspace` on
//! stdout; [`WorkspaceIo::split`] keeps that out of the job's log, and [`WorkspaceIo::collect`]
//! turns it into the job's change (patch, push, pull request) and its artifacts.

use std::{
    io::{Seek as _, Write as _},
    path::{Component, Path, PathBuf},
};

use flotilla_proto::{Artifact, DiffStat, JobRequest, names};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest as _, Sha256};

use flotilla_catalog::Engine;

use crate::{
    Shared,
    git::{Checkout, GitError},
    marker,
};

/// What the node knows of a job's workspace while it runs.
#[derive(Default)]
pub(crate) struct WorkspaceIo {
    checkout: Option<Checkout>,
    archive: Option<PathBuf>,
    capture: Option<Capture>,
    /// Holds a follow-up's saved workspace while the job runs.
    scratch: Option<tempfile::TempDir>,
}

/// What came out of the workspace, for the job's result.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub(crate) base_commit: Option<String>,
    pub(crate) diff_stat: Option<DiffStat>,
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) branch: Option<String>,
    pub(crate) commit: Option<String>,
    pub(crate) pull_request_url: Option<String>,
    pub(crate) workspace_saved: bool,
    /// A step the job asked for failed (the push, say): the job fails with this.
    pub(crate) error: Option<String>,
    /// Said in the job's log (outputs beyond the limits, ...).
    pub(crate) notices: Vec<String>,
}

/// Limits on what the node takes back out of a container.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    /// The workspace tar read back; beyond it nothing is collected.
    pub max_workspace_bytes: u64,
    pub max_artifacts: usize,
    pub max_artifact_bytes: u64,
    /// A final workspace up to this size is saved for follow-ups.
    pub max_saved_workspace_bytes: u64,
}

impl WorkspaceIo {
    /// Fetches and packs the job's repository, and gets ready to read the workspace back.
    pub(crate) async fn prepare(shared: &Shared, request: &JobRequest) -> Result<Self, GitError> {
        let mut io = Self::default();
        if let Some(source) = &request.git {
            let checkout = shared.git.checkout(source).await?;
            if request.continues.is_none() {
                io.archive = Some(checkout.archive());
            }
            io.checkout = Some(checkout);
        }
        if let Some(continues) = &request.continues {
            io.archive = Some(saved_workspace(shared, continues, &mut io.scratch).await?);
        }
        if request.git.is_some() || request.continues.is_some() || !request.outputs.is_empty() {
            io.capture = Some(
                Capture::new(shared.config.output_limits.max_workspace_bytes)
                    .map_err(|e| GitError::Unavailable(format!("cannot buffer outputs: {e}")))?,
            );
        }
        Ok(io)
    }

    /// The tar the container unpacks in `/workspace` before anything runs.
    pub(crate) fn archive(&self) -> Option<&Path> {
        self.archive.as_deref()
    }

    /// The line the job script prints before the workspace tar, if it is to send one.
    pub(crate) fn marker(&self) -> Option<&str> {
        self.capture.as_ref().map(|c| c.marker.as_str())
    }

    /// Standard output as it arrives: returns what belongs in the job's log.
    pub(crate) fn split(&mut self, data: &[u8]) -> Vec<u8> {
        match &mut self.capture {
            Some(capture) => capture.feed(data),
            None => data.to_vec(),
        }
    }

    /// The output held back in case it began the marker, once the container is done.
    pub(crate) fn end_of_output(&mut self) -> Vec<u8> {
        self.capture
            .as_mut()
            .map(|c| std::mem::take(&mut c.pending))
            .unwrap_or_default()
    }

    /// After the container: the change against the base commit, the push and pull request
    /// asked for, and the artifacts, stored in the object store under this attempt.
    pub(crate) async fn collect(
        self,
        shared: &Shared,
        request: &JobRequest,
        engine: &Engine,
        attempt: u32,
        ran_to_end: bool,
    ) -> Collected {
        let mut collected = Collected {
            base_commit: self.checkout.as_ref().map(|c| c.base.clone()),
            ..Collected::default()
        };
        let Some(capture) = self.capture else {
            return collected;
        };
        if !ran_to_end {
            return collected;
        }
        let mut ignore = engine.workspace_ignore.clone();
        if request.instructions.is_some() {
            // Flotilla wrote it, not the agent.
            ignore.push(format!("/{}", engine.instructions_file));
        }
        let job = Job {
            request,
            attempt,
            ignore: &ignore,
        };
        if let Err(e) = read_back(
            shared,
            &job,
            capture,
            self.checkout.as_ref(),
            &mut collected,
        )
        .await
        {
            collected.error = Some(e);
        }
        collected
    }
}

/// The attempt whose workspace is read back, and what its change leaves out.
struct Job<'a> {
    request: &'a JobRequest,
    attempt: u32,
    ignore: &'a [String],
}

/// Downloads the workspace a follow-up continues from.
async fn saved_workspace(
    shared: &Shared,
    continues: &flotilla_proto::Continuation,
    scratch: &mut Option<tempfile::TempDir>,
) -> Result<PathBuf, GitError> {
    let name = names::workspace_object(&continues.job_id, continues.attempt);
    let unavailable = |e: &dyn std::fmt::Display| {
        GitError::Unavailable(format!(
            "cannot read the workspace of {}: {e}",
            continues.job_id
        ))
    };
    let mut object = match shared.topology.artifacts.get(&name).await {
        Ok(object) => object,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(GitError::Refused(format!(
                "the saved workspace of {} is gone",
                continues.job_id
            )));
        }
        Err(e) => return Err(unavailable(&e)),
    };
    let dir = tempfile::tempdir().map_err(|e| unavailable(&e))?;
    let path = dir.path().join("in.tar");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| unavailable(&e))?;
    tokio::io::copy(&mut object, &mut file)
        .await
        .map_err(|e| unavailable(&e))?;
    *scratch = Some(dir);
    Ok(path)
}

/// Unpacks the workspace the container sent, then diffs, pushes and collects from it.
async fn read_back(
    shared: &Shared,
    job: &Job<'_>,
    capture: Capture,
    checkout: Option<&Checkout>,
    collected: &mut Collected,
) -> Result<(), String> {
    if capture.overflowed {
        return Err(format!(
            "the workspace is over {} MiB: its change and outputs were not kept",
            capture.max >> 20
        ));
    }
    if !capture.found {
        return Err(
            "the job's container sent no workspace back (does its image have tar?)".to_owned(),
        );
    }
    let out = tempfile::Builder::new()
        .prefix("out-")
        .tempdir()
        .map_err(|e| format!("cannot unpack the workspace: {e}"))?;
    let (request, attempt) = (job.request, job.attempt);
    let globs = output_globs(&request.outputs)?;
    let limits = shared.config.output_limits;
    let dir = out.path().to_owned();
    let saved = capture.file.try_clone().map_err(|e| e.to_string())?;
    let size = capture.written;
    let (found, notices) =
        tokio::task::spawn_blocking(move || unpack(capture.file, &dir, &globs, limits))
            .await
            .map_err(|e| format!("cannot unpack the workspace: {e}"))?
            .map_err(|e| format!("cannot unpack the workspace: {e}"))?;
    let mut found = found;
    found.sort();
    collected.notices = notices;
    if let Some(checkout) = checkout {
        change(shared, job, checkout, out.path(), collected).await?;
    }
    // Saved for the jobs one continues: those on a repository, and follow-ups themselves.
    let continuable = request.git.is_some() || request.continues.is_some();
    if continuable && size <= limits.max_saved_workspace_bytes {
        save_workspace(shared, job, saved).await?;
        collected.workspace_saved = true;
    } else if continuable {
        collected.notices.push(format!(
            "the workspace is over {} MiB: not saved, the job cannot be continued",
            limits.max_saved_workspace_bytes >> 20
        ));
    }
    for (path, size, sha256) in found {
        let name = names::artifact_object(&request.job_id, attempt, &path);
        let mut file = tokio::fs::File::open(out.path().join(&path))
            .await
            .map_err(|e| format!("cannot read output {path}: {e}"))?;
        shared
            .topology
            .artifacts
            .put(name.as_str(), &mut file)
            .await
            .map_err(|e| format!("cannot store output {path}: {e}"))?;
        collected.artifacts.push(Artifact { path, size, sha256 });
    }
    Ok(())
}

/// Keeps the final workspace (the tar as the container sent it) for a follow-up.
async fn save_workspace(
    shared: &Shared,
    job: &Job<'_>,
    mut file: std::fs::File,
) -> Result<(), String> {
    std::io::Seek::rewind(&mut file).map_err(|e| e.to_string())?;
    let mut file = tokio::fs::File::from_std(file);
    shared
        .topology
        .artifacts
        .put(
            names::workspace_object(&job.request.job_id, job.attempt).as_str(),
            &mut file,
        )
        .await
        .map(drop)
        .map_err(|e| format!("cannot save the workspace: {e}"))
}

/// The patch against the base commit (stored as an object), and the push it asked for.
async fn change(
    shared: &Shared,
    job: &Job<'_>,
    checkout: &Checkout,
    worktree: &Path,
    collected: &mut Collected,
) -> Result<(), String> {
    let (request, attempt) = (job.request, job.attempt);
    checkout
        .stage(worktree, job.ignore)
        .await
        .map_err(|e| e.to_string())?;
    let (patch, stat) = checkout.diff(worktree).await.map_err(|e| e.to_string())?;
    shared
        .topology
        .artifacts
        .put(
            names::diff_object(&request.job_id, attempt).as_str(),
            &mut patch.as_slice(),
        )
        .await
        .map_err(|e| format!("cannot store the job's patch: {e}"))?;
    collected.diff_stat = Some(stat);
    let Some(push) = &request.push else {
        return Ok(());
    };
    if stat.files == 0 {
        collected
            .notices
            .push("nothing changed: no branch pushed".to_owned());
        return Ok(());
    }
    let commit = checkout
        .push(&shared.git, worktree, push)
        .await
        .map_err(|e| format!("push failed: {e}"))?;
    collected.branch = Some(push.branch.clone());
    collected.commit = Some(commit);
    if let Some(pr) = &push.pull_request {
        let url = checkout
            .pull_request(push, pr)
            .await
            .map_err(|e| format!("pushed {}, but the pull request failed: {e}", push.branch))?;
        collected.pull_request_url = Some(url);
    }
    Ok(())
}

fn output_globs(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("outputs: {e}"))?;
        set.add(glob);
    }
    set.build().map_err(|e| format!("outputs: {e}"))
}

/// Found outputs: path, size, hex SHA-256.
type Found = Vec<(String, u64, String)>;

/// Unpacks the container's workspace tar into `dir`: regular files, directories and
/// symlinks only, nothing under `.git` (the node never runs git on the container's own
/// repository files) or `.flotilla` (the job's scripts), nothing outside `dir`. Returns the
/// outputs matching `globs`, within the limits, and notices about what was left out.
fn unpack(
    mut file: std::fs::File,
    dir: &Path,
    globs: &GlobSet,
    limits: OutputLimits,
) -> std::io::Result<(Found, Vec<String>)> {
    file.rewind()?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    archive.set_preserve_permissions(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut found = Found::new();
    let mut notices = Vec::new();
    let mut kept_bytes = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            continue;
        }
        let Some(path) = clean_path(&entry.path()?) else {
            continue;
        };
        if !entry.unpack_in(dir)? || !kind.is_file() || !globs.is_match(&path) {
            continue;
        }
        let size = entry.header().size()?;
        if found.len() == limits.max_artifacts || kept_bytes + size > limits.max_artifact_bytes {
            notices.push(format!(
                "outputs: {path} not kept: over {} files or {} MiB",
                limits.max_artifacts,
                limits.max_artifact_bytes >> 20
            ));
            continue;
        }
        kept_bytes += size;
        let digest = Sha256::digest(std::fs::read(dir.join(&path))?);
        found.push((path, size, hex::encode(digest)));
    }
    Ok((found, notices))
}

/// `path` relative to `/workspace`, `/`-separated, if the node keeps it.
fn clean_path(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    let skipped = parts.first() == Some(&".flotilla") || parts.contains(&".git");
    (!parts.is_empty() && !skipped).then(|| parts.join("/"))
}

/// Splits standard output at the marker: before it, the job's log; after it, the workspace
/// tar, written to a temporary file (bounded).
struct Capture {
    marker: String,
    /// `\n<marker>\n`, as it appears in the output.
    line: Vec<u8>,
    /// Output that may be the start of the marker, held back.
    pending: Vec<u8>,
    found: bool,
    file: std::fs::File,
    written: u64,
    max: u64,
    overflowed: bool,
}

impl Capture {
    fn new(max: u64) -> std::io::Result<Self> {
        let marker = format!("FLOTILLA-WORKSPACE-{}", uuid::Uuid::new_v4().simple());
        Ok(Self {
            line: format!("\n{marker}\n").into_bytes(),
            marker,
            pending: Vec::new(),
            found: false,
            file: tempfile::tempfile()?,
            written: 0,
            max,
            overflowed: false,
        })
    }

    /// The bytes before the marker line (`\n<marker>\n`; the script prints the newline
    /// before it, so it is not the job's either).
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.found {
            self.keep(data);
            return Vec::new();
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        if let Some(at) = marker::find(&buf, &self.line) {
            self.found = true;
            let after = buf.split_off(at + self.line.len());
            self.keep(&after);
            buf.truncate(at);
            return buf;
        }
        let held = marker::partial_suffix(&buf, &self.line);
        self.pending = buf.split_off(buf.len() - held);
        buf
    }

    fn keep(&mut self, data: &[u8]) {
        if self.overflowed {
            return;
        }
        self.written += data.len() as u64;
        if self.written > self.max || self.file.write_all(data).is_err() {
            self.overflowed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_splits_output_wherever_the_chunks_break() {
        for size in [1, 2, 5, 7, 64] {
            let mut capture = Capture::new(1 << 20).unwrap();
            let text = format!("hello\nworld\n{}\nTARBYTES", capture.marker);
            let mut log = Vec::new();
            for chunk in text.as_bytes().chunks(size) {
                log.extend(capture.feed(chunk));
            }
            log.extend(std::mem::take(&mut capture.pending));
            assert_eq!(log, b"hello\nworld", "chunks of {size}");
            assert!(capture.found);
            assert_eq!(capture.written, 8);
        }
    }

    #[test]
    fn output_without_the_marker_is_all_log() {
        let mut capture = Capture::new(1 << 20).unwrap();
        let mut log = capture.feed(b"line\nFLOTILLA-WORK");
        log.extend(std::mem::take(&mut capture.pending));
        assert_eq!(log, b"line\nFLOTILLA-WORK");
        assert!(!capture.found);
    }

    #[test]
    fn paths_out_of_the_workspace_or_of_git_are_not_kept() {
        assert_eq!(
            clean_path(Path::new("./src/a.rs")).as_deref(),
            Some("src/a.rs")
        );
        for bad in [
            "../x",
            "/etc/passwd",
            ".git/config",
            "a/.git/hooks/x",
            ".flotilla/job.sh",
            ".",
        ] {
            assert_eq!(clean_path(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn globs_do_not_cross_directories_unless_asked() {
        let globs = output_globs(&["dist/**".to_owned(), "*.md".to_owned()]).unwrap();
        assert!(globs.is_match("dist/a/b.js"));
        assert!(globs.is_match("report.md"));
        assert!(!globs.is_match("docs/report.md"));
    }
}
