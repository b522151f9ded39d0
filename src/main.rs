//! The `corral` command line: parse arguments, load the config, call into the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral::commands::{
    doctor, logs, models, profile, route as route_cmd, run as run_cmd, sandbox_exec,
};
use corral::config::{Config, LogFormat, Sources};

#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    about = "Run small language models, and any other program, inside real Linux sandboxes"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
struct Global {
    /// Config file (default: $CORRAL_CONFIG, then ./corral.toml, then built-in defaults)
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory of NAME.toml profiles (default: $CORRAL_PROFILES_DIR, then profiles/ beside the config)
    #[arg(long, global = true, value_name = "DIR")]
    profiles_dir: Option<PathBuf>,
    /// Log filter, e.g. `debug` or `corral=trace` (overrides logging.level and $CORRAL_LOG)
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
}

/// `corral [OPTIONS] sandbox exec ...` alone, with the same argument types as [`Cli`]: parsing
/// it skips building every other subcommand's parser (about 0.3 ms of a 8 ms sandbox launch).
/// Anything it does not accept (help, other subcommands, errors) goes to the full parser.
#[derive(Debug, Parser)]
#[command(name = "corral")]
struct ExecOnly {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: ExecOnlyCmd,
}

#[derive(Debug, Subcommand)]
enum ExecOnlyCmd {
    #[command(subcommand)]
    Sandbox(SandboxCmd),
}

impl Cli {
    fn parse_fast() -> Cli {
        let args: Vec<OsString> = std::env::args_os().collect();
        if args.iter().any(|a| a == "sandbox") && args.iter().any(|a| a == "exec") {
            if let Ok(e) = ExecOnly::try_parse_from(&args) {
                let ExecOnlyCmd::Sandbox(cmd) = e.command;
                return Cli {
                    global: e.global,
                    command: Cmd::Sandbox(cmd),
                };
            }
        }
        Cli::parse_from(args)
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Answer a prompt as routing decides: a local model in its sandbox (streamed, unless the
    /// answer may still be escalated), the remote chain when its confidence is below the
    /// threshold or a policy requires it, or a refusal (exit status 3). A summary line with
    /// model, profile, tokens, timings, confidence and route goes to stderr. Exit status 2 for a
    /// model that is unknown, not allowed or not on this machine, 1 when no answer came
    /// (the local model failed with nothing to escalate to, every provider failed)
    Run(run_cmd::RunArgs),
    /// Serve the OpenAI-compatible API (chat and legacy completions, models, route) and
    /// Anthropic's Messages API (/v1/messages) from warm sandboxed runners and the remote
    /// providers (streamed as they answer), with /healthz, /readyz and /metrics.
    /// SIGHUP reloads the configuration (kept if the new one is invalid); SIGTERM drains and stops
    /// (exit status 0). Exit status 4 when it cannot start (audit log, warm pools, address)
    Serve(corral::server::ServeArgs),
    /// Show the route a prompt would take (SLM, LLM chain or refusal) and why, without running
    /// anything
    Route(route_cmd::RouteArgs),
    /// List or fetch models of the catalog
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Run programs inside a sandbox
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Show what this host can enforce and whether each profile is enforceable here
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Check or show sandbox profiles
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// The encrypted audit log of model requests and answers: make a key, verify, decrypt
    #[command(subcommand)]
    Logs(LogsCmd),
    /// Validate the configuration and print where it came from
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxCmd {
    /// Run CMD inside the sandbox a profile describes.
    ///
    /// Exit status: the command's own; 128+N when killed by signal N; 124 when the time limit
    /// ended it; never 0 when a limit was hit (then 1); 2 for a bad profile or configuration;
    /// 125 when the sandbox could not be set up, 126/127 when the command cannot be executed /
    /// is not found. A limit that ended
    /// or constrained the command is named on stderr (`memory limit`, `pids limit`,
    /// `time limit`, `seccomp`).
    #[command(trailing_var_arg = true)]
    Exec {
        /// Profile name (secure, standard, gpu, or one of yours) or path to a profile .toml
        /// (default: slm.default_sandbox_profile)
        #[arg(long, short = 'p', value_name = "NAME|PATH")]
        profile: Option<String>,
        /// Extra environment variable for the command (the environment is otherwise clean)
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory inside the sandbox (default: /tmp with temp files, else /)
        #[arg(long, value_name = "DIR")]
        cwd: Option<PathBuf>,
        /// The command and its arguments
        #[arg(required = true, value_name = "CMD")]
        argv: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCmd {
    /// Catalog models and whether their files are present
    List,
    /// Download a model from the Hugging Face hub and verify its sha256
    Pull { id: String },
}

#[derive(Debug, Subcommand)]
enum ProfileCmd {
    /// Validate profiles (all known ones when none is named) and build, on this host, the
    /// launch plan of a command under each — everything a launch does short of starting it —
    /// so a profile that checks ok launches
    Check {
        /// Profile names or paths to .toml files
        names: Vec<String>,
        /// The command to plan the launch of (after `--`; default /bin/true)
        #[arg(last = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Print a profile as enforced: merged onto its base, with derived limits
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LogsCmd {
    /// Write a new random 256-bit audit key to a file created with mode 0600 (never overwriting)
    Keygen(logs::KeygenArgs),
    /// Check the log's MAC chain, AES-GCM tags, sequence, file links, seals and checkpoint;
    /// print every problem by file, line and seq. Exit status 1 when anything is wrong
    Verify(logs::VerifyArgs),
    /// Print entries as JSON lines with their payloads decrypted (for the key holder)
    Decrypt(logs::DecryptArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Load and validate the configuration and every profile it can see
    Check,
}

fn init_logging(config: Option<&Config>, cli_filter: Option<&str>) {
    let filter = cli_filter
        .map(str::to_string)
        .or_else(|| config.map(|c| c.logging.filter.clone()))
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.map(|c| c.logging.format) == Some(LogFormat::Json) {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

fn run(cli: Cli) -> Result<i32, corral::Error> {
    let sources = Sources {
        config: cli.global.config.clone(),
        profiles_dir: cli.global.profiles_dir.clone(),
    };
    let config = match Config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            init_logging(None, cli.global.log.as_deref());
            return Err(e.into());
        }
    };
    init_logging(Some(&config), cli.global.log.as_deref());
    match cli.command {
        Cmd::Sandbox(SandboxCmd::Exec {
            profile,
            env,
            cwd,
            argv,
        }) => {
            let env = env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((OsString::from(k), OsString::from(v))),
                    _ => Err(corral::Error::Usage(format!(
                        "--env '{kv}': expected KEY=VALUE"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            sandbox_exec::run(
                &config,
                &sandbox_exec::ExecArgs {
                    profile,
                    env,
                    cwd,
                    argv,
                },
            )
        }
        Cmd::Doctor { json } => doctor::run(&config, json),
        Cmd::Run(args) => run_cmd::run(&config, &args),
        Cmd::Serve(args) => corral::server::serve(config, sources, &args),
        Cmd::Route(args) => route_cmd::route(&config, &args),
        Cmd::Logs(LogsCmd::Keygen(args)) => logs::keygen(&config, &args),
        Cmd::Logs(LogsCmd::Verify(args)) => logs::verify(&config, &args),
        Cmd::Logs(LogsCmd::Decrypt(args)) => logs::decrypt(&config, &args),
        Cmd::Models(ModelsCmd::List) => models::list(&config),
        Cmd::Models(ModelsCmd::Pull { id }) => models::pull(&config, &id),
        Cmd::Profile(ProfileCmd::Check { names, command }) => {
            profile::check(&config, &names, &command)
        }
        Cmd::Profile(ProfileCmd::Show { name, json }) => profile::show(&config, &name, json),
        Cmd::Config {
            cmd: ConfigCmd::Check,
        } => {
            println!(
                "config: {}",
                config
                    .path
                    .as_ref()
                    .map_or("<built-in defaults>".to_string(), |p| p
                        .display()
                        .to_string())
            );
            println!(
                "profiles: {}",
                config.profiles.names().collect::<Vec<_>>().join(", ")
            );
            println!(
                "models: {}",
                config.slm.models.ids().collect::<Vec<_>>().join(", ")
            );
            Ok(0)
        }
    }
}

/// Soft open-file limit up to the hard one: a supervisor holds several descriptors per sandbox
/// (pipes, pidfd, cgroup files, egress proxy connections).
fn raise_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() -> ExitCode {
    raise_nofile_limit();
    let cli = Cli::parse_fast();
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("corral: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path and the full parser read `sandbox exec` the same way.
    #[test]
    fn exec_fast_path_agrees_with_the_full_parser() {
        for line in [
            "corral sandbox exec -- /bin/true",
            "corral --config c.toml sandbox exec -p secure -- /bin/echo a -b --c",
            "corral sandbox --log debug exec --profile ./p.toml -e A=1 --env B=2 --cwd /tmp ls -la",
            "corral sandbox exec --profiles-dir /p -p standard curl https://x/ -o /dev/null",
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            let fast = ExecOnly::try_parse_from(&args).expect(line);
            let full = Cli::try_parse_from(&args).expect(line);
            let ExecOnlyCmd::Sandbox(cmd) = fast.command;
            let fast = Cli {
                global: fast.global,
                command: Cmd::Sandbox(cmd),
            };
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{line}");
        }
        // What the fast path refuses goes to the full parser (help, typos, other commands).
        for line in [
            "corral sandbox exec --help",
            "corral sandbox exec",
            "corral run exec sandbox",
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            assert!(ExecOnly::try_parse_from(&args).is_err(), "{line}");
        }
    }
}
