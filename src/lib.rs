//! corral: run small language models inside real Linux sandboxes, and run anything else in them
//! too. The library does the work; `src/main.rs` is a thin command-line front end.
//!
//! - [`config`]: corral.toml, environment overrides, validation with key paths.
//! - [`profile`]: named sandbox profiles (`profiles/*.toml`), lookup and validation.
//! - [`sandbox`]: profile -> enforced child process (namespaces, mounts, Landlock, seccomp,
//!   cgroups, capabilities, rlimits), and the host probe behind `corral doctor`.
//! - [`catalog`]: model definitions and allow lists.
//! - [`slm`]: model files and the supervisor's side of a sandboxed `corral-runner`.
//! - [`confidence`]: scores in [0, 1] from per-token log-probabilities.
//! - [`guardrails`]: PII detection/masking and prompt-injection detection.
//! - [`providers`]: remote LLM providers (OpenAI-compatible, Anthropic) with retries, circuit
//!   breakers and fallback chains.
//! - [`routing`]: task classification, policy rules and the route decision.
//! - [`answer`]: the answer pipeline `corral run` and `corral serve` share: decide, run the
//!   SLM (retry), score, escalate, audit record.
//! - [`pool`]: warm sandboxed runners per (model, profile) and their queue.
//! - [`audit`]: the encrypted, tamper-evident log of every model request and answer.
//! - [`commands`]: what each CLI subcommand does, callable from tests.

pub mod answer;
pub mod audit;
pub mod catalog;
pub mod commands;
pub mod confidence;
pub mod config;
pub mod files;
pub mod guardrails;
pub mod metrics;
pub mod pool;
pub mod profile;
pub mod providers;
pub mod routing;
pub mod sandbox;
pub mod server;
pub mod slm;

/// Every error corral's library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Runner(#[from] slm::runner::RunnerError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Provider(#[from] providers::ChainError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server could not start (its audit log, its warm pools, its address).
    #[error("the server cannot start: {0}")]
    Start(String),
    /// A request the answer pipeline refused or could not answer.
    #[error(transparent)]
    Answer(#[from] answer::Failure),
}

impl Error {
    /// Exit status for this error: 127 command not found, 126 not executable, 2 usage and
    /// configuration errors (an audit key file refused included, a model the caller may not
    /// use or that is not on this machine), 1 a failed audit log or a request that got no
    /// answer, 4 a server that could not start, 125 any other failure to launch.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Sandbox(sandbox::SandboxError::CommandNotFound { .. }) => 127,
            Error::Runner(_) | Error::Provider(_) => 1,
            Error::Sandbox(sandbox::SandboxError::NotExecutable { .. }) => 126,
            Error::Config(_) | Error::Profile(_) | Error::Usage(_) => 2,
            Error::Audit(e) if e.is_config() => 2,
            Error::Audit(_) => 1,
            Error::Start(_) => 4,
            Error::Answer(
                answer::Failure::UnknownModel(_)
                | answer::Failure::NotAllowed(_)
                | answer::Failure::Unavailable { .. },
            ) => 2,
            Error::Answer(_) => 1,
            _ => 125,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
