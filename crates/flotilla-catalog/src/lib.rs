//! flotilla-catalog: the engines and profiles read from `engines/*.toml` and `profiles/*.toml`,
//! the validation that turns a submission into a runnable job, and the argv that runs it.

mod args;
mod bounds;
mod catalog;
mod engine;
mod images;
mod output;
mod profile;
mod rules;
pub mod schedule;
mod validate;
mod webhook;
mod workspace;

pub use args::LimitsArgs;
pub use bounds::check_job_request;
pub use catalog::{Catalog, CatalogError};
pub use engine::{Engine, EngineKind, LlmAccess, MCP_CONFIG_PATH, MappedField, Output, OutputMode};
pub use images::ImageAllowList;
pub use output::{ParsedOutput, Parser, parse};
pub use profile::{Hooks, Profile, VarType, Variable};
pub use rules::parse_memory;
pub use validate::{
    DEFAULT_PROFILE, Limits, Origin, ValidationError, check_prefetch_image, metadata_is_valid,
    validate,
};
pub use webhook::{
    Lookup, Resolve, SystemResolver, WebhookTarget, check_webhook_url, resolve_webhook_url,
};
pub use workspace::{GitAllowList, GitTarget, MAX_OUTPUTS, resolve_git_url};

#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod tests;
