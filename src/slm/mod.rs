//! Local small models: where model files live and how they are fetched (`models.rs`), and the
//! supervisor's side of a sandboxed `corral-runner` (`runner.rs`): spawning it under its profile,
//! and treating every frame it sends as untrusted.

pub mod models;
pub mod runner;
