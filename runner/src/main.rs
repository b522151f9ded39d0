//! `corral-runner`: loads one model and answers generation requests over its stdin/stdout.
//! Started by the supervisor inside a sandbox; never touches the network.
//!
//! `corral-runner --model PATH --sha256 HEX [--threads N] [--keep-quantization] [--no-tighten]`

mod engine;
mod ggml_math;
mod harden;
mod kernels;
mod llama;
mod model;
mod sampler;
mod template;
mod tokenizer;

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context};
use corral_protocol::{
    read_frame, write_frame, Ready, Request, Response, TokenInfo, MAX_REQUEST_FRAME,
};
use sha2::{Digest, Sha256};

struct Args {
    model: PathBuf,
    sha256: Option<String>,
    threads: Option<usize>,
    requantize: bool,
    tighten: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: PathBuf::new(),
        sha256: None,
        threads: None,
        requantize: true,
        tighten: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--model" => a.model = it.next().context("--model needs a path")?.into(),
            "--sha256" => a.sha256 = Some(it.next().context("--sha256 needs a hex digest")?),
            "--threads" => {
                a.threads = Some(it.next().context("--threads needs a number")?.parse()?)
            }
            "--keep-quantization" => a.requantize = false,
            "--no-tighten" => a.tighten = false,
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
    inbox: &'a mpsc::Receiver<Request>,
    queued: &'a mut VecDeque<Request>,
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
            match msg {
                Request::Cancel { id: c } if c == id => return true,
                Request::Cancel { .. } => {}
                other => self.queued.push_back(other),
            }
        }
        false
    }
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
    let bytes = std::fs::read(&args.model).with_context(|| format!("{}", args.model.display()))?;
    if let Some(expected) = &args.sha256 {
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !got.eq_ignore_ascii_case(expected) {
            bail!(
                "{}: sha256 {got} does not match the catalog's {expected}",
                args.model.display()
            );
        }
    }
    phase("sha256");
    let device = candle_core::Device::Cpu;
    phase("read");
    let (model, meta) = model::Model::load_gguf(&args.model, &bytes, args.requantize, &device)?;
    drop(bytes);
    phase("weights");
    let tok = tokenizer::Tokenizer::new(meta.tokenizer)?;
    phase("tokenizer");
    let name = |id: Option<u32>| {
        id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
            .unwrap_or_default()
    };
    let knows_chatml = tok.token_id("<|im_start|>").is_some();
    let template = template::ChatTemplate::new(
        meta.chat_template,
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
        load_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    let mut engine = engine::Engine {
        model,
        tokenizer: tok,
        template,
    };
    if args.tighten {
        // Everything is in memory now: no further file system access at all.
        harden::forbid_file_access().context("tightening the sandbox after load")?;
    }

    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    write_frame(&mut out, &Response::Ready(ready))?;

    let (tx, inbox) = mpsc::channel::<Request>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            match read_frame::<Request>(&mut stdin, MAX_REQUEST_FRAME) {
                Ok(Some(req)) => {
                    if tx.send(req).is_err() {
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
    let mut queued: VecDeque<Request> = VecDeque::new();
    loop {
        let msg = match queued.pop_front() {
            Some(m) => m,
            None => match inbox.recv() {
                Ok(m) => m,
                Err(_) => return Ok(()), // stdin closed: the supervisor is done with us
            },
        };
        match msg {
            Request::Shutdown => return Ok(()),
            Request::Cancel { .. } => {}
            Request::Tokenize { id, text, special } => {
                let ids = engine.tokenizer.encode(&text, special, false);
                write_frame(&mut out, &Response::Tokens { id, ids })?;
            }
            Request::Generate(req) => {
                let mut sink = StdoutSink {
                    out: &mut out,
                    inbox: &inbox,
                    queued: &mut queued,
                };
                match engine.generate(&req, &mut sink) {
                    Ok(done) => write_frame(&mut out, &Response::Done(done))?,
                    Err(e) => write_frame(
                        &mut out,
                        &Response::Error {
                            id: Some(req.id),
                            message: format!("{e:#}"),
                        },
                    )?,
                }
            }
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("corral-runner: {e:#}");
        std::process::exit(1);
    }
}
