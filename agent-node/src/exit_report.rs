//! The job script's exit status, in band: its last writes are `\n<marker> <status>\n` on
//! stdout, then on stderr, so the node knows how the job ended as soon as both arrive, instead
//! of waiting for the output stream to end and Docker to report the exit (tens of milliseconds
//! after the process is gone). Each pipe is ordered, so once both reports are in, so is all the
//! script's output. A job that sends its workspace back reports on stderr only (its stdout ends
//! with the tar), and the node reads it to the end of the stream.
//!
//! The marker is random per attempt and kept out of the log. A job can read it (it is in its
//! own script) and print a false report: that ends or misreports only its own job (the node
//! stops reading and removes the container), which the job could do by exiting anyway. An exit
//! of 137 (SIGKILL) is still asked of the runtime, which knows an OOM kill.

use flotilla_proto::LogStream;

use crate::marker;

/// Splits the reports off the job's stdout and stderr and keeps the status they gave.
pub(crate) struct ExitReport {
    marker: String,
    stdout: Splitter,
    stderr: Splitter,
    /// Whether the script reports on stdout too (no workspace tar there).
    on_stdout: bool,
}

impl ExitReport {
    pub(crate) fn new(on_stdout: bool) -> Self {
        let marker = format!("FLOTILLA-EXIT-{}", uuid::Uuid::new_v4().simple());
        let prefix = format!("{marker} ").into_bytes();
        Self {
            stdout: Splitter::new(prefix.clone()),
            stderr: Splitter::new(prefix),
            marker,
            on_stdout,
        }
    }

    /// What the job script prints as its report's prefix.
    pub(crate) fn marker(&self) -> &str {
        &self.marker
    }

    /// Whether the script prints its report on stdout too.
    pub(crate) fn on_stdout(&self) -> bool {
        self.on_stdout
    }

    /// The status reported on stderr, if the report came.
    pub(crate) fn status(&self) -> Option<i64> {
        self.stderr.status
    }

    /// Both reports are in: the script's output is all here, whether or not the stream ends.
    pub(crate) fn complete(&self) -> bool {
        self.on_stdout && self.stdout.status.is_some() && self.stderr.status.is_some()
    }

    /// Output as it arrives: returns what belongs in the job's log.
    pub(crate) fn feed(&mut self, stream: LogStream, data: &[u8]) -> Vec<u8> {
        match stream {
            LogStream::Stdout if self.on_stdout => self.stdout.feed(data),
            LogStream::Stderr => self.stderr.feed(data),
            _ => data.to_vec(),
        }
    }

    /// What was held back on each stream, once the output has ended.
    pub(crate) fn end(&mut self) -> (Vec<u8>, Vec<u8>) {
        (self.stdout.end(), self.stderr.end())
    }
}

/// One stream's report: found wherever the writes break, the last one kept.
struct Splitter {
    /// `<marker> `, as the report begins.
    prefix: Vec<u8>,
    /// Output that may be the start of the report, held back.
    held: Vec<u8>,
    status: Option<i64>,
}

impl Splitter {
    fn new(prefix: Vec<u8>) -> Self {
        Self {
            prefix,
            held: Vec::new(),
            status: None,
        }
    }

    /// Only what may be the start of the marker itself is held back, never a line's newline
    /// (a live log shows each line as it comes); the newline the script prints before the
    /// report is dropped when it arrives with it.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let prefix = self.prefix.as_slice();
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let mut log = Vec::with_capacity(buf.len());
        let mut rest = buf.as_slice();
        while let Some(at) = marker::find(rest, prefix) {
            let after = &rest[at + prefix.len()..];
            let Some(end) = after.iter().position(|&b| b == b'\n') else {
                // The report has begun; the rest of it comes with the next write.
                log.extend_from_slice(&rest[..at]);
                self.held = rest[at..].to_vec();
                return log;
            };
            let status = std::str::from_utf8(&after[..end])
                .ok()
                .and_then(|s| s.parse().ok());
            let line_end = at + prefix.len() + end + 1;
            match status {
                Some(status) => {
                    self.status = Some(status);
                    let before = &rest[..at];
                    log.extend_from_slice(before.strip_suffix(b"\n").unwrap_or(before));
                }
                // Not a report after all: it is output.
                None => log.extend_from_slice(&rest[..line_end]),
            }
            rest = &rest[line_end..];
        }
        let keep = marker::partial_suffix(rest, prefix);
        log.extend_from_slice(&rest[..rest.len() - keep]);
        self.held = rest[rest.len() - keep..].to_vec();
        log
    }

    fn end(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` on stderr in writes of `size`: the log that is left.
    fn run(report: &mut ExitReport, text: &str, size: usize) -> Vec<u8> {
        let mut log = Vec::new();
        for chunk in text.as_bytes().chunks(size) {
            log.extend(report.feed(LogStream::Stderr, chunk));
        }
        log.extend(report.end().1);
        log
    }

    #[test]
    fn the_report_is_found_wherever_the_writes_break_and_kept_out_of_the_log() {
        for size in [1, 3, 7, 200] {
            let mut report = ExitReport::new(false);
            let text = format!("warning: x\n\n{} 3\n", report.marker());
            // The newline before the report goes when it comes in the same write.
            let log = run(&mut report, &text, size);
            assert!(
                log == b"warning: x\n" || log == b"warning: x\n\n",
                "writes of {size}: {:?}",
                String::from_utf8_lossy(&log)
            );
            assert_eq!(report.status(), Some(3));
        }
    }

    #[test]
    fn the_last_report_wins_and_a_malformed_one_is_output() {
        let mut report = ExitReport::new(false);
        let marker = report.marker().to_owned();
        let text = format!("a\n\n{marker} 0\nb\n{marker} nope\n\n{marker} 1\n");
        let log = run(&mut report, &text, 400);
        assert_eq!(report.status(), Some(1));
        assert_eq!(
            String::from_utf8(log).unwrap(),
            format!("a\nb\n{marker} nope\n")
        );
    }

    #[test]
    fn a_line_s_newline_is_never_held_back() {
        let mut report = ExitReport::new(false);
        assert_eq!(report.feed(LogStream::Stderr, b"oops\n"), b"oops\n");
        assert_eq!(report.feed(LogStream::Stderr, b"FLOTILLA-EX"), b"");
    }

    #[test]
    fn output_without_a_report_is_all_log() {
        let mut report = ExitReport::new(false);
        assert_eq!(
            run(&mut report, "just\nFLOTILLA-EX", 2),
            b"just\nFLOTILLA-EX"
        );
        assert_eq!(report.status(), None);
    }

    #[test]
    fn the_output_is_complete_once_both_streams_reported() {
        let mut report = ExitReport::new(true);
        let line = format!("\n{} 0\n", report.marker());
        assert_eq!(report.feed(LogStream::Stdout, b"hi"), b"hi");
        assert_eq!(report.feed(LogStream::Stderr, line.as_bytes()), b"");
        assert!(
            !report.complete(),
            "stdout may still have output on its way"
        );
        assert_eq!(report.feed(LogStream::Stdout, line.as_bytes()), b"");
        assert!(report.complete());
        assert_eq!(report.status(), Some(0));

        // A job sending its workspace back reports on stderr only: never complete early.
        let mut report = ExitReport::new(false);
        let line = format!("\n{} 0\n", report.marker());
        assert_eq!(
            report.feed(LogStream::Stdout, line.as_bytes()),
            line.as_bytes()
        );
        report.feed(LogStream::Stderr, line.as_bytes());
        assert!(!report.complete());
        assert_eq!(report.status(), Some(0));
    }
}
