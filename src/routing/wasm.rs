//! WASM policies: a rule whose action is `{ type = "wasm", module = "policy.wat" }` asks a
//! WebAssembly module (wasmtime) what to do.
//!
//! ABI (JSON in, JSON out; the module has no imports at all, so it can reach no file, socket,
//! clock or host function — only its own memory):
//!
//! - exports `memory`, `alloc(len: i32) -> i32` (where the host writes the input) and
//!   `decide(ptr: i32, len: i32) -> i64` (the output's `ptr << 32 | len` in its memory);
//! - input: `{"prompt": "...", "prompt_chars": 42, "task": "QA", "complexity": "low",
//!   "agent": "a" | null, "team": ..., "key_alias": ..., "requested_model": ...,
//!   "metadata": {"k": "v"}}`;
//! - output: `{"pass": true}` (this rule does not decide: evaluation goes on with the next one),
//!   or `{"action": ACTION}` with ACTION in the policy action schema (`prefer_slm`,
//!   `require_llm`, `deny`; not `wasm`).
//!
//! Limits per call: fuel (instructions, default 1,000,000), linear memory (default 16 MiB, at
//! most 64; instances come from a pool of 128 reused slots), a
//! wall-clock bound (default 50 ms, by epoch interruption) and an output size cap (64 KiB). A
//! module that traps, runs out of fuel or time, or answers anything but the above yields the
//! rule's `fail_safe` action (default: deny), and a `warn` log line says why. The module is
//! compiled once when the configuration loads; each call instantiates it afresh (no state
//! survives between requests).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap,
};

use super::rules::{Action, RequestContext};
use super::task::Classification;

/// Largest answer a module may give.
const MAX_OUTPUT: usize = 64 * 1024;
/// Policy calls that can run at the same time (the instance pool's size).
const POOL_SLOTS: u32 = 128;
/// The most linear memory a policy may be given (`memory_mb`).
pub const MAX_MEMORY_MB: u32 = 64;
/// Epoch ticks are this long.
const TICK: Duration = Duration::from_millis(1);

/// `{ type = "wasm", ... }` in a policy's action.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WasmAction {
    /// A `.wasm` or `.wat` file, relative to the configuration file's directory.
    pub module: PathBuf,
    /// What to do when the module fails (default: deny).
    #[serde(default)]
    pub fail_safe: Option<Box<Action>>,
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_fuel() -> u64 {
    1_000_000
}
fn default_memory() -> u32 {
    16
}
fn default_timeout() -> u64 {
    50
}

/// What a module answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    Decide(Action),
    /// The module failed; the fail-safe applies. The string says why.
    Failed(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    pass: bool,
    #[serde(default)]
    action: Option<Action>,
}

struct State {
    limits: StoreLimits,
}

/// A compiled policy module.
#[derive(Clone)]
pub struct WasmPolicy {
    path: PathBuf,
    engine: Engine,
    pre: InstancePre<State>,
    fuel: u64,
    memory_bytes: usize,
    ticks: u64,
    pub fail_safe: Action,
}

impl std::fmt::Debug for WasmPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPolicy")
            .field("path", &self.path)
            .field("fuel", &self.fuel)
            .field("memory_bytes", &self.memory_bytes)
            .finish_non_exhaustive()
    }
}

/// The engine all policies share, with a thread advancing its epoch every millisecond (the
/// wall-clock bound of each call counts these ticks).
/// Bytes at the start of each pooled memory (and table) reset by `memset` instead of `madvise`.
const KEEP_RESIDENT: usize = 128 * 1024;

fn engine() -> Result<Engine, String> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut cfg = Config::new();
            cfg.consume_fuel(true).epoch_interruption(true);
            // Instances and memories come from a pool and are reset, not mapped and unmapped,
            // per call: this is most of a call's fixed cost. POOL_SLOTS calls can run at once;
            // one more gets "pool exhausted" and its policy's fail-safe.
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(POOL_SLOTS)
                .total_memories(POOL_SLOTS)
                .total_tables(POOL_SLOTS)
                .max_memory_size(MAX_MEMORY_MB as usize * 1024 * 1024)
                .max_unused_warm_slots(16)
                // A call touches a few pages of its memory: zeroing them in place is cheaper
                // than returning them to the kernel and faulting them back in on the next call.
                .linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(KEEP_RESIDENT);
            cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
                .memory_reservation(u64::from(MAX_MEMORY_MB) * 1024 * 1024)
                .memory_guard_size(64 * 1024);
            let engine = Engine::new(&cfg).map_err(|e| e.to_string())?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("corral-wasm-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                })
                .map_err(|e| format!("epoch thread: {e}"))?;
            Ok(engine)
        })
        .clone()
}

impl WasmPolicy {
    /// Compiles the module of `action` (its path relative to `base`); `key` names it in errors.
    pub fn compile(
        action: &WasmAction,
        base: &Path,
        key: &str,
    ) -> Result<WasmPolicy, (String, String)> {
        let path = if action.module.is_absolute() {
            action.module.clone()
        } else {
            base.join(&action.module)
        };
        let err = |m: String| (format!("{key}.module"), format!("{}: {m}", path.display()));
        if action.fuel == 0 || action.memory_mb == 0 || action.timeout_ms == 0 {
            return Err((
                key.to_string(),
                "fuel, memory_mb and timeout_ms must be > 0".into(),
            ));
        }
        let engine = engine().map_err(err)?;
        let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
        let module = Module::new(&engine, &bytes).map_err(|e| err(format!("{e:#}")))?;
        if module.imports().len() != 0 {
            let names: Vec<String> = module
                .imports()
                .map(|i| format!("{}.{}", i.module(), i.name()))
                .collect();
            return Err(err(format!(
                "imports {} but policy modules get no imports (no host access)",
                names.join(", ")
            )));
        }
        for (name, what) in [("memory", "memory"), ("alloc", "func"), ("decide", "func")] {
            if module.get_export(name).is_none() {
                return Err(err(format!("does not export {what} `{name}`")));
            }
        }
        let linker: Linker<State> = Linker::new(&engine);
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| err(format!("{e:#}")))?;
        let fail_safe = action
            .fail_safe
            .as_deref()
            .cloned()
            .unwrap_or(Action::Deny {
                reason: format!("wasm policy {} failed", path.display()),
            });
        if matches!(fail_safe, Action::Wasm(_)) {
            return Err((
                format!("{key}.fail_safe"),
                "cannot itself be a wasm action".into(),
            ));
        }
        Ok(WasmPolicy {
            path,
            engine,
            pre,
            fuel: action.fuel,
            memory_bytes: action.memory_mb as usize * 1024 * 1024,
            ticks: action.timeout_ms.div_ceil(TICK.as_millis() as u64).max(1),
            fail_safe,
        })
    }

    /// The input document for `req`; `resolved_model` is what the requested model stands for
    /// (an alias's target, `PROVIDER/MODEL` for a remote model).
    pub fn input(
        req: &RequestContext,
        class: &Classification,
        prompt_chars: usize,
        resolved_model: Option<&str>,
    ) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "prompt": req.prompt,
            "prompt_chars": prompt_chars,
            "task": class.task,
            "complexity": class.complexity,
            "agent": req.agent,
            "team": req.team,
            "key_alias": req.key_alias,
            "requested_model": req.requested_model,
            "resolved_model": resolved_model,
            "metadata": req.metadata,
        }))
        .unwrap_or_default()
    }

    /// Runs the module on `input`.
    pub fn call(&self, input: &[u8]) -> Outcome {
        match self.try_call(input) {
            Ok(o) => o,
            Err(why) => {
                tracing::warn!(policy = %self.path.display(), error = %why, "wasm policy failed: fail-safe applies");
                Outcome::Failed(why)
            }
        }
    }

    fn try_call(&self, input: &[u8]) -> Result<Outcome, String> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_bytes)
            .instances(1)
            .memories(1)
            .tables(1)
            .table_elements(10_000)
            .build();
        let mut store = Store::new(&self.engine, State { limits });
        store.limiter(|s| &mut s.limits);
        store.set_fuel(self.fuel).map_err(|e| e.to_string())?;
        store.set_epoch_deadline(self.ticks);
        let explain = |e: wasmtime::Error| match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => format!("ran out of fuel ({} units)", self.fuel),
            Some(Trap::Interrupt) => format!("ran past its time limit ({} ms)", self.ticks),
            Some(t) => format!("trapped: {t}"),
            None => format!("{e:#}"),
        };
        let instance = self.pre.instantiate(&mut store).map_err(explain)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or("no memory export")?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "alloc")
            .map_err(|e| format!("alloc: {e}"))?;
        let decide = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, "decide")
            .map_err(|e| format!("decide: {e}"))?;
        let len = i32::try_from(input.len()).map_err(|_| "input too large")?;
        let ptr = alloc.call(&mut store, len).map_err(explain)?;
        memory
            .write(&mut store, ptr as u32 as usize, input)
            .map_err(|_| "alloc returned memory outside the module's memory".to_string())?;
        let packed = decide.call(&mut store, (ptr, len)).map_err(explain)?;
        let (out_ptr, out_len) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        if out_len > MAX_OUTPUT {
            return Err(format!("answer of {out_len} bytes (limit {MAX_OUTPUT})"));
        }
        let mut out = vec![0u8; out_len];
        memory
            .read(&store, out_ptr, &mut out)
            .map_err(|_| "answer points outside the module's memory".to_string())?;
        let a: Answer = serde_json::from_slice(&out).map_err(|e| {
            format!(
                "unreadable answer ({e}): {:?}",
                String::from_utf8_lossy(&out[..out.len().min(200)])
            )
        })?;
        match (a.pass, a.action) {
            (true, None) => Ok(Outcome::Pass),
            (false, Some(Action::Wasm(_))) => Err("answered a wasm action".into()),
            (false, Some(action)) => Ok(Outcome::Decide(action)),
            _ => Err("answer must be {\"pass\": true} or {\"action\": ...}".into()),
        }
    }
}

/// Shared handle kept by compiled rules.
pub type Handle = Arc<WasmPolicy>;

#[cfg(test)]
mod tests {
    use super::*;

    fn action(module: &Path) -> WasmAction {
        WasmAction {
            module: module.to_path_buf(),
            fail_safe: None,
            fuel: default_fuel(),
            memory_mb: 1,
            timeout_ms: 50,
        }
    }

    fn example() -> WasmPolicy {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        WasmPolicy::compile(&action(Path::new("examples/policies/tier.wat")), base, "k").unwrap()
    }

    fn input(tier: &str) -> Vec<u8> {
        let req = RequestContext {
            prompt: "hello".into(),
            metadata: [("tier".to_string(), tier.to_string())].into(),
            ..Default::default()
        };
        let class = super::super::task::Classifier::new(true, &[], super::super::TaskType::QA)
            .unwrap()
            .classify("hello", None);
        WasmPolicy::input(&req, &class, 5, None)
    }

    #[test]
    fn the_example_policy_decides_from_metadata() {
        let p = example();
        assert_eq!(
            p.call(&input("blocked")),
            Outcome::Decide(Action::Deny {
                reason: "tenant tier is blocked".into()
            })
        );
        assert!(matches!(
            p.call(&input("premium")),
            Outcome::Decide(Action::RequireLlm { .. })
        ));
        assert_eq!(p.call(&input("free")), Outcome::Pass);
        // large inputs grow the module's memory
        let big = format!(
            "{{\"prompt\":\"{}\",\"metadata\":{{\"tier\":\"blocked\"}}}}",
            "x".repeat(200_000)
        );
        let mut p2 = action(Path::new("examples/policies/tier.wat"));
        p2.memory_mb = 4;
        p2.fuel = 100_000_000; // a byte-by-byte scan of 200 KB needs more than the default
        let p2 = WasmPolicy::compile(&p2, Path::new(env!("CARGO_MANIFEST_DIR")), "k").unwrap();
        let got = p2.call(big.as_bytes());
        assert!(
            matches!(got, Outcome::Decide(Action::Deny { .. })),
            "{got:?}"
        );
        // with the default budget the same scan runs out of fuel, and says so
        match p.call(big.as_bytes()) {
            Outcome::Failed(why) => assert!(why.contains("fuel"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    fn module(dir: &Path, name: &str, decide_body: &str) -> PathBuf {
        let p = dir.join(name);
        let src = format!(
            r#"(module (memory (export "memory") 1)
                 (data (i32.const 0) "not json")
                 (func (export "alloc") (param i32) (result i32) (i32.const 1024))
                 (func (export "decide") (param i32 i32) (result i64) {decide_body}))"#
        );
        std::fs::write(&p, src).unwrap();
        p
    }

    #[test]
    fn misbehaving_modules_yield_the_fail_safe_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases = [
            ("loop.wat", "(loop $l (br $l)) (i64.const 0)", "fuel"),
            ("trap.wat", "unreachable", "trapped"),
            ("garbage.wat", "(i64.const 8)", "unreadable answer"),
            ("outside.wat", "(i64.const 0x7fffffff00000010)", "outside"),
        ];
        for (name, body, want) in cases {
            let p = WasmPolicy::compile(&action(&module(d, name, body)), d, "k").unwrap();
            match p.call(b"{}") {
                Outcome::Failed(why) => assert!(why.contains(want), "{name}: {why}"),
                other => panic!("{name}: {other:?}"),
            }
            assert!(matches!(p.fail_safe, Action::Deny { .. }));
        }
        // The wall-clock bound holds when fuel would not (a huge budget).
        let mut slow = action(&module(d, "slow.wat", "(loop $l (br $l)) (i64.const 0)"));
        slow.fuel = u64::MAX / 2;
        slow.timeout_ms = 20;
        let p = WasmPolicy::compile(&slow, d, "k").unwrap();
        let t = std::time::Instant::now();
        match p.call(b"{}") {
            Outcome::Failed(why) => assert!(why.contains("time limit"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2));
        // Memory beyond the limit cannot be had.
        let grow = module(
            d,
            "grow.wat",
            "(if (i32.lt_s (memory.grow (i32.const 64)) (i32.const 0)) (then unreachable)) (i64.const 0)",
        );
        match WasmPolicy::compile(&action(&grow), d, "k")
            .unwrap()
            .call(b"{}")
        {
            Outcome::Failed(why) => assert!(why.contains("trapped"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn modules_with_imports_or_missing_exports_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = d.join("imports.wat");
        std::fs::write(
            &p,
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "alloc") (param i32) (result i32) (i32.const 0))
                (func (export "decide") (param i32 i32) (result i64) (i64.const 0)))"#,
        )
        .unwrap();
        let e = WasmPolicy::compile(&action(&p), d, "k").unwrap_err();
        assert!(
            e.1.contains("no imports") && e.1.contains("fd_write"),
            "{e:?}"
        );
        let q = d.join("noexport.wat");
        std::fs::write(&q, "(module (memory (export \"memory\") 1))").unwrap();
        let e = WasmPolicy::compile(&action(&q), d, "k").unwrap_err();
        assert!(e.1.contains("alloc"), "{e:?}");
        let e = WasmPolicy::compile(&action(&d.join("missing.wasm")), d, "k").unwrap_err();
        assert_eq!(e.0, "k.module");
    }
}
