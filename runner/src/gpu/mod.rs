//! The forward pass on an accelerator: the graph of `llama.rs` (every architecture it reads) on
//! device buffers, through the few operations a [`Backend`] provides.
//!
//! - `cuda.rs` (the `cuda` feature) runs them as corral's own kernels (`kernels.cu`, compiled to
//!   PTX by NVRTC at build time; at run time only the driver, `libcuda.so.1`, is loaded, so the
//!   sandbox needs no CUDA toolkit).
//! - `host.rs` runs the same operations on the CPU, one plain loop each, with the kernels'
//!   arithmetic: the graph is tested against the CPU forward pass on machines without a GPU.
//!
//! The weights go to the device in f32, dequantized from the file as ggml dequantizes them, so
//! the products are exact sums of the quantized weights (the CPU path quantizes activations to
//! 8 bits for its integer dot products; the device does not). Embedding rows are looked up on
//! the host (the CPU model's table) and uploaded per pass; the rotary tables too. Keys and
//! values stay on the device, in each sequence's [`KvCache`], rounded to f16 as on the CPU.
//!
//! `CORRAL_GPU_MEMORY_MB` (the profile's advisory cap for a shared GPU) is enforced here: the
//! load fails when the weights and one full context's cache do not fit under it, and a
//! sequence whose cache would pass it fails with an error instead of taking more.

// Without the `cuda` feature only the tests build a device model (on `host.rs`).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::llama::{Item, KvCache, Llama, Rows};

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod emulate;
#[cfg(any(test, feature = "cuda"))]
pub mod host;
pub mod kernels;
#[cfg(any(test, feature = "cuda"))]
pub mod selftest;

/// One layer's weights in f32; matrices row-major `[out][in]`, fused ones split.
pub(crate) struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub qkv_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: Vec<f32>,
    pub wo_bias: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// One sequence's attention: `rows` query rows (positions `pos..`) starting at row `q_row` of
/// the pass, over a cache holding `pos + rows` positions.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub q_row: usize,
    pub rows: usize,
    pub pos: usize,
    pub n_head: usize,
    pub group: usize,
    pub head_dim: usize,
    pub kv_dim: usize,
    /// Multiplies the scores (1 where the queries were scaled instead).
    pub scale: f32,
    /// Gemma 2's cap on the scores; 0 for none.
    pub softcap: f32,
    /// A sliding window's width; 0 for none.
    pub window: usize,
}

/// Buffers of f32 on a device: made, filled, read back, copied.
pub trait Memory: Send + Sync + 'static {
    type Buf: Send + Sync + 'static;
    /// The device, for logs and `ready`.
    fn describe(&self) -> String;
    /// Bytes the device has free, if it can tell.
    fn free_bytes(&self) -> Option<usize>;
    fn upload(&self, data: &[f32]) -> anyhow::Result<Self::Buf>;
    fn zeros(&self, n: usize) -> anyhow::Result<Self::Buf>;
    fn download(&self, b: &Self::Buf, from: usize, n: usize) -> anyhow::Result<Vec<f32>>;
    /// `dst[to..to + n] = src[from..from + n]`.
    fn copy(
        &self,
        src: &Self::Buf,
        from: usize,
        dst: &mut Self::Buf,
        to: usize,
        n: usize,
    ) -> anyhow::Result<()>;
}

/// Memory that is a `Vec<f32>` on the host: the reference backend's and the emulator's.
pub trait OnHost: Send + Sync + 'static {
    fn name(&self) -> String;
}

impl<T: OnHost> Memory for T {
    type Buf = Vec<f32>;

    fn describe(&self) -> String {
        self.name()
    }

    fn free_bytes(&self) -> Option<usize> {
        None
    }

    fn upload(&self, data: &[f32]) -> anyhow::Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn zeros(&self, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn download(&self, b: &Vec<f32>, from: usize, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(b[from..from + n].to_vec())
    }

    fn copy(
        &self,
        src: &Vec<f32>,
        from: usize,
        dst: &mut Vec<f32>,
        to: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        dst[to..to + n].copy_from_slice(&src[from..from + n]);
        Ok(())
    }
}

/// The operations the graph needs, on a device's buffers. Lengths are passed explicitly; every
/// buffer is at least as long as the operation reads or writes.
pub trait Backend: Memory {
    /// `out[r][j] = Σ_i x[r][i] · w[j][i]`: `rows` rows of `k` values, `n` weight rows.
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
    ) -> anyhow::Result<Self::Buf>;
    /// Each of `rows` rows of `n` values scaled to unit RMS, times `w`.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> anyhow::Result<Self::Buf>;
    /// `x[r] += b` for each of `rows` rows as long as `b` (`n`).
    fn add_rows(
        &self,
        x: &mut Self::Buf,
        b: &Self::Buf,
        rows: usize,
        n: usize,
    ) -> anyhow::Result<()>;
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> anyhow::Result<()>;
    fn scale(&self, x: &mut Self::Buf, n: usize, s: f32) -> anyhow::Result<()>;
    fn round_f16(&self, x: &mut Self::Buf, n: usize) -> anyhow::Result<()>;
    /// Rotates the first `n_rot` dims of each head of `rows` rows; `cos_sin`: per row,
    /// `n_rot / 2` pairs.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos_sin: &Self::Buf,
        rows: usize,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        neox: bool,
    ) -> anyhow::Result<()>;
    /// `g = act(g) · u`: GELU (tanh, ggml's f16 table) or SiLU.
    fn gated(&self, g: &mut Self::Buf, u: &Self::Buf, n: usize, gelu: bool) -> anyhow::Result<()>;
    fn softcap(&self, x: &mut Self::Buf, n: usize, cap: f32) -> anyhow::Result<()>;
    /// One sequence's attention rows into `out` (same rows as in `q`).
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        a: &AttnShape,
        out: &mut Self::Buf,
    ) -> anyhow::Result<()>;
}

/// A sequence's keys and values on a device: per layer, room for `cap` positions.
pub struct DevKv {
    pub(crate) len: usize,
    cap: usize,
    /// Positions the engine asked room for (`KvCache::reserve`), allocated at the next pass.
    pub(crate) want: usize,
    /// `Vec<(B::Buf, B::Buf)>` of the backend that made it.
    layers: Option<Box<dyn Any + Send + Sync>>,
    pub(crate) bytes: usize,
    counter: Arc<AtomicUsize>,
}

impl std::fmt::Debug for DevKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKv")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for DevKv {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What `Model` holds of a device model: its pass, its caches.
pub trait DeviceForward: Send + Sync {
    fn forward_batch(
        &self,
        host: &Llama,
        items: &mut [Item<'_>],
    ) -> anyhow::Result<Vec<Option<Vec<f32>>>>;
    fn new_cache(&self, host: &Llama) -> KvCache;
    fn describe(&self) -> String;
    /// Bytes of KV cache the cap leaves (None without a cap).
    fn kv_room(&self) -> Option<usize>;
}

struct DevLayer<B: Backend> {
    attn_norm: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    bias: Option<(B::Buf, B::Buf, B::Buf)>,
    qk_norm: Option<(B::Buf, B::Buf)>,
    wo: B::Buf,
    wo_bias: Option<B::Buf>,
    post_attn_norm: Option<B::Buf>,
    ffn_norm: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    down: B::Buf,
    post_ffn_norm: Option<B::Buf>,
    n_ff: usize,
}

/// The model's weights on a device, and the pass over them.
pub struct DeviceModel<B: Backend> {
    b: B,
    layers: Vec<DevLayer<B>>,
    norm: B::Buf,
    output: B::Buf,
    output_bias: Option<B::Buf>,
    vocab: usize,
    weight_bytes: usize,
    /// The advisory cap, in bytes (`CORRAL_GPU_MEMORY_MB`).
    cap: Option<usize>,
    /// What the largest pass's buffers take ([`pass_bytes`]), kept free under the cap.
    pub(crate) pass_reserve: usize,
    /// Bytes held by every sequence's cache.
    kv_bytes: Arc<AtomicUsize>,
}

const MB: usize = 1 << 20;

impl<B: Backend> DeviceModel<B> {
    /// Uploads `host`'s weights (a layer at a time, dequantized to f32). `cap_mb`: the memory
    /// the model may use on the device; the load fails when the weights and one full context's
    /// cache would not fit under it.
    /// The largest pass is `max_rows` rows with logits for `max_items` of them.
    pub fn new(
        b: B,
        host: &Llama,
        cap_mb: Option<usize>,
        (max_rows, max_items): (usize, usize),
    ) -> anyhow::Result<DeviceModel<B>> {
        let c = host.config().clone();
        let kv_dim = c.n_head_kv * c.head_dim;
        let cap = cap_mb.map(|m| m.saturating_mul(MB));
        let n_ff = host.ffn_width();
        let pass_reserve = pass_bytes(&c, n_ff, host.vocab_size(), max_rows, max_items);
        // One full context and the largest pass beside the weights.
        let context_bytes = 2 * c.n_layer * kv_dim * c.max_seq * 4 + pass_reserve;
        let mut weight_bytes = 0usize;
        let check = |weight_bytes: usize| -> anyhow::Result<()> {
            if let Some(cap) = cap {
                if weight_bytes.saturating_add(context_bytes) > cap {
                    anyhow::bail!(
                        "the model needs more than the GPU memory cap of {} MB \
                         (CORRAL_GPU_MEMORY_MB): its weights in f32 take {} MB or more, and one \
                         context of {} positions with a pass's buffers {} MB",
                        cap / MB,
                        weight_bytes.div_ceil(MB),
                        c.max_seq,
                        context_bytes.div_ceil(MB)
                    );
                }
            }
            Ok(())
        };
        let mut up = |v: &[f32]| -> anyhow::Result<B::Buf> {
            weight_bytes += v.len() * 4;
            check(weight_bytes)?;
            b.upload(v)
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let h = host.export_layer(l)?;
            let n_ff = h.gate.len() / c.n_embd;
            let bias = match &h.qkv_bias {
                Some(bias) => {
                    let (bq, bkv) = bias.split_at(c.q_dim);
                    let (bk, bv) = bkv.split_at(kv_dim);
                    Some((up(bq)?, up(bk)?, up(bv)?))
                }
                None => None,
            };
            let qk_norm = match (&h.q_norm, &h.k_norm) {
                (Some(q), Some(k)) => Some((up(q)?, up(k)?)),
                _ => None,
            };
            layers.push(DevLayer {
                attn_norm: up(&h.attn_norm)?,
                q: up(&h.q)?,
                k: up(&h.k)?,
                v: up(&h.v)?,
                bias,
                qk_norm,
                wo: up(&h.wo)?,
                wo_bias: h.wo_bias.as_deref().map(&mut up).transpose()?,
                post_attn_norm: h.post_attn_norm.as_deref().map(&mut up).transpose()?,
                ffn_norm: up(&h.ffn_norm)?,
                gate: up(&h.gate)?,
                up: up(&h.up)?,
                down: up(&h.down)?,
                post_ffn_norm: h.post_ffn_norm.as_deref().map(&mut up).transpose()?,
                n_ff,
            });
        }
        let (norm, output, output_bias) = host.export_output()?;
        let vocab = output.len() / c.n_embd;
        let norm = up(&norm)?;
        let output = up(&output)?;
        let output_bias = output_bias.as_deref().map(&mut up).transpose()?;
        Ok(DeviceModel {
            b,
            layers,
            norm,
            output,
            output_bias,
            vocab,
            weight_bytes,
            cap,
            pass_reserve,
            kv_bytes: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Bytes the weights take on the device.
    #[cfg(test)]
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Makes room in `kv` for `need` positions (what the engine reserved, or twice the room it
    /// has, when that fits under the cap; else exactly `need`), keeping the first `keep`. The
    /// old cache stays whole until the new one is made, so a failure leaves it as it was; the
    /// cap counts both while the positions are copied.
    fn ensure_room(
        &self,
        kv: &mut DevKv,
        need: usize,
        keep: usize,
        n_layer: usize,
        kv_dim: usize,
        max_seq: usize,
    ) -> anyhow::Result<()> {
        if kv.layers.is_some() && kv.cap >= need {
            return Ok(());
        }
        let preferred = need
            .max(kv.want)
            .max(if kv.cap > 0 { kv.cap * 2 } else { 0 })
            .min(max_seq)
            .max(need);
        let bytes_for = |positions: usize| 2 * n_layer * kv_dim * positions * 4;
        let held = self.kv_bytes.load(Ordering::Relaxed);
        let fits = |bytes: usize| match self.cap {
            Some(cap) => self.weight_bytes + self.pass_reserve + held + bytes <= cap,
            None => true,
        };
        let new_cap = if fits(bytes_for(preferred)) {
            preferred
        } else if fits(bytes_for(need)) {
            need
        } else {
            let cap = self.cap.unwrap_or(0);
            anyhow::bail!(
                "the GPU memory cap of {} MB (CORRAL_GPU_MEMORY_MB) is reached: the weights take \
                 {} MB, a pass's buffers up to {} MB, caches {} MB, and this sequence needs {} MB \
                 more",
                cap / MB,
                self.weight_bytes.div_ceil(MB),
                self.pass_reserve.div_ceil(MB),
                held.div_ceil(MB),
                bytes_for(need).div_ceil(MB)
            );
        };
        let bytes = bytes_for(new_cap);
        let old = match kv.layers.as_ref() {
            Some(l) => Some(
                l.downcast_ref::<Vec<(B::Buf, B::Buf)>>()
                    .ok_or_else(|| anyhow::anyhow!("a cache made by another device"))?,
            ),
            None => None,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let mut k = self.b.zeros(new_cap * kv_dim)?;
            let mut v = self.b.zeros(new_cap * kv_dim)?;
            if let Some(old) = old {
                let n = keep.min(kv.cap).min(kv.len) * kv_dim;
                self.b.copy(&old[l].0, 0, &mut k, 0, n)?;
                self.b.copy(&old[l].1, 0, &mut v, 0, n)?;
            }
            layers.push((k, v));
        }
        kv.layers = Some(Box::new(layers));
        self.kv_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.kv_bytes.fetch_sub(kv.bytes, Ordering::Relaxed);
        kv.bytes = bytes;
        kv.cap = new_cap;
        Ok(())
    }

    /// Bytes of KV cache the engine may hold on the device (every sequence's and the kept
    /// prompt states'): the cap less the weights and a pass's buffers.
    pub fn kv_room(&self) -> Option<usize> {
        self.cap.map(|c| {
            c.saturating_sub(self.weight_bytes)
                .saturating_sub(self.pass_reserve)
        })
    }
}

/// Bytes a pass's own buffers take at most on the device: `rows` rows through every layer (the
/// residual, norms, products and their outputs, all alive until the layer ends) and `logits`
/// rows of logits.
fn pass_bytes(
    c: &crate::llama::Config,
    n_ff: usize,
    vocab: usize,
    rows: usize,
    logits: usize,
) -> usize {
    let kv_dim = c.n_head_kv * c.head_dim;
    let widths = 8 * c.n_embd + 3 * c.q_dim + 4 * kv_dim + 3 * n_ff + c.n_rot;
    rows * widths * 4 + logits * vocab * 4 + logits * c.n_embd * 8
}

impl<B: Backend> DeviceForward for DeviceModel<B> {
    fn kv_room(&self) -> Option<usize> {
        DeviceModel::kv_room(self)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} MB of weights in f32{}{})",
            self.b.describe(),
            self.weight_bytes.div_ceil(MB),
            match self.b.free_bytes() {
                Some(f) => format!(", {} MB free", f / MB),
                None => String::new(),
            },
            match self.cap {
                Some(c) => format!(", cap {} MB", c / MB),
                None => String::new(),
            }
        )
    }

    fn new_cache(&self, host: &Llama) -> KvCache {
        let c = host.config();
        KvCache::on_device(
            c.n_head_kv * c.head_dim,
            DevKv {
                len: 0,
                cap: 0,
                want: 0,
                layers: None,
                bytes: 0,
                counter: self.kv_bytes.clone(),
            },
        )
    }

    /// The pass of `Llama::forward_batch`, step for step, on the device.
    fn forward_batch(
        &self,
        host: &Llama,
        items: &mut [Item<'_>],
    ) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
        let b = &self.b;
        let c = host.config();
        let kv_dim = c.n_head_kv * c.head_dim;
        for it in items.iter_mut() {
            it.check(c.max_seq)?;
            let Some(kv) = it.cache.dev.as_mut() else {
                anyhow::bail!("a cache that does not belong to this device");
            };
            if it.pos > kv.len {
                anyhow::bail!("a cache that does not belong to this sequence");
            }
            // Positions from `pos` on are rewritten now: not valid until the pass ends.
            kv.len = it.pos;
            let need = it.pos + it.tokens.len();
            self.ensure_room(kv, need, it.pos, c.n_layer, kv_dim, c.max_seq)?;
        }
        let Rows {
            spans,
            positions,
            tokens,
            wanted,
        } = Rows::of(items);
        let total = positions.len();
        let logit_rows = wanted.len();
        if self.cap.is_some()
            && pass_bytes(
                c,
                self.layers.first().map_or(0, |l| l.n_ff),
                self.vocab,
                total,
                logit_rows,
            ) > self.pass_reserve
        {
            anyhow::bail!(
                "a pass of {total} tokens is larger than the GPU memory cap \
                 (CORRAL_GPU_MEMORY_MB) leaves room for"
            );
        }
        let mut x = b.upload(&host.embed(&tokens)?)?;
        let flat =
            |cs: &[(f32, f32)]| -> Vec<f32> { cs.iter().flat_map(|(c, s)| [*c, *s]).collect() };
        let (global, local) = host.rope_tables(&positions);
        let global = b.upload(&flat(&global))?;
        let local = local.map(|l| b.upload(&flat(&l))).transpose()?;
        let group = c.n_head / c.n_head_kv;
        let scale = if c.scale_queries { 1.0 } else { c.attn_scale };
        let mut rows = total;
        for (l, layer) in self.layers.iter().enumerate() {
            let window = c.sliding.as_ref().filter(|w| w.layers[l]).map(|w| w.window);
            let cos_sin = match (&local, window) {
                (Some(cs), Some(_)) => cs,
                _ => &global,
            };
            let h = b.rms_norm(&x, &layer.attn_norm, total, c.n_embd, c.eps)?;
            let mut q = b.matmul(&h, &layer.q, total, c.n_embd, c.q_dim)?;
            let mut k = b.matmul(&h, &layer.k, total, c.n_embd, kv_dim)?;
            let mut v = b.matmul(&h, &layer.v, total, c.n_embd, kv_dim)?;
            if let Some((bq, bk, bv)) = &layer.bias {
                b.add_rows(&mut q, bq, total, c.q_dim)?;
                b.add_rows(&mut k, bk, total, kv_dim)?;
                b.add_rows(&mut v, bv, total, kv_dim)?;
            }
            if let Some((qn, kn)) = &layer.qk_norm {
                q = b.rms_norm(&q, qn, total * c.n_head, c.head_dim, c.eps)?;
                k = b.rms_norm(&k, kn, total * c.n_head_kv, c.head_dim, c.eps)?;
            }
            b.rope(
                &mut q, cos_sin, total, c.n_head, c.head_dim, c.n_rot, c.neox,
            )?;
            b.rope(
                &mut k,
                cos_sin,
                total,
                c.n_head_kv,
                c.head_dim,
                c.n_rot,
                c.neox,
            )?;
            if c.scale_queries {
                b.scale(&mut q, total * c.q_dim, c.attn_scale)?;
            }
            b.round_f16(&mut k, total * kv_dim)?;
            b.round_f16(&mut v, total * kv_dim)?;
            let mut att = b.zeros(total * c.q_dim)?;
            for (it, span) in items.iter_mut().zip(&spans) {
                let kv = it
                    .cache
                    .dev
                    .as_mut()
                    .and_then(|d| d.layers.as_mut())
                    .and_then(|l| l.downcast_mut::<Vec<(B::Buf, B::Buf)>>())
                    .ok_or_else(|| anyhow::anyhow!("a cache made by another device"))?;
                let (kc, vc) = &mut kv[l];
                let n = span.len() * kv_dim;
                b.copy(&k, span.start * kv_dim, kc, it.pos * kv_dim, n)?;
                b.copy(&v, span.start * kv_dim, vc, it.pos * kv_dim, n)?;
                b.attention(
                    &q,
                    kc,
                    vc,
                    &AttnShape {
                        q_row: span.start,
                        rows: span.len(),
                        pos: it.pos,
                        n_head: c.n_head,
                        group,
                        head_dim: c.head_dim,
                        kv_dim,
                        scale,
                        softcap: c.attn_softcap.unwrap_or(0.0),
                        window: window.unwrap_or(0),
                    },
                    &mut att,
                )?;
            }
            let mut o = b.matmul(&att, &layer.wo, total, c.q_dim, c.n_embd)?;
            if let Some(bias) = &layer.wo_bias {
                b.add_rows(&mut o, bias, total, c.n_embd)?;
            }
            // As on the CPU, only the rows whose logits are wanted go on past the last
            // layer's attention.
            if l + 1 == c.n_layer && wanted.len() < total {
                if wanted.is_empty() {
                    rows = 0;
                    break;
                }
                let keep = |m: &B::Buf| -> anyhow::Result<B::Buf> {
                    let mut out = b.zeros(wanted.len() * c.n_embd)?;
                    for (i, &r) in wanted.iter().enumerate() {
                        b.copy(m, r * c.n_embd, &mut out, i * c.n_embd, c.n_embd)?;
                    }
                    Ok(out)
                };
                o = keep(&o)?;
                x = keep(&x)?;
                rows = wanted.len();
            }
            if let Some(w) = &layer.post_attn_norm {
                o = b.rms_norm(&o, w, rows, c.n_embd, c.eps)?;
            }
            b.add(&mut x, &o, rows * c.n_embd)?;
            let h = b.rms_norm(&x, &layer.ffn_norm, rows, c.n_embd, c.eps)?;
            let mut g = b.matmul(&h, &layer.gate, rows, c.n_embd, layer.n_ff)?;
            let u = b.matmul(&h, &layer.up, rows, c.n_embd, layer.n_ff)?;
            b.gated(&mut g, &u, rows * layer.n_ff, c.gemma)?;
            let mut d = b.matmul(&g, &layer.down, rows, layer.n_ff, c.n_embd)?;
            if let Some(w) = &layer.post_ffn_norm {
                d = b.rms_norm(&d, w, rows, c.n_embd, c.eps)?;
            }
            b.add(&mut x, &d, rows * c.n_embd)?;
        }
        for (it, span) in items.iter_mut().zip(&spans) {
            if let Some(kv) = it.cache.dev.as_mut() {
                kv.len = it.pos + span.len();
            }
        }
        let mut out: Vec<Option<Vec<f32>>> = items.iter().map(|_| None).collect();
        if wanted.is_empty() || rows == 0 {
            return Ok(out);
        }
        let h = b.rms_norm(&x, &self.norm, rows, c.n_embd, c.eps)?;
        let mut logits = b.matmul(&h, &self.output, rows, c.n_embd, self.vocab)?;
        if let Some(bias) = &self.output_bias {
            b.add_rows(&mut logits, bias, rows, self.vocab)?;
        }
        if let Some(cap) = c.final_softcap {
            b.softcap(&mut logits, rows * self.vocab, cap)?;
        }
        // A row whose hidden state is not finite gets NaN logits, so that its own sequence
        // fails, as on the CPU.
        let hidden = b.download(&h, 0, rows * c.n_embd)?;
        let mut logits = b.download(&logits, 0, rows * self.vocab)?;
        for (row, h) in logits
            .chunks_exact_mut(self.vocab)
            .zip(hidden.chunks_exact(c.n_embd))
        {
            if crate::engine::check_finite("final hidden state", h).is_err() {
                row.fill(f32::NAN);
            }
        }
        let mut rows = logits.chunks_exact(self.vocab);
        for (o, it) in out.iter_mut().zip(items.iter()) {
            if it.logits {
                *o = rows.next().map(<[f32]>::to_vec);
            }
        }
        Ok(out)
    }
}

/// The device a runner computes on: `CORRAL_DEVICE` (`cpu`, `cuda`), or a GPU when the
/// sandbox handed one over (`CORRAL_GPUS`, set by the supervisor for `gpu_access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Cpu,
    Cuda,
}

impl Choice {
    pub fn from_env(device: Option<&str>, gpus: Option<&str>) -> anyhow::Result<Choice> {
        match device.map(str::trim) {
            Some("cpu") => Ok(Choice::Cpu),
            Some("cuda") => Ok(Choice::Cuda),
            Some("") | Some("auto") | None => Ok(match gpus.map(str::trim) {
                Some(g) if !g.is_empty() => Choice::Cuda,
                _ => Choice::Cpu,
            }),
            Some(other) => anyhow::bail!("CORRAL_DEVICE is '{other}': cpu, cuda or auto"),
        }
    }
}

/// The GPU memory cap, from `CORRAL_GPU_MEMORY_MB`.
pub fn memory_cap(v: Option<&str>) -> anyhow::Result<Option<usize>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<usize>().map(Some).map_err(|_| {
            anyhow::anyhow!("CORRAL_GPU_MEMORY_MB is '{s}', not a number of megabytes")
        }),
    }
}

/// What the catalog entry asks of a GPU (`resource_requirements.gpu_requirements`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    pub min_vram_mb: Option<usize>,
    pub compute: Option<(u32, u32)>,
}

impl Requirements {
    fn any(&self) -> bool {
        self.min_vram_mb.is_some() || self.compute.is_some()
    }

    /// Refuses a GPU of `capability` with `total` bytes that falls short of these.
    pub fn check(&self, name: &str, capability: (u32, u32), total: usize) -> anyhow::Result<()> {
        if let Some(need) = self.compute {
            if capability < need {
                anyhow::bail!(
                    "{name} has compute capability {}.{}; the model needs {}.{} \
                     (gpu_requirements.compute_capability)",
                    capability.0,
                    capability.1,
                    need.0,
                    need.1
                );
            }
        }
        if let Some(mb) = self.min_vram_mb {
            if total / MB < mb {
                anyhow::bail!(
                    "{name} has {} MB of memory; the model needs {mb} MB \
                     (gpu_requirements.min_vram_mb)",
                    total / MB
                );
            }
        }
        Ok(())
    }
}

/// `8.0`, `9.0`: a compute capability.
pub fn parse_capability(v: &str) -> anyhow::Result<(u32, u32)> {
    let (a, b) = v.trim().split_once('.').unwrap_or((v.trim(), "0"));
    match (a.parse(), b.parse()) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ => anyhow::bail!("'{v}' is not a compute capability (MAJOR.MINOR, e.g. 8.0)"),
    }
}

/// `corral-runner --gpu-self-test`: every kernel on the GPU against the host reference,
/// printed one line each; an error when any is off.
pub fn self_test() -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    {
        let d = cuda::Cuda::new(0)?;
        println!("{}", d.describe());
        let t = std::time::Instant::now();
        let checks = selftest::run(&d)?;
        let bad = checks.iter().filter(|c| !c.ok()).count();
        for c in &checks {
            let mark = if c.ok() { "ok  " } else { "FAIL" };
            println!(
                "{mark} {}: off by {:.2e} (tolerance {:.0e})",
                c.name, c.worst, c.tol
            );
        }
        println!(
            "{} kernel checks, {bad} failed, {:.0} ms",
            checks.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
        if bad > 0 {
            anyhow::bail!("{bad} GPU kernel check(s) failed");
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("this corral-runner was built without CUDA: build it with scripts/build-cuda.sh")
}

/// A device model for `host` on the device chosen, or None for the CPU. A model with GPU
/// requirements is refused on the CPU, and on a GPU that does not meet them.
/// `slots`: sequences the runner decodes together at most.
pub fn open(
    choice: Choice,
    host: &Llama,
    cap_mb: Option<usize>,
    needs: &Requirements,
    slots: usize,
) -> anyhow::Result<Option<Box<dyn DeviceForward>>> {
    // The largest pass the engine makes: a step's prompt budget beside every decoding row.
    let largest = (crate::engine::PREFILL_MAX + slots, slots);
    match choice {
        Choice::Cpu if needs.any() => anyhow::bail!(
            "the model needs a GPU (its catalog entry has gpu_requirements) and this runner was \
             given none (a profile with gpu_access hands one over)"
        ),
        Choice::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Choice::Cuda => {
            let d = cuda::Cuda::new(0)?;
            needs.check(&d.name(), d.capability(), d.total_bytes())?;
            Ok(Some(Box::new(DeviceModel::new(d, host, cap_mb, largest)?)))
        }
        #[cfg(not(feature = "cuda"))]
        Choice::Cuda => {
            let _ = (host, cap_mb, largest);
            anyhow::bail!(
                "a GPU was asked for (CORRAL_GPUS or CORRAL_DEVICE=cuda), but this corral-runner \
                 was built without CUDA: build it with scripts/build-cuda.sh"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host::Host;
    use super::*;
    use crate::model::Model;

    fn load(file: &str, fetch: &str) -> (Model, crate::tokenizer::Tokenizer) {
        let path = crate::llama::tests::model_named(file, fetch);
        let bytes = std::fs::read(&path).unwrap();
        let (m, _, tok) = Model::load_gguf(&path, &bytes, &candle_core::Device::Cpu).unwrap();
        (m, tok)
    }

    fn log_softmax(l: &[f32]) -> Vec<f64> {
        let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = l.iter().map(|v| (*v as f64 - mx).exp()).sum::<f64>().ln() + mx;
        l.iter().map(|v| *v as f64 - z).collect()
    }

    fn argmax(l: &[f32]) -> u32 {
        l.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
            )
            .0 as u32
    }

    type StepFn<'a> = dyn Fn(&mut KvCache, &[u32], usize) -> Vec<f32> + 'a;

    /// The log-probabilities after each token of `ids` past the prompt (`prompt` tokens first,
    /// then one at a time), by `step`.
    fn teacher_forced(
        cache: &mut KvCache,
        step: &StepFn<'_>,
        ids: &[u32],
        prompt: usize,
    ) -> Vec<Vec<f64>> {
        let mut out = vec![log_softmax(&step(cache, &ids[..prompt], 0))];
        for i in prompt..ids.len() {
            out.push(log_softmax(&step(cache, &ids[i..=i], i)));
        }
        out
    }

    /// The device graph (on the host backend: the kernels' arithmetic, one loop each) against
    /// the CPU forward pass, on a real model, fed the same tokens (the CPU pass's greedy
    /// answer): the same top token wherever the CPU pass's choice is clear (0.5 nats ahead),
    /// and a mean KL divergence between their next-token distributions under `tol`. They differ by the
    /// CPU pass's 8-bit activations; the device graph computes in f32 throughout (its distance
    /// from an exact pass is tested below).
    fn agrees_with_the_cpu_pass(file: &str, fetch: &str, prompts: &[&str], tol: f64) {
        let (mut model, tok) = load(file, fetch);
        fn step(m: &Model) -> impl Fn(&mut KvCache, &[u32], usize) -> Vec<f32> + '_ {
            move |c: &mut KvCache, t: &[u32], pos: usize| {
                let mut items = [Item {
                    cache: c,
                    tokens: t,
                    pos,
                    logits: true,
                }];
                m.forward_batch(&mut items).unwrap().pop().unwrap().unwrap()
            }
        }
        let mut runs = Vec::new();
        for p in prompts {
            let mut ids = tok.encode(p, false, true);
            let prompt = ids.len();
            let mut cache = model.new_cache();
            let mut logits = step(&model)(&mut cache, &ids, 0);
            for _ in 0..8 {
                let t = argmax(&logits);
                ids.push(t);
                logits = step(&model)(&mut cache, &[t], ids.len() - 1);
            }
            let cpu = teacher_forced(&mut model.new_cache(), &step(&model), &ids, prompt);
            runs.push((ids, prompt, cpu));
        }
        let dev = DeviceModel::new(Host, model.weights_for_tests(), None, (512, 4)).unwrap();
        model.attach(Box::new(dev));
        // What the device pass reads on the host survives; the CPU pass's layers do not.
        let mut c = crate::llama::KvCache::default();
        let mut items = [Item {
            cache: &mut c,
            tokens: &[1],
            pos: 0,
            logits: true,
        }];
        assert!(model.weights_for_tests().forward_batch(&mut items).is_err());
        let (mut worst, mut sum, mut n) = (0f64, 0f64, 0usize);
        for (ids, prompt, cpu) in &runs {
            let mut cache = model.new_cache();
            assert!(
                cache.dev.is_some(),
                "the device model's caches live on the device"
            );
            let dev = teacher_forced(&mut cache, &step(&model), ids, *prompt);
            for (i, (a, b)) in dev.iter().zip(cpu).enumerate() {
                let mut order: Vec<usize> = (0..b.len()).collect();
                order.sort_by(|i, j| b[*j].total_cmp(&b[*i]));
                if b[order[0]] - b[order[1]] > 0.5 {
                    let top = a
                        .iter()
                        .enumerate()
                        .max_by(|x, y| x.1.total_cmp(y.1))
                        .map(|x| x.0);
                    assert_eq!(
                        top,
                        Some(order[0]),
                        "{file}: top token at step {i} of {ids:?}"
                    );
                }
                let d: f64 = b.iter().zip(a).map(|(p, q)| p.exp() * (p - q)).sum();
                worst = worst.max(d);
                sum += d;
                n += 1;
            }
        }
        let mean = sum / n as f64;
        eprintln!("{file}: KL divergence of the device's distributions from the CPU's: mean {mean:.5}, largest {worst:.5}");
        assert!(mean < tol, "{file}: mean KL divergence {mean}");
    }

    #[test]
    fn the_device_graph_computes_what_the_cpu_pass_computes_for_the_default_model() {
        agrees_with_the_cpu_pass(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "scripts/fetch-model.sh",
            &[
                "The capital of France is",
                "def fibonacci(n):\n    ",
                "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
            ],
            0.02,
        );
    }

    /// Gemma 3: sliding-window layers with their own rope base, query and key norms, norms
    /// after attention and after the feed-forward, GELU, scaled embeddings, NeoX rotation.
    #[test]
    fn the_device_graph_computes_what_the_cpu_pass_computes_for_gemma3() {
        agrees_with_the_cpu_pass(
            "gemma-3-270m-q4_k_m.gguf",
            "scripts/fetch-model.sh gemma3-270m",
            &["The capital of France is", "1, 2, 3, 4,"],
            0.02,
        );
    }

    /// Sequences of different lengths and positions in one device pass get exactly what each
    /// gets alone, and a cache cut back to an earlier position (a reused prompt prefix) goes on
    /// as a fresh one would.
    #[test]
    fn batched_and_resumed_device_passes_match_single_ones() {
        let (model, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh");
        let host = model.weights_for_tests();
        let dev = DeviceModel::new(Host, host, None, (512, 4)).unwrap();
        let a = tok.encode("Once upon a time there was", false, true);
        let b = tok.encode("2 + 2 =", false, true);
        let alone = |ids: &[u32]| {
            let mut c = dev.new_cache(host);
            let mut items = [Item {
                cache: &mut c,
                tokens: ids,
                pos: 0,
                logits: true,
            }];
            (
                dev.forward_batch(host, &mut items)
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap(),
                c,
            )
        };
        let (la, mut ca) = alone(&a);
        let (lb, mut cb) = alone(&b);
        assert_eq!(ca.len(), a.len());
        // Both go on by one token together, one of them without wanting logits.
        let (ta, tb) = (argmax(&la), argmax(&lb));
        let mut items = [
            Item {
                cache: &mut ca,
                tokens: &[ta],
                pos: a.len(),
                logits: true,
            },
            Item {
                cache: &mut cb,
                tokens: &[tb],
                pos: b.len(),
                logits: false,
            },
        ];
        let out = dev.forward_batch(host, &mut items).unwrap();
        assert!(out[1].is_none());
        let mut a1 = a.clone();
        a1.push(ta);
        let (la1, _) = alone(&a1);
        assert_eq!(
            out[0].as_ref().unwrap(),
            &la1,
            "batched row differs from its single pass"
        );
        // Cut `a`'s cache back to 3 positions and feed the rest again: the same logits.
        let mut items = [Item {
            cache: &mut ca,
            tokens: &a1[3..],
            pos: 3,
            logits: true,
        }];
        let again = dev
            .forward_batch(host, &mut items)
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(again, la1);
        assert_eq!(ca.len(), a1.len());
    }

    /// `CORRAL_GPU_MEMORY_MB` is enforced: a cap below the weights fails the load naming it; a
    /// sequence that cannot get even the room it needs now fails with the cap named and its
    /// cache untouched, and gets it once another's cache is gone; one that cannot get the room
    /// it reserved gets what it needs now.
    #[test]
    fn the_gpu_memory_cap_is_enforced_at_load_and_per_sequence() {
        let (model, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh");
        let host = model.weights_for_tests();
        let err = DeviceModel::new(Host, host, Some(64), (512, 4))
            .err()
            .expect("64 MB is too little");
        let msg = format!("{err}");
        assert!(
            msg.contains("CORRAL_GPU_MEMORY_MB") && msg.contains("64 MB"),
            "{msg}"
        );
        let free = DeviceModel::new(Host, host, None, (512, 4)).unwrap();
        let c = host.config();
        let context = 2 * c.n_layer * c.n_head_kv * c.head_dim * c.max_seq * 4;
        let per_token = context / c.max_seq;
        let needed = free.weight_bytes() + free.pass_reserve + context;
        let step = |dev: &DeviceModel<Host>, cache: &mut KvCache, ids: &[u32]| {
            let mut items = [Item {
                cache,
                tokens: ids,
                pos: 0,
                logits: true,
            }];
            dev.forward_batch(host, &mut items).map(|_| ())
        };
        let hello = tok.encode("Hello", false, true);
        let long = tok.encode(
            &"the quick brown fox jumps over the lazy dog ".repeat(4),
            false,
            true,
        );
        assert!(
            long.len() * per_token > MB,
            "the long prompt needs more than 1 MB"
        );

        // Room for exactly one context (and less than 1 MB beside it).
        let dev = DeviceModel::new(Host, host, Some(needed.div_ceil(MB)), (512, 4)).unwrap();
        let room = dev.kv_room().unwrap();
        assert!(
            room >= context && room < context + MB,
            "{room} for a context of {context}"
        );
        let mut first = dev.new_cache(host);
        first.reserve(c.max_seq);
        step(&dev, &mut first, &hello).unwrap();
        assert_eq!(
            first.bytes(),
            context,
            "the reserved room, allocated at once"
        );
        let mut second = dev.new_cache(host);
        second.reserve(c.max_seq);
        let err = step(&dev, &mut second, &long).expect_err("over the cap");
        assert!(format!("{err}").contains("CORRAL_GPU_MEMORY_MB"), "{err}");
        assert_eq!((second.len(), second.bytes()), (0, 0));
        drop(first);
        step(&dev, &mut second, &long).unwrap();
        assert_eq!(second.len(), long.len());

        // Room for one and a half: the second gets what it needs now, not its reservation.
        let dev =
            DeviceModel::new(Host, host, Some((needed + context / 2) / MB), (512, 4)).unwrap();
        let mut first = dev.new_cache(host);
        first.reserve(c.max_seq);
        step(&dev, &mut first, &hello).unwrap();
        let mut second = dev.new_cache(host);
        second.reserve(c.max_seq);
        step(&dev, &mut second, &long).unwrap();
        assert_eq!(second.bytes(), long.len() * per_token);
    }

    #[test]
    fn the_device_follows_the_sandbox_s_gpus_unless_told() {
        use Choice::*;
        assert_eq!(Choice::from_env(None, None).unwrap(), Cpu);
        assert_eq!(Choice::from_env(None, Some("")).unwrap(), Cpu);
        assert_eq!(Choice::from_env(None, Some("0,1")).unwrap(), Cuda);
        assert_eq!(Choice::from_env(Some("cpu"), Some("0")).unwrap(), Cpu);
        assert_eq!(Choice::from_env(Some("cuda"), None).unwrap(), Cuda);
        assert!(Choice::from_env(Some("tpu"), None).is_err());
        assert_eq!(memory_cap(Some("512")).unwrap(), Some(512));
        assert_eq!(memory_cap(None).unwrap(), None);
        assert!(memory_cap(Some("lots")).is_err());
    }

    /// A catalog entry's GPU requirements: refused on the CPU, and on a GPU below them, naming
    /// the requirement.
    #[test]
    fn gpu_requirements_are_enforced() {
        let (model, _) = load("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh");
        let needs = Requirements {
            min_vram_mb: Some(4096),
            compute: Some(parse_capability("8.0").unwrap()),
        };
        let err = open(Choice::Cpu, model.weights_for_tests(), None, &needs, 1)
            .err()
            .expect("a model that needs a GPU is refused on the CPU");
        assert!(format!("{err}").contains("gpu_requirements"), "{err}");
        assert!(open(
            Choice::Cpu,
            model.weights_for_tests(),
            None,
            &Requirements::default(),
            1
        )
        .unwrap()
        .is_none());
        let gb = 1usize << 30;
        assert!(needs.check("gpu", (9, 0), 80 * gb).is_ok());
        let e = needs.check("gpu", (7, 5), 80 * gb).unwrap_err();
        assert!(format!("{e}").contains("compute capability 7.5"), "{e}");
        let e = needs.check("gpu", (9, 0), 2 * gb).unwrap_err();
        assert!(format!("{e}").contains("2048 MB"), "{e}");
        assert_eq!(parse_capability("9").unwrap(), (9, 0));
        assert_eq!(parse_capability("8.6").unwrap(), (8, 6));
        assert!(parse_capability("eight").is_err());
    }

    /// Without the `cuda` feature, asking for a GPU fails with a message saying how to build
    /// one, rather than quietly computing on the CPU.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_only_runner_refuses_a_gpu_with_the_way_to_build_one() {
        let (model, _) = load("SmolLM2-135M-Instruct.Q4_1.gguf", "scripts/fetch-model.sh");
        let err = open(
            Choice::Cuda,
            model.weights_for_tests(),
            None,
            &Requirements::default(),
            1,
        )
        .err()
        .unwrap();
        assert!(format!("{err}").contains("scripts/build-cuda.sh"), "{err}");
    }
}

#[cfg(test)]
mod exact {
    use super::host::Host;
    use super::*;

    /// The device graph's log-probabilities are at least as close to an exact pass (f64,
    /// dequantized weights: scripts/kl-reference.py) as llama.cpp's (which the CPU pass
    /// matches: `llama::tests::kl_to_exact_reference`): mean KL divergence over the same 128
    /// next-token distributions.
    #[test]
    fn the_device_graph_is_as_close_to_an_exact_pass_as_the_cpu_pass() {
        let path = crate::llama::tests::model_named(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "scripts/fetch-model.sh",
        );
        let dev = std::sync::OnceLock::new();
        let (ours, llama_cpp) = crate::llama::tests::kl_against_exact_with(&path, &|m, c, t, p| {
            let dev = dev.get_or_init(|| DeviceModel::new(Host, m, None, (512, 4)).unwrap());
            let c = c.get_or_insert_with(|| dev.new_cache(m));
            let mut items = [Item {
                cache: c,
                tokens: t,
                pos: p,
                logits: true,
            }];
            dev.forward_batch(m, &mut items)
                .unwrap()
                .pop()
                .unwrap()
                .unwrap()
        });
        eprintln!("mean KL from exact: device graph {ours:.6}, llama.cpp {llama_cpp:.6}");
        assert!(ours <= llama_cpp, "device {ours} vs llama.cpp {llama_cpp}");
    }
}

#[cfg(test)]
mod checkpoints {
    use super::host::Host;
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType};
    use candle_core::{DType, Device};

    /// The default model's weights as an f16 or bf16 checkpoint holds them (the types
    /// safetensors models come in), on the device graph and on the CPU pass: the same next
    /// token after each prefix of a prompt, distributions within a small KL divergence.
    fn half_checkpoint_agrees(dtype: DType, ggml: GgmlDType) {
        let path = crate::llama::tests::model_named(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "scripts/fetch-model.sh",
        );
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut tensors = std::collections::HashMap::new();
        let mut infos = std::collections::HashMap::new();
        for (name, info) in &ct.tensor_infos {
            let t = ct
                .tensor(&mut f, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let matrix = t.dims().len() == 2;
            let t = if matrix {
                t.to_dtype(dtype).unwrap()
            } else {
                t
            };
            infos.insert(
                name.clone(),
                gguf_file::TensorInfo {
                    ggml_dtype: if matrix { ggml } else { GgmlDType::F32 },
                    shape: info.shape.clone(),
                    offset: 0,
                },
            );
            tensors.insert(name.clone(), t);
        }
        let half_ct = gguf_file::Content {
            magic: ct.magic,
            metadata: ct.metadata.clone(),
            tensor_infos: infos,
            tensor_data_offset: 0,
        };
        let cpu = Llama::from_tensors(&half_ct, tensors, &Device::Cpu, 512).unwrap();
        let dev = DeviceModel::new(Host, &cpu, None, (512, 4)).unwrap();
        let tokens: Vec<u32> = (0..12).map(|i| 2 + (i * 7919) % 40000).collect();
        let (mut c1, mut c2) = (cpu.new_cache(), dev.new_cache(&cpu));
        let mut worst = 0f64;
        for (i, t) in tokens.iter().enumerate() {
            let a = cpu.forward(&mut c1, &[*t], i).unwrap();
            let mut items = [Item {
                cache: &mut c2,
                tokens: std::slice::from_ref(t),
                pos: i,
                logits: true,
            }];
            let b = dev
                .forward_batch(&cpu, &mut items)
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
            let lsm = |l: &[f32]| -> Vec<f64> {
                let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z = l.iter().map(|v| (*v as f64 - mx).exp()).sum::<f64>().ln() + mx;
                l.iter().map(|v| *v as f64 - z).collect()
            };
            let (p, q) = (lsm(&a), lsm(&b));
            let kl: f64 = p.iter().zip(&q).map(|(p, q)| p.exp() * (p - q)).sum();
            worst = worst.max(kl);
            let top = |v: &[f64]| {
                v.iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|x| x.0)
            };
            let mut sorted = p.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] > 0.5 {
                assert_eq!(
                    top(&p),
                    top(&q),
                    "{dtype:?}: next token after {} tokens",
                    i + 1
                );
            }
        }
        eprintln!("{dtype:?} checkpoint: largest KL divergence device vs CPU {worst:.5}");
        assert!(worst < 0.02, "{dtype:?}: KL divergence {worst}");
    }

    #[test]
    fn f16_and_bf16_checkpoints_run_on_the_device_graph() {
        half_checkpoint_agrees(DType::F16, GgmlDType::F16);
        half_checkpoint_agrees(DType::BF16, GgmlDType::BF16);
    }
}
