//! `corral serve`: an OpenAI-compatible HTTP endpoint in front of sandboxed local models and
//! remote LLM providers.
//!
//! How the files relate:
//! - `auth.rs`: API keys -> [`auth::Identity`], rate and concurrency limits, the admin key (its
//!   settings are compiled by `crate::config::auth`).
//! - `openai.rs`: the request shapes and what corral does with each field.
//! - `api/`: the handlers, one file per group of endpoints; generation requests go through the
//!   answer pipeline ([`crate::answer`]) and are framed as JSON or server-sent events with
//!   `x-corral-*` headers.
//! - `error.rs`: errors in OpenAI's format.
//!
//! Below the server: [`crate::pool`] (warm sandboxed runners per (model, profile), their queue,
//! crash replacement; this file's [`State`] keeps the pools of each configuration generation
//! and is the pipeline's local model through `PoolModel`) and [`crate::metrics`] (the Prometheus
//! exposition behind `/metrics`).
//!
//! [`app`] builds the router from a [`State`] (tests call it directly); [`serve`] binds, handles
//! SIGHUP (reload: the new configuration is validated and swapped in, or the old one keeps
//! serving and the error is logged) and SIGTERM/SIGINT (graceful shutdown: stop accepting, drain
//! in-flight requests for up to `server.shutdown_grace_seconds`, stop every runner).

pub mod api;
pub mod auth;
pub mod budget;
pub mod error;
pub mod openai;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::answer::remote::Providers;
use crate::answer::{LocalModel, Pipeline, SubmitError};
use crate::config::{Config, Sources};
use crate::pool::{Event, Job};
use crate::routing::calibrate::Monitor;
use crate::sandbox::HostSupport;
use crate::slm::models;

/// One configuration generation: what a reload replaces.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    pub keys: Arc<auth::Keys>,
    /// Providers are built once per generation so circuit breakers see every request.
    pub remote: Arc<Providers>,
    pub generation: u64,
}

impl Live {
    pub fn new(config: Config, generation: u64) -> Result<Live, String> {
        let keys = auth::Keys::load(&config.server.auth, &|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })?;
        let remote = Arc::new(Providers::from_config(&config.providers));
        Ok(Live {
            config,
            keys: Arc::new(keys),
            remote,
            generation,
        })
    }
}

/// Shared by every request.
#[derive(Debug)]
pub struct State {
    live: RwLock<Arc<Live>>,
    /// Pools by (model, profile, configuration generation).
    pools: Mutex<HashMap<(String, String, u64), Arc<crate::pool::Pool>>>,
    /// Closed pools of earlier generations whose workers may still be stopping their runners.
    retiring: Mutex<Vec<Arc<crate::pool::Pool>>>,
    /// Held during a reload.
    reloading: Mutex<()>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub monitor: Mutex<Monitor>,
    /// What each key has spent of its token budgets (kept across reloads).
    pub budgets: budget::Budgets,
    /// US dollars since start: what remote answers cost, what local ones saved (`/admin/monitor`).
    pub spend: Mutex<Spend>,
    pub host: HostSupport,
    sources: Sources,
    draining: AtomicBool,
    /// The audit log (`[audit]`), opened at start; a reload does not reopen it.
    pub audit: Option<crate::audit::AuditLog>,
    /// Where SLM requests run instead of the pools (tests: a scripted model).
    local: Option<Arc<dyn LocalModel>>,
}

/// Remote spend and the spend local answers avoided, US dollars (from `[providers.NAME] prices`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Spend {
    pub remote_usd: f64,
    pub avoided_usd: f64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    pub fn new(config: Config, sources: Sources) -> Result<Arc<State>, String> {
        // Refuse to serve without the audit log the configuration asks for.
        let audit = if config.audit.enabled {
            Some(
                crate::audit::AuditLog::open(&config.audit)
                    .map_err(|e| format!("audit log: {e}"))?,
            )
        } else {
            None
        };
        let host = HostSupport::probe_for(&config.sandbox);
        let live = Live::new(config, 0)?;
        Ok(Arc::new(State {
            live: RwLock::new(Arc::new(live)),
            pools: Mutex::new(HashMap::new()),
            retiring: Mutex::new(Vec::new()),
            reloading: Mutex::new(()),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            monitor: Mutex::new(Monitor::new(100_000)),
            budgets: budget::Budgets::default(),
            spend: Mutex::new(Spend::default()),
            host,
            sources,
            draining: AtomicBool::new(false),
            audit,
            local: None,
        }))
    }

    /// A state whose SLM requests go to `local` instead of sandboxed runner pools (tests of
    /// the HTTP layer without root or weights).
    pub fn with_local(
        config: Config,
        sources: Sources,
        local: Arc<dyn LocalModel>,
    ) -> Result<Arc<State>, String> {
        let st = State::new(config, sources)?;
        let mut st = Arc::try_unwrap(st).map_err(|_| "state is shared".to_string())?;
        st.local = Some(local);
        Ok(Arc::new(st))
    }

    /// The answer pipeline for a request of configuration generation `live`.
    pub fn pipeline(self: &Arc<Self>, live: &Arc<Live>) -> Pipeline {
        let local: Arc<dyn LocalModel> = match &self.local {
            Some(l) => l.clone(),
            None => Arc::new(PoolModel {
                state: self.clone(),
                pool: Mutex::new(None),
            }),
        };
        Pipeline {
            router: live.config.routing.clone(),
            local,
            remote: live.remote.clone(),
            audit: self.audit.is_some(),
            prefix_cache: crate::answer::PrefixCache {
                scope: live.config.server.pool.prefix_cache,
                shared: live.config.server.pool.prefix_cache_shared.clone(),
            },
            calibrators: live.config.slm.calibrators.clone(),
        }
    }

    pub fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Loads the configuration again; on success new requests use it (and new pools), on error
    /// the old one keeps serving. Pools of the old generation finish their queues and stop.
    pub fn reload(&self) -> Result<Reloaded, String> {
        // One reload at a time (SIGHUP and the admin endpoint may overlap).
        let _one = lock(&self.reloading);
        let config = Config::load(&self.sources).map_err(|e| e.to_string())?;
        let before = self.live();
        let generation = before.generation + 1;
        let restart_needed = restart_only_changes(&before.config, &config);
        for change in &restart_needed {
            tracing::warn!(%change, "reloaded, but this setting takes effect only at the next restart");
        }
        let live = Live::new(config, generation)?;
        *self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(live);
        let old: Vec<Arc<crate::pool::Pool>> = {
            let mut pools = lock(&self.pools);
            let stale: Vec<_> = pools
                .keys()
                .filter(|k| k.2 != generation)
                .cloned()
                .collect();
            stale.iter().filter_map(|k| pools.remove(k)).collect()
        };
        for p in &old {
            p.close();
        }
        // The old pools' workers finish their queues and stop their runners on their own; they
        // stay listed until then, so a shutdown waits for (or kills) them too.
        let mut retiring = lock(&self.retiring);
        retiring.retain(|p| !p.finished());
        retiring.extend(old);
        tracing::info!(generation, "configuration reloaded");
        Ok(Reloaded {
            generation,
            restart_needed,
        })
    }

    /// A runtime allow-list override (admin API): the same generation (pools keep running) with
    /// one agent's list replaced. A reload goes back to the file's lists.
    pub fn override_allow_list(
        &self,
        agent: &str,
        models: Option<Vec<String>>,
    ) -> Result<(), String> {
        let mut guard = self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !guard.config.slm.allow_runtime_overrides {
            return Err(
                "runtime overrides are off (slm.model_allow_lists.allow_runtime_overrides = false)"
                    .into(),
            );
        }
        let mut config = guard.config.clone();
        std::sync::Arc::make_mut(&mut config.routing).set_allow_list(agent, models.clone())?;
        match models {
            Some(m) => {
                config.slm.agent_model_maps.insert(agent.to_string(), m);
            }
            None => {
                config.slm.agent_model_maps.remove(agent);
            }
        }
        *guard = Arc::new(Live {
            config,
            keys: guard.keys.clone(),
            remote: guard.remote.clone(),
            generation: guard.generation,
        });
        tracing::warn!(agent, "allow list overridden at run time");
        Ok(())
    }

    /// The pool for (model, profile) of this generation, started on first use.
    pub fn pool(
        &self,
        live: &Live,
        model: &str,
        profile: &str,
        warm: bool,
    ) -> Result<Arc<crate::pool::Pool>, String> {
        let key = (model.to_string(), profile.to_string(), live.generation);
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            return Ok(p.clone());
        }
        let config = &live.config;
        let spec = models::runner_spec(&config.slm.models, &config.slm.model_dir, model)
            .map_err(|e| e.to_string())?;
        let profile_def = config
            .profiles
            .resolve(profile)
            .map_err(|e| e.to_string())?;
        let launch = crate::pool::Launch {
            spec,
            profile: profile_def,
            sandbox: config.sandbox.clone(),
            host: self.host.clone(),
        };
        let p = crate::pool::Pool::start(
            format!("{model}/{profile}"),
            launch,
            &config.server.pool,
            warm,
            self.metrics.clone(),
        )
        .map_err(|e| format!("starting pool workers: {e}"))?;
        pools.insert(key, p.clone());
        Ok(p)
    }

    /// Pools of the current generation.
    pub fn current_pools(&self) -> Vec<Arc<crate::pool::Pool>> {
        let g = self.live().generation;
        lock(&self.pools)
            .iter()
            .filter(|(k, _)| k.2 == g)
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Closes every pool and waits for its runners to stop, at most `wait`: past it (a runner
    /// stuck starting, loading or generating), every sandbox this process runs is killed and
    /// queued jobs fail, so the workers end promptly and clean up their cgroups.
    pub fn stop_pools(&self, wait: Duration) {
        let mut pools: Vec<_> = lock(&self.pools).drain().map(|(_, p)| p).collect();
        pools.append(&mut lock(&self.retiring));
        for p in &pools {
            p.close();
        }
        let deadline = Instant::now() + wait;
        while !pools.iter().all(|p| p.finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !pools.iter().all(|p| p.finished()) {
            for p in &pools {
                p.abort();
            }
            let killed = crate::sandbox::launch::stop_all();
            tracing::warn!(
                killed,
                "runners still busy at shutdown: killed every sandbox of this server"
            );
        }
        for p in &pools {
            p.join();
        }
    }

    /// Starts the warm pools (`server.pool.warm`).
    pub fn warm_up(&self) -> Result<(), String> {
        let live = self.live();
        for model in &live.config.server.pool.warm {
            let profile = live.config.routing.profile_for(model);
            self.pool(&live, model, &profile, true)?;
        }
        Ok(())
    }
}

pub use api::app;

/// The server's local model for one request: the warm pool of sandboxed runners for (model,
/// profile) of the current configuration generation.
#[derive(Debug)]
struct PoolModel {
    state: Arc<State>,
    /// The pool this request's first attempt used: a retry goes to the same one, unless a
    /// reload closed it meanwhile (then to the current generation's), so a retry never starts
    /// a pool of a configuration already replaced.
    pool: Mutex<Option<Arc<crate::pool::Pool>>>,
}

impl LocalModel for PoolModel {
    fn submit(
        &self,
        model: &str,
        profile: &str,
        req: corral_protocol::GenerateRequest,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, SubmitError> {
        if self.state.draining() {
            return Err(SubmitError::ShuttingDown);
        }
        let mut held = lock(&self.pool);
        // Pools are started only for the current configuration generation: one a reload has
        // replaced is never started again.
        let pool = match held.as_ref() {
            Some(p) if !p.is_closed() => Ok(p.clone()),
            _ => self.state.pool(&self.state.live(), model, profile, false),
        }
        .map_err(|e| {
            tracing::error!(error = %e, "cannot start a pool");
            SubmitError::Unavailable(e)
        })?;
        *held = Some(pool.clone());
        drop(held);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            req,
            events: tx,
            enqueued: Instant::now(),
        };
        match pool.submit(job) {
            Ok(()) => Ok(rx),
            Err(_) => Err(SubmitError::Full {
                pool: pool.name.clone(),
                queue_timeout: pool.queue_timeout(),
            }),
        }
    }
}

/// `corral serve`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Listen address (default: server.bind, 127.0.0.1:8080)
    #[arg(long, value_name = "ADDR:PORT")]
    pub bind: Option<SocketAddr>,
}

/// What a reload did.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub generation: u64,
    /// Settings that changed but are read only when the server starts (`server.bind: A -> B`).
    pub restart_needed: Vec<String>,
}

/// Settings the running server read once at start, changed between `old` and `new`.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.server.bind != new.server.bind {
        out.push(format!(
            "server.bind: {} -> {} (still listening on the old address)",
            old.server.bind, new.server.bind
        ));
    }
    if old.server.shutdown_grace != new.server.shutdown_grace {
        out.push(format!(
            "server.shutdown_grace_seconds: {} -> {}",
            old.server.shutdown_grace.as_secs(),
            new.server.shutdown_grace.as_secs()
        ));
    }
    if old.server.max_request_body_bytes != new.server.max_request_body_bytes {
        out.push(format!(
            "server.max_request_body_bytes: {} -> {}",
            old.server.max_request_body_bytes, new.server.max_request_body_bytes
        ));
    }
    if old.logging.filter != new.logging.filter || old.logging.format != new.logging.format {
        out.push("logging: level/format".into());
    }
    out
}

/// How long past the grace period shutdown waits for runners before killing them.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// Runs the server until SIGTERM or SIGINT.
pub fn serve(config: Config, sources: Sources, args: &ServeArgs) -> crate::Result<i32> {
    let bind = args.bind.unwrap_or(config.server.bind);
    let grace = config.server.shutdown_grace;
    let state = State::new(config, sources).map_err(crate::Error::Start)?;
    state.warm_up().map_err(crate::Error::Start)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("corral-http")
        .build()?;
    let st = state.clone();
    let result: std::io::Result<Instant> = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        // Handlers first: a SIGHUP or SIGTERM right after the address line is handled, never
        // the default action (which would end the server on SIGHUP).
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::hangup())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        tracing::info!(addr = %listener.local_addr()?, "serving");
        // The address line tests and scripts wait for.
        eprintln!("corral: listening on http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signals = tokio::spawn(signal_loop(st.clone(), stop_tx, handlers));
        let mut rx = stop_rx.clone();
        let server = axum::serve(listener, app(st.clone())).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        let mut rx = stop_rx;
        let handle = tokio::spawn(async move { server.await });
        let _ = rx.wait_for(|s| *s).await;
        let stopping_since = Instant::now();
        st.draining.store(true, Ordering::Release);
        match tokio::time::timeout(grace, handle).await {
            Ok(r) => r.map_err(std::io::Error::other)??,
            Err(_) => tracing::warn!(
                ?grace,
                "in-flight requests still running at the end of the grace period"
            ),
        }
        signals.abort();
        Ok(stopping_since)
    });
    // Runners get what is left of the grace period to finish, plus a hard margin; then they are
    // killed, so SIGTERM ends the server whatever a runner is stuck on.
    let since = result.as_ref().map_or_else(|_| Instant::now(), |t| *t);
    state.stop_pools((since + grace).saturating_duration_since(Instant::now()) + SHUTDOWN_MARGIN);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(log) = &state.audit {
        if let Err(e) = log.flush() {
            tracing::error!(error = %e, "audit log: final flush failed");
        }
    }
    result.map_err(|e| crate::Error::Start(format!("serving on {bind}: {e}")))?;
    tracing::info!("stopped");
    eprintln!("corral: stopped");
    Ok(0)
}

async fn signal_loop(
    state: Arc<State>,
    stop: tokio::sync::watch::Sender<bool>,
    handlers: (
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    ),
) {
    let (mut hup, mut term, mut int) = handlers;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Reloaded beside this loop, so SIGTERM is always heard.
                let st = state.clone();
                tokio::spawn(async move {
                    match tokio::task::spawn_blocking(move || st.reload()).await {
                        Ok(Ok(r)) => {
                            eprintln!("corral: configuration reloaded (generation {})", r.generation);
                            for c in r.restart_needed {
                                eprintln!("corral: takes effect at the next restart: {c}");
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "reload failed: keeping the old configuration");
                            eprintln!("corral: reload failed, keeping the old configuration: {e}");
                        }
                        Err(e) => tracing::error!(error = %e, "reload task failed"),
                    }
                });
            }
            _ = term.recv() => { let _ = stop.send(true); return; }
            _ = int.recv() => { let _ = stop.send(true); return; }
        }
    }
}
