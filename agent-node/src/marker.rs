//! Finding a marker line in output that arrives in writes of any size (the workspace tar on
//! stdout, the exit report on stderr).

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How many bytes at the end of `buf` could be the start of `needle`: held back until the next
/// write says whether they are.
pub(crate) fn partial_suffix(buf: &[u8], needle: &[u8]) -> usize {
    (1..needle.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf.ends_with(&needle[..n]))
        .unwrap_or(0)
}
