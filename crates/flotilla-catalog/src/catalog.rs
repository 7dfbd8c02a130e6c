//! The catalogue: every engine and profile, loaded once from their directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::engine::Engine;
use crate::profile::Profile;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    engines: BTreeMap<String, Engine>,
    profiles: BTreeMap<String, Profile>,
}

impl Catalog {
    /// Loads every `*.toml` in `engines_dir` (one engine per file, id = `[engine].id` or the
    /// file stem) and every `*.toml` in `profiles_dir` (name = file stem).
    pub fn load(engines_dir: &Path, profiles_dir: &Path) -> Result<Catalog, CatalogError> {
        let mut engines = BTreeMap::new();
        let mut engine_files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (path, stem, text) in read_toml_files(engines_dir)? {
            let invalid = |message| CatalogError::Invalid {
                path: path.clone(),
                message,
            };
            let engine = Engine::parse(&stem, &text).map_err(invalid)?;
            if let Some(first) = engine_files.get(&engine.id) {
                let message = format!(
                    "engine id {:?} is already defined by {}",
                    engine.id,
                    first.display()
                );
                return Err(invalid(message));
            }
            engine_files.insert(engine.id.clone(), path.clone());
            engines.insert(engine.id.clone(), engine);
        }

        let mut profiles = BTreeMap::new();
        for (path, stem, text) in read_toml_files(profiles_dir)? {
            let invalid = |message| CatalogError::Invalid {
                path: path.clone(),
                message,
            };
            let profile = Profile::parse(&stem, &text, profiles_dir).map_err(invalid)?;
            if let Some(engine) = &profile.engine
                && !engines.contains_key(engine)
            {
                return Err(invalid(format!(
                    "[agent].engine {engine:?} is not a known engine"
                )));
            }
            profiles.insert(profile.name.clone(), profile);
        }
        Ok(Catalog { engines, profiles })
    }

    pub fn engine(&self, id: &str) -> Option<&Engine> {
        self.engines.get(id)
    }

    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// Sorted by id.
    pub fn engines(&self) -> impl Iterator<Item = &Engine> {
        self.engines.values()
    }

    /// Sorted by name.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }
}

/// `(path, stem, contents)` of each `*.toml` file directly in `dir`, sorted by path so that
/// errors (such as a duplicate id) are reported the same way every time.
fn read_toml_files(dir: &Path) -> Result<Vec<(PathBuf, String, String)>, CatalogError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CatalogError::Io { path, source }
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            return Err(CatalogError::Invalid {
                path,
                message: "file name is not UTF-8".to_owned(),
            });
        };
        files.push((path, stem, text));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineKind, MappedField};

    fn shipped() -> Catalog {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        Catalog::load(&root.join("engines"), &root.join("profiles")).unwrap()
    }

    #[test]
    fn shipped_engines_and_profiles_load() {
        let catalog = shipped();
        let ids: Vec<&str> = catalog.engines().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "aider",
                "claude-code",
                "codex",
                "flotilla",
                "gemini",
                "opencode",
                "shell"
            ]
        );
        let names: Vec<&str> = catalog.profiles().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["code-review", "default", "researcher", "shell"]);

        let shell = catalog.engine("shell").unwrap();
        assert_eq!(
            (shell.kind, shell.binary.as_str()),
            (EngineKind::Shell, "/bin/sh")
        );
        let claude = catalog.engine("claude-code").unwrap();
        let order: Vec<MappedField> = claude.flags.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            order,
            [
                MappedField::Model,
                MappedField::OutputFormat,
                MappedField::MaxTurns,
                MappedField::MaxBudgetUsd,
                MappedField::SystemPrompt,
                MappedField::AllowedTools,
                MappedField::Resume,
            ]
        );

        let default = catalog.profile("default").unwrap();
        assert_eq!(default.engine, None);
        assert_eq!(default.model.as_deref(), Some("claude-sonnet-4-6"));
        assert_eq!(
            default.allowed_tools,
            ["Read", "Grep", "Glob", "Bash", "Write", "Edit"]
        );
        let researcher = catalog.profile("researcher").unwrap();
        assert!(researcher.prompt_vars["query"].required);
        assert!(researcher.allowed_tools.iter().any(|t| t == "WebFetch"));
        assert_eq!(researcher.timeout_seconds, Some(3600));
        let review = catalog.profile("code-review").unwrap();
        assert_eq!(review.max_budget_usd, Some(10.0));
        assert_eq!(
            catalog.profile("shell").unwrap().engine.as_deref(),
            Some("shell")
        );
    }

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let engines = tmp.path().join("engines");
        let profiles = tmp.path().join("profiles");
        std::fs::create_dir_all(&engines).unwrap();
        std::fs::create_dir_all(profiles.join("templates")).unwrap();
        (tmp, engines, profiles)
    }

    #[test]
    fn errors_name_the_file() {
        let (_tmp, engines, profiles) = dirs();
        std::fs::write(engines.join("ok.toml"), "[command]\nbinary = \"ok\"\n").unwrap();
        std::fs::write(engines.join("broken.toml"), "[command\nbinary = 1\n").unwrap();
        let err = Catalog::load(&engines, &profiles).unwrap_err().to_string();
        assert!(err.contains("broken.toml"), "{err}");

        std::fs::remove_file(engines.join("broken.toml")).unwrap();
        std::fs::write(profiles.join("p.toml"), "[agent]\nengine = \"nope\"\n").unwrap();
        let err = Catalog::load(&engines, &profiles).unwrap_err().to_string();
        assert!(
            err.contains("p.toml") && err.contains("\"nope\" is not a known engine"),
            "{err}"
        );

        std::fs::write(
            profiles.join("p.toml"),
            "[prompt]\ntemplate = \"{% for %}\"\n",
        )
        .unwrap();
        let err = Catalog::load(&engines, &profiles).unwrap_err().to_string();
        assert!(
            err.contains("p.toml") && err.contains("syntax error"),
            "{err}"
        );

        std::fs::write(profiles.join("p.toml"), "[prompt]\nbogus = 1\n").unwrap();
        let err = Catalog::load(&engines, &profiles).unwrap_err().to_string();
        assert!(
            err.contains("p.toml") && err.contains("unknown field `bogus`"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_engine_ids_are_refused() {
        let (_tmp, engines, profiles) = dirs();
        std::fs::write(engines.join("a.toml"), "[engine]\nid = \"same\"\n").unwrap();
        std::fs::write(engines.join("b.toml"), "[engine]\nid = \"same\"\n").unwrap();
        let err = Catalog::load(&engines, &profiles).unwrap_err().to_string();
        assert!(err.contains("b.toml") && err.contains("a.toml"), "{err}");
    }

    #[test]
    fn missing_directory_is_an_error() {
        let (tmp, _engines, profiles) = dirs();
        let err = Catalog::load(&tmp.path().join("nope"), &profiles).unwrap_err();
        assert!(matches!(err, CatalogError::Io { .. }), "{err}");
    }

    #[test]
    fn template_files_and_other_files() {
        let (_tmp, engines, profiles) = dirs();
        std::fs::write(profiles.join("templates/t.md.j2"), "Hello {{ who }}").unwrap();
        std::fs::write(profiles.join("README.md"), "not a profile").unwrap();
        std::fs::write(
            profiles.join("p.toml"),
            "[prompt]\ntemplate_file = \"templates/t.md.j2\"\n",
        )
        .unwrap();
        let catalog = Catalog::load(&engines, &profiles).unwrap();
        assert_eq!(catalog.profiles().count(), 1);
        assert_eq!(
            catalog.profile("p").unwrap().prompt_template.as_deref(),
            Some("Hello {{ who }}")
        );
    }
}
