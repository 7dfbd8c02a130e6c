//! The path rules of the file tools: every path the model names must stay inside the workspace,
//! after `..` and symlinks are resolved. The container is the real boundary; these rules keep
//! the model's file tools where its job's files are, and say so when it strays.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("an empty path")]
    Empty,
    #[error("{0:?} is outside the workspace {1}")]
    Outside(String, String),
    #[error("{0:?} goes through a symlink that points nowhere")]
    Dangling(String),
}

/// The workspace root, canonical.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub fn new(root: &Path) -> io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `path` (relative to the workspace, or absolute inside it) really is. The result
    /// may not exist yet (`write_file` creates it), but whatever part of it exists has been
    /// resolved through its symlinks and is inside the workspace.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, PathError> {
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        let outside = || PathError::Outside(path.to_owned(), self.root.display().to_string());
        let lexical = normalize(&self.root.join(path)).ok_or_else(outside)?;
        if !lexical.starts_with(&self.root) {
            return Err(outside());
        }
        let real =
            resolve_existing(&lexical).ok_or_else(|| PathError::Dangling(path.to_owned()))?;
        if real.starts_with(&self.root) {
            Ok(real)
        } else {
            Err(outside())
        }
    }
}

/// `path` with `.` and `..` removed lexically; `None` when `..` climbs above `/`.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => out.push(component),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(name) => out.push(name),
        }
    }
    Some(out)
}

/// Canonicalizes the longest part of `path` that exists (symlinks included, dangling ones too)
/// and appends the rest, which does not exist and so holds no symlink. `None` for a dangling
/// symlink, which a write would follow to wherever it points.
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while existing.symlink_metadata().is_err() {
        rest.push(existing.file_name()?.to_owned());
        if !existing.pop() {
            return None;
        }
    }
    let mut real = existing.canonicalize().ok()?;
    for name in rest.iter().rev() {
        real.push(name);
    }
    Some(real)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn workspace() -> (tempfile::TempDir, Workspace) {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        std::fs::create_dir(ws.root().join("src")).unwrap();
        std::fs::write(ws.root().join("src/a.txt"), "a").unwrap();
        (dir, ws)
    }

    #[test]
    fn paths_inside_resolve() {
        let (_dir, ws) = workspace();
        let root = ws.root().to_path_buf();
        assert_eq!(ws.resolve("src/a.txt").unwrap(), root.join("src/a.txt"));
        assert_eq!(
            ws.resolve("./src/../src/a.txt").unwrap(),
            root.join("src/a.txt")
        );
        assert_eq!(ws.resolve(".").unwrap(), root);
        assert_eq!(ws.resolve("new/dir/f").unwrap(), root.join("new/dir/f"));
        let absolute = root.join("src/a.txt").display().to_string();
        assert_eq!(ws.resolve(&absolute).unwrap(), root.join("src/a.txt"));
    }

    #[test]
    fn escapes_are_refused() {
        let (_dir, ws) = workspace();
        for path in [
            "..",
            "../etc/passwd",
            "src/../../x",
            "/etc/passwd",
            "/",
            "/../../../../etc",
        ] {
            assert!(
                matches!(ws.resolve(path), Err(PathError::Outside(..))),
                "{path}: {:?}",
                ws.resolve(path)
            );
        }
        // The root's own name does not make a sibling inside.
        let sibling = format!("{}-evil/x", ws.root().display());
        assert!(ws.resolve(&sibling).is_err());
        assert_eq!(ws.resolve(""), Err(PathError::Empty));
    }

    #[test]
    fn symlinks_are_followed_before_the_check() {
        let (_dir, ws) = workspace();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), ws.root().join("out")).unwrap();
        symlink(ws.root().join("src"), ws.root().join("in")).unwrap();
        symlink("/nonexistent/target", ws.root().join("dangling")).unwrap();
        assert!(matches!(ws.resolve("out"), Err(PathError::Outside(..))));
        assert!(matches!(
            ws.resolve("out/new.txt"),
            Err(PathError::Outside(..))
        ));
        assert_eq!(ws.resolve("in/a.txt").unwrap(), ws.root().join("src/a.txt"));
        assert!(matches!(
            ws.resolve("dangling"),
            Err(PathError::Dangling(_))
        ));
    }
}
