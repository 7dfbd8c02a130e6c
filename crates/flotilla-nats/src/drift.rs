//! What an existing stream, bucket or consumer holds against what this service's settings ask
//! for: replicas and limits. Services started with other settings than the rest of the fleet
//! would otherwise silently run on whichever settings came first.

use std::{fmt, time::Duration};

use async_nats::jetstream::{consumer, stream};

/// One setting that differs: its name, the value in NATS, the value asked for and the
/// service setting that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub found: String,
    pub wanted: String,
    pub setting: &'static str,
}

/// The differences of one object; empty when it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift(pub Vec<Difference>);

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn check<T: PartialEq + fmt::Debug>(
        &mut self,
        field: &'static str,
        found: T,
        wanted: T,
        setting: &'static str,
    ) {
        if found != wanted {
            self.0.push(Difference {
                field,
                found: format!("{found:?}"),
                wanted: format!("{wanted:?}"),
                setting,
            });
        }
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{} is {} where this service wants {} ({})",
                d.field, d.found, d.wanted, d.setting
            )?;
        }
        Ok(())
    }
}

/// The limits a service holds a stream to (a KV bucket is a stream too). Everything else of
/// an existing stream is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub replicas: usize,
    /// `None`: not this service's to say (KV buckets).
    pub max_messages: Option<i64>,
    pub max_bytes: i64,
    pub max_age: Duration,
    pub max_message_size: i32,
    /// Whether any replica answers reads (direct gets); `None`: not this service's to say.
    pub direct: Option<bool>,
}

impl StreamLimits {
    pub fn of(config: &stream::Config) -> Self {
        Self {
            replicas: config.num_replicas.max(1),
            max_messages: Some(config.max_messages),
            max_bytes: config.max_bytes,
            max_age: config.max_age,
            max_message_size: config.max_message_size,
            direct: None,
        }
        .normalized()
    }

    /// As the server stores it: no limit is -1, one replica at least.
    pub fn normalized(self) -> Self {
        Self {
            replicas: self.replicas.max(1),
            max_messages: self.max_messages.map(unlimited),
            max_bytes: unlimited(self.max_bytes),
            max_age: self.max_age,
            max_message_size: unlimited(i64::from(self.max_message_size)) as i32,
            direct: self.direct,
        }
    }

    pub fn drift(&self, existing: &stream::Config) -> Drift {
        let mut drift = Drift::default();
        let found = Self::of(existing);
        drift.check(
            "replicas",
            found.replicas,
            self.replicas,
            "FLOTILLA_REPLICAS",
        );
        if let Some(max) = self.max_messages {
            drift.check(
                "max_messages",
                found.max_messages.unwrap_or(-1),
                max,
                "FLOTILLA_QUEUE_MAX",
            );
        }
        let bytes_setting = "FLOTILLA_QUEUE_MAX_MB, FLOTILLA_KEPT_MAX_MB, FLOTILLA_LOGS_MAX_MB or \
                             FLOTILLA_BUCKET_MAX_MB";
        drift.check("max_bytes", found.max_bytes, self.max_bytes, bytes_setting);
        drift.check(
            "max_age",
            found.max_age,
            self.max_age,
            "built in (retention)",
        );
        drift.check(
            "max_message_size",
            found.max_message_size,
            self.max_message_size,
            "built in (nats.conf max_payload)",
        );
        if let Some(direct) = self.direct {
            let setting = "FLOTILLA_REPLICAS (reads go to the leader when replicated)";
            drift.check("allow_direct", existing.allow_direct, direct, setting);
        }
        drift
    }

    /// `existing` with these limits: what an update sends.
    pub fn apply(&self, mut existing: stream::Config) -> stream::Config {
        existing.num_replicas = self.replicas;
        if let Some(max) = self.max_messages {
            existing.max_messages = max;
        }
        existing.max_bytes = self.max_bytes;
        existing.max_age = self.max_age;
        existing.max_message_size = self.max_message_size;
        if let Some(direct) = self.direct {
            existing.allow_direct = direct;
        }
        existing
    }
}

/// The differences of a durable pull consumer from the one wanted.
pub fn consumer_drift(existing: &consumer::Config, wanted: &consumer::pull::Config) -> Drift {
    let mut drift = Drift::default();
    drift.check(
        "replicas",
        effective_replicas(existing.num_replicas),
        effective_replicas(wanted.num_replicas),
        "FLOTILLA_REPLICAS",
    );
    drift.check(
        "ack_wait",
        existing.ack_wait,
        wanted.ack_wait,
        "FLOTILLA_ACK_WAIT_SECS",
    );
    drift.check(
        "max_deliver",
        existing.max_deliver,
        wanted.max_deliver,
        "FLOTILLA_MAX_DELIVER",
    );
    drift.check(
        "max_ack_pending",
        existing.max_ack_pending,
        wanted.max_ack_pending,
        "FLOTILLA_MAX_ACK_PENDING",
    );
    drift
}

fn unlimited<T: Into<i64> + Copy>(value: T) -> i64 {
    let value = value.into();
    if value <= 0 { -1 } else { value }
}

/// A consumer's replicas of 0 means "as many as its stream"; ours always say.
fn effective_replicas(replicas: usize) -> usize {
    replicas.max(1)
}

/// How to make the change by hand, for the error message.
pub fn stream_command(stream: &str, limits: &StreamLimits) -> String {
    let mut command = format!(
        "nats stream edit {stream} --replicas {} --max-bytes {} --max-msg-size {}",
        limits.replicas, limits.max_bytes, limits.max_message_size
    );
    if let Some(max) = limits.max_messages {
        command.push_str(&format!(" --max-msgs {max}"));
    }
    match limits.direct {
        Some(true) => command.push_str(" --allow-direct"),
        Some(false) => command.push_str(" --no-allow-direct"),
        None => {}
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(replicas: usize, max_bytes: i64) -> stream::Config {
        stream::Config {
            name: "S".into(),
            num_replicas: replicas,
            max_bytes,
            max_messages: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_matching_stream_has_no_drift() {
        let wanted = StreamLimits::of(&stream(3, 100));
        assert!(wanted.drift(&stream(3, 100)).is_empty());
    }

    #[test]
    fn replicas_and_limits_are_told_apart_with_their_settings() {
        let wanted = StreamLimits::of(&stream(3, 100));
        let drift = wanted.drift(&stream(1, 50));
        let text = drift.to_string();
        assert_eq!(drift.0.len(), 2, "{text}");
        assert!(text.contains("replicas is 1 where this service wants 3 (FLOTILLA_REPLICAS)"));
        assert!(text.contains("max_bytes is 50 where this service wants 100"));
    }

    #[test]
    fn an_update_keeps_what_is_not_ours() {
        let mut existing = stream(1, 50);
        existing.subjects = vec!["a.>".into()];
        let updated = StreamLimits::of(&stream(3, 100)).apply(existing);
        assert_eq!(updated.subjects, ["a.>"]);
        assert_eq!((updated.num_replicas, updated.max_bytes), (3, 100));
    }

    #[test]
    fn a_consumer_of_zero_replicas_counts_as_one() {
        let existing = consumer::Config {
            num_replicas: 0,
            ..Default::default()
        };
        let wanted = consumer::pull::Config {
            num_replicas: 1,
            ..Default::default()
        };
        assert!(consumer_drift(&existing, &wanted).is_empty());
    }
}
