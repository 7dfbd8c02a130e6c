//! Flotilla's wire protocol.
//!
//! Everything that crosses a process boundary is defined here, once: the message types, the
//! subjects they travel on, the JetStream stream, consumer and KV bucket names, header names and
//! container labels. `docs/protocol.md` is the human-readable version of this crate; keep the two
//! in step.

pub mod codec;
pub mod ids;
pub mod job;
pub mod llm;
pub mod log;
pub mod names;
pub mod node;
pub mod routing;
pub mod schedule;
pub mod transition;

pub use codec::{CodecError, Encoding, decode, encode};
pub use job::{
    Artifact, Attempt, Continuation, DiffStat, FileRequest, GitRequest, GitSource, JobRecord,
    JobRequest, JobResult, JobStatus, PullRequest, PullRequestRequest, Push, PushRequest,
    Resources, ResourcesRequest, SubmitRequest, Usage, WebhookDelivery, WorkspaceFile,
    WorkspaceRequest,
};
pub use llm::LlmGrant;
pub use log::{LogChunk, LogEnd, LogStream};
pub use node::NodeInfo;
pub use routing::{JobClass, Priority};
pub use schedule::{Schedule, ScheduleRequest};
pub use transition::{Finish, Refusal, Transition};
