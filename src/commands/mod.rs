//! What each subcommand does. `main.rs` parses arguments and calls these; tests may too.

pub mod doctor;
pub mod logs;
pub mod models;
pub mod profile;
pub mod route;
pub mod run;
pub mod sandbox_exec;
