//! Landlock (see the `corral-landlock` crate, shared with the runner): the rights, the ruleset
//! and its raw system calls.

pub use corral_landlock::*;
