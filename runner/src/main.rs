//! `corral-runner`: loads one model and answers generation requests over its stdin/stdout.
//! Started by the supervisor inside a sandbox; never touches the network.
//!
//! `corral-runner --model PATH --sha256 HEX [--threads N] [--slots N] [--memory-limit-mb L |
//! --kv-budget-mb M] [--no-tighten]` (PATH: a GGUF file, or a safetensors checkpoint
//! directory). Up to `--slots` requests are decoded together (one batched pass per step); their
//! KV state and the prompt states kept for reuse stay within `--kv-budget-mb`, or within what
//! the memory limit leaves beside the loaded model.

mod awake;
mod checkpoint;
mod constrain;
mod engine;
mod files;
mod ggml_math;
mod gpu;
mod harden;
mod hf;
mod kernels;
mod llama;
mod model;
mod sampler;
mod template;
mod tokenizer;
mod tools;

use std::collections::{HashSet, VecDeque};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context};
use corral_protocol::digest;
use corral_protocol::{
    read_frame, write_frame, ErrorKind, Ready, Request, Response, TokenInfo, MAX_REQUEST_FRAME,
};

struct Args {
    model: PathBuf,
    sha256: Option<String>,
    threads: Option<usize>,
    slots: usize,
    kv_budget_mb: Option<usize>,
    memory_limit_mb: Option<usize>,
    tighten: bool,
    /// The catalog entry's GPU requirements (`resource_requirements.gpu_requirements`).
    gpu: gpu::Requirements,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: PathBuf::new(),
        sha256: None,
        threads: None,
        slots: 1,
        kv_budget_mb: None,
        memory_limit_mb: None,
        tighten: true,
        gpu: gpu::Requirements::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--model" => a.model = it.next().context("--model needs a path")?.into(),
            "--sha256" => a.sha256 = Some(it.next().context("--sha256 needs a hex digest")?),
            "--threads" => {
                a.threads = Some(it.next().context("--threads needs a number")?.parse()?)
            }
            "--slots" => {
                a.slots = it.next().context("--slots needs a number")?.parse()?;
                if a.slots == 0 {
                    bail!("--slots must be at least 1");
                }
            }
            "--kv-budget-mb" => {
                a.kv_budget_mb = Some(
                    it.next()
                        .context("--kv-budget-mb needs a number")?
                        .parse()?,
                )
            }
            "--memory-limit-mb" => {
                a.memory_limit_mb = Some(
                    it.next()
                        .context("--memory-limit-mb needs a number")?
                        .parse()?,
                )
            }
            "--no-tighten" => a.tighten = false,
            "--gpu-self-test" => {
                // Every GPU kernel against the CPU reference, no model needed.
                gpu::self_test()?;
                std::process::exit(0);
            }
            "--gpu-min-vram-mb" => {
                a.gpu.min_vram_mb = Some(
                    it.next()
                        .context("--gpu-min-vram-mb needs a number")?
                        .parse()?,
                )
            }
            "--gpu-compute-capability" => {
                let v = it
                    .next()
                    .context("--gpu-compute-capability needs MAJOR.MINOR")?;
                a.gpu.compute = Some(gpu::parse_capability(&v)?);
            }
            other => bail!("unknown argument '{other}'"),
        }
    }
    if a.model.as_os_str().is_empty() {
        bail!("--model is required");
    }
    Ok(a)
}

struct StdoutSink<'a, W: Write> {
    out: &'a mut W,
    inbox: &'a mpsc::Receiver<(Instant, Request)>,
    /// Messages that arrived during a step (with when they were read), handled after it.
    queued: &'a mut VecDeque<(Instant, Request)>,
    /// Running requests whose cancel has been read.
    cancelled: &'a HashSet<u64>,
}

impl<W: Write> engine::Sink for StdoutSink<'_, W> {
    fn token(&mut self, id: u64, token: &TokenInfo) -> std::io::Result<()> {
        write_frame(
            self.out,
            &Response::Token {
                id,
                token: token.clone(),
            },
        )
        .map_err(std::io::Error::other)
    }

    fn cancelled(&mut self, id: u64) -> bool {
        while let Ok(msg) = self.inbox.try_recv() {
            self.queued.push_back(msg);
        }
        self.cancelled.contains(&id)
            || self
                .queued
                .iter()
                .any(|(_, m)| matches!(m, Request::Cancel { id: c } if *c == id))
    }
}

/// A request's outcome as its frame.
fn outcome_frame(id: u64, outcome: engine::Outcome) -> Response {
    match outcome {
        engine::Outcome::Done(d) => Response::Done(*d),
        engine::Outcome::Failed(e) => error_frame(id, &e),
    }
}

fn error_frame(id: u64, e: &anyhow::Error) -> Response {
    Response::Error {
        id: Some(id),
        message: format!("{e:#}"),
        kind: if e.downcast_ref::<engine::NonFinite>().is_some() {
            ErrorKind::Model
        } else if e.downcast_ref::<engine::TooLong>().is_some() {
            ErrorKind::Context
        } else {
            ErrorKind::Request
        },
    }
}

/// Memory a runner needs beyond its weights and KV state while it serves (activations of a
/// prefill chunk, grammar tables, the allocator's slack).
const RUNTIME_MARGIN: usize = 128 << 20;

/// This process's resident memory now (`/proc/self/statm`; read before Landlock forbids it).
fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(usize::try_from(page).unwrap_or(4096))
}

fn check_digest(path: &std::path::Path, got: &str, expected: &str) -> anyhow::Result<()> {
    if !got.eq_ignore_ascii_case(expected) {
        bail!(
            "{}: sha256 {got} does not match the catalog's {expected}",
            path.display()
        );
    }
    Ok(())
}

/// A safetensors checkpoint directory: every file the digest covers is read once, hashed, and
/// the digest checked before any of it is used; each weight file's bytes are freed as soon as
/// its tensors are parsed (the runner's memory limit must hold the f32 weights, not copies).
fn load_checkpoint_dir(
    dir: &std::path::Path,
    expected: Option<&str>,
    device: &candle_core::Device,
) -> anyhow::Result<(model::Model, model::ModelMeta)> {
    let files = digest::model_dir_files(dir)?;
    let mut hashes = Vec::new();
    let mut json = std::collections::HashMap::new();
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".safetensors") {
            // Read tensor by tensor (hashed as read): the weights are held once.
            let (ts, sha) =
                checkpoint::read_safetensors(f).with_context(|| format!("{}", f.display()))?;
            hashes.push((name.clone(), sha));
            tensors.extend(ts);
        } else {
            let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
            hashes.push((name.clone(), digest::sha256_hex(&bytes)));
            let text =
                String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", f.display()))?;
            json.insert(name, text);
        }
    }
    if let Some(expected) = expected {
        check_digest(dir, &digest::manifest_digest(&hashes), expected)?;
    }
    let text = |n: &str| json.get(n).map(String::as_str);
    let config: serde_json::Value = serde_json::from_str(text("config.json").unwrap_or("{}"))
        .with_context(|| format!("{}/config.json", dir.display()))?;
    let (tokenizer, chat_template) = hf::tokenizer(
        text("tokenizer.json").unwrap_or("{}"),
        text("tokenizer_config.json"),
        &config,
    )
    .with_context(|| format!("{}", dir.display()))?;
    let model = model::Model::load_safetensors(dir, &config, tensors, device)?;
    Ok((
        model,
        model::ModelMeta {
            tokenizer,
            chat_template,
        },
    ))
}

fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let args = parse_args()?;
    // Candle reads its thread counts once, at first use: set them before anything else.
    let threads = args
        .threads
        .or_else(|| {
            std::env::var("CORRAL_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());

    // Read the file once: hash it, then parse it from memory.
    let phase = |name: &str| {
        if std::env::var_os("CORRAL_RUNNER_TIMINGS").is_some() {
            eprintln!(
                "corral-runner: {name} at {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    };
    let device = candle_core::Device::Cpu;
    let (model, chat_template, tok) = if args.model.is_dir() {
        let (model, meta) = load_checkpoint_dir(&args.model, args.sha256.as_deref(), &device)?;
        phase("weights");
        let tok = tokenizer::Tokenizer::new(meta.tokenizer)?;
        (model, meta.chat_template, tok)
    } else {
        // Hashed while it is read; checked before any of it is parsed.
        let bytes = match &args.sha256 {
            Some(expected) => {
                let (bytes, got) = files::read_hashed(&args.model)
                    .with_context(|| format!("{}", args.model.display()))?;
                check_digest(&args.model, &got, expected)?;
                bytes
            }
            None => {
                std::fs::read(&args.model).with_context(|| format!("{}", args.model.display()))?
            }
        };
        phase("read and sha256");
        model::Model::load_gguf(&args.model, &bytes, &device)?
    };
    phase("weights and tokenizer");
    // A GPU when the sandbox handed one over (or CORRAL_DEVICE says); the weights go there now.
    let choice = gpu::Choice::from_env(
        std::env::var("CORRAL_DEVICE").ok().as_deref(),
        std::env::var("CORRAL_GPUS").ok().as_deref(),
    )?;
    let mut model = model;
    model.place(
        choice,
        gpu::memory_cap(std::env::var("CORRAL_GPU_MEMORY_MB").ok().as_deref())?,
        &args.gpu,
        args.slots,
    )?;
    if choice != gpu::Choice::Cpu {
        phase("weights on the device");
    }
    let name = |id: Option<u32>| {
        id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
            .unwrap_or_default()
    };
    let knows_chatml = tok.token_id("<|im_start|>").is_some();
    let template = template::ChatTemplate::new(
        chat_template,
        knows_chatml,
        name(tok.bos),
        name(tok.eos.first().copied()),
    )?;
    let ready = Ready {
        architecture: model.architecture.clone(),
        quantization: model.quantization.clone(),
        vocab_size: tok.vocab_size() as u32,
        context_length: model.context_length as u32,
        eos_token_ids: tok.eos.clone(),
        has_chat_template: template.from_model,
        threads: threads as u32,
        kernels: kernels::kernel_isa().name().to_string(),
        device: model.device_name(),
        load_ms: started.elapsed().as_secs_f64() * 1e3,
        slots: 1,
        kv_bytes_per_token: 0,
        kv_budget_mb: 0,
    };
    let slots = args.slots;
    let mut engine = engine::Engine::new(model, tok, template);
    // The KV budget: given, or what the memory limit leaves beside what this process holds
    // now that the model is loaded (measured, not guessed from the file's size: a model whose
    // embedding is widened at load holds far more than its file), the grouped copies batched
    // products will build (with more than one slot) and a margin; 2 GiB without a limit.
    // 16 MiB at least.
    let grouped = if slots > 1 {
        engine.model.grouped_bytes()
    } else {
        0
    };
    engine.kv_budget = match (args.kv_budget_mb, args.memory_limit_mb) {
        (Some(mb), _) => mb.saturating_mul(1 << 20),
        (None, Some(limit)) => limit
            .saturating_mul(1 << 20)
            .saturating_sub(resident_bytes())
            .saturating_sub(grouped)
            .saturating_sub(RUNTIME_MARGIN),
        (None, None) => (2048usize << 20).saturating_sub(grouped),
    }
    .max(16 << 20);
    if let Some(room) = engine.model.device_kv_room() {
        // The caches live on the GPU: its memory cap bounds them (the engine then admits and
        // keeps no more than fits, instead of a pass failing at the cap).
        engine.kv_budget = engine.kv_budget.min(room);
    }
    let kv_per_token = engine.model.kv_bytes_per_token();
    let ready = Ready {
        slots: slots as u32,
        kv_bytes_per_token: kv_per_token as u64,
        kv_budget_mb: (engine.kv_budget >> 20) as u64,
        ..ready
    };
    if args.tighten && choice != gpu::Choice::Cpu {
        // The CUDA driver runs threads of its own (Landlock would confine only this one, and
        // `forbid_file_access` refuses to leave others out) and opens device files as it goes:
        // a GPU runner keeps the sandbox's layers as launched, without this extra one.
        eprintln!(
            "corral-runner: on a GPU: file access is not tightened after load (the sandbox's \
             layers stay as launched)"
        );
    } else if args.tighten {
        // Everything is in memory now: no further file system access at all.
        harden::forbid_file_access().context("tightening the sandbox after load")?;
    }

    // The serving loop runs on one of the compute pool's threads: each parallel region of the
    // forward pass (~150 a token) then starts on a thread that is already a worker, instead of
    // being handed to the pool and waited for (a wake-up and a sleep every region). The pool
    // starts only now, after tightening: Landlock confines the thread that asks and the
    // threads it starts afterwards, not threads already running.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        // The main thread's 8 MiB, not a worker's default 2 MiB: template rendering, schema
        // walks and grammar building run here too.
        .stack_size(8 << 20)
        .build()
        .context("starting the compute threads")?;
    pool.install(move || serve(engine, ready, slots, kv_per_token))
}

/// Answers requests until stdin closes or a `shutdown` frame arrives.
fn serve(
    mut engine: engine::Engine,
    ready: Ready,
    slots: usize,
    kv_per_token: usize,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    write_frame(&mut out, &Response::Ready(ready))?;

    // Each request with the moment it was read: a request's time to first token counts from
    // there, though the loop takes it only between steps.
    let (tx, inbox) = mpsc::channel::<(Instant, Request)>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            match read_frame::<Request>(&mut stdin, MAX_REQUEST_FRAME) {
                Ok(Some(req)) => {
                    if tx.send((Instant::now(), req)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("corral-runner: bad request frame: {e}");
                    break;
                }
            }
        }
    });
    let mut queued: VecDeque<(Instant, Request)> = VecDeque::new();
    let mut running: Vec<engine::Seq> = Vec::new();
    // Started requests waiting for a slot, or for KV room.
    let mut waiting: VecDeque<engine::Seq> = VecDeque::new();
    let mut cancelled: HashSet<u64> = HashSet::new();
    loop {
        // Nothing to compute: wait for the next message.
        if running.is_empty() && waiting.is_empty() && queued.is_empty() {
            match inbox.recv() {
                Ok(m) => queued.push_back(m),
                Err(_) => return Ok(()), // stdin closed: the supervisor is done with us
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(m) => queued.push_back(m),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        while let Some((read_at, msg)) = queued.pop_front() {
            match msg {
                Request::Shutdown => return Ok(()),
                Request::Cancel { id } => {
                    if let Some(i) = waiting.iter().position(|s| s.id == id) {
                        if let Some(s) = waiting.remove(i) {
                            let mut sink = StdoutSink {
                                out: &mut out,
                                inbox: &inbox,
                                queued: &mut VecDeque::new(),
                                cancelled: &cancelled,
                            };
                            let outcome = engine.cancel(s, &mut sink);
                            write_frame(&mut out, &outcome_frame(id, outcome))?;
                        }
                    } else if running.iter().any(|s| s.id == id) {
                        cancelled.insert(id);
                    }
                }
                Request::Tokenize { id, text, special } => {
                    let ids = engine.tokenizer.encode(&text, special, false);
                    write_frame(&mut out, &Response::Tokens { id, ids })?;
                }
                Request::Generate(req) => {
                    let id = req.id;
                    match engine.start(*req, read_at) {
                        Ok(seq) => waiting.push_back(seq),
                        Err(e) => write_frame(&mut out, &error_frame(id, &e))?,
                    }
                }
            }
        }
        // Admission: a free slot, and room for the request's worst case beside the running
        // ones (one runs whatever its size); kept prompt states give way first.
        let reserved = |r: &[engine::Seq]| -> usize {
            r.iter()
                .map(|s| s.worst_case_tokens().saturating_mul(kv_per_token))
                .sum()
        };
        while running.len() < slots {
            let Some(next) = waiting.front() else { break };
            let need = next.worst_case_tokens().saturating_mul(kv_per_token);
            if !running.is_empty() && reserved(&running).saturating_add(need) > engine.kv_budget {
                break;
            }
            if let Some(mut seq) = waiting.pop_front() {
                if seq.waited {
                    write_frame(&mut out, &Response::Started { id: seq.id })?;
                }
                engine.admit(&mut seq);
                running.push(seq);
            }
        }
        for s in waiting.iter_mut() {
            s.waited = true;
        }
        engine.trim_cache(reserved(&running));
        if running.is_empty() {
            continue;
        }
        let ended = {
            let mut sink = StdoutSink {
                out: &mut out,
                inbox: &inbox,
                queued: &mut queued,
                cancelled: &cancelled,
            };
            engine.step(&mut running, &mut sink)
        };
        for (id, outcome) in ended {
            write_frame(&mut out, &outcome_frame(id, outcome))?;
        }
        cancelled.retain(|id| running.iter().any(|s| s.id == *id));
    }
}

/// Keeps the allocator from handing every large buffer back to the kernel when it is freed.
///
/// A forward pass allocates and frees buffers of a few MB per layer (a product's output, its
/// transpose, the attention's rows). glibc serves blocks above its mmap threshold (128 KB,
/// raised only to the largest block freed so far) with a fresh `mmap` and returns the heap's top
/// above its trim threshold at every `free`, so each of those buffers came back as new pages:
/// a page fault and the kernel's zeroing per 4 KB, 8% of a 315-token prefill's time in page
/// faults and 10% in `memset` (`perf`, Q8_0). With blocks up to 32 MiB (the most glibc
/// documents for 64-bit hosts) served from the heap and up to 64 MiB of free heap kept, the same
/// prefill takes 24% less time. Larger blocks (the weights) still get their own mappings, and
/// the most memory kept unused is bounded. Where glibc refuses the threshold, nothing is changed
/// (setting only the trim threshold would also stop the mmap threshold's own growth).
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; called before any thread starts.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

fn main() {
    keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("corral-runner: {e:#}");
        // Tell the supervisor why (it reads frames, not our stderr); it may already be gone.
        let mut out = std::io::stdout().lock();
        let _ = write_frame(
            &mut out,
            &Response::Error {
                id: None,
                message: format!("{e:#}"),
                kind: ErrorKind::Model,
            },
        );
        let _ = out.flush();
        std::process::exit(1);
    }
}
