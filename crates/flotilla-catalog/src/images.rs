//! The images a job may run in instead of a node's worker image (`FLOTILLA_ALLOWED_IMAGES`).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Glob patterns an image reference must match (`flotilla-worker:*`, `ghcr.io/acme/*`),
/// compiled once when the limits are read. A `*` matches across `/` too: an operator who
/// allows `ghcr.io/acme/*` means every image of that organisation, nested ones included.
/// Empty: no job may name an image.
#[derive(Clone, Default)]
pub struct ImageAllowList {
    set: GlobSet,
    patterns: Vec<String>,
}

/// The patterns only: the limits' debug form is what services compare at startup
/// (`check_limits`), and the compiled set's internals are no business of theirs.
impl std::fmt::Debug for ImageAllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ImageAllowList")
            .field(&self.patterns)
            .finish()
    }
}

impl ImageAllowList {
    /// Reads a comma-separated list of patterns; blank entries are skipped.
    pub fn parse(list: &str) -> Result<Self, String> {
        let patterns: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        let mut set = GlobSetBuilder::new();
        for pattern in &patterns {
            let glob = GlobBuilder::new(pattern)
                // Image references are paths in name only: `/` is not special to the operator.
                .literal_separator(false)
                .build()
                .map_err(|e| {
                    format!("FLOTILLA_ALLOWED_IMAGES pattern {pattern:?} is not a valid glob: {e}")
                })?;
            set.add(glob);
        }
        let set = set
            .build()
            .map_err(|e| format!("FLOTILLA_ALLOWED_IMAGES cannot be compiled: {e}"))?;
        Ok(Self { set, patterns })
    }

    pub fn allows(&self, image: &str) -> bool {
        self.set.is_match(image)
    }

    /// The patterns as the operator wrote them.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Why `image` is refused, completing "image ... is not allowed: ".
    pub(crate) fn refusal(&self) -> String {
        if self.is_empty() {
            "no job images are allowed (set FLOTILLA_ALLOWED_IMAGES)".to_owned()
        } else {
            format!(
                "FLOTILLA_ALLOWED_IMAGES allows {}",
                self.patterns.join(", ")
            )
        }
    }
}

/// Two lists are equal when they were written the same; the compiled set follows from that.
impl PartialEq for ImageAllowList {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_across_slashes() {
        let allow = ImageAllowList::parse("flotilla-worker:*, ghcr.io/acme/*").unwrap();
        for image in [
            "flotilla-worker:latest",
            "flotilla-worker:1.2",
            "ghcr.io/acme/x:1",
            "ghcr.io/acme/tools/x:1",
            "ghcr.io/acme/x@sha256:abc",
        ] {
            assert!(allow.allows(image), "{image}");
        }
        for image in [
            "flotilla-worker",
            "other:latest",
            "ghcr.io/acme",
            "ghcr.io/acmeevil/x:1",
            "evil.io/ghcr.io/acme/x:1",
        ] {
            assert!(!allow.allows(image), "{image}");
        }
        assert_eq!(allow.patterns(), ["flotilla-worker:*", "ghcr.io/acme/*"]);
    }

    #[test]
    fn matching_is_exact_and_case_sensitive_without_wildcards() {
        let allow = ImageAllowList::parse("alpine:3.20").unwrap();
        assert!(allow.allows("alpine:3.20"));
        assert!(!allow.allows("alpine:3.2"));
        assert!(!allow.allows("Alpine:3.20"));
        assert!(!allow.allows("alpine:3.20.1"));
    }

    #[test]
    fn an_empty_list_allows_nothing() {
        for list in ["", " , ,"] {
            let allow = ImageAllowList::parse(list).unwrap();
            assert!(allow.is_empty());
            assert!(!allow.allows("flotilla-worker:latest"));
            assert_eq!(allow, ImageAllowList::default());
        }
    }

    #[test]
    fn an_invalid_pattern_is_a_config_error_naming_the_variable() {
        let error = ImageAllowList::parse("ok:*,bad[").unwrap_err();
        assert!(error.contains("FLOTILLA_ALLOWED_IMAGES"), "{error}");
        assert!(error.contains("\"bad[\""), "{error}");
    }
}
