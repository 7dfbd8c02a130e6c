//! Value rules shared by profile loading and submission validation, so a profile default can
//! never be something a request would be refused for. Each check returns the reason only; the
//! caller prefixes it with the field it came from.

use std::collections::BTreeMap;

use flotilla_proto::Priority;

pub(crate) const MAX_PROMPT_CHARS: usize = 1_000_000;
pub(crate) const MAX_SYSTEM_PROMPT_CHARS: usize = 500_000;
/// Linux refuses a single argv element of 128 KiB or more (`MAX_ARG_STRLEN`, NUL included).
pub(crate) const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
pub(crate) const MAX_TOOLS: usize = 100;
pub(crate) const MAX_TOOL_CHARS: usize = 256;
pub(crate) const SAFE_ID_MAX: usize = 64;
pub(crate) const MAX_TIMEOUT_SECONDS: u64 = 86_400;
pub(crate) const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;
/// 0.01 CPU, the least Docker can enforce.
pub(crate) const MIN_NANO_CPUS: i64 = 10_000_000;
pub(crate) const OUTPUT_FORMATS: [&str; 3] = ["json", "text", "stream-json"];
/// Node labels a job may need (`requires`): each one narrows the nodes that can run it, and
/// every distinct set is a queue class of its own.
pub(crate) const MAX_REQUIRES: usize = 16;
pub(crate) const LABEL_MAX: usize = 64;
pub(crate) const MAX_IMAGE_CHARS: usize = 256;

/// True when `s` has more than `max` chars; the byte length is a cheap upper bound.
pub(crate) fn too_long(s: &str, max: usize) -> bool {
    s.len() > max && s.chars().count() > max
}

/// A user value cut short for an error message, so a huge input is not echoed back whole.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    }
}

/// A path inside `/workspace` for a submitted file: relative, plain parts, outside the job's
/// own `.flotilla/` directory.
pub(crate) fn check_workspace_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1024 {
        return Err("must be 1-1024 bytes".to_owned());
    }
    if path.contains('\0') {
        return Err("must not contain NUL characters".to_owned());
    }
    if path.starts_with('/') {
        return Err("must be relative to /workspace".to_owned());
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("must not have empty, `.` or `..` parts".to_owned());
    }
    if path == ".flotilla" || path.starts_with(".flotilla/") {
        return Err("must not be under .flotilla/ (the job's own files)".to_owned());
    }
    Ok(())
}

pub(crate) fn check_safe_id(s: &str) -> Result<(), String> {
    if flotilla_proto::ids::is_safe_id(s, SAFE_ID_MAX) {
        Ok(())
    } else {
        Err(format!(
            "must match ^[A-Za-z0-9_-]{{1,{SAFE_ID_MAX}}}$, got {}",
            clip(s)
        ))
    }
}

pub(crate) fn check_model(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must match ^[A-Za-z0-9._/:-]{{1,128}}$, got {}",
            clip(s)
        ))
    }
}

/// `high`, `normal` or `low`.
pub(crate) fn check_priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).ok_or_else(|| "must be high, normal or low".to_owned())
}

/// A node label's key or value, or a Docker runtime name: `^[A-Za-z0-9_.-]{1,64}$`, so it can
/// go into a subject digest, a log line or `docker run --runtime` as it is.
pub(crate) fn check_label(s: &str) -> Result<(), String> {
    if flotilla_proto::routing::is_valid_label(s) {
        Ok(())
    } else {
        Err(format!(
            "must match ^[A-Za-z0-9_.-]{{1,{LABEL_MAX}}}$, got {}",
            clip(s)
        ))
    }
}

/// The node labels a job needs. On error, the key whose value broke the rule (`None` when the
/// map itself or one of its keys did: a bad key cannot name the field) and the reason.
pub(crate) fn check_requires(
    requires: &BTreeMap<String, String>,
) -> Result<(), (Option<&str>, String)> {
    if requires.len() > MAX_REQUIRES {
        return Err((None, format!("must have at most {MAX_REQUIRES} keys")));
    }
    for (key, value) in requires {
        check_label(key).map_err(|e| (None, format!("keys {e}")))?;
        check_label(value).map_err(|e| (Some(key.as_str()), e))?;
    }
    Ok(())
}

/// `prefix` (`requires`, `[agent].requires`) narrowed to the key a [`check_requires`] error
/// names.
pub(crate) fn requires_field(prefix: &str, key: Option<&str>) -> String {
    match key {
        Some(key) => format!("{prefix}.{key}"),
        None => prefix.to_owned(),
    }
}

/// The shape of a Docker image reference (`ghcr.io/acme/tool:1.2`, `x@sha256:...`): it is
/// compared with the operator's patterns and handed to Docker, so nothing that could be read
/// as an option, a second argument or a terminal escape gets through.
pub(crate) fn check_image(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if too_long(s, MAX_IMAGE_CHARS) {
        return Err(format!("must be at most {MAX_IMAGE_CHARS} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    let starts_ok = s
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let chars_ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b));
    if starts_ok && chars_ok {
        Ok(())
    } else {
        Err(format!(
            "must be a Docker image reference (starting with [a-z0-9], then [A-Za-z0-9._/:@-]), \
             got {}",
            clip(s)
        ))
    }
}

pub(crate) fn check_max_turns(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(turns @ 1..=100) => Ok(turns),
        _ => Err(format!("must be between 1 and 100, got {n}")),
    }
}

/// Retries of a job whose engine failed (`retries`): 0-5.
pub(crate) fn check_retries(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(retries @ 0..=5) => Ok(retries),
        _ => Err(format!("must be between 0 and 5, got {n}")),
    }
}

pub(crate) fn check_budget(usd: f64) -> Result<(), String> {
    if usd.is_finite() && usd > 0.0 && usd <= 50.0 {
        Ok(())
    } else {
        Err(format!("must be greater than 0 and at most 50, got {usd}"))
    }
}

pub(crate) fn check_output_format(s: &str) -> Result<(), String> {
    if OUTPUT_FORMATS.contains(&s) {
        Ok(())
    } else {
        Err(format!(
            "must be one of json, text, stream-json, got {}",
            clip(s)
        ))
    }
}

pub(crate) fn check_tool(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else if too_long(s, MAX_TOOL_CHARS) {
        Err(format!("must be at most {MAX_TOOL_CHARS} characters"))
    } else if s.chars().any(char::is_control) {
        Err("must not contain control characters".to_owned())
    } else {
        Ok(())
    }
}

pub(crate) fn check_timeout(secs: i64) -> Result<u64, String> {
    match u64::try_from(secs) {
        Ok(s @ 1..=MAX_TIMEOUT_SECONDS) => Ok(s),
        _ => Err(format!(
            "must be between 1 and {MAX_TIMEOUT_SECONDS}, got {secs}"
        )),
    }
}

pub(crate) fn check_cpus(cpus: f64) -> Result<(), String> {
    nano_cpus(cpus).map(drop)
}

/// `cpus` as Docker's `NanoCpus`. Refused below 0.01 CPU after rounding: Docker reads
/// `NanoCpus` 0 as "no limit", so `1e-10` would otherwise lift the limit instead of tightening it.
pub(crate) fn nano_cpus(cpus: f64) -> Result<i64, String> {
    if !(cpus.is_finite() && cpus > 0.0) {
        return Err(format!("must be a number greater than 0, got {cpus}"));
    }
    let nano = (cpus * 1e9).round();
    if nano < MIN_NANO_CPUS as f64 {
        return Err(format!(
            "must be at least 0.01 (less would be no limit at all), got {cpus}"
        ));
    }
    // Saturates for absurd values; the operator maximum refuses those.
    Ok(nano as i64)
}

/// Parses a memory size: a plain byte count, or a number (fraction allowed) followed by k, m, g
/// or t, optionally followed by "b" or "ib". Units are powers of 1024, as Docker reads them.
pub fn parse_memory(s: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "invalid memory size {}: expected bytes (\"1073741824\") or a number with a unit \
             k, m, g or t, e.g. \"512m\", \"2g\", \"1.5g\", \"1024k\" (a trailing \"b\" or \
             \"ib\" is allowed)",
            clip(s)
        )
    };
    let lower = s.trim().to_ascii_lowercase();
    // "ib" only makes sense after a unit ("512mib"); a lone "b" also fits a byte count ("10b").
    let (body, unit_required) = match lower.strip_suffix("ib") {
        Some(rest) => (rest, true),
        None => (lower.strip_suffix('b').unwrap_or(&lower), false),
    };
    let (number, multiplier): (&str, u64) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ if unit_required => return Err(bad()),
        _ => (body, 1),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
        return Err(bad());
    }
    let bytes = if number.contains('.') {
        // A fraction of a byte means nothing; with a unit it is a convenience ("1.5g").
        if multiplier == 1 || fraction.is_empty() {
            return Err(bad());
        }
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = (value * multiplier as f64).round();
        if bytes >= i64::MAX as f64 {
            return Err(bad());
        }
        bytes as i64
    } else {
        let value: u64 = whole.parse().map_err(|_| bad())?;
        value
            .checked_mul(multiplier)
            .and_then(|b| i64::try_from(b).ok())
            .ok_or_else(bad)?
    };
    Ok(bytes)
}

/// Bytes in the unit an operator would write them in, for messages.
pub(crate) fn human_bytes(bytes: i64) -> String {
    const GIB: i64 = 1 << 30;
    const MIB: i64 = 1 << 20;
    if bytes % GIB == 0 {
        format!("{}g", bytes / GIB)
    } else if bytes % MIB == 0 {
        format!("{}m", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_forms() {
        let cases = [
            ("512m", 512 << 20),
            ("2g", 2 << 30),
            ("2G", 2 << 30),
            ("1024k", 1 << 20),
            ("1073741824", 1 << 30),
            ("1.5g", 3 << 29),
            ("512MiB", 512 << 20),
            ("512mb", 512 << 20),
            ("2GB", 2 << 30),
            ("100b", 100),
            (" 1t ", 1 << 40),
            ("0", 0),
        ];
        for (input, want) in cases {
            assert_eq!(parse_memory(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn memory_errors_say_the_accepted_forms() {
        for bad in [
            "",
            "g",
            "-1g",
            "1.5",
            "1.g",
            ".5g",
            "1e9",
            "12x",
            "1 g",
            "1024ib",
            "1gg",
            "abc",
            "99999999999t",
            "1,5g",
        ] {
            let err = parse_memory(bad).unwrap_err();
            assert!(err.contains("\"512m\""), "{bad}: {err}");
        }
    }

    #[test]
    fn long_values_are_clipped_in_messages() {
        let err = check_model(&"x".repeat(5000)).unwrap_err();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn char_counting_is_not_byte_counting() {
        // 3 bytes per char: 10 chars fit a limit of 10 even though the bytes do not.
        assert!(!too_long(&"é".repeat(10), 10));
        assert!(too_long(&"é".repeat(11), 10));
    }
}
