//! corral's own decoder forward pass, for every architecture in [`ARCHITECTURES`] (llama,
//! mistral, qwen2, qwen3, phi3, gemma2, gemma3) with each one's options as llama.cpp's graph for
//! it computes them, from GGUF files or from converted checkpoints (`checkpoint.rs`).
//!
//! Weight products for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16 and BF16 use corral's
//! own kernels (`kernels.rs`) with ggml's arithmetic (Candle's quantized matmul drifts further
//! from it), other types (F32) Candle's; everything
//! between them is plain Rust that reproduces the float arithmetic of llama.cpp's x86 CPU path
//! operation for operation (`ggml_math.rs`), so that greedy decoding agrees with it token for
//! token and the log-probabilities to the last bits (`scripts/make-reference.py`, the parity test):
//!
//! - RMS norm accumulates the sum of squares in f64;
//! - rotary embeddings rotate adjacent pairs (llama, mistral) or halves (NeoX: the others),
//!   with angles advanced by repeated f32
//!   multiplication and the rotation in the fused multiply-adds GCC emits for ggml;
//! - the KV cache holds f16; queries are rounded to f16 before `q·k`, and the softmax weights to
//!   f16 before they multiply `v` (llama.cpp's `mul_mat` converts its f32 operand to the cache's
//!   type); both products sum in the order of ggml's f16 dot product when one row is decoded and
//!   of tinyBLAS when a prompt is prefilled;
//! - the softmax and SiLU use ggml's vectorized `expf`; the softmax sums groups of eight in f32
//!   and those in f64.
//!
//! Running the glue ourselves also avoids Candle's per-operation overhead (allocation and thread
//! dispatch for each of ~20 small operations per layer), which dominated decode time.

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::ggml_math::{self, ColumnDot, Order};
use crate::kernels::{QMat, WType};

/// A weight matrix: our own kernels for the types `kernels` computes (ggml's arithmetic),
/// Candle's for the rest.
enum Mat {
    Own(QMat),
    Candle(QMatMul),
}

#[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
impl Mat {
    /// Values per row.
    fn cols(&self) -> usize {
        match self {
            Mat::Own(m) => m.cols,
            Mat::Candle(QMatMul::QTensor(t)) => t.shape().dims().last().copied().unwrap_or(0),
            Mat::Candle(QMatMul::Tensor(t)) | Mat::Candle(QMatMul::TensorF16(t)) => {
                t.dims().last().copied().unwrap_or(0)
            }
        }
    }

    /// The matrix in f32, row-major: each quantized value as ggml dequantizes it.
    fn to_f32(&self) -> anyhow::Result<Vec<f32>> {
        match self {
            Mat::Own(m) => {
                let mut out = Vec::with_capacity(m.rows * m.cols);
                for r in 0..m.rows {
                    out.extend_from_slice(&m.row_f32(r));
                }
                Ok(out)
            }
            Mat::Candle(QMatMul::QTensor(t)) => Ok(vec_of(t)?),
            Mat::Candle(QMatMul::Tensor(t)) => Ok(t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?),
            Mat::Candle(QMatMul::TensorF16(t)) => Ok(t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub n_layer: usize,
    pub freq_base: f32,
    pub eps: f32,
    pub max_seq: usize,
    /// Query width: heads x head dimension (Gemma 3's head dimension is not n_embd / heads).
    pub q_dim: usize,
    /// Per rotary frequency, the divisor of its angle (`rope_freqs.weight`: Llama 3.1/3.2
    /// files' long-context scaling; Phi-3's `rope_factors_short`/`_long`, chosen as llama.cpp
    /// chooses them by the context size).
    pub freq_factors: Option<Vec<f32>>,
    /// Rotary embeddings over halves (NeoX: Qwen, Phi-3, Gemma) instead of adjacent pairs.
    pub neox: bool,
    /// Angle multiplier of the full-attention layers (`1 / rope.scaling.factor`).
    pub freq_scale: f32,
    /// Multiplier of the rotation's cos and sin (`rope.scaling.attn_factor`, Phi-3.5's LongRoPE).
    pub rope_mscale: f32,
    /// Sliding-window attention (Gemma 2 and 3): which layers, how wide, their rope.
    pub sliding: Option<Sliding>,
    /// The attention scale; with `scale_queries` it multiplies the queries before `q·k` (as
    /// Gemma's and Phi-3's graphs do), otherwise the scores in the softmax.
    pub attn_scale: f32,
    pub scale_queries: bool,
    /// Gemma 2: `cap * tanh(score / cap)` on attention scores and on the final logits.
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Gemma: embeddings scaled by sqrt(n_embd), GELU (tanh) instead of SiLU.
    pub gemma: bool,
}

/// Sliding-window layers: position p sees keys p - window + 1 ..= p, rotated with a base (and
/// scale) of their own.
#[derive(Debug, Clone)]
pub struct Sliding {
    pub window: usize,
    pub layers: Vec<bool>,
    pub base: f32,
    pub scale: f32,
}

/// The GGUF architectures this forward pass reads, with llama.cpp's meaning of each.
pub const ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
];

/// The weights of Q, K and V: three matrices, or one whose rows are Q's, K's then V's (Phi-3).
#[allow(clippy::large_enum_variant)] // one per layer, never moved in a loop: size is no cost
enum Qkv {
    Split(Mat, Mat, Mat),
    Fused(Mat),
}

/// The feed-forward input products: gate and up, or one matrix of gate rows then up rows
/// (Phi-3's `ffn_up`).
enum GateUp {
    Split(Mat, Mat),
    Fused(Mat),
}

struct Layer {
    /// Qwen3 and Gemma 3: per-head query and key norms. Gemma: norms after attention and after
    /// the FFN.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    attn_norm: Vec<f32>,
    qkv: Qkv,
    /// Q, K and V biases end to end (Qwen2; any file that has them), added after the products.
    qkv_bias: Option<Vec<f32>>,
    wo: Mat,
    wo_bias: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    w_down: Mat,
}

/// The token embedding: a quantized table dequantized row by row (llama.cpp's `get_rows`), or
/// a plain f32 table for other types.
enum Embedding {
    Quant(QMat),
    /// The rows of the output matrix (a tied table on our own kernels, laid out once).
    Output,
    F32(Vec<f32>),
    /// Another quantized type, kept as the file has it and dequantized a row at a time by
    /// Candle (a 262k-token table widened to f32 would take 671 MB).
    Rows {
        dtype: GgmlDType,
        data: Vec<u8>,
        row_bytes: usize,
    },
}

pub struct Llama {
    cfg: Config,
    embd: Embedding,
    vocab: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Mat,
    output_bias: Option<Vec<f32>>,
    device: Device,
}

/// One sequence's keys and values. Per layer: `[position][kv_head * head_dim]`, grown as the
/// sequence grows. Values are rounded to f16 (llama.cpp's cache type) but kept as f32, so
/// reading them costs nothing.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Values per position in each layer.
    kv_dim: usize,
    /// A device model's cache (`gpu.rs`): the keys and values live on the device.
    pub(crate) dev: Option<crate::gpu::DevKv>,
}

impl KvCache {
    /// An empty cache on a device.
    pub(crate) fn on_device(kv_dim: usize, dev: crate::gpu::DevKv) -> KvCache {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            kv_dim,
            dev: Some(dev),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        if let Some(d) = &self.dev {
            return d.len;
        }
        match self.k.first() {
            Some(k) if self.kv_dim > 0 => k.len() / self.kv_dim,
            _ => 0,
        }
    }

    /// A cache of `positions` positions of `layers` layers, `kv_dim` values each (for tests).
    #[cfg(test)]
    pub fn filled(layers: usize, positions: usize, kv_dim: usize) -> KvCache {
        KvCache {
            k: vec![vec![0.5; positions * kv_dim]; layers],
            v: vec![vec![0.5; positions * kv_dim]; layers],
            kv_dim,
            dev: None,
        }
    }

    /// Bytes of keys and values allocated (each layer's two vectors).
    pub fn bytes(&self) -> usize {
        if let Some(d) = &self.dev {
            return d.bytes;
        }
        self.k.iter().chain(&self.v).map(|l| l.capacity() * 4).sum()
    }

    /// Room for `positions` positions allocated now, exactly (a vector left to grow would
    /// double, holding up to twice what the budget counts).
    pub fn reserve(&mut self, positions: usize) {
        if let Some(d) = &mut self.dev {
            // allocated by the next pass, exactly (a device buffer cannot grow in place)
            d.want = d.want.max(positions);
            return;
        }
        let want = positions * self.kv_dim;
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            if l.capacity() < want {
                l.reserve_exact(want - l.len());
            }
        }
    }

    /// Gives back the room past what it holds.
    pub fn shrink(&mut self) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.shrink_to_fit();
        }
    }
}

/// One sequence's part of a batched forward pass: `tokens` placed at positions `pos..` of
/// `cache` (which is cut back to `pos` first), and whether its last token's logits are wanted.
pub struct Item<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub pos: usize,
    pub logits: bool,
}

/// A batch's rows, in the order of its items: each item's range of rows, each row's position
/// and token, and the rows that go on past the last layer's attention (the last of each item
/// that wants logits).
pub(crate) struct Rows {
    pub spans: Vec<std::ops::Range<usize>>,
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    pub wanted: Vec<usize>,
}

impl Rows {
    pub(crate) fn of(items: &[Item<'_>]) -> Rows {
        let mut spans = Vec::with_capacity(items.len());
        let mut positions = Vec::new();
        for it in items {
            let from = positions.len();
            positions.extend(it.pos..it.pos + it.tokens.len());
            spans.push(from..positions.len());
        }
        let wanted = items
            .iter()
            .zip(&spans)
            .filter(|(it, _)| it.logits)
            .map(|(_, s)| s.end - 1)
            .collect();
        Rows {
            spans,
            positions,
            tokens: items.iter().flat_map(|it| it.tokens).copied().collect(),
            wanted,
        }
    }
}

impl Item<'_> {
    /// Refuses an item with no tokens, or one that would pass the context.
    pub(crate) fn check(&self, max_seq: usize) -> anyhow::Result<()> {
        if self.tokens.is_empty() {
            anyhow::bail!("no tokens to feed");
        }
        if self.pos + self.tokens.len() > max_seq {
            anyhow::bail!(
                "position {} exceeds the context of {max_seq}",
                self.pos + self.tokens.len()
            );
        }
        Ok(())
    }
}

/// The bytes `from..from + len` of a tensor's data in the file, if the arithmetic stays in range.
fn span(
    ct: &gguf_file::Content,
    info: &gguf_file::TensorInfo,
    from: usize,
    len: usize,
) -> Option<std::ops::Range<usize>> {
    let start = ct
        .tensor_data_offset
        .checked_add(info.offset)
        .and_then(|o| usize::try_from(o).ok())?
        .checked_add(from)?;
    Some(start..start.checked_add(len)?)
}

/// A tensor of the file (or of a converted checkpoint's, as an f32 QTensor).
fn get<R: std::io::Read + std::io::Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    loaded: Option<&Loaded>,
    name: &str,
) -> anyhow::Result<QTensor> {
    if let Some(l) = loaded {
        let l = l.borrow();
        let t = l
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))?;
        return Ok(QTensor::quantize(
            &t.to_dtype(candle_core::DType::F32)?,
            GgmlDType::F32,
        )?);
    }
    ct.tensor(r, name, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
}

fn vec_of(t: &QTensor) -> candle_core::Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

/// A converted checkpoint's tensors under GGUF names (f32, f16 or bf16), taken as the model is
/// built so that each is held once.
pub type Loaded = std::cell::RefCell<std::collections::HashMap<String, Tensor>>;

impl Llama {
    /// A model from a GGUF file (`bytes`, also read through `r`).
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        bytes: &[u8],
        r: &mut R,
        device: &Device,
        max_seq: usize,
    ) -> anyhow::Result<Llama> {
        Self::load(ct, bytes, r, None, device, max_seq)
    }

    /// A model from a checkpoint converted by `checkpoint.rs`: `ct` holds its metadata and
    /// tensor shapes, `tensors` the tensors themselves.
    pub fn from_tensors(
        ct: &gguf_file::Content,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
        max_seq: usize,
    ) -> anyhow::Result<Llama> {
        let loaded = std::cell::RefCell::new(tensors);
        let empty: &[u8] = &[];
        Self::load(
            ct,
            empty,
            &mut std::io::Cursor::new(empty),
            Some(&loaded),
            device,
            max_seq,
        )
    }

    fn load<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        bytes: &[u8],
        r: &mut R,
        loaded: Option<&Loaded>,
        device: &Device,
        max_seq: usize,
    ) -> anyhow::Result<Llama> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let md_u = |k: &str| -> anyhow::Result<usize> {
            let v = ct
                .metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| anyhow::anyhow!("GGUF metadata {arch}.{k} is missing"))?;
            Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from))? as usize)
        };
        let md_f = |k: &str| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_f32().ok())
        };
        let n_embd = md_u("embedding_length")?;
        let n_head = md_u("attention.head_count")?;
        let n_head_kv = md_u("attention.head_count_kv").unwrap_or(n_head);
        let n_layer = md_u("block_count")?;
        if n_layer == 0 || n_layer > ct.tensor_infos.len() {
            anyhow::bail!(
                "{n_layer} layers declared for {} tensors",
                ct.tensor_infos.len()
            );
        }
        // Every tensor the graph reads; a file with others is refused below (llama.cpp refuses
        // files whose tensors its graph does not all create).
        let used = std::cell::RefCell::new(std::collections::HashSet::<String>::new());
        if !ARCHITECTURES.contains(&arch.as_str()) {
            anyhow::bail!(
                "unsupported GGUF architecture '{arch}' ({} are supported)",
                ARCHITECTURES.join(", ")
            );
        }
        let gemma = arch.starts_with("gemma");
        let key_length = md_u("attention.key_length").ok();
        if n_head == 0
            || n_head_kv == 0
            || (key_length.is_none() && n_embd % n_head != 0)
            || n_head % n_head_kv != 0
        {
            anyhow::bail!(
                "inconsistent attention shape: {n_embd} dims, {n_head} heads, {n_head_kv} kv heads"
            );
        }
        let head_dim = key_length.unwrap_or(n_embd / n_head);
        let n_rot = md_u("rope.dimension_count").unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            anyhow::bail!("rope dimension {n_rot} does not fit head dimension {head_dim}");
        }
        // Rope scaling as llama.cpp reads it: a linear factor for any architecture, LongRoPE's
        // factor tensors; YaRN would compute other angles, so such files are refused rather than
        // answered with the wrong ones.
        let scaling_type = ct
            .metadata
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "linear".into());
        if !matches!(scaling_type.as_str(), "none" | "linear" | "longrope") {
            anyhow::bail!(
                "{arch}.rope.scaling.type is '{scaling_type}': only linear and LongRoPE rope \
                 scaling are supported"
            );
        }
        // A factor applies unless the type says none (llama.cpp's reading; LongRoPE's own
        // factors are tensors, below).
        let freq_scale = md_f("rope.scaling.factor")
            .or_else(|| md_f("rope.scale_linear"))
            .filter(|f| *f != 0.0 && scaling_type != "none")
            .map_or(1.0, |f| 1.0 / f);
        let factors = |r: &mut R, name: &str| -> anyhow::Result<Option<Vec<f32>>> {
            if !ct.tensor_infos.contains_key(name) {
                return Ok(None);
            }
            used.borrow_mut().insert(name.to_string());
            let f = vec_of(&get(ct, r, loaded, name)?)?;
            if f.len() != n_rot / 2 || f.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                anyhow::bail!(
                    "{name} has {} values (want {} positive ones)",
                    f.len(),
                    n_rot / 2
                );
            }
            Ok(Some(f))
        };
        let freq_factors = match arch.as_str() {
            "llama" | "mistral" => factors(r, "rope_freqs.weight")?,
            // Phi-3 (128k variants): the long factors when the context used exceeds the one
            // the model was trained for, the short ones otherwise (llama.cpp's choice).
            "phi3" => {
                let orig = md_u("rope.scaling.original_context_length")
                    .or_else(|_| md_u("context_length"))
                    .unwrap_or(max_seq);
                // (Both are the graph's, as llama.cpp loads both.)
                let (long, short) = ("rope_factors_long.weight", "rope_factors_short.weight");
                used.borrow_mut()
                    .extend([long.to_string(), short.to_string()]);
                factors(r, if max_seq > orig { long } else { short })?
            }
            _ => None,
        };
        // Sliding windows: Gemma 2 always (4096 unless the file says), Gemma 3 when the file
        // names a window; which layers from `sliding_window_pattern` (a period, whose last
        // layer is global, or one flag per layer).
        let window = md_u("attention.sliding_window").ok();
        let window = match arch.as_str() {
            "gemma2" => Some(window.unwrap_or(4096)),
            "gemma3" => window.filter(|w| *w > 0),
            _ => None,
        };
        let sliding = match window {
            None => None,
            Some(window) => {
                let key = format!("{arch}.attention.sliding_window_pattern");
                let layers = match ct.metadata.get(&key) {
                    Some(gguf_file::Value::Array(flags)) => {
                        let flags: Vec<bool> =
                            flags.iter().filter_map(|v| v.to_bool().ok()).collect();
                        if flags.len() != n_layer {
                            anyhow::bail!("{key} has {} flags for {n_layer} layers", flags.len());
                        }
                        flags
                    }
                    _ => {
                        let period = md_u("attention.sliding_window_pattern")
                            .unwrap_or(if arch == "gemma2" { 2 } else { 6 });
                        (0..n_layer)
                            .map(|l| period == 0 || l % period < period - 1)
                            .collect()
                    }
                };
                Some(Sliding {
                    window,
                    layers,
                    // Gemma 2's sliding layers rotate like the others unless the file says;
                    // Gemma 3's default to 10000 and ignore the linear scaling.
                    base: md_f("rope.freq_base_swa")
                        .or_else(|| md_f("rope.local_freq_base"))
                        .unwrap_or(if arch == "gemma2" {
                            md_f("rope.freq_base").unwrap_or(10_000.0)
                        } else {
                            10_000.0
                        }),
                    scale: if arch == "gemma2" { freq_scale } else { 1.0 },
                })
            }
        };
        let cfg = Config {
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            n_layer,
            freq_base: md_f("rope.freq_base").unwrap_or(10_000.0),
            eps: md_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            max_seq,
            q_dim: n_head * head_dim,
            freq_factors,
            neox: arch != "llama" && arch != "mistral",
            freq_scale,
            rope_mscale: md_f("rope.scaling.attn_factor").unwrap_or(1.0),
            sliding,
            // llama.cpp's choice for the 27B Gemmas (46 layers for Gemma 2, 62 for Gemma 3):
            // 1/sqrt(n_embd / n_head); head dimension otherwise.
            attn_scale: if (arch == "gemma2" && n_layer == 46)
                || (arch == "gemma3" && n_layer == 62)
            {
                1.0 / ((n_embd / n_head) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            scale_queries: gemma || arch == "phi3",
            attn_softcap: (arch == "gemma2")
                .then(|| md_f("attn_logit_softcapping").unwrap_or(50.0))
                .filter(|c| *c != 0.0),
            final_softcap: match arch.as_str() {
                "gemma2" => Some(md_f("final_logit_softcapping").unwrap_or(30.0)),
                "gemma3" => md_f("final_logit_softcapping"),
                _ => None,
            }
            .filter(|c| *c != 0.0),
            gemma,
        };
        let f32_weights = std::env::var_os("CORRAL_DEBUG_F32_WEIGHTS").is_some();
        // Rows `rows` of a matrix (all when None) on our own kernels, when its type has them.
        let own_rows = |name: &str, part: Option<(usize, usize)>| -> anyhow::Result<Option<QMat>> {
            let info = ct
                .tensor_infos
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))?;
            let Some(w) = WType::from_ggml(info.ggml_dtype) else {
                return Ok(None);
            };
            if f32_weights {
                return Ok(None);
            }
            let (rows, cols) = info.shape.dims2()?;
            if let Some(l) = loaded {
                // A checkpoint's f16 or bf16 matrix (the own types one holds), from its tensor.
                let (first, n) = part.unwrap_or((0, rows));
                let t = l
                    .borrow()
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))?
                    .narrow(0, first, n)?;
                let data: Vec<u8> = match (w, t.dtype()) {
                    (WType::F16, candle_core::DType::F16) => {
                        let v = t.flatten_all()?.to_vec1::<half::f16>()?;
                        v.iter().flat_map(|x| x.to_le_bytes()).collect()
                    }
                    (WType::BF16, candle_core::DType::BF16) => {
                        let v = t.flatten_all()?.to_vec1::<half::bf16>()?;
                        v.iter().flat_map(|x| x.to_le_bytes()).collect()
                    }
                    _ => return Ok(None),
                };
                used.borrow_mut().insert(name.to_string());
                if name != "token_embd.weight" && part.is_none() {
                    l.borrow_mut().remove(name);
                }
                return Ok(Some(QMat::new(w, n, cols, &data)?));
            }
            let row_bytes = cols / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let (first, n) = part.unwrap_or((0, rows));
            if first.saturating_add(n) > rows {
                anyhow::bail!(
                    "tensor {name} has {rows} rows, not {}",
                    first.saturating_add(n)
                );
            }
            used.borrow_mut().insert(name.to_string());
            let data = span(ct, info, first * row_bytes, n * row_bytes)
                .and_then(|r| bytes.get(r))
                .ok_or_else(|| anyhow::anyhow!("tensor {name} lies outside the file"))?;
            Ok(Some(QMat::new(w, n, cols, data)?))
        };
        let own = |name: &str| own_rows(name, None);
        let mm = |r: &mut R, name: &str| -> anyhow::Result<Mat> {
            used.borrow_mut().insert(name.to_string());
            if let Some(m) = own(name)? {
                return Ok(Mat::Own(m));
            }
            if let Some(l) = loaded {
                // Taken, not copied (the embedding stays: a tied output reads it again).
                let t = if name == "token_embd.weight" {
                    l.borrow().get(name).cloned()
                } else {
                    l.borrow_mut().remove(name)
                };
                let t = t.ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))?;
                return Ok(Mat::Candle(QMatMul::Tensor(
                    t.to_dtype(candle_core::DType::F32)?,
                )));
            }
            let t = get(ct, r, None, name)?;
            if f32_weights {
                return Ok(Mat::Candle(QMatMul::Tensor(t.dequantize(&Device::Cpu)?)));
            }
            Ok(Mat::Candle(QMatMul::from_qtensor(t)?))
        };
        let norm_vec = |r: &mut R, name: &str| -> anyhow::Result<Vec<f32>> {
            used.borrow_mut().insert(name.to_string());
            Ok(vec_of(&get(ct, r, loaded, name)?)?)
        };
        let embd_info = ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| anyhow::anyhow!("tensor token_embd.weight is missing"))?;
        let embd_dtype = embd_info.ggml_dtype;
        used.borrow_mut().insert("token_embd.weight".into());
        // Gemma 2 always ties the output to the embedding (llama.cpp ignores an output.weight).
        let tied = arch == "gemma2" || !ct.tensor_infos.contains_key("output.weight");
        // A tied table on our own kernels is laid out once, as the output matrix, and the
        // embedding reads its rows there (Gemma 3's is 178 MB: laid out twice, it cost a fifth
        // of the load and as much memory again).
        let mut tied_output = None;
        let (embd, vocab) = match own("token_embd.weight")? {
            Some(m) if tied => {
                let v = m.rows;
                tied_output = Some(m);
                (Embedding::Output, v)
            }
            Some(m) => {
                let v = m.rows;
                (Embedding::Quant(m), v)
            }
            None if !matches!(
                embd_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            ) && !f32_weights =>
            {
                let (rows, cols) = embd_info.shape.dims2()?;
                let row_bytes = cols / embd_dtype.block_size() * embd_dtype.type_size();
                let data = span(ct, embd_info, 0, rows.saturating_mul(row_bytes))
                    .and_then(|r| bytes.get(r))
                    .ok_or_else(|| {
                        anyhow::anyhow!("tensor token_embd.weight lies outside the file")
                    })?
                    .to_vec();
                (
                    Embedding::Rows {
                        dtype: embd_dtype,
                        data,
                        row_bytes,
                    },
                    rows,
                )
            }
            None => {
                let t = vec_of(&get(ct, r, loaded, "token_embd.weight")?)?;
                let v = t.len() / n_embd;
                (Embedding::F32(t), v)
            }
        };
        // A malformed file must fail here, not panic at the first request: check every shape.
        if n_embd == 0 || vocab == 0 {
            anyhow::bail!("empty embedding");
        }
        let kv_dim = n_head_kv * head_dim;
        let q_dim = n_head * head_dim;
        let n_ff = md_u("feed_forward_length").unwrap_or_else(|_| {
            ct.tensor_infos
                .get("blk.0.ffn_gate.weight")
                .and_then(|t| t.shape.dims2().ok())
                .map_or(0, |(r, _)| r)
        });
        let shape = |name: &str, rows: usize, cols: usize| -> anyhow::Result<()> {
            let info = ct
                .tensor_infos
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))?;
            let dims = info.shape.dims();
            let ok = match dims {
                [c] => rows == 1 && *c == cols,
                [r, c] => *r == rows && *c == cols,
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                anyhow::bail!("tensor {name} has shape {dims:?}, expected [{rows}, {cols}]")
            }
        };
        let has = |name: &str| ct.tensor_infos.contains_key(name);
        // Which optional parts each architecture has, as llama.cpp loads them.
        let qk_norms = arch == "qwen3" || arch == "gemma3";
        let fused_ffn = arch == "phi3";
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            shape(&format!("{p}.attn_norm.weight"), 1, n_embd)?;
            shape(&format!("{p}.ffn_norm.weight"), 1, n_embd)?;
            if has(&format!("{p}.attn_qkv.weight")) {
                shape(&format!("{p}.attn_qkv.weight"), q_dim + 2 * kv_dim, n_embd)?;
            } else {
                shape(&format!("{p}.attn_q.weight"), q_dim, n_embd)?;
                shape(&format!("{p}.attn_k.weight"), kv_dim, n_embd)?;
                shape(&format!("{p}.attn_v.weight"), kv_dim, n_embd)?;
            }
            for (b, n) in [
                ("attn_qkv", q_dim + 2 * kv_dim),
                ("attn_q", q_dim),
                ("attn_k", kv_dim),
                ("attn_v", kv_dim),
                ("attn_output", n_embd),
            ] {
                let name = format!("{p}.{b}.bias");
                if has(&name) {
                    shape(&name, 1, n)?;
                }
            }
            shape(&format!("{p}.attn_output.weight"), n_embd, q_dim)?;
            if qk_norms {
                shape(&format!("{p}.attn_q_norm.weight"), 1, head_dim)?;
                shape(&format!("{p}.attn_k_norm.weight"), 1, head_dim)?;
            }
            if gemma {
                shape(&format!("{p}.post_attention_norm.weight"), 1, n_embd)?;
                shape(&format!("{p}.post_ffw_norm.weight"), 1, n_embd)?;
            }
            if fused_ffn {
                shape(&format!("{p}.ffn_up.weight"), 2 * n_ff, n_embd)?;
            } else {
                shape(&format!("{p}.ffn_gate.weight"), n_ff, n_embd)?;
                shape(&format!("{p}.ffn_up.weight"), n_ff, n_embd)?;
            }
            shape(&format!("{p}.ffn_down.weight"), n_embd, n_ff)?;
        }
        shape("output_norm.weight", 1, n_embd)?;
        shape("token_embd.weight", vocab, n_embd)?;
        if !tied {
            shape("output.weight", vocab, n_embd)?;
        }
        if has("output.bias") {
            shape("output.bias", 1, vocab)?;
        }
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let mut opt = |name: &str, wanted: bool| -> anyhow::Result<Option<Vec<f32>>> {
                let name = format!("{p}.{name}");
                if wanted && has(&name) {
                    Ok(Some(norm_vec(r, &name)?))
                } else {
                    Ok(None)
                }
            };
            let (q_norm, k_norm, post_attn_norm, post_ffn_norm) = (
                opt("attn_q_norm.weight", qk_norms)?,
                opt("attn_k_norm.weight", qk_norms)?,
                opt("post_attention_norm.weight", gemma)?,
                opt("post_ffw_norm.weight", gemma)?,
            );
            // Biases: a fused one, or Q's, K's and V's (each optional, zero when absent, as
            // llama.cpp adds each it has), end to end.
            let qkv_bias = match opt("attn_qkv.bias", true)? {
                Some(b) => Some(b),
                None => match (
                    opt("attn_q.bias", true)?,
                    opt("attn_k.bias", true)?,
                    opt("attn_v.bias", true)?,
                ) {
                    (None, None, None) => None,
                    (q, k, v) => Some(
                        [
                            q.unwrap_or_else(|| vec![0.0; q_dim]),
                            k.unwrap_or_else(|| vec![0.0; kv_dim]),
                            v.unwrap_or_else(|| vec![0.0; kv_dim]),
                        ]
                        .concat(),
                    ),
                },
            };
            let wo_bias = opt("attn_output.bias", true)?;
            // A fused matrix on our own kernels is split at load (its rows are whole blocks):
            // the products then run as the separate ones do, fused per pass by `matmul_many`.
            let qkv_name = format!("{p}.attn_qkv.weight");
            let qkv = if has(&qkv_name) {
                let parts = [(0, q_dim), (q_dim, kv_dim), (q_dim + kv_dim, kv_dim)]
                    .iter()
                    .map(|part| own_rows(&qkv_name, Some(*part)))
                    .collect::<anyhow::Result<Option<Vec<QMat>>>>()?;
                match parts {
                    Some(ms) => {
                        let mut ms = ms.into_iter().map(Mat::Own);
                        let (Some(q), Some(k), Some(v)) = (ms.next(), ms.next(), ms.next()) else {
                            unreachable!("three parts")
                        };
                        Qkv::Split(q, k, v)
                    }
                    None => Qkv::Fused(mm(r, &qkv_name)?),
                }
            } else {
                Qkv::Split(
                    mm(r, &format!("{p}.attn_q.weight"))?,
                    mm(r, &format!("{p}.attn_k.weight"))?,
                    mm(r, &format!("{p}.attn_v.weight"))?,
                )
            };
            let up_name = format!("{p}.ffn_up.weight");
            let gate_up = if fused_ffn {
                match (
                    own_rows(&up_name, Some((0, n_ff)))?,
                    own_rows(&up_name, Some((n_ff, n_ff)))?,
                ) {
                    (Some(g), Some(u)) => GateUp::Split(Mat::Own(g), Mat::Own(u)),
                    _ => GateUp::Fused(mm(r, &up_name)?),
                }
            } else {
                GateUp::Split(
                    mm(r, &format!("{p}.ffn_gate.weight"))?,
                    mm(r, &format!("{p}.ffn_up.weight"))?,
                )
            };
            layers.push(Layer {
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                attn_norm: norm_vec(r, &format!("{p}.attn_norm.weight"))?,
                qkv,
                qkv_bias,
                wo: mm(r, &format!("{p}.attn_output.weight"))?,
                wo_bias,
                ffn_norm: norm_vec(r, &format!("{p}.ffn_norm.weight"))?,
                gate_up,
                w_down: mm(r, &format!("{p}.ffn_down.weight"))?,
            });
        }
        let norm = norm_vec(r, "output_norm.weight")?;
        // Tied embeddings: no output.weight, the token embedding doubles as the output matrix.
        let output = match tied_output {
            Some(m) => Mat::Own(m),
            None => mm(
                r,
                if tied {
                    "token_embd.weight"
                } else {
                    "output.weight"
                },
            )?,
        };
        let output_bias = if has("output.bias") {
            Some(norm_vec(r, "output.bias")?)
        } else {
            None
        };
        let used = used.into_inner();
        let mut unused: Vec<&String> = ct
            .tensor_infos
            .keys()
            .filter(|k| !used.contains(*k))
            .collect();
        unused.sort();
        if let Some(first) = unused.first() {
            anyhow::bail!(
                "tensor {first} (and {} more) is not part of the {arch} graph: this file's \
                 layout is not one corral (or llama.cpp) reads",
                unused.len() - 1
            );
        }
        Ok(Llama {
            cfg,
            embd,
            vocab,
            layers,
            norm,
            output,
            output_bias,
            device: device.clone(),
        })
    }

    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    /// Frees the layers' weights once a device holds them (the device pass reads only the
    /// embedding, the configuration and the rotary tables here); this model's own pass refuses
    /// to run after it.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn release_layers(&mut self) {
        self.layers = Vec::new();
    }

    /// The feed-forward width (the down projection's input).
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn ffn_width(&self) -> usize {
        self.layers.first().map_or(0, |l| l.w_down.cols())
    }

    /// Layer `l`'s weights in f32 (dequantized; fused matrices split), for a device.
    pub(crate) fn export_layer(&self, l: usize) -> anyhow::Result<crate::gpu::HostLayer> {
        let c = &self.cfg;
        let kv_dim = c.n_head_kv * c.head_dim;
        let layer = self
            .layers
            .get(l)
            .ok_or_else(|| anyhow::anyhow!("no layer {l}"))?;
        let (q, k, v) = match &layer.qkv {
            Qkv::Split(q, k, v) => (q.to_f32()?, k.to_f32()?, v.to_f32()?),
            Qkv::Fused(w) => {
                let mut all = w.to_f32()?;
                let v = all.split_off((c.q_dim + kv_dim) * c.n_embd);
                let k = all.split_off(c.q_dim * c.n_embd);
                (all, k, v)
            }
        };
        let (gate, up) = match &layer.gate_up {
            GateUp::Split(g, u) => (g.to_f32()?, u.to_f32()?),
            GateUp::Fused(w) => {
                let mut all = w.to_f32()?;
                let up = all.split_off(all.len() / 2);
                (all, up)
            }
        };
        Ok(crate::gpu::HostLayer {
            attn_norm: layer.attn_norm.clone(),
            q,
            k,
            v,
            qkv_bias: layer.qkv_bias.clone(),
            q_norm: layer.q_norm.clone(),
            k_norm: layer.k_norm.clone(),
            wo: layer.wo.to_f32()?,
            wo_bias: layer.wo_bias.clone(),
            post_attn_norm: layer.post_attn_norm.clone(),
            ffn_norm: layer.ffn_norm.clone(),
            gate,
            up,
            down: layer.w_down.to_f32()?,
            post_ffn_norm: layer.post_ffn_norm.clone(),
        })
    }

    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    /// The final norm, the output matrix (f32) and its bias, for a device.
    #[allow(clippy::type_complexity)]
    pub(crate) fn export_output(&self) -> anyhow::Result<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
        Ok((
            self.norm.clone(),
            self.output.to_f32()?,
            self.output_bias.clone(),
        ))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Several products of the same input, fused when our own kernels compute them all;
    /// `batched`: rows of several sequences (the grouped products, `QMat::matmul_many_batched`).
    fn matmul_many(
        &self,
        ws: &[&Mat],
        x: &[f32],
        rows: usize,
        batched: bool,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let own: Option<Vec<&QMat>> = ws
            .iter()
            .map(|w| if let Mat::Own(m) = w { Some(m) } else { None })
            .collect();
        match own {
            Some(ms) => Ok(QMat::matmul_many_batched(&ms, x, rows, batched)),
            None => ws
                .iter()
                .map(|w| self.matmul(w, x, rows, batched))
                .collect(),
        }
    }

    fn matmul(
        &self,
        w: &Mat,
        x: &[f32],
        rows: usize,
        batched: bool,
    ) -> candle_core::Result<Vec<f32>> {
        match w {
            Mat::Own(m) => Ok(QMat::matmul_many_batched(&[m], x, rows, batched)
                .pop()
                .unwrap_or_default()),
            Mat::Candle(m) => {
                let cols = x.len() / rows;
                let t = Tensor::from_slice(x, (rows, cols), &self.device)?;
                m.forward(&t)?.flatten_all()?.to_vec1()
            }
        }
    }

    /// Bytes the grouped copies of the weights take once batched products have run.
    pub fn grouped_bytes(&self) -> usize {
        let own = |m: &Mat| match m {
            Mat::Own(q) => q.grouped_bytes(),
            Mat::Candle(_) => 0,
        };
        let mut total = own(&self.output);
        for l in &self.layers {
            total += match &l.qkv {
                Qkv::Split(a, b, c) => own(a) + own(b) + own(c),
                Qkv::Fused(a) => own(a),
            };
            total += match &l.gate_up {
                GateUp::Split(a, b) => own(a) + own(b),
                GateUp::Fused(a) => own(a),
            };
            total += own(&l.wo) + own(&l.w_down);
        }
        total
    }

    /// A cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            k: vec![Vec::new(); self.cfg.n_layer],
            v: vec![Vec::new(); self.cfg.n_layer],
            kv_dim: self.cfg.n_head_kv * self.cfg.head_dim,
            dev: None,
        }
    }

    /// Bytes one position of a sequence takes in its cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.n_layer * self.cfg.n_head_kv * self.cfg.head_dim * 4
    }

    /// Logits of the last of `tokens`, placed at positions `pos..` of `cache`.
    #[cfg(test)]
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        pos: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let mut items = [Item {
            cache,
            tokens,
            pos,
            logits: true,
        }];
        let mut out = self.forward_batch(&mut items)?;
        out.pop()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("no logits"))
    }

    /// The embedding rows of `tokens` (scaled by sqrt(n_embd) for Gemma), `[token][n_embd]`.
    pub(crate) fn embed(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let c = &self.cfg;
        let vocab = self.vocab_size();
        let mut x = vec![0f32; tokens.len() * c.n_embd];
        for (i, &t) in tokens.iter().enumerate() {
            let t = t as usize;
            if t >= vocab {
                anyhow::bail!("token id {t} outside the vocabulary");
            }
            let dst = &mut x[i * c.n_embd..(i + 1) * c.n_embd];
            match &self.embd {
                Embedding::Quant(m) => dst.copy_from_slice(&m.row_f32(t)),
                Embedding::Output => match &self.output {
                    Mat::Own(m) => dst.copy_from_slice(&m.row_f32(t)),
                    Mat::Candle(_) => anyhow::bail!("a tied embedding without its table"),
                },
                Embedding::F32(e) => dst.copy_from_slice(&e[t * c.n_embd..(t + 1) * c.n_embd]),
                Embedding::Rows {
                    dtype,
                    data,
                    row_bytes,
                } => {
                    let row = &data[t * row_bytes..(t + 1) * row_bytes];
                    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                        *dtype,
                        row,
                        vec![1, c.n_embd],
                        &Device::Cpu,
                    )?;
                    dst.copy_from_slice(&q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?);
                }
            }
        }
        if c.gemma {
            let s = (c.n_embd as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        Ok(x)
    }

    /// Per position, the rotary `(cos, sin)` of each of the `n_rot / 2` frequencies: for the
    /// full-attention layers, and for the sliding ones where they rotate with a base of their
    /// own.
    #[allow(clippy::type_complexity)]
    pub(crate) fn rope_tables(
        &self,
        positions: &[usize],
    ) -> (Vec<(f32, f32)>, Option<Vec<(f32, f32)>>) {
        let c = &self.cfg;
        // Rotary angles for each row's position: theta_k = pos * base^(-2k/n_rot), by repeated
        // f32 multiplication as ggml computes them (Gemma's sliding layers have a base of their
        // own).
        let angles = |base: f32, freq_scale: f32| {
            let theta_scale = base.powf(-2.0 / c.n_rot as f32);
            let mut cos_sin = vec![(0f32, 0f32); positions.len() * c.n_rot / 2];
            for (i, &p) in positions.iter().enumerate() {
                let mut theta = p as f32;
                for k in 0..c.n_rot / 2 {
                    // ggml: theta = freq_scale * (p * theta_scale^k / freq_factor_k); unscaled,
                    // bit for bit the old angle.
                    let t = match &c.freq_factors {
                        Some(f) => theta / f[k],
                        None => theta,
                    };
                    let t = if freq_scale == 1.0 { t } else { freq_scale * t };
                    cos_sin[i * c.n_rot / 2 + k] = if c.rope_mscale == 1.0 {
                        (t.cos(), t.sin())
                    } else {
                        (t.cos() * c.rope_mscale, t.sin() * c.rope_mscale)
                    };
                    theta *= theta_scale;
                }
            }
            cos_sin
        };
        (
            angles(c.freq_base, c.freq_scale),
            c.sliding.as_ref().map(|w| angles(w.base, w.scale)),
        )
    }

    /// Several sequences in one pass: their rows go through every weight product together
    /// (one pass over the weights for all), each attends over its own cache. Returns, per item,
    /// the logits of its last token when it asked for them. One item computes exactly what a
    /// single-sequence pass would; rows batched with others take the many-row products, whose
    /// arithmetic differs in the last digits (as in llama.cpp's batches).
    pub fn forward_batch(&self, items: &mut [Item<'_>]) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
        let c = &self.cfg;
        if self.layers.len() != c.n_layer {
            anyhow::bail!("this model's layers were handed to a device");
        }
        let kv_dim = c.n_head_kv * c.head_dim;
        // Rows of several sequences (decoding, or prompt chunks beside them): the grouped
        // products. A lone sequence, prompt or decode, keeps the exact one-row and tiled
        // arithmetic.
        let batched = items.len() > 1;
        // Row ranges of each item in the batch, and each row's position.
        for it in items.iter_mut() {
            it.check(c.max_seq)?;
            if it.cache.k.len() != c.n_layer || it.cache.kv_dim != kv_dim || it.pos > it.cache.len()
            {
                anyhow::bail!("a cache that does not belong to this sequence");
            }
            for l in 0..c.n_layer {
                it.cache.k[l].truncate(it.pos * kv_dim);
                it.cache.v[l].truncate(it.pos * kv_dim);
            }
        }
        let Rows {
            spans,
            positions,
            tokens,
            wanted,
        } = Rows::of(items);
        let total = positions.len();
        let mut x = self.embed(&tokens)?;
        let (global_cs, local_cs) = self.rope_tables(&positions);
        let group = c.n_head / c.n_head_kv;
        let scale = if c.scale_queries { 1.0 } else { c.attn_scale };
        for l in 0..c.n_layer {
            let layer = &self.layers[l];
            let window = c.sliding.as_ref().filter(|w| w.layers[l]).map(|w| w.window);
            let cos_sin = match (&local_cs, window) {
                (Some(cs), Some(_)) => cs,
                _ => &global_cs,
            };
            let h = rms_norm(&x, &layer.attn_norm, c.eps);
            let (mut q, mut k, mut v) = match &layer.qkv {
                Qkv::Split(wq, wk, wv) => {
                    let mut qkv = self
                        .matmul_many(&[wq, wk, wv], &h, total, batched)?
                        .into_iter();
                    let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                        anyhow::bail!("attention projections missing");
                    };
                    (q, k, v)
                }
                Qkv::Fused(w) => {
                    let all = self.matmul(w, &h, total, batched)?;
                    let width = c.q_dim + 2 * kv_dim;
                    let part = |from: usize, n: usize| -> Vec<f32> {
                        all.chunks_exact(width)
                            .flat_map(|row| &row[from..from + n])
                            .copied()
                            .collect()
                    };
                    (
                        part(0, c.q_dim),
                        part(c.q_dim, kv_dim),
                        part(c.q_dim + kv_dim, kv_dim),
                    )
                }
            };
            if let Some(b) = &layer.qkv_bias {
                let (bq, bkv) = b.split_at(c.q_dim);
                let (bk, bv) = bkv.split_at(kv_dim);
                add_rows(&mut q, bq);
                add_rows(&mut k, bk);
                add_rows(&mut v, bv);
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q, qn, c.eps);
                k = rms_norm(&k, kn, c.eps);
            }
            ggml_math::with_fma(|| {
                if c.neox {
                    rope_neox(&mut q, c.n_head, c.head_dim, c.n_rot, cos_sin);
                    rope_neox(&mut k, c.n_head_kv, c.head_dim, c.n_rot, cos_sin);
                } else {
                    rope(&mut q, c.n_head, c.head_dim, c.n_rot, cos_sin);
                    rope(&mut k, c.n_head_kv, c.head_dim, c.n_rot, cos_sin);
                }
            });
            if c.scale_queries {
                q.iter_mut().for_each(|v| *v *= c.attn_scale);
            }
            let mut att = vec![0f32; total * c.q_dim];
            // The cache holds f16 values (as f32), as llama.cpp's does.
            ggml_math::round_f16(&mut k);
            ggml_math::round_f16(&mut v);
            for (it, span) in items.iter_mut().zip(&spans) {
                it.cache.k[l].extend_from_slice(&k[span.start * kv_dim..span.end * kv_dim]);
                it.cache.v[l].extend_from_slice(&v[span.start * kv_dim..span.end * kv_dim]);
            }
            let attns: Vec<Attn<'_>> = items
                .iter()
                .zip(&spans)
                .map(|(it, span)| Attn {
                    q: &q[span.start * c.q_dim..span.end * c.q_dim],
                    kc: &it.cache.k[l],
                    vc: &it.cache.v[l],
                    pos: it.pos,
                    n_head: c.n_head,
                    group,
                    head_dim: c.head_dim,
                    kv_dim,
                    scale,
                    softcap: c.attn_softcap,
                    order: Order::for_rows(span.len()),
                    window,
                })
                .collect();
            if batched && spans.iter().all(|s| s.len() == 1) {
                // Several sequences decoding: every (sequence, head) in one parallel region
                // (one per sequence cost a region each, per layer), each computed as alone.
                let longest = items.iter().map(|it| it.pos + 1).max().unwrap_or(1);
                let (n_head, head_dim) = (c.n_head, c.head_dim);
                let bufs = || AttnBufs {
                    scores: vec![0f32; longest],
                    q16: vec![0f32; head_dim],
                    scratch: vec![0f32; 32 * head_dim],
                };
                att.par_chunks_mut(head_dim)
                    .enumerate()
                    .for_each_init(bufs, |b, (idx, out)| {
                        let a = &attns[idx / n_head];
                        ggml_math::with_fma(|| a.one(b, idx % n_head, out));
                    });
            } else {
                for (a, span) in attns.iter().zip(&spans) {
                    a.run(
                        &mut att[span.start * c.q_dim..span.end * c.q_dim],
                        span.len(),
                    );
                }
            }
            let mut o = self.matmul(&layer.wo, &att, total, batched)?;
            if let Some(b) = &layer.wo_bias {
                add_rows(&mut o, b);
            }
            // As llama.cpp does, only the rows whose logits are wanted go on from the last
            // layer's attention output: less work, and a lone sequence's feed-forward products
            // then run on one row, whose arithmetic differs from the many-row kind for the K
            // types.
            let mut rows = total;
            if l + 1 == c.n_layer && wanted.len() < total {
                let keep = |m: &[f32]| -> Vec<f32> {
                    wanted
                        .iter()
                        .flat_map(|&r| &m[r * c.n_embd..(r + 1) * c.n_embd])
                        .copied()
                        .collect()
                };
                o = keep(&o);
                x = keep(&x);
                rows = wanted.len();
                if rows == 0 {
                    break;
                }
            }
            if let Some(w) = &layer.post_attn_norm {
                o = rms_norm(&o, w, c.eps);
            }
            for_rows(&mut x, c.n_embd, |r, row| {
                for (a, b) in row.iter_mut().zip(&o[r * c.n_embd..]) {
                    *a += b;
                }
            });
            let h = rms_norm(&x, &layer.ffn_norm, c.eps);
            let (g, u) = match &layer.gate_up {
                GateUp::Split(wg, wu) => {
                    let mut gu = self.matmul_many(&[wg, wu], &h, rows, batched)?.into_iter();
                    let (Some(g), Some(u)) = (gu.next(), gu.next()) else {
                        anyhow::bail!("feed-forward projections missing");
                    };
                    (g, u)
                }
                GateUp::Fused(w) => {
                    let both = self.matmul(w, &h, rows, batched)?;
                    let n_ff = both.len() / rows / 2;
                    let half = |from: usize| -> Vec<f32> {
                        both.chunks_exact(2 * n_ff)
                            .flat_map(|row| &row[from..from + n_ff])
                            .copied()
                            .collect()
                    };
                    (half(0), half(n_ff))
                }
            };
            let mut act = g;
            if c.gemma {
                gelu_tanh_mul(&mut act, &u);
            } else {
                let n_ff = act.len() / rows.max(1);
                for_rows(&mut act, n_ff, |r, row| {
                    ggml_math::with_fma(|| {
                        for (a, u) in row.iter_mut().zip(&u[r * n_ff..]) {
                            *a = ggml_math::silu(*a) * u;
                        }
                    });
                });
            }
            let mut d = self.matmul(&layer.w_down, &act, rows, batched)?;
            if let Some(w) = &layer.post_ffn_norm {
                d = rms_norm(&d, w, c.eps);
            }
            for_rows(&mut x, c.n_embd, |r, row| {
                for (a, b) in row.iter_mut().zip(&d[r * c.n_embd..]) {
                    *a += b;
                }
            });
        }
        let mut out: Vec<Option<Vec<f32>>> = items.iter().map(|_| None).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let mut h = rms_norm(&x, &self.norm, c.eps);
        // A row whose hidden state is not finite gets NaN logits, so that its own sequence
        // fails (8-bit activation quantization before the output matrix could turn it into
        // finite logits); the other rows of the batch go on.
        let broken: Vec<bool> = h
            .chunks_exact(c.n_embd)
            .map(|r| crate::engine::check_finite("final hidden state", r).is_err())
            .collect();
        for (row, bad) in h.chunks_exact_mut(c.n_embd).zip(&broken) {
            if *bad {
                row.fill(0.0);
            }
        }
        let mut logits = self.matmul(&self.output, &h, wanted.len(), batched)?;
        let width = logits.len() / wanted.len();
        if let Some(b) = &self.output_bias {
            add_rows(&mut logits, b);
        }
        if let Some(cap) = c.final_softcap {
            softcap(&mut logits, cap);
        }
        for (row, bad) in logits.chunks_exact_mut(width).zip(&broken) {
            if *bad {
                row.fill(f32::NAN);
            }
        }
        let mut rows = logits.chunks_exact(width);
        for (o, it) in out.iter_mut().zip(items.iter()) {
            if it.logits {
                *o = rows.next().map(<[f32]>::to_vec);
            }
        }
        Ok(out)
    }
}

/// What every attention task reads: the layer's queries, the KV cache, the shapes.
struct Attn<'a> {
    q: &'a [f32],
    kc: &'a [f32],
    vc: &'a [f32],
    pos: usize,
    n_head: usize,
    group: usize,
    head_dim: usize,
    kv_dim: usize,
    scale: f32,
    /// Gemma 2: scores capped by `cap * tanh(score / cap)` before the softmax.
    softcap: Option<f32>,
    order: Order,
    /// A sliding-window layer's window: position p sees keys p - window + 1 ..= p.
    window: Option<usize>,
}

impl Attn<'_> {
    /// Every query row (`seq` positions of `n_head` heads) into `att`, `[position][head]`.
    fn run(&self, att: &mut [f32], seq: usize) {
        let head_dim = self.head_dim;
        let n_head = self.n_head;
        let pos = self.pos;
        let bufs = || AttnBufs {
            scores: vec![0f32; pos + seq],
            q16: vec![0f32; head_dim],
            scratch: vec![0f32; 32 * head_dim],
        };
        if seq >= 2 {
            // Prefill: per head, blocks of positions; within a block four queries share each
            // key row (`Attn::block`). Computed head-major, then put back in place. One
            // (block, head) per task: each writes its own slice with the same arithmetic as a
            // single thread would, so the result does not depend on the split.
            let mut att_t = vec![0f32; n_head * seq * head_dim];
            // V transposed, `[kv head][dim][position]`: each output dim is then one contiguous
            // dot product over the positions for four queries at once, in tinyBLAS's order (as
            // llama.cpp computes it from its transposed V cache), instead of a scattered
            // accumulation per query and position.
            let n_kv = pos + seq;
            let mut vt = vec![0f32; self.kv_dim * n_kv];
            // Sixteen dims (a cache line of each cached row) per task.
            let kv_dim = self.kv_dim;
            let vc = self.vc;
            for_rows(&mut vt, 16 * n_kv, |g, cols| {
                for (j, row) in vc.chunks_exact(kv_dim).take(n_kv).enumerate() {
                    for (i, v) in row[g * 16..].iter().take(cols.len() / n_kv).enumerate() {
                        cols[i * n_kv + j] = *v;
                    }
                }
            });
            debug_assert!(self.kv_dim.is_multiple_of(head_dim));
            let vt = &vt;
            let block_bufs = || AttnBufs {
                scores: vec![0f32; 4 * (pos + seq)],
                q16: vec![0f32; 4 * head_dim],
                scratch: Vec::new(), // the V products read `vt` instead
            };
            att_t
                .par_chunks_mut(seq * head_dim)
                .enumerate()
                .for_each(|(hh, head_out)| {
                    head_out
                        .par_chunks_mut(POS_BLOCK * head_dim)
                        .enumerate()
                        .for_each_init(block_bufs, |b, (blk, out)| {
                            self.block_fma(b, hh, blk * POS_BLOCK, out, (vt, n_kv));
                        });
                });
            let att_t = &att_t;
            for_rows(att, n_head * head_dim, |i, row| {
                for (hh, out) in row.chunks_exact_mut(head_dim).enumerate() {
                    out.copy_from_slice(&att_t[(hh * seq + i) * head_dim..][..head_dim]);
                }
            });
        } else if (pos + seq) * n_head * head_dim < 32_768 {
            // Decoding a short context: not worth the threads.
            let mut b = bufs();
            ggml_math::with_fma(|| {
                for (idx, out) in att.chunks_mut(head_dim).enumerate() {
                    self.one(&mut b, idx, out);
                }
            });
        } else {
            att.par_chunks_mut(head_dim)
                .enumerate()
                .for_each_init(bufs, |b, (idx, out)| {
                    ggml_math::with_fma(|| self.one(b, idx, out));
                });
        }
    }

    /// A score as llama.cpp computes it from `q·k`: capped (Gemma 2), then scaled (in its
    /// softmax; 1 where the queries were scaled instead).
    #[inline(always)]
    fn score(&self, dot: f32) -> f32 {
        match self.softcap {
            Some(cap) => (dot * (1.0 / cap)).tanh() * cap * self.scale,
            None => dot * self.scale,
        }
    }

    /// The first key position `p` may see.
    #[inline(always)]
    fn first_key(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// Query row `idx` (position `idx / n_head`, head `idx % n_head`) attending over the cache
    /// (causal: a position sees itself and all before), into `out`. Always inlined, so that
    /// inside `with_fma` it is compiled with FMA (`mul_add` a call into libm otherwise).
    #[inline(always)]
    fn one(&self, bufs: &mut AttnBufs, idx: usize, out: &mut [f32]) {
        let (i, hh) = (idx / self.n_head, idx % self.n_head);
        let hd = self.head_dim;
        let n_ctx = self.pos + i + 1;
        let kvh = hh / self.group;
        bufs.q16.copy_from_slice(&self.q[idx * hd..][..hd]);
        ggml_math::round_f16(&mut bufs.q16);
        let scores = &mut bufs.scores[..n_ctx];
        let lo = self.first_key(n_ctx - 1);
        for (j, s) in scores.iter_mut().enumerate() {
            let krow = &self.kc[j * self.kv_dim + kvh * hd..][..hd];
            *s = if j < lo {
                f32::NEG_INFINITY
            } else {
                self.score(ggml_math::dot(krow, &bufs.q16, self.order))
            };
        }
        ggml_math::softmax(scores);
        // The weights enter the V product as f16 (ggml converts them to the cache's type).
        ggml_math::round_f16(scores);
        let mut acc = ColumnDot::new(&mut bufs.scratch, hd, self.order);
        acc.add_all(scores, &self.vc[kvh * hd..], self.kv_dim);
        acc.finish(out);
    }
}

impl Attn<'_> {
    /// `block`, compiled with AVX2 and FMA where the CPU has them (`mul_add` one instruction
    /// instead of a call into libm; the results are identical). A function of its own rather
    /// than a closure in `ggml_math::with_fma`: a body this large is not inlined into one.
    fn block_fma(
        &self,
        bufs: &mut AttnBufs,
        hh: usize,
        i0: usize,
        out: &mut [f32],
        vt: (&[f32], usize),
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            fn fast(
                a: &Attn<'_>,
                bufs: &mut AttnBufs,
                hh: usize,
                i0: usize,
                out: &mut [f32],
                vt: (&[f32], usize),
            ) {
                a.block::<2>(bufs, hh, i0, out, vt);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU was just found to support AVX2 and FMA.
                unsafe { fast(self, bufs, hh, i0, out, vt) };
                return;
            }
        }
        self.block::<2>(bufs, hh, i0, out, vt);
    }

    /// Positions `i0..` (as many as `out` holds rows) of head `hh`, four at a time, in register
    /// tiles of `R` key rows (then `R` output dims) against the four queries, their dot products
    /// independent chains (`dot_tile_tinyblas`: each to the bit what `dot` gives, the prefill
    /// order; with `R = 2` each FMA needs 0.75 loads instead of 1.25, and a 1,890-token prefill
    /// takes 10% less time; wider tiles spill on AVX2's 16 registers). `out` is this head's rows
    /// for those positions.
    #[inline(always)]
    fn block<const R: usize>(
        &self,
        bufs: &mut AttnBufs,
        hh: usize,
        i0: usize,
        out: &mut [f32],
        (vt, n_kv): (&[f32], usize),
    ) {
        let hd = self.head_dim;
        let kvh = hh / self.group;
        let stride = self.pos + out.len() / hd + i0;
        for (g, outs) in out.chunks_mut(4 * hd).enumerate() {
            let first = i0 + g * 4;
            let count = outs.len() / hd;
            for p in 0..4 {
                // Rows past the end repeat the last query (their results are dropped).
                let i = first + p.min(count - 1);
                let q16 = &mut bufs.q16[p * hd..][..hd];
                q16.copy_from_slice(&self.q[(i * self.n_head + hh) * hd..][..hd]);
                ggml_math::round_f16(q16);
            }
            let n_max = self.pos + first + count; // the last query's causal window
            let (q0, rest) = bufs.q16.split_at(hd);
            let (q1, rest) = rest.split_at(hd);
            let (q2, q3) = rest.split_at(hd);
            // `R` key rows against the four queries per tile, then the keys left one by one.
            let krow = |j: usize| &self.kc[j * self.kv_dim + kvh * hd..][..hd];
            let mut j = 0;
            while j + R <= n_max {
                let s = ggml_math::dot_tile_tinyblas(
                    std::array::from_fn::<_, R, _>(|r| krow(j + r)),
                    [q0, q1, q2, q3],
                );
                for (r, s) in s.iter().enumerate() {
                    for (p, v) in s.iter().enumerate() {
                        bufs.scores[p * stride + j + r] = self.score(*v);
                    }
                }
                j += R;
            }
            for j in j..n_max {
                let s = ggml_math::dot_many_tinyblas(krow(j), [q0, q1, q2, q3]);
                for (p, v) in s.iter().enumerate() {
                    bufs.scores[p * stride + j] = self.score(*v);
                }
            }
            for p in 0..count {
                let n_ctx = self.pos + first + p + 1;
                let lo = self.first_key(n_ctx - 1);
                let scores = &mut bufs.scores[p * stride..][..n_max];
                scores[..lo].fill(f32::NEG_INFINITY);
                ggml_math::softmax(&mut scores[..n_ctx]);
                ggml_math::round_f16(&mut scores[..n_ctx]);
                // Past its causal window a query weighs each value 0, as ggml's masked row
                // does: the sums of `dot_many_tinyblas` over the block's window are then the
                // query's own.
                scores[n_ctx..].fill(0.0);
            }
            let rows: [&[f32]; 4] =
                std::array::from_fn(|p| &bufs.scores[p.min(count - 1) * stride..][..n_max]);
            // `R` output dims (rows of the transposed V) per tile, then the rest one by one.
            let column = |d: usize| &vt[(kvh * hd + d) * n_kv..][..n_max];
            let mut d = 0;
            while d + R <= hd {
                let t = ggml_math::dot_tile_tinyblas(
                    std::array::from_fn::<_, R, _>(|r| column(d + r)),
                    rows,
                );
                for (r, t) in t.iter().enumerate() {
                    for (p, v) in t.iter().take(count).enumerate() {
                        outs[p * hd + d + r] = *v;
                    }
                }
                d += R;
            }
            for d in d..hd {
                let r = ggml_math::dot_many_tinyblas(column(d), rows);
                for (p, v) in r.iter().take(count).enumerate() {
                    outs[p * hd + d] = *v;
                }
            }
        }
    }
}

/// Positions per attention task when prefilling.
const POS_BLOCK: usize = 16;

/// One attention task's scratch space.
struct AttnBufs {
    scores: Vec<f32>,
    q16: Vec<f32>,
    scratch: Vec<f32>,
}

/// Adds `b` to each row of `x` (rows as long as `b`).
fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
}

/// `cap * tanh(x / cap)` in place, as ggml's scale, tanh, scale.
fn softcap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    x.iter_mut().for_each(|v| *v = (*v * inv).tanh() * cap);
}

/// Fewest values for which a row-wise step of the forward pass goes to the compute pool: below
/// it (decoding, short prompts) a parallel region costs more than the work.
const PAR_ROWS_MIN: usize = 16_384;

/// `f(r, row r)` for every row of `width` values of `x` (the last one shorter if `x` is not
/// whole rows): in a few chunks on the compute pool
/// when `x` is large (a prefill), one after another otherwise. Each row is computed the same way
/// either way. While the pass's thread ran these steps (norms, rotations, activations, residual
/// sums) alone, the pool's other threads waited: 11% of a 315-token prefill's samples were
/// `sched_yield`.
fn for_rows(x: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let width = width.max(1);
    let rows = x.len().div_ceil(width);
    if x.len() < PAR_ROWS_MIN || rows < 2 {
        for (r, row) in x.chunks_mut(width).enumerate() {
            f(r, row);
        }
        return;
    }
    let per = rows.div_ceil(2 * rayon::current_num_threads().max(1));
    x.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_mut(width).enumerate() {
                f(c * per + i, row);
            }
        });
}

/// Row-wise RMS norm times `w`; the sum of squares accumulates in f64 as in ggml.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    for_rows(&mut out, n, |r, o| {
        let row = &x[r * n..][..n];
        let sum: f64 = row.iter().map(|v| f64::from(*v * *v)).sum();
        let mean = (sum / n as f64) as f32;
        let s = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = v * s * w;
        }
    });
    out
}

/// Rotates adjacent pairs (x[2k], x[2k+1]) of the first `n_rot` dims of each head.
fn rope(x: &mut [f32], n_head: usize, head_dim: usize, n_rot: usize, cos_sin: &[(f32, f32)]) {
    let half = n_rot / 2;
    for_rows(x, n_head * head_dim, |r, row| {
        let cs = &cos_sin[r * half..(r + 1) * half];
        ggml_math::with_fma(|| {
            for head in row.chunks_exact_mut(head_dim) {
                for (k, (c, s)) in cs.iter().enumerate() {
                    let (a, b) = (head[2 * k], head[2 * k + 1]);
                    // the fused multiply-adds GCC makes of ggml's `x0*cos - x1*sin` and
                    // `x0*sin + x1*cos` (found by comparing activations bit for bit)
                    head[2 * k] = a.mul_add(*c, -(b * s));
                    head[2 * k + 1] = a.mul_add(*s, b * c);
                }
            }
        });
    });
}

/// Rotary embeddings over halves (NeoX ordering, Gemma): dimension k pairs with k + n_rot/2.
fn rope_neox(x: &mut [f32], n_head: usize, head_dim: usize, n_rot: usize, cos_sin: &[(f32, f32)]) {
    let half = n_rot / 2;
    for_rows(x, n_head * head_dim, |r, row| {
        let cs = &cos_sin[r * half..(r + 1) * half];
        ggml_math::with_fma(|| {
            for head in row.chunks_exact_mut(head_dim) {
                for (k, (c, s)) in cs.iter().enumerate() {
                    let (a, b) = (head[k], head[k + half]);
                    head[k] = a.mul_add(*c, -(b * s));
                    head[k + half] = a.mul_add(*s, b * c);
                }
            }
        });
    });
}

/// GELU (tanh approximation, Gemma's feed-forward activation) as ggml's CPU path computes it:
/// the input rounded to f16, looked up in a table of f32 GELU values rounded to f16; saturated
/// outside (-10, 10).
/// `act[i] = GELU(act[i]) · up[i]` for the whole gate at once (the inputs rounded to f16
/// eight at a time).
fn gelu_tanh_mul(act: &mut [f32], up: &[f32]) {
    // ggml looks GELU up in a table of every f16 input (GGML_GELU_FP16), each entry the f32
    // formula rounded to f16: the same table, built once, its entries kept as f32.
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_bits(gelu_f16_entry(b)).to_f32())
            .collect()
    });
    const CHUNK: usize = 4096;
    for_rows(act, CHUNK, |c, act| {
        let mut bits = vec![0u16; act.len()];
        ggml_math::f16_bits(act, &mut bits);
        for ((a, u), b) in act.iter_mut().zip(&up[c * CHUNK..]).zip(&bits) {
            let g = if *a <= -10.0 {
                0.0
            } else if *a >= 10.0 {
                *a
            } else {
                table[usize::from(*b)]
            };
            *a = g * u;
        }
    });
}

/// ggml's `ggml_gelu_f32` of an f16 input, rounded to f16 (one entry of its table).
fn gelu_f16_entry(bits: u16) -> u16 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    let v = f16::from_bits(bits).to_f32();
    let g = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + COEF_A * v * v)).tanh());
    f16::from_f32(g).to_bits()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The whole-gate GELU is each value's: rounded to f16 by `half`, looked up in ggml's table
    /// (each entry rounded to f16), saturated outside (-10, 10), times the up value.
    #[test]
    fn gelu_of_a_gate_is_each_values_table_entry() {
        let mut xs: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.11).collect();
        xs.extend([
            -10.0,
            10.0,
            -9.999,
            9.999,
            1e-8,
            -6.1e-5,
            65519.0,
            1e6,
            f32::NAN,
        ]);
        let up: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut got = xs.clone();
        gelu_tanh_mul(&mut got, &up);
        for ((x, u), g) in xs.iter().zip(&up).zip(&got) {
            let want = if *x <= -10.0 {
                0.0
            } else if *x >= 10.0 {
                *x
            } else {
                f16::from_bits(gelu_f16_entry(f16::from_f32(*x).to_bits())).to_f32()
            } * u;
            assert_eq!(g.to_bits(), want.to_bits(), "x = {x}");
        }
    }

    /// The prefill attention (`Attn::block`: four queries per pass, V transposed) gives each
    /// query, to the bit, the one-query-at-a-time sums in tinyBLAS's order: its scores over its
    /// own causal (or sliding) window, softmax, weights rounded to f16, then each output dim
    /// summed over the positions in 8 lanes.
    #[test]
    fn prefill_attention_is_each_query_alone() {
        // A head size off the tiles' and the lanes' multiples too.
        for hd in [24, 27] {
            prefill_attention_is_each_query_alone_with(hd);
        }
    }

    fn prefill_attention_is_each_query_alone_with(hd: usize) {
        let (n_head, group) = (4, 2);
        let kv_dim = n_head / group * hd;
        let (pos, seq) = (5, 37);
        let n = pos + seq;
        let val = |i: usize, k: usize| ((i * 7919 + k * 104729) % 2003) as f32 / 1001.0 - 1.0;
        let q: Vec<f32> = (0..seq * n_head * hd).map(|i| val(i, 1)).collect();
        let mut kc: Vec<f32> = (0..n * kv_dim).map(|i| val(i, 2) * 3.0).collect();
        let mut vc: Vec<f32> = (0..n * kv_dim).map(|i| val(i, 3)).collect();
        ggml_math::round_f16(&mut kc);
        ggml_math::round_f16(&mut vc);
        for window in [None, Some(7)] {
            let a = Attn {
                q: &q,
                kc: &kc,
                vc: &vc,
                pos,
                n_head,
                group,
                head_dim: hd,
                kv_dim,
                scale: 0.3,
                softcap: None,
                order: Order::TinyBlas,
                window,
            };
            let mut got = vec![0f32; seq * n_head * hd];
            a.run(&mut got, seq);
            for i in 0..seq {
                for hh in 0..n_head {
                    let kvh = hh / group;
                    let mut q16 = q[(i * n_head + hh) * hd..][..hd].to_vec();
                    ggml_math::round_f16(&mut q16);
                    let n_ctx = pos + i + 1;
                    let lo = window.map_or(0, |w| (n_ctx).saturating_sub(w));
                    let mut sc: Vec<f32> = (0..n_ctx)
                        .map(|j| {
                            let k = &kc[j * kv_dim + kvh * hd..][..hd];
                            if j < lo {
                                f32::NEG_INFINITY
                            } else {
                                ggml_math::dot(k, &q16, Order::TinyBlas) * 0.3
                            }
                        })
                        .collect();
                    ggml_math::softmax(&mut sc);
                    ggml_math::round_f16(&mut sc);
                    let mut scratch = vec![0f32; 32 * hd];
                    let mut acc = ColumnDot::new(&mut scratch, hd, Order::TinyBlas);
                    for (j, w) in sc.iter().enumerate() {
                        acc.add(j, *w, &vc[j * kv_dim + kvh * hd..][..hd]);
                    }
                    let mut want = vec![0f32; hd];
                    acc.finish(&mut want);
                    let g = &got[(i * n_head + hh) * hd..][..hd];
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(g),
                        bits(&want),
                        "window {window:?} position {i} head {hh}"
                    );
                }
            }
        }
    }

    #[test]
    fn rms_norm_and_rope_basics() {
        let out = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let s = 1.0 / (12.5f32).sqrt();
        assert!((out[0] - 3.0 * s).abs() < 1e-6 && (out[1] - 8.0 * s).abs() < 1e-6);
        // position 0 leaves vectors unchanged; rotation preserves the norm
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut x, 1, 4, 4, &[(1.0, 0.0), (1.0, 0.0)]);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
        let (c, s) = (0.3f32.cos(), 0.3f32.sin());
        rope(&mut x, 1, 4, 2, &[(c, s)]);
        assert!(((x[0] * x[0] + x[1] * x[1]) - 5.0).abs() < 1e-5);
        assert_eq!(&x[2..], &[3.0, 4.0], "dims past n_rot are untouched");
    }

    /// The default model's file (and others made from it), where `scripts/fetch-model.sh` puts
    /// it; missing, the test fails rather than skips.
    fn default_model() -> std::path::PathBuf {
        model_named("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh")
    }

    /// A model file of the catalog's directory; missing is a failure, not a skip.
    pub(crate) fn model_named(file: &str, fetch: &str) -> std::path::PathBuf {
        let dir = std::env::var_os("CORRAL_MODEL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("XDG_DATA_HOME")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| {
                        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".local/share")
                    })
                    .join("corral/models")
            });
        let p = dir.join(file);
        assert!(p.is_file(), "{} is missing: run {fetch}", p.display());
        p
    }

    /// corral's mean KL divergence from an exact (f64, dequantized weights) forward pass, and
    /// llama.cpp's, over the same 128 next-token distributions (scripts/kl-reference.py).
    fn kl_against_exact(model: &std::path::Path) -> (f64, f64) {
        kl_against_exact_with(model, &|m, cache, tokens, pos| {
            let cache = cache.get_or_insert_with(|| m.new_cache());
            m.forward(cache, tokens, pos).unwrap()
        })
    }

    /// One step of a forward pass for [`kl_against_exact_with`]: the logits of the last of
    /// `tokens` placed at `pos`, the sequence's cache made on its first step.
    pub(crate) type Step<'a> = dyn Fn(&Llama, &mut Option<KvCache>, &[u32], usize) -> Vec<f32> + 'a;

    /// [`kl_against_exact`] of any pass over the model's weights.
    pub(crate) fn kl_against_exact_with(model: &std::path::Path, step: &Step<'_>) -> (f64, f64) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("target/kl");
        std::fs::create_dir_all(&dir).unwrap();
        let stem = dir.join(model.file_stem().unwrap());
        let out = std::process::Command::new("python3")
            .arg(root.join("scripts/kl-reference.py"))
            .arg(model)
            .arg(&stem)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "scripts/kl-reference.py failed (it needs llama.cpp, scripts/install-llama-cpp.sh, \
             and the gguf package; scripts/test.sh installs both):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}.json", stem.display())).unwrap(),
        )
        .unwrap();
        let exact: Vec<f32> = std::fs::read(format!("{}.f32", stem.display()))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n_vocab = meta["n_vocab"].as_u64().unwrap() as usize;
        let bytes = std::fs::read(model).unwrap();
        let mut cur = std::io::Cursor::new(&bytes);
        let ct = gguf_file::Content::read(&mut cur).unwrap();
        let m = Llama::from_gguf(&ct, &bytes, &mut cur, &Device::Cpu, 512).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let mut kls = Vec::new();
        for c in meta["cases"].as_array().unwrap() {
            let prompt = ids(&c["prompt_ids"]);
            let gen = ids(&c["greedy_ids"]);
            let mut cache = None;
            let mut logits = step(&m, &mut cache, &prompt, 0);
            for (i, tok) in gen.iter().enumerate() {
                let row = &exact[kls.len() * n_vocab..][..n_vocab];
                let max = logits.iter().fold(f64::MIN, |a, b| a.max(f64::from(*b)));
                let lse = max
                    + logits
                        .iter()
                        .map(|l| (f64::from(*l) - max).exp())
                        .sum::<f64>()
                        .ln();
                let kl: f64 = row
                    .iter()
                    .zip(&logits)
                    .map(|(p, l)| {
                        let p = f64::from(*p);
                        p.exp() * (p - (f64::from(*l) - lse))
                    })
                    .sum();
                kls.push(kl);
                logits = step(&m, &mut cache, &[*tok], prompt.len() + i);
            }
        }
        let mean = kls.iter().sum::<f64>() / kls.len() as f64;
        (mean, meta["llama_cpp_mean_kl"].as_f64().unwrap())
    }

    /// Issue 17's yardstick for numerics: corral's distributions are at least as close to exact
    /// arithmetic as llama.cpp's (built for this CPU) on the same file, measured as the mean KL
    /// divergence over 8 prompts x 16 greedy steps, for the default Q4_1 file (where corral
    /// reproduces llama.cpp's arithmetic, so the two are equal) and for a Q4_K_M file made by
    /// llama.cpp's quantizer (whose repacked Q4_K order corral does not reproduce: there it
    /// must not be further from exact than llama.cpp is, by more than 5%). Measured 2026-12-07
    /// (AMD EPYC, AVX2): Q4_1 2.629e-3 both; Q4_K_M corral 5.18e-3, llama.cpp 5.07e-3.
    #[test]
    fn kl_to_exact_reference() {
        let default = default_model();
        let (ours, theirs) = kl_against_exact(&default);
        eprintln!("Q4_1: corral mean KL {ours:.4e}, llama.cpp {theirs:.4e}");
        assert!(
            ours > 0.0 && ours <= theirs * 1.001 + 1e-9,
            "{ours} vs {theirs}"
        );
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("target/quantized");
        let out = std::process::Command::new("python3")
            .arg(root.join("scripts/make-quantized.py"))
            .arg(&dir)
            .arg(&default)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ours, theirs) = kl_against_exact(&dir.join("smollm2-q4_k_m.gguf"));
        eprintln!("Q4_K_M: corral mean KL {ours:.4e}, llama.cpp {theirs:.4e}");
        assert!(ours > 0.0 && ours <= theirs * 1.05, "{ours} vs {theirs}");
    }
}
