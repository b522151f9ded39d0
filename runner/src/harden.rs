//! Self-restriction after the model is loaded: a Landlock domain that handles every file-system
//! right and allows none, so the runner cannot open any file again (a compromised tokenizer or
//! template path gains nothing by asking). Stacks on the supervisor's Landlock domain.

pub fn forbid_file_access() -> std::io::Result<()> {
    corral_landlock::forbid_file_access()
}
