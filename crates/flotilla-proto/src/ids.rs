//! Job ids: `<agent_id>-<32 hex>` when the server assigns one (a UUIDv7, so ids sort by time),
//! or any `^[A-Za-z0-9_-]{1,128}$` string chosen by a direct NATS publisher. Both are safe as KV
//! keys and subject tokens.

pub const MAX_JOB_ID_LEN: usize = 128;

pub fn new_job_id(agent_id: &str) -> String {
    format!("{agent_id}-{}", uuid::Uuid::now_v7().simple())
}

/// `^[A-Za-z0-9_-]{1,max}$`: the "safe id" rule used for agent ids, profiles, plugins.
pub fn is_safe_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn is_valid_job_id(s: &str) -> bool {
    is_safe_id(s, MAX_JOB_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_job_id("agent_1");
        let b = new_job_id("agent_1");
        assert_ne!(a, b);
        assert!(is_valid_job_id(&a), "{a}");
        assert!(a.starts_with("agent_1-"));
    }

    #[test]
    fn rejects_unsafe_ids() {
        for bad in ["", "a.b", "a b", "a*", "a>", "é", &"x".repeat(129)] {
            assert!(!is_valid_job_id(bad), "{bad:?}");
        }
    }
}
