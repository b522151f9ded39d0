//! Self-restriction after the model is loaded: a Landlock domain that handles every file-system
//! right and allows none, so the runner cannot open any file again (a compromised tokenizer or
//! template path gains nothing by asking). Stacks on the supervisor's Landlock domain.

const CREATE_RULESET_VERSION: u32 = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

pub fn forbid_file_access() -> std::io::Result<()> {
    // SAFETY: the version query takes no pointer.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        // Landlock unavailable (e.g. running unsandboxed for a benchmark): nothing to tighten.
        return Ok(());
    }
    let mut fs = (1u64 << 13) - 1;
    if abi >= 2 {
        fs |= 1 << 13;
    }
    if abi >= 3 {
        fs |= 1 << 14;
    }
    if abi >= 5 {
        fs |= 1 << 15;
    }
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: 0,
        scoped: 0,
    };
    // SAFETY: attr is valid for the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: no_new_privs then restrict_self on the fd we just created; close it after.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd as i32);
            return Err(e);
        }
        libc::close(fd as i32);
    }
    Ok(())
}
