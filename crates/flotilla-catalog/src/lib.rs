//! flotilla-catalog: the engines and profiles read from `engines/*.toml` and `profiles/*.toml`,
//! the validation that turns a submission into a runnable job, and the argv that runs it.

mod args;
mod catalog;
mod engine;
mod output;
mod profile;
mod rules;
pub mod schedule;
mod validate;
mod webhook;

pub use args::LimitsArgs;
pub use catalog::{Catalog, CatalogError};
pub use engine::{Engine, EngineKind, LlmAccess, MCP_CONFIG_PATH, MappedField, Output, OutputMode};
pub use output::{ParsedOutput, Parser, parse};
pub use profile::{Hooks, Profile, VarType, Variable};
pub use rules::parse_memory;
pub use validate::{DEFAULT_PROFILE, Limits, Origin, ValidationError, validate};
pub use webhook::check_webhook_url;

#[cfg(test)]
mod tests;
