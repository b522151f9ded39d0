//! `corral sandbox exec`: run one command under a profile, supervise it, report limits.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sandbox::{self, Command, HostSupport};

#[derive(Debug, Clone)]
pub struct ExecArgs {
    pub profile: Option<String>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    pub argv: Vec<OsString>,
}

/// Signals corral forwards to the sandbox (then kills it if it lingers).
const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
/// After a forwarded signal, how long the program has before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the command; returns the exit status corral should exit with. Limit lines go to stderr.
pub fn run(config: &Config, args: &ExecArgs) -> crate::Result<i32> {
    let name = args
        .profile
        .clone()
        .unwrap_or_else(|| config.slm.default_sandbox_profile.clone());
    let profile = config.profiles.resolve(&name)?;
    let host = HostSupport::probe_for(&config.sandbox);
    let cmd = Command {
        argv: args.argv.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        ..Command::default()
    };

    // Block the forwarded signals before the child exists (it unblocks them before exec) and
    // read them from a signalfd next to the child's pidfd.
    // SAFETY: sigset manipulation on a stack value; sigprocmask on the calling thread.
    let sigfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    let mut sb = sandbox::launch(&profile, &cmd, &config.sandbox, &host)?;
    let deadline = sb.started() + profile.max_execution_time;
    let mut kill_at: Option<Instant> = None;
    loop {
        if sb.try_wait()?.is_some() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            sb.kill_for_time_limit();
            sb.wait_until(None)?;
            break;
        }
        if kill_at.is_some_and(|k| now >= k) {
            sb.kill();
            sb.wait_until(None)?;
            break;
        }
        let until = kill_at.map_or(deadline, |k| k.min(deadline));
        let timeout = i32::try_from(until.saturating_duration_since(now).as_millis().max(1))
            .unwrap_or(i32::MAX);
        let mut fds = [
            libc::pollfd {
                fd: sb.pidfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds we own.
        unsafe { libc::poll(fds.as_mut_ptr(), if sigfd >= 0 { 2 } else { 1 }, timeout) };
        if sigfd >= 0 && fds[1].revents & libc::POLLIN != 0 {
            // SAFETY: reading one signalfd_siginfo into a zeroed stack struct of that size.
            let sig = unsafe {
                let mut info: libc::signalfd_siginfo = std::mem::zeroed();
                libc::read(
                    sigfd,
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                );
                info.ssi_signo as i32
            };
            if kill_at.is_some() {
                sb.kill(); // a second signal: no more waiting
            } else {
                sb.signal(sig);
                kill_at = Some(Instant::now() + GRACE);
            }
        }
    }
    if sigfd >= 0 {
        // SAFETY: closing the signalfd we opened.
        unsafe { libc::close(sigfd) };
    }
    let outcome = sb.wait()?;
    for limit in &outcome.limits {
        eprintln!("corral: {}", limit.message());
    }
    tracing::debug!(exit = ?outcome.exit, elapsed_ms = outcome.elapsed.as_millis() as u64, memory_peak = ?outcome.stats.memory_peak_bytes, "sandbox finished");
    Ok(outcome.exit_code())
}
