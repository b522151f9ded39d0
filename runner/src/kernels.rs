//! Quantized matrix-vector products for the forward pass, with ggml's arithmetic (its AVX2
//! `ggml_vec_dot_*` functions: the same integer sums in the same SIMD lanes, the same float
//! accumulation order), for the weight types GGUF files carry: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! (blocks of 32) and Q4_K, Q5_K, Q6_K (super-blocks of 256, the `_K_M`/`_K_S` files).
//!
//! Activations are quantized once per product as ggml does for the weight type: per 32 values
//! (Q8_0/Q8_1: `d = amax / 127` as f16, rounded to nearest-even) for the block-32 types, per 256
//! values (Q8_K: `d = max / -127` as f32, with per-16 sums) for the K types. Each block then
//! contributes `d_w * d_a * Σ q_w q_a` (plus the min terms of Q4_1, Q5_1, Q4_K and Q5_K).
//!
//! The x86 kernels are written once (`x86_kernels`) and built twice: for AVX2+FMA+F16C and for
//! AVX-512 F/BW/VL with VNNI (`vpdpbusd`/`vpdpwssd` for the 8-bit products, 32 registers for
//! larger tiles). Both compute ggml's AVX2 arithmetic, bit for bit: corral reproduces one fixed
//! order on every x86 host (docs/performance.md says why). Which build runs is chosen once at
//! run time (`kernel_isa`, from `is_x86_feature_detected!`), with a scalar fallback that
//! computes the same integer sums (its float sums go in block order, not in lanes). Output
//! rows are split across the rayon pool, whose size the runner sets from the profile's CPU limit.
//! Why our own rather than Candle's: Candle's generic path for these types runs 2.5–7× slower
//! here and sums in another order, so its greedy answers drift from llama.cpp's.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

/// Calls `$call`, a kernel of the x86 kernel modules, in the build `$isa` names (AVX2's where it
/// names no x86 build: callers check for AVX2 first).
#[cfg(target_arch = "x86_64")]
macro_rules! simd {
    ($isa:expr, $($call:tt)+) => {
        if $isa == Isa::Avx512 {
            avx512::$($call)+
        } else {
            avx2::$($call)+
        }
    };
}

pub const QK: usize = 32;
/// Values per K-quant super-block.
pub const QKK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// f16 weights: products as ggml's f16 paths compute them (activations rounded to f16,
    /// `ggml_vec_dot_f16`'s order for one row, tinyBLAS's for more).
    F16,
    /// bf16 weights: products as `ggml_vec_dot_bf16` computes them (activations rounded to
    /// bf16; without AVX512-BF16 llama.cpp takes it for any number of rows).
    BF16,
}

// Codes of the block-32 types for the const-generic kernels.
const T4_0: u8 = 0;
const T4_1: u8 = 1;
const T5_0: u8 = 2;
const T5_1: u8 = 3;
const T8_0: u8 = 4;

/// Bytes kept per block of a block-32 type (after the f16 scales, which are widened at load).
const fn kept32(t: u8) -> usize {
    match t {
        T4_0 | T4_1 => 16,
        T5_0 | T5_1 => 20, // 4 bytes of high bits, 16 of nibbles
        _ => 32,
    }
}

/// Block-32 types whose values are unsigned with a min (`d * q + m`).
const fn has_min(t: u8) -> bool {
    matches!(t, T4_1 | T5_1)
}

impl WType {
    /// The types computed here; others (Q2_K, Q3_K, the IQ types, F32) go elsewhere.
    pub fn from_ggml(t: GgmlDType) -> Option<WType> {
        Some(match t {
            GgmlDType::Q4_0 => WType::Q4_0,
            GgmlDType::Q4_1 => WType::Q4_1,
            GgmlDType::Q5_0 => WType::Q5_0,
            GgmlDType::Q5_1 => WType::Q5_1,
            GgmlDType::Q8_0 => WType::Q8_0,
            GgmlDType::Q4K => WType::Q4K,
            GgmlDType::Q5K => WType::Q5K,
            GgmlDType::Q6K => WType::Q6K,
            GgmlDType::F16 => WType::F16,
            GgmlDType::BF16 => WType::BF16,
            _ => return None,
        })
    }

    fn is_k(self) -> bool {
        matches!(self, WType::Q4K | WType::Q5K | WType::Q6K)
    }

    /// Values per block.
    pub fn block(self) -> usize {
        match self {
            WType::F16 | WType::BF16 => 1,
            _ if self.is_k() => QKK,
            _ => QK,
        }
    }

    /// Bytes per block in the file.
    fn file_bytes(self) -> usize {
        match self {
            WType::Q4_0 => 18,
            WType::Q4_1 => 20,
            WType::Q5_0 => 22,
            WType::Q5_1 => 24,
            WType::Q8_0 => 34,
            WType::Q4K => 144,
            WType::Q5K => 176,
            WType::Q6K => 210,
            WType::F16 | WType::BF16 => 2,
        }
    }

    /// Bytes kept per block: the quantized values (and, for Q4_K/Q5_K, the eight 6-bit scales
    /// and mins unpacked to a byte each; Q6_K keeps its 16 signed scales).
    fn kept(self) -> usize {
        match self {
            WType::Q4_0 | WType::Q4_1 => 16,
            WType::Q5_0 | WType::Q5_1 => 20,
            WType::Q8_0 => 32,
            WType::Q4K => 16 + 128,
            WType::Q5K => 16 + 32 + 128,
            WType::Q6K => 128 + 64 + 16,
            WType::F16 | WType::BF16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            WType::Q4_0 => T4_0,
            WType::Q4_1 => T4_1,
            WType::Q5_0 => T5_0,
            WType::Q5_1 => T5_1,
            _ => T8_0,
        }
    }
}

/// A weight matrix (rows x cols) in a quantized layout we compute ourselves. The f16 block
/// scales are widened to f32 once at load (converting them in the inner loop cost more than the
/// integer dot products), the quantized values kept as they are.
#[derive(Debug)]
pub struct QMat {
    pub wtype: WType,
    pub rows: usize,
    pub cols: usize,
    /// Per block: d (and m, or dmin for the K types, where the type has one).
    d: Vec<f32>,
    m: Vec<f32>,
    /// Per block: `wtype.kept()` bytes.
    q: Vec<u8>,
    /// The rows interleaved in groups of 8 for batched products (built on first use).
    grouped: std::sync::OnceLock<Box<Grouped>>,
}

/// One block-32 activation block: scale, sum term (Q8_1's, used with Q4_1/Q5_1), 32 values.
#[derive(Debug, Clone, Copy)]
struct ABlock {
    d: f32,
    s: f32,
    q: [i8; QK],
}

/// One Q8_K activation super-block: scale, 256 values, and the sums of each 16.
#[derive(Debug, Clone, Copy)]
struct KBlock {
    d: f32,
    q: [i8; QKK],
    bsums: [i16; QKK / 16],
}

/// Eight Q8_K activation rows laid out for `tile_k8`: per super-block, chunk by chunk of 32
/// values, the eight rows' bytes side by side; the rows' scales; and their 16-value sums paired
/// as `vpmaddwd`/`vpdpwssd` read them (lane = activation row), in 16-value groups (`bs`, Q6_K's
/// scales) and in 32-value groups (`gs`, Q4_K/Q5_K's mins). Built once per product and read by
/// every weight row.
#[cfg(target_arch = "x86_64")]
struct KTile8 {
    q: Vec<[i8; 8 * QKK]>,
    d: Vec<[f32; 8]>,
    bs: Vec<[[i32; 8]; 8]>,
    gs: Vec<[[i32; 8]; 4]>,
}

#[cfg(target_arch = "x86_64")]
impl KTile8 {
    fn new(acts: &[Vec<KBlock>]) -> KTile8 {
        debug_assert_eq!(acts.len(), 8);
        let nb = acts[0].len();
        let pair = |lo: i16, hi: i16| (u32::from(lo as u16) | (u32::from(hi as u16) << 16)) as i32;
        let mut t = KTile8 {
            q: vec![[0; 8 * QKK]; nb],
            d: vec![[0.0; 8]; nb],
            bs: vec![[[0; 8]; 8]; nb],
            gs: vec![[[0; 8]; 4]; nb],
        };
        for i in 0..nb {
            for (j, a) in acts.iter().enumerate() {
                let y = &a[i];
                for c in 0..8 {
                    t.q[i][(c * 8 + j) * 32..][..32].copy_from_slice(&y.q[c * 32..][..32]);
                }
                t.d[i][j] = y.d;
                for k in 0..8 {
                    t.bs[i][k][j] = pair(y.bsums[2 * k], y.bsums[2 * k + 1]);
                }
                // 32-value sums: at most 32 · 128 in size, an i16 as in ggml's `hadd`.
                let g = |g: usize| y.bsums[2 * g].wrapping_add(y.bsums[2 * g + 1]);
                for k in 0..4 {
                    t.gs[i][k][j] = pair(g(2 * k), g(2 * k + 1));
                }
            }
        }
        t
    }
}

/// 64 bytes, aligned as a 512-bit register.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Z64<T: Copy, const N: usize>([T; N]);

/// Eight block-32 activation rows laid out for `avx512_wide::tile32x8s` (the signed weight
/// types, whose values go on `vpdpbusd`'s unsigned side as `x + K`): per block and pair of rows
/// `p` (rows 2p and 2p+1, one per 256-bit half), their 64 bytes, their scales in 8 lanes each,
/// and `-K` times each lane's sum of four activation bytes for the `K` of every signed type in
/// the product (8 for Q4_0, 16 for Q5_0, 128 for Q8_0). Built once per product.
#[cfg(target_arch = "x86_64")]
struct ATile8 {
    y: Vec<[Z64<i8, 64>; 4]>,
    d: Vec<[Z64<f32, 16>; 4]>,
    /// Indexed as `offset_slot(T)`.
    start: [Vec<[Z64<i32, 16>; 4]>; 3],
}

#[cfg(target_arch = "x86_64")]
impl ATile8 {
    /// The slot of `start` and the `K` of signed type `t`.
    const fn offset_slot(t: u8) -> (usize, i32) {
        match t {
            T4_0 => (0, 8),
            T5_0 => (1, 16),
            _ => (2, 128),
        }
    }

    fn new(acts: &[Vec<ABlock>], types: &[u8]) -> ATile8 {
        debug_assert_eq!(acts.len(), 8);
        let nb = acts[0].len();
        let mut t = ATile8 {
            y: vec![[Z64([0; 64]); 4]; nb],
            d: vec![[Z64([0.0; 16]); 4]; nb],
            start: [Vec::new(), Vec::new(), Vec::new()],
        };
        for (b, (ys, ds)) in t.y.iter_mut().zip(&mut t.d).enumerate() {
            for (p, (y, d)) in ys.iter_mut().zip(ds).enumerate() {
                for h in 0..2 {
                    let a = &acts[2 * p + h][b];
                    y.0[32 * h..32 * h + 32].copy_from_slice(&a.q);
                    d.0[8 * h..8 * h + 8].fill(a.d);
                }
            }
        }
        for &ty in types {
            let (slot, k) = ATile8::offset_slot(ty);
            if !t.start[slot].is_empty() {
                continue;
            }
            t.start[slot] =
                t.y.iter()
                    .map(|ys| {
                        ys.map(|y| {
                            Z64(std::array::from_fn(|l| {
                                -k * y.0[4 * l..4 * l + 4]
                                    .iter()
                                    .map(|v| i32::from(*v))
                                    .sum::<i32>()
                            }))
                        })
                    })
                    .collect();
        }
        t
    }
}

/// Scale and min `j` (0..8) of a Q4_K/Q5_K super-block's packed 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl QMat {
    pub fn new(wtype: WType, rows: usize, cols: usize, data: &[u8]) -> anyhow::Result<QMat> {
        let (bs, per) = (wtype.block(), wtype.file_bytes());
        if !cols.is_multiple_of(bs) || data.len() != rows * cols / bs * per {
            anyhow::bail!(
                "{wtype:?} matrix {rows}x{cols} has {} bytes (rows must be whole blocks of {bs})",
                data.len()
            );
        }
        if matches!(wtype, WType::F16 | WType::BF16) {
            return Ok(QMat {
                wtype,
                rows,
                cols,
                d: Vec::new(),
                m: Vec::new(),
                q: data.to_vec(),
                grouped: std::sync::OnceLock::new(),
            });
        }
        let blocks = rows * cols / bs;
        let mut d: Vec<f32> = Vec::with_capacity(blocks);
        let mut m = Vec::new();
        let mut q: Vec<u8> = Vec::with_capacity(blocks * wtype.kept());
        crate::files::populate(q.spare_capacity_mut());
        crate::files::populate(d.spare_capacity_mut());
        for b in data.chunks_exact(per) {
            match wtype {
                WType::Q4_0 | WType::Q5_0 | WType::Q8_0 => {
                    d.push(f16_at(b, 0));
                    q.extend_from_slice(&b[2..]);
                }
                WType::Q4_1 | WType::Q5_1 => {
                    d.push(f16_at(b, 0));
                    m.push(f16_at(b, 2));
                    q.extend_from_slice(&b[4..]);
                }
                WType::Q4K | WType::Q5K => {
                    d.push(f16_at(b, 0));
                    m.push(f16_at(b, 2));
                    let packed = &b[4..16];
                    let sm: [(u8, u8); 8] = std::array::from_fn(|j| scale_min_k4(j, packed));
                    q.extend(sm.iter().map(|p| p.0));
                    q.extend(sm.iter().map(|p| p.1));
                    q.extend_from_slice(&b[16..]);
                }
                WType::Q6K => {
                    q.extend_from_slice(&b[..208]);
                    d.push(f16_at(b, 208));
                }
                WType::F16 | WType::BF16 => unreachable!("taken whole above"),
            }
        }
        Ok(QMat {
            wtype,
            rows,
            cols,
            d,
            m,
            q,
            grouped: std::sync::OnceLock::new(),
        })
    }

    /// Row `r` dequantized (an embedding lookup), as ggml's `dequantize_row_*` computes it.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let w = self.row(r);
        match self.wtype {
            WType::F16 => return f16_row(w.q),
            WType::BF16 => return bf16_row(w.q),
            _ => {}
        }
        let kb = self.wtype.kept();
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..self.cols / self.wtype.block() {
            let q = &w.q[b * kb..(b + 1) * kb];
            let d = w.d[b];
            match self.wtype {
                WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q5_1 | WType::Q8_0 => {
                    let vals = unpack32_scalar(self.wtype.code(), q);
                    let m = w.m.get(b).copied();
                    out.extend(vals.iter().map(|v| match m {
                        Some(m) => *v as f32 * d + m,
                        None => *v as f32 * d,
                    }));
                }
                WType::Q4K | WType::Q5K => {
                    let (vals, _) = unpack_k(self.wtype, q);
                    let dmin = w.m[b];
                    for (g, chunk) in vals.chunks_exact(32).enumerate() {
                        let (d1, m1) = (d * f32::from(q[g]), dmin * f32::from(q[8 + g]));
                        out.extend(chunk.iter().map(|v| d1 * *v as f32 - m1));
                    }
                }
                WType::F16 | WType::BF16 => unreachable!("converted whole above"),
                WType::Q6K => {
                    let (vals, sc) = unpack_k(self.wtype, q);
                    for (g, chunk) in vals.chunks_exact(16).enumerate() {
                        let ds = d * sc[g] as f32;
                        out.extend(chunk.iter().map(|v| ds * *v as f32));
                    }
                }
            }
        }
        out
    }

    /// Row `r` as (scales, mins, quants).
    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / self.wtype.block();
        let kb = self.wtype.kept();
        Row {
            d: if self.d.is_empty() {
                &[]
            } else {
                &self.d[r * nb..(r + 1) * nb]
            },
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[r * nb..(r + 1) * nb]
            },
            q: &self.q[r * nb * kb..(r + 1) * nb * kb],
        }
    }

    /// Several matrices with the same input width applied to the same `x` (Q, K and V; gate and
    /// up): one activation quantization per kind and one parallel region instead of one each.
    #[cfg(test)]
    pub fn matmul_many(mats: &[&QMat], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        QMat::matmul_many_batched(mats, x, n, false)
    }

    /// Several matrices with the same input width applied to the same `x`; with `batched`
    /// (rows of several sequences in one pass), Q4_0, Q4_1 and Q8_0 matrices take the grouped
    /// layout's products (`Grouped`): less work per output than the one-row kernels, rounded
    /// differently in the last digits (a lone sequence, prompt and decoding, keeps ggml's exact
    /// arithmetic).
    pub fn matmul_many_batched(
        mats: &[&QMat],
        x: &[f32],
        n: usize,
        batched: bool,
    ) -> Vec<Vec<f32>> {
        QMat::matmul_with(kernel_isa(), mats, x, n, batched)
    }

    /// `matmul_many_batched` with the kernels of `isa` (which the CPU must have).
    fn matmul_with(isa: Isa, mats: &[&QMat], x: &[f32], n: usize, batched: bool) -> Vec<Vec<f32>> {
        let cols = mats[0].cols;
        debug_assert!(mats.iter().all(|m| m.cols == cols));
        // A prompt's rows are quantized on every thread (one thread alone was a few percent of
        // a prefill while the other waited).
        let wide = n * cols >= 8192 && rayon::current_num_threads() > 1;
        let a32: Vec<Vec<ABlock>> = if mats.iter().any(|m| !m.wtype.is_k()) {
            per_row(x, cols, n, wide, |r| quantize_row(isa, r))
        } else {
            Vec::new()
        };
        let ak: Vec<Vec<KBlock>> = if mats.iter().any(|m| m.wtype.is_k()) {
            per_row(x, cols, n, wide, |r| quantize_row_k(isa, r))
        } else {
            Vec::new()
        };
        // f16 weights: the activations rounded to f16 (ggml converts them to the weights' type).
        // Eight at a time with F16C, and on every thread (one value at a time on one thread
        // was 10% of an F16 prefill).
        let a16: Vec<Vec<f32>> = if mats.iter().any(|m| m.wtype == WType::F16) {
            per_row(x, cols, n, wide, |r| {
                let mut v = r.to_vec();
                crate::ggml_math::round_f16(&mut v);
                v
            })
        } else {
            Vec::new()
        };
        // bf16 weights: the activations rounded to bf16.
        let ab16: Vec<Vec<f32>> = if mats.iter().any(|m| m.wtype == WType::BF16) {
            per_row(x, cols, n, wide, |r| {
                r.iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect()
            })
        } else {
            Vec::new()
        };
        if batched && n >= 2 && isa != Isa::Portable && mats.iter().all(|m| m.groupable()) {
            // Q4_0 takes its offset of 8 off as 8 · Σ a per block.
            let sums: Vec<Vec<i32>> = if mats.iter().any(|m| m.wtype == WType::Q4_0) {
                a32.iter()
                    .map(|row| {
                        row.iter()
                            .map(|b| b.q.iter().map(|v| i32::from(*v)).sum())
                            .collect()
                    })
                    .collect()
            } else {
                vec![Vec::new(); n]
            };
            return mats
                .iter()
                .map(|m| m.grouped_product(isa, &a32, &sums))
                .collect();
        }
        // Eight activation rows at a time laid out for `tile32x8s` (AVX-512, signed types).
        #[cfg(target_arch = "x86_64")]
        let a8: Vec<ATile8> = {
            let signed: Vec<u8> = mats
                .iter()
                .filter(|m| matches!(m.wtype, WType::Q4_0 | WType::Q5_0 | WType::Q8_0))
                .map(|m| m.wtype.code())
                .collect();
            if isa == Isa::Avx512 && n >= 8 && !signed.is_empty() {
                a32.par_chunks_exact(8)
                    .map(|c| ATile8::new(c, &signed))
                    .collect()
            } else {
                Vec::new()
            }
        };
        // Eight activation rows at a time, laid out for `tile_k8`.
        #[cfg(target_arch = "x86_64")]
        let k8: Vec<KTile8> = if isa != Isa::Portable && n >= 8 {
            ak.par_chunks_exact(8).map(KTile8::new).collect()
        } else {
            Vec::new()
        };
        let total: usize = mats.iter().map(|m| m.rows).sum();
        let starts: Vec<usize> = mats
            .iter()
            .scan(0, |acc, m| {
                let s = *acc;
                *acc += m.rows;
                Some(s)
            })
            .collect();
        let avx2 = isa != Isa::Portable;
        let threads = rayon::current_num_threads().max(1);
        let tasks = if total * cols * n < 400_000 {
            1
        } else {
            threads * 2
        };
        let chunk = total.div_ceil(tasks).max(1);
        // Each matrix's output, `[activation][row]`: every task computes its rows
        // `[row][activation]` into a buffer of its own and writes them here itself, while they
        // are in its cache (a separate transpose pass over the whole product was 7% of a
        // prefill, and its buffer as large again as the output).
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows]).collect();
        let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
        let scatter = |g0: usize, dst: &[f32]| {
            let here = dst.len() / n;
            let mut k = 0;
            while k < here {
                let mi = starts.iter().rposition(|s| *s <= g0 + k).unwrap_or(0);
                let (rows, first) = (mats[mi].rows, starts[mi]);
                let end = (first + rows - g0).min(here);
                let base = ptrs[mi];
                // Eight activations at a time: each pass reads `dst` in order and writes eight
                // output rows in order.
                for j0 in (0..n).step_by(8) {
                    let j1 = (j0 + 8).min(n);
                    for kk in k..end {
                        let r = g0 + kk - first;
                        for (j, v) in (j0..j1).zip(&dst[kk * n + j0..kk * n + j1]) {
                            // SAFETY: `outs[mi]` holds `n * rows` values and outlives the
                            // tasks; row `r` of matrix `mi` is computed by this task alone,
                            // so no other task writes `j * rows + r`.
                            unsafe { *base.0.add(j * rows + r) = *v };
                        }
                    }
                }
                k = end;
            }
        };
        // Prefill: tiles of weight rows against activation rows (AVX-512: four rows against
        // eight, `avx512_wide`; AVX2: one row against eight, `tile32_row8`; each result
        // computed exactly as the one-by-one product). Decoding (one activation row) goes row
        // by row: measured, a four-row tile was slower there (the product is memory-bound).
        let compute = |ci: usize, dst: &mut [f32]| {
            let here = dst.len() / n;
            let g0 = ci * chunk;
            let mut k = 0;
            // The chunk's rows, matrix by matrix (rows looked up as they are computed: gathering
            // them first wrote a row descriptor per weight row, every token).
            while k < here {
                let mi = starts.iter().rposition(|s| *s <= g0 + k).unwrap_or(0);
                let (m, first) = (mats[mi], starts[mi]);
                let end = (first + m.rows - g0).min(here);
                let wt = m.wtype;
                if wt == WType::F16 {
                    rows_half(isa, m, g0 + k - first, &mut dst[k * n..end * n], &a16);
                    k = end;
                    continue;
                }
                if wt == WType::BF16 {
                    rows_half(isa, m, g0 + k - first, &mut dst[k * n..end * n], &ab16);
                    k = end;
                    continue;
                }
                if n == 1 {
                    // Decoding: one activation row, the rows one after another.
                    let out = &mut dst[k..end];
                    if wt.is_k() {
                        rows_dot_k(m, g0 + k - first, out, &ak[0], isa);
                    } else {
                        rows_dot32(m, g0 + k - first, out, &a32[0], isa);
                    }
                    k = end;
                    continue;
                }
                while k < end {
                    let this = m.row(g0 + k - first);
                    if wt.is_k() {
                        let mut i = 0;
                        // Many rows: eight, then four activation rows per pass over the weight
                        // row (its values unpacked once), each result exactly `dot_k`'s
                        // tiled-order one.
                        #[cfg(target_arch = "x86_64")]
                        for t in &k8 {
                            dst[k * n + i..][..8].copy_from_slice(&tile_k8(isa, wt, &this, t));
                            i += 8;
                        }
                        while avx2 && n >= 8 && i + 4 <= n {
                            let a4 = [&ak[i][..], &ak[i + 1], &ak[i + 2], &ak[i + 3]];
                            dst[k * n + i..][..4].copy_from_slice(&tile_k(isa, wt, &this, a4));
                            i += 4;
                        }
                        for (j, a) in ak.iter().enumerate().skip(i) {
                            dst[k * n + j] = dot_k(wt, &this, a, isa, n >= 8);
                        }
                        k += 1;
                        continue;
                    }
                    if isa == Isa::Avx2 && n >= 8 {
                        // 16 registers: one weight row against eight activation rows keeps the
                        // eight accumulators in registers (two rows against four spilled them,
                        // and each spilled one made its FMA chain wait on memory).
                        tile_rows(
                            isa,
                            wt,
                            [&this],
                            &a32,
                            #[cfg(target_arch = "x86_64")]
                            &a8,
                            &mut dst[k * n..],
                        );
                        k += 1;
                        continue;
                    }
                    if !(avx2 && n > 1 && k + 1 < end) {
                        for (i, a) in a32.iter().enumerate() {
                            dst[k * n + i] = dot32(wt, &this, a, isa);
                        }
                        k += 1;
                        continue;
                    }
                    // With AVX-512's 32 registers, four weight rows at once: each activation
                    // block read from cache serves twice the products.
                    if isa == Isa::Avx512 && k + 3 < end {
                        let ws = [0, 1, 2, 3].map(|r| m.row(g0 + k + r - first));
                        tile_rows(
                            isa,
                            wt,
                            [&ws[0], &ws[1], &ws[2], &ws[3]],
                            &a32,
                            #[cfg(target_arch = "x86_64")]
                            &a8,
                            &mut dst[k * n..],
                        );
                        k += 4;
                        continue;
                    }
                    let next = m.row(g0 + k + 1 - first);
                    tile_rows(
                        isa,
                        wt,
                        [&this, &next],
                        &a32,
                        #[cfg(target_arch = "x86_64")]
                        &a8,
                        &mut dst[k * n..],
                    );
                    k += 2;
                }
            }
        };
        let task = |ci: usize| {
            let rows = chunk.min(total - ci * chunk);
            let mut dst = vec![0f32; rows * n];
            compute(ci, &mut dst);
            scatter(ci * chunk, &dst);
        };
        let count = total.div_ceil(chunk);
        if tasks == 1 || count == 1 {
            (0..count).for_each(task);
        } else {
            (0..count).into_par_iter().for_each(task);
        }
        drop(ptrs);
        outs
    }

    /// `x` holds `n` rows of `cols` values; returns `n` rows of `rows` values.
    #[cfg(test)]
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        QMat::matmul_many(&[self], x, n).pop().unwrap_or_default()
    }
}

/// A block-32 matrix's rows in groups of 8, interleaved for products against several
/// activation rows at once (batched decoding, where the one-row kernels' per-output work
/// dominates): each 32-byte chunk holds four bytes of each of 8 rows, so one `maddubs` works for
/// 8 outputs and one float conversion and FMA per block finish all 8. Built on first batched use
/// (a copy of the quantized values beside the row-major ones). Sums are exact integers per
/// block, then one float FMA per block and row: the float rounding differs in the last digits
/// from the one-row products (which keep ggml's lane order), as llama.cpp's batched products do.
#[derive(Debug)]
struct Grouped {
    /// Per group, per block: the 8 rows' scales.
    d: Vec<f32>,
    /// Per group, per block: the 8 rows' mins (Q4_1).
    m: Vec<f32>,
    /// Per group, per block, chunks of 32 bytes: chunk j, bytes 4i..4i+4 = row i's quantized
    /// bytes 4j..4j+4 (Q4: 4 chunks of nibble bytes, low nibbles values 4j.., high 16 + 4j..;
    /// Q8_0: 8 chunks of values).
    q: Vec<u8>,
}

/// Rows per interleaved group.
const GROUP: usize = 8;

impl QMat {
    /// Bytes the grouped copy of this matrix takes once built (0 when it has none).
    pub fn grouped_bytes(&self) -> usize {
        if !self.groupable() {
            return 0;
        }
        let blocks = self.rows * self.cols / QK;
        blocks * (self.wtype.kept() + 4 * if self.m.is_empty() { 1 } else { 2 })
    }

    /// Whether this matrix has the grouped layout for batched products.
    fn groupable(&self) -> bool {
        matches!(self.wtype, WType::Q4_0 | WType::Q4_1 | WType::Q8_0)
            && self.rows.is_multiple_of(GROUP)
    }

    /// The grouped copy of this matrix (built once, on first use).
    fn grouped(&self) -> &Grouped {
        self.grouped.get_or_init(|| {
            let nb = self.cols / QK;
            let kb = self.wtype.kept();
            let chunks = kb / 4; // 4 for Q4 (16 bytes a block), 8 for Q8_0

            let groups = self.rows / GROUP;
            let mut d = Vec::with_capacity(self.rows * nb);
            let mut m = Vec::with_capacity(self.m.len());
            let mut q = vec![0u8; self.rows * nb * kb];
            for g in 0..groups {
                for b in 0..nb {
                    for i in 0..GROUP {
                        let r = g * GROUP + i;
                        d.push(self.d[r * nb + b]);
                        if !self.m.is_empty() {
                            m.push(self.m[r * nb + b]);
                        }
                        let src = &self.q[(r * nb + b) * kb..][..kb];
                        for j in 0..chunks {
                            let dst = ((g * nb + b) * chunks + j) * 32 + 4 * i;
                            q[dst..dst + 4].copy_from_slice(&src[4 * j..4 * j + 4]);
                        }
                    }
                }
            }
            Box::new(Grouped { d, m, q })
        })
    }

    /// `n` activation rows (quantized, with their integer sums for Q4_0) against the grouped
    /// rows: returns `n` rows of `self.rows` values.
    fn grouped_product(&self, isa: Isa, a32: &[Vec<ABlock>], sums: &[Vec<i32>]) -> Vec<f32> {
        let n = a32.len();
        let g = self.grouped();
        let nb = self.cols / QK;
        let kb = self.wtype.kept();
        let groups = self.rows / GROUP;
        let code = self.wtype.code();
        let mut tmp = vec![0f32; groups * n * GROUP];
        let one_group = |gi: usize, dst: &mut [f32]| {
            let gq = &g.q[gi * nb * kb * GROUP..][..nb * kb * GROUP];
            let gd = &g.d[gi * nb * GROUP..][..nb * GROUP];
            let gm = if g.m.is_empty() {
                &[][..]
            } else {
                &g.m[gi * nb * GROUP..][..nb * GROUP]
            };
            let mut a0 = 0;
            while a0 < n {
                // Eight activation rows per pass over the group, else up to four.
                let take = if n - a0 >= 8 { 8 } else { (n - a0).min(4) };
                let out = &mut dst[a0 * GROUP..(a0 + take) * GROUP];
                // SAFETY: only called when AVX2 and FMA were detected; the grouped layout holds
                // `nb` blocks per row of this type, as every activation row does.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match take {
                        8 => simd!(
                            isa,
                            group32::<8>(code, gq, gd, gm, &a32[a0..], &sums[a0..], out)
                        ),
                        4 => simd!(
                            isa,
                            group32::<4>(code, gq, gd, gm, &a32[a0..], &sums[a0..], out)
                        ),
                        3 => simd!(
                            isa,
                            group32::<3>(code, gq, gd, gm, &a32[a0..], &sums[a0..], out)
                        ),
                        2 => simd!(
                            isa,
                            group32::<2>(code, gq, gd, gm, &a32[a0..], &sums[a0..], out)
                        ),
                        _ => simd!(
                            isa,
                            group32::<1>(code, gq, gd, gm, &a32[a0..], &sums[a0..], out)
                        ),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!(
                    "grouped products need AVX2 ({isa:?}, {code}, {}, {}, {})",
                    gq.len(),
                    gd.len() + gm.len(),
                    out.len()
                );
                a0 += take;
            }
        };
        if groups * n * self.cols < 400_000 {
            for (gi, dst) in tmp.chunks_mut(n * GROUP).enumerate() {
                one_group(gi, dst);
            }
        } else {
            tmp.par_chunks_mut(n * GROUP)
                .enumerate()
                .for_each(|(gi, dst)| one_group(gi, dst));
        }
        let mut out = vec![0f32; n * self.rows];
        for gi in 0..groups {
            for a in 0..n {
                out[a * self.rows + gi * GROUP..][..GROUP]
                    .copy_from_slice(&tmp[(gi * n + a) * GROUP..][..GROUP]);
            }
        }
        out
    }
}

/// `f` of each of the first `n` rows of `cols` values in `x`, on every thread when `wide`.
fn per_row<T: Send>(
    x: &[f32],
    cols: usize,
    n: usize,
    wide: bool,
    f: impl Fn(&[f32]) -> T + Sync + Send,
) -> Vec<T> {
    if wide {
        x.par_chunks_exact(cols).take(n).map(f).collect()
    } else {
        x.chunks_exact(cols).take(n).map(f).collect()
    }
}

/// Where a product's tasks write their rows of one output matrix (each task its own rows).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only written through at indices one task owns (see `scatter` in
// `matmul_many_batched`), while the vector it points into is alive and not otherwise touched.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// `R` rows of one block-32 type against every activation row, four at a time (`tile`):
/// `dst[r * n + i]` gets row `r`'s product with activation row `i`.
fn tile_rows<const R: usize>(
    isa: Isa,
    wt: WType,
    ws: [&Row<'_>; R],
    a32: &[Vec<ABlock>],
    #[cfg(target_arch = "x86_64")] a8: &[ATile8],
    dst: &mut [f32],
) {
    let n = a32.len();
    let mut put =
        |i: usize, out: &[f32], r: usize| dst[r * n + i..][..out.len()].copy_from_slice(out);
    let mut i = 0;
    while i < n {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && i + 8 <= n {
            let acts8: [&[ABlock]; 8] = std::array::from_fn(|k| &a32[i + k][..]);
            // SAFETY: AVX-512 F/BW/VL/VNNI were detected (`Isa::Avx512`); the rows and the
            // activations (and the tile, made from them with every signed type of the
            // product) come from the same product, so their block counts match.
            let out = unsafe {
                match (wt.code(), a8.get(i / 8)) {
                    (T4_0, Some(t)) => avx512_wide::tile32x8s::<T4_0, R>(ws, t),
                    (T5_0, Some(t)) => avx512_wide::tile32x8s::<T5_0, R>(ws, t),
                    (T8_0, Some(t)) => avx512_wide::tile32x8s::<T8_0, R>(ws, t),
                    (T4_0, None) => avx512_wide::tile32x8::<T4_0, R>(ws, acts8),
                    (T4_1, _) => avx512_wide::tile32x8::<T4_1, R>(ws, acts8),
                    (T5_0, None) => avx512_wide::tile32x8::<T5_0, R>(ws, acts8),
                    (T5_1, _) => avx512_wide::tile32x8::<T5_1, R>(ws, acts8),
                    _ => avx512_wide::tile32x8::<T8_0, R>(ws, acts8),
                }
            };
            for (r, o) in out.iter().enumerate() {
                put(i, o, r);
            }
            i += 8;
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if R == 1 && isa == Isa::Avx2 && i + 8 <= n {
            let acts8: [&[ABlock]; 8] = std::array::from_fn(|k| &a32[i + k][..]);
            // SAFETY: AVX2 and FMA were detected (`Isa::Avx2`); the row and the activations
            // come from the same product, so their block counts match.
            let out = unsafe {
                match wt.code() {
                    T4_0 => avx2::tile32_row8::<T4_0>(ws[0], acts8),
                    T4_1 => avx2::tile32_row8::<T4_1>(ws[0], acts8),
                    T5_0 => avx2::tile32_row8::<T5_0>(ws[0], acts8),
                    T5_1 => avx2::tile32_row8::<T5_1>(ws[0], acts8),
                    _ => avx2::tile32_row8::<T8_0>(ws[0], acts8),
                }
            };
            put(i, &out, 0);
            i += 8;
            continue;
        }
        if i + 4 <= n {
            let a4 = [&a32[i][..], &a32[i + 1], &a32[i + 2], &a32[i + 3]];
            for (r, o) in tile::<R, 4>(isa, wt, ws, a4).iter().enumerate() {
                put(i, o, r);
            }
            i += 4;
        } else if i + 3 == n {
            let a3 = [&a32[i][..], &a32[i + 1], &a32[i + 2]];
            for (r, o) in tile::<R, 3>(isa, wt, ws, a3).iter().enumerate() {
                put(i, o, r);
            }
            i += 3;
        } else if i + 2 == n {
            for (r, o) in tile::<R, 2>(isa, wt, ws, [&a32[i][..], &a32[i + 1]])
                .iter()
                .enumerate()
            {
                put(i, o, r);
            }
            i += 2;
        } else {
            for (r, o) in tile::<R, 1>(isa, wt, ws, [&a32[i]]).iter().enumerate() {
                put(i, o, r);
            }
            i += 1;
        }
    }
}

/// `R` rows of one block-32 type against `A` activation rows with the x86 tiles (the caller
/// checked AVX2 and FMA).
fn tile<const R: usize, const A: usize>(
    isa: Isa,
    wt: WType,
    ws: [&Row<'_>; R],
    acts: [&[ABlock]; A],
) -> [[f32; A]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called when AVX2 and FMA were detected (`has_avx2`); the rows and
        // activations come from the same matrix product, so their block counts match.
        unsafe {
            match wt.code() {
                T4_0 => simd!(isa, tile32::<T4_0, R, A>(ws, acts)),
                T4_1 => simd!(isa, tile32::<T4_1, R, A>(ws, acts)),
                T5_0 => simd!(isa, tile32::<T5_0, R, A>(ws, acts)),
                T5_1 => simd!(isa, tile32::<T5_1, R, A>(ws, acts)),
                _ => simd!(isa, tile32::<T8_0, R, A>(ws, acts)),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        let mut out = [[0f32; A]; R];
        for (r, w) in ws.iter().enumerate() {
            for (j, a) in acts.iter().enumerate() {
                out[r][j] = dot32(wt, w, a, Isa::Portable);
            }
        }
        out
    }
}

/// A K-type row against four activation rows in the tiled (many-row) order (the caller checked
/// AVX2 and FMA).
fn tile_k(isa: Isa, wt: WType, w: &Row<'_>, acts: [&[KBlock]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called when AVX2 and FMA were detected; the row and the activations come
        // from the same matrix product, so their super-block counts match.
        unsafe {
            match wt {
                WType::Q4K => simd!(isa, tile_k::<0, 4>(w, acts)),
                WType::Q5K => simd!(isa, tile_k::<1, 4>(w, acts)),
                _ => simd!(isa, tile_k::<2, 4>(w, acts)),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        acts.map(|a| dot_k(wt, w, a, Isa::Portable, true))
    }
}

/// A K-type row against a tile of eight activation rows (`tile_k8`; the caller checked AVX2
/// and FMA).
#[cfg(target_arch = "x86_64")]
fn tile_k8(isa: Isa, wt: WType, w: &Row<'_>, t: &KTile8) -> [f32; 8] {
    // SAFETY: only called when AVX2 and FMA were detected; the row and the tile come from the
    // same matrix product, so their super-block counts match.
    unsafe {
        match wt {
            WType::Q4K => simd!(isa, tile_k8::<0>(w, t)),
            WType::Q5K => simd!(isa, tile_k8::<1>(w, t)),
            _ => simd!(isa, tile_k8::<2>(w, t)),
        }
    }
}

/// One weight row.
struct Row<'a> {
    d: &'a [f32],
    m: &'a [f32],
    q: &'a [u8],
}

/// The kernels' instruction set, chosen once from what the CPU reports: `Avx512` where it has
/// AVX-512 F/BW/VL and VNNI (with AVX2, FMA and F16C), `Avx2` where it has AVX2, FMA and F16C,
/// else the portable code. `CORRAL_KERNELS=avx2` or `=portable` picks a lesser one (to compare
/// them). The two x86 builds compute the same bits; the portable code the same integer sums, its
/// float sums in block order rather than in ggml's lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // no x86 build elsewhere
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512-vnni",
        }
    }
}

pub fn kernel_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detected_isa();
        match std::env::var("CORRAL_KERNELS").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") if best != Isa::Portable => Isa::Avx2,
            _ => best,
        }
    })
}

fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("f16c")) {
            return Isa::Portable;
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            return Isa::Avx512;
        }
        Isa::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

#[cfg(test)]
fn has_avx2() -> bool {
    kernel_isa() != Isa::Portable
}

/// ggml's `quantize_row_q8_1` (the `s` term is used by Q4_1 and Q5_1 only; for the other types
/// it is `quantize_row_q8_0`).
fn quantize_row(isa: Isa, x: &[f32]) -> Vec<ABlock> {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { simd!(isa, quantize_row(x)) };
    }
    quantize_row_scalar(x)
}

fn quantize_row_scalar(x: &[f32]) -> Vec<ABlock> {
    x.chunks_exact(QK)
        .map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            // ggml's AVX2 quantizer takes the inverse as 127/amax (not 1/d): same rounding here.
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut q = [0i8; QK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(b) {
                let r = (v * id).round_ties_even() as i32;
                *o = r as i8;
                sum += r;
            }
            ABlock {
                d: f16::from_f32(d).to_f32(),
                s: f16::from_f32(sum as f32 * d).to_f32(),
                q,
            }
        })
        .collect()
}

/// ggml's `quantize_row_q8_K` (its reference version, which is what x86 builds run): the
/// value of largest magnitude maps to -127, `d` is the f32 inverse of that scale.
fn quantize_row_k(isa: Isa, x: &[f32]) -> Vec<KBlock> {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    x.chunks_exact(QKK)
        .map(|b| {
            let (mut max, mut amax) = (0f32, 0f32);
            for v in b {
                if v.abs() > amax {
                    amax = v.abs();
                    max = *v;
                }
            }
            let mut out = KBlock {
                d: 0.0,
                q: [0; QKK],
                bsums: [0; QKK / 16],
            };
            if amax == 0.0 {
                return out;
            }
            let iscale = -127.0 / max;
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Portable {
                // SAFETY: AVX2 and FMA were detected at run time; b has 256 values.
                unsafe { simd!(isa, round_k(iscale, b, &mut out.q)) };
            } else {
                round_k(iscale, b, &mut out.q);
            }
            #[cfg(not(target_arch = "x86_64"))]
            round_k(iscale, b, &mut out.q);
            for (s, c) in out.bsums.iter_mut().zip(out.q.chunks_exact(16)) {
                *s = c.iter().map(|q| i16::from(*q)).sum();
            }
            out.d = 1.0 / iscale;
            out
        })
        .collect()
}

/// ggml's `nearest_int(iscale * x)` (round half to even), capped at 127, for each value.
fn round_k(iscale: f32, x: &[f32], q: &mut [i8]) {
    for (o, v) in q.iter_mut().zip(x) {
        *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 32 values of a block-32 type's block as they enter the product: signed for Q4_0
/// (`q - 8`), Q5_0 (`q - 16`) and Q8_0, unsigned for Q4_1 and Q5_1 (their min is added apart).
fn unpack32_scalar(t: u8, q: &[u8]) -> [i32; QK] {
    let mut v = [0i32; QK];
    if t == T8_0 {
        for (o, b) in v.iter_mut().zip(q) {
            *o = i32::from(*b as i8);
        }
        return v;
    }
    let (qh, nib) = match t {
        T5_0 | T5_1 => (u32::from_le_bytes([q[0], q[1], q[2], q[3]]), &q[4..20]),
        _ => (0, &q[..16]),
    };
    for (j, n) in nib.iter().enumerate() {
        let (mut lo, mut hi) = (i32::from(n & 0x0f), i32::from(n >> 4));
        if matches!(t, T5_0 | T5_1) {
            lo |= (((qh >> j) & 1) << 4) as i32;
            hi |= (((qh >> (j + 16)) & 1) << 4) as i32;
        }
        let off = match t {
            T4_0 => 8,
            T5_0 => 16,
            _ => 0,
        };
        v[j] = lo - off;
        v[j + 16] = hi - off;
    }
    v
}

/// An f16 row's values.
fn f16_row(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// A bf16 row's values.
#[inline(always)]
fn bf16_row(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// `ggml_vec_dot_bf16`'s AVX2 arithmetic on values already widened: four 8-lane accumulators
/// over steps of 32 (a fused multiply-add each, as GCC compiles ggml's multiply then add), its
/// reduction, then the rest one by one in double precision.
#[inline(always)]
fn bf16_vec_dot(w: &[f32], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    let np = n / 32 * 32;
    let mut c = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, c) in c.iter_mut().enumerate() {
            for (l, c) in c.iter_mut().enumerate() {
                let k = i + 8 * j + l;
                *c = w[k].mul_add(a[k], *c);
            }
        }
    }
    let v: [f32; 8] = std::array::from_fn(|l| (c[0][l] + c[2][l]) + (c[1][l] + c[3][l]));
    let g = [v[4] + v[0], v[5] + v[1], v[6] + v[2], v[7] + v[3]];
    let mut sum = f64::from((g[0] + g[2]) + (g[1] + g[3]));
    for k in np..n {
        sum += f64::from(w[k] * a[k]);
    }
    sum as f32
}

/// Rows `r0..` of an f16 or bf16 matrix against the activation rows `acts` (rounded to the
/// matrix's type), into `out` (row-major: each weight row's results for every activation row),
/// as llama.cpp computes them: tinyBLAS (one 8-lane FMA accumulator per output) for two rows or
/// more of a length that is whole 8-lane groups, else the type's `vec_dot` — `vec_dot_f16`'s
/// four accumulators over steps of 32 and its reduction, or `vec_dot_bf16`'s (see
/// `bf16_vec_dot`), each adding what is left past the last step of 32 one by one in double.
fn rows_half(isa: Isa, m: &QMat, r0: usize, out: &mut [f32], acts: &[Vec<f32>]) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    use crate::ggml_math::{dot, dot_many_tinyblas, with_fma, Order};
    let n = acts.len();
    let bf = m.wtype == WType::BF16;
    let tiny = m.cols.is_multiple_of(8) && n >= 2;
    let np = m.cols / 32 * 32;
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // Many activation rows: several weight rows against four activation rows at a time
        // (four with AVX-512's 32 registers, two with AVX2's 16), each output its own 8-lane
        // chain as in `half_tiny`.
        let rows = out.len() / n;
        let mut j = 0;
        if tiny && n >= 4 {
            let wide = isa == Isa::Avx512;
            while j + if wide { 4 } else { 2 } <= rows {
                let mut i = 0;
                while i + 4 <= n {
                    let four = [&acts[i][..], &acts[i + 1], &acts[i + 2], &acts[i + 3]];
                    // SAFETY: AVX2, FMA and F16C (and, for `wide`, AVX-512 F/VL) were
                    // detected; every row holds cols 16-bit values, every activation cols f32.
                    unsafe {
                        if wide {
                            let ws = std::array::from_fn(|k| m.row(r0 + j + k).q);
                            let res = avx512::half_tiny_rows::<4, 4>(bf, ws, four);
                            for (k, r) in res.iter().enumerate() {
                                out[(j + k) * n + i..][..4].copy_from_slice(r);
                            }
                        } else {
                            let ws = std::array::from_fn(|k| m.row(r0 + j + k).q);
                            let res = avx2::half_tiny_rows::<2, 4>(bf, ws, four);
                            for (k, r) in res.iter().enumerate() {
                                out[(j + k) * n + i..][..4].copy_from_slice(r);
                            }
                        }
                    }
                    i += 4;
                }
                for k in 0..if wide { 4 } else { 2 } {
                    let w = m.row(r0 + j + k).q;
                    for (o, a) in out[(j + k) * n + i..(j + k + 1) * n]
                        .iter_mut()
                        .zip(&acts[i..])
                    {
                        // SAFETY: as below.
                        *o = unsafe { simd!(isa, half_tiny(bf, w, [&a[..]]))[0] };
                    }
                }
                j += if wide { 4 } else { 2 };
            }
        }
        for (j, o) in out.chunks_mut(n).enumerate().skip(j) {
            let w = m.row(r0 + j).q;
            let mut i = 0;
            // SAFETY: AVX2, FMA and F16C were detected; `w` holds cols 16-bit values and every
            // activation row cols f32 values.
            unsafe {
                while tiny && i + 4 <= n {
                    let four = [&acts[i][..], &acts[i + 1], &acts[i + 2], &acts[i + 3]];
                    o[i..i + 4].copy_from_slice(&simd!(isa, half_tiny(bf, w, four)));
                    i += 4;
                }
                for (o, a) in o[i..].iter_mut().zip(&acts[i..]) {
                    *o = match (tiny, bf) {
                        (true, _) => simd!(isa, half_tiny(bf, w, [&a[..]]))[0],
                        (false, true) => simd!(isa, bf16_vec_dot(w, a)),
                        (false, false) => simd!(isa, f16_vec_dot(w, a, np)),
                    };
                }
            }
        }
        return;
    }
    let f16_vec_dot = |w: &[f32], a: &[f32]| -> f32 {
        let mut sum = f64::from(dot(&w[..np], &a[..np], Order::VecDot));
        for (x, y) in w[np..].iter().zip(&a[np..]) {
            sum += f64::from(x * y);
        }
        sum as f32
    };
    with_fma(|| {
        for (j, o) in out.chunks_mut(n).enumerate() {
            let w = m.row_f32(r0 + j);
            let mut i = 0;
            while tiny && i + 4 <= n {
                let four = [&acts[i][..], &acts[i + 1], &acts[i + 2], &acts[i + 3]];
                o[i..i + 4].copy_from_slice(&dot_many_tinyblas(&w, four));
                i += 4;
            }
            for (o, a) in o[i..].iter_mut().zip(&acts[i..]) {
                *o = match (tiny, bf) {
                    (true, _) => dot(&w, a, Order::TinyBlas),
                    (false, true) => bf16_vec_dot(&w, a),
                    (false, false) => f16_vec_dot(&w, a),
                };
            }
        }
    });
}

/// Rows `r0..` of a block-32 matrix (as many as `out` holds) against one activation row: the
/// type dispatched once for the run of rows.
fn rows_dot32(m: &QMat, r0: usize, out: &mut [f32], a: &[ABlock], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected at run time; the rows and `a` have the same blocks.
        unsafe {
            match m.wtype.code() {
                T4_0 => simd!(isa, rows_dot32::<T4_0>(m, r0, out, a)),
                T4_1 => simd!(isa, rows_dot32::<T4_1>(m, r0, out, a)),
                T5_0 => simd!(isa, rows_dot32::<T5_0>(m, r0, out, a)),
                T5_1 => simd!(isa, rows_dot32::<T5_1>(m, r0, out, a)),
                _ => simd!(isa, rows_dot32::<T8_0>(m, r0, out, a)),
            }
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot32(m.wtype, &m.row(r0 + j), a, isa);
    }
}

fn dot32(wt: WType, w: &Row<'_>, a: &[ABlock], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected at run time; `w` and `a` have the same blocks.
        return unsafe {
            match wt.code() {
                T4_0 => simd!(isa, dot32::<T4_0>(w, a)),
                T4_1 => simd!(isa, dot32::<T4_1>(w, a)),
                T5_0 => simd!(isa, dot32::<T5_0>(w, a)),
                T5_1 => simd!(isa, dot32::<T5_1>(w, a)),
                _ => simd!(isa, dot32::<T8_0>(w, a)),
            }
        };
    }
    let _ = isa;
    let t = wt.code();
    let kb = kept32(t);
    let mut sum = 0f32;
    let mut summs = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let vals = unpack32_scalar(t, &w.q[b * kb..(b + 1) * kb]);
        let isum: i32 = vals.iter().zip(&ab.q).map(|(v, q)| v * i32::from(*q)).sum();
        sum += w.d[b] * ab.d * isum as f32;
        if has_min(t) {
            summs += w.m[b] * ab.s;
        }
    }
    sum + summs
}

/// A K-type super-block's 256 values as they enter the product (unsigned for Q4_K/Q5_K, `q - 32`
/// for Q6_K), with its scales: per 32 values for Q4_K/Q5_K (the mins are the kept bytes 8..16),
/// per 16 for Q6_K.
fn unpack_k(wt: WType, q: &[u8]) -> ([i32; QKK], [i32; 16]) {
    let mut v = [0i32; QKK];
    let mut sc = [0i32; 16];
    match wt {
        WType::Q4K | WType::Q5K => {
            let (qh, qs) = if wt == WType::Q5K {
                (&q[16..48], &q[48..176])
            } else {
                (&[][..], &q[16..144])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let b = qs[32 * j + l];
                    let (mut lo, mut hi) = (i32::from(b & 0x0f), i32::from(b >> 4));
                    if !qh.is_empty() {
                        lo |= i32::from((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= i32::from((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    v[64 * j + l] = lo;
                    v[64 * j + 32 + l] = hi;
                }
            }
            for (s, b) in sc.iter_mut().zip(&q[..8]) {
                *s = i32::from(*b);
            }
        }
        _ => {
            let (ql, qh, scales) = (&q[..128], &q[128..192], &q[192..208]);
            for n in 0..2 {
                for l in 0..32 {
                    let (a, b, h) = (ql[64 * n + l], ql[64 * n + 32 + l], qh[32 * n + l]);
                    let base = 128 * n + l;
                    v[base] = i32::from((a & 0x0f) | ((h & 3) << 4)) - 32;
                    v[base + 32] = i32::from((b & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
                    v[base + 64] = i32::from((a >> 4) | (((h >> 4) & 3) << 4)) - 32;
                    v[base + 96] = i32::from((b >> 4) | (((h >> 6) & 3) << 4)) - 32;
                }
            }
            for (s, b) in sc.iter_mut().zip(scales) {
                *s = i32::from(*b as i8);
            }
        }
    }
    (v, sc)
}

/// A K-type row against Q8_K activations, in one of ggml's two orders: one activation row
/// (`ggml_vec_dot_*_q8_K`: scaled integer sums in 8 lanes, FMA'd per super-block with
/// `d_w * d_a`), or `many`, for products of 8 rows or more (ggml's tiled matrix product: per
/// super-block the exact integer sum `s1` and min term `s2`, then `acc += (d_w * s1 - dmin * s2)
/// * d_a`, fused as its AVX2 build fuses them).
/// Rows `r0..` of a K-type matrix (as many as `out` holds) against one activation row (the
/// one-row order, `vec_dot`'s): the type dispatched once for the run of rows.
fn rows_dot_k(m: &QMat, r0: usize, out: &mut [f32], a: &[KBlock], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected at run time; the rows and `a` have the same blocks.
        unsafe {
            match m.wtype {
                WType::Q4K => simd!(isa, rows_dot_k::<0>(m, r0, out, a)),
                WType::Q5K => simd!(isa, rows_dot_k::<1>(m, r0, out, a)),
                _ => simd!(isa, rows_dot_k::<2>(m, r0, out, a)),
            }
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_k(m.wtype, &m.row(r0 + j), a, isa, false);
    }
}

fn dot_k(wt: WType, w: &Row<'_>, a: &[KBlock], isa: Isa, many: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected at run time; `w` and `a` have the same blocks.
        return unsafe {
            match (wt, many) {
                (WType::Q4K, false) => simd!(isa, dot_k::<0>(w, a)),
                (WType::Q5K, false) => simd!(isa, dot_k::<1>(w, a)),
                (_, false) => simd!(isa, dot_k::<2>(w, a)),
                (WType::Q4K, true) => simd!(isa, tile_k::<0, 1>(w, [a]))[0],
                (WType::Q5K, true) => simd!(isa, tile_k::<1, 1>(w, [a]))[0],
                (_, true) => simd!(isa, tile_k::<2, 1>(w, [a]))[0],
            }
        };
    }
    let _ = isa;
    let kb = wt.kept();
    let mut sum = 0f32;
    for (i, y) in a.iter().enumerate() {
        let q = &w.q[i * kb..(i + 1) * kb];
        let (vals, sc) = unpack_k(wt, q);
        let per = if wt == WType::Q6K { 16 } else { 32 };
        let s1: i32 = (0..QKK)
            .map(|e| sc[e / per] * vals[e] * i32::from(y.q[e]))
            .sum();
        let s2: i32 = if wt == WType::Q6K {
            0
        } else {
            (0..8)
                .map(|g| i32::from(q[8 + g]) * i32::from(y.bsums[2 * g] + y.bsums[2 * g + 1]))
                .sum()
        };
        let dmin = w.m.get(i).copied().unwrap_or(0.0);
        if many {
            let res = (-dmin).mul_add(s2 as f32, w.d[i] * s1 as f32);
            sum = res.mul_add(y.d, sum);
        } else {
            sum += y.d * w.d[i] * s1 as f32 - y.d * dmin * s2 as f32;
        }
    }
    sum
}

/// The x86 kernels, written once and compiled twice (`avx2`, `avx512`): `$fma` and `$f16c` are
/// the target features of the two kinds of function, `$vnni` whether `vpdpbusd`/`vpdpwssd`
/// replace `maddubs`+`madd`. Both builds compute the same integers and the same float operations
/// in the same order (ggml's AVX2 order), so their results are bit for bit the same; the
/// AVX-512 build gains VNNI's fused integer dot products and 32 vector registers.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($fma:literal, $f16c:literal, $vnni:literal) => {
        const VNNI: bool = $vnni;
        use super::{has_min, kept32, ABlock, KBlock, Row, QK, T4_0, T4_1, T5_0, T5_1, T8_0};
        use half::f16;
        use std::arch::x86_64::*;

        /// `quantize_row_scalar` with the rounding done by `vroundps` (nearest, ties to even).
        ///
        /// # Safety
        /// Needs AVX2 and FMA.
        #[target_feature(enable = $fma)]
        pub unsafe fn quantize_row(x: &[f32]) -> Vec<ABlock> {
            let mut out = Vec::with_capacity(x.len() / QK);
            let sign = _mm256_set1_ps(-0.0);
            for b in x.chunks_exact(QK) {
                // SAFETY: b has 32 floats: four loads of 8.
                let v = unsafe {
                    [
                        _mm256_loadu_ps(b.as_ptr()),
                        _mm256_loadu_ps(b.as_ptr().add(8)),
                        _mm256_loadu_ps(b.as_ptr().add(16)),
                        _mm256_loadu_ps(b.as_ptr().add(24)),
                    ]
                };
                let mut m = _mm256_andnot_ps(sign, v[0]);
                for vv in &v[1..] {
                    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vv));
                }
                let mut lanes = [0f32; 8];
                // SAFETY: lanes holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
                let amax = lanes.iter().fold(0f32, |a, l| a.max(*l));
                let d = amax / 127.0;
                let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let mut q = [0i8; QK];
                let mut sum = 0i32;
                for (k, vv) in v.iter().enumerate() {
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm256_mul_ps(*vv, id),
                    );
                    let i = _mm256_cvtps_epi32(r);
                    let mut ints = [0i32; 8];
                    // SAFETY: ints holds 8 i32.
                    unsafe { _mm256_storeu_si256(ints.as_mut_ptr().cast(), i) };
                    for (j, iv) in ints.iter().enumerate() {
                        q[k * 8 + j] = *iv as i8;
                        sum += iv;
                    }
                }
                out.push(ABlock {
                    d: f16::from_f32(d).to_f32(),
                    s: f16::from_f32(sum as f32 * d).to_f32(),
                    q,
                });
            }
            out
        }

        /// `super::round_k` with `vroundps` (nearest, ties to even) for eight values at a time.
        ///
        /// # Safety
        /// Needs AVX2; `x` and `q` have the same length, a multiple of 8.
        #[target_feature(enable = $fma)]
        pub unsafe fn round_k(iscale: f32, x: &[f32], q: &mut [i8]) {
            let s = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            for (xs, qs) in x.chunks_exact(8).zip(q.chunks_exact_mut(8)) {
                // SAFETY: xs has 8 floats.
                let v = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, s),
                );
                let i = _mm256_min_epi32(_mm256_cvtps_epi32(r), cap);
                let mut ints = [0i32; 8];
                // SAFETY: ints holds 8 i32.
                unsafe { _mm256_storeu_si256(ints.as_mut_ptr().cast(), i) };
                for (o, v) in qs.iter_mut().zip(ints) {
                    *o = v as i8;
                }
            }
        }

        /// Horizontal sum of 8 f32 lanes (high half plus low half, then pairs: ggml's order).
        ///
        /// # Safety
        /// Needs AVX2 and FMA (the caller checked them at run time, as every kernel here does).
        #[target_feature(enable = $fma)]
        pub(super) unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps::<1>(v);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// The wrapping sum of the i32 lanes of two vectors (an exact integer wherever ggml's is).
        ///
        /// # Safety
        /// Needs AVX2.
        #[target_feature(enable = $fma)]
        #[inline]
        unsafe fn hsum_i32(a: __m128i, b: __m128i) -> i32 {
            // Integer sums wrap alike in any order: add in registers.
            let s = _mm_add_epi32(a, b);
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }

        /// 32 unsigned times 32 signed bytes, summed into 8 i32 lanes, as f32.
        ///
        /// # Safety
        /// Needs AVX2 and FMA (the caller checked them at run time, as every kernel here does).
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        #[target_feature(enable = $fma)]
        unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
            if VNNI {
                // SAFETY: VNNI is only set where AVX512-VNNI/VL are enabled for this function. The
                // lanes equal maddubs + madd's: no pair of products here reaches maddubs's i16
                // saturation (|u| ≤ 128 against |s| ≤ 127, or u ≤ 31).
                return _mm256_cvtepi32_ps(unsafe {
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
                });
            }
            let dot16 = _mm256_maddubs_epi16(u, s);
            let dot32 = _mm256_madd_epi16(dot16, _mm256_set1_epi16(1));
            _mm256_cvtepi32_ps(dot32)
        }

        /// Bit `j` of the 4 bytes at `p` as byte `j` of the result (0xff where set).
        ///
        /// # Safety
        /// Needs AVX2; `p` has 4 bytes.
        #[target_feature(enable = $fma)]
        unsafe fn bits_to_bytes(p: &[u8]) -> __m256i {
            let x = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            // Byte j takes source byte j / 8, then keeps bit j % 8.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(x as i32),
                _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
        }

        /// A block-32 type's 32 values as bytes (see `unpack32_scalar`).
        ///
        /// # Safety
        /// Needs AVX2; `q` has the type's `kept32` bytes.
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        #[target_feature(enable = $fma)]
        #[inline]
        pub(super) unsafe fn unpack32<const T: u8>(q: &[u8]) -> __m256i {
            if T == T8_0 {
                // SAFETY: q has 32 bytes.
                return unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
            }
            let nib = if T == T5_0 || T == T5_1 {
                &q[4..20]
            } else {
                &q[..16]
            };
            // SAFETY: nib has 16 bytes.
            let lo = unsafe { _mm_loadu_si128(nib.as_ptr().cast()) };
            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo);
            let x = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
            if VNNI && (T == T5_0 || T == T5_1) {
                // AVX-512 BW/VL: the 32 high bits are a mask register as they are.
                let bits = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
                let sixteen = _mm256_set1_epi8(16);
                // SAFETY: VNNI is only set where AVX512-BW/VL are enabled for this function.
                return unsafe {
                    if T == T5_0 {
                        _mm256_mask_sub_epi8(x, !bits, x, sixteen)
                    } else {
                        _mm256_mask_add_epi8(x, bits, x, sixteen)
                    }
                };
            }
            match T {
                T4_0 => _mm256_sub_epi8(x, _mm256_set1_epi8(8)),
                T4_1 => x,
                T5_0 => {
                    // (q | h << 4) - 16: where the high bit is clear, q - 16 is q | 0xf0.
                    // SAFETY: q has 4 bytes of high bits first.
                    let h = unsafe { bits_to_bytes(q) };
                    _mm256_or_si256(x, _mm256_andnot_si256(h, _mm256_set1_epi8(0xf0u8 as i8)))
                }
                _ => {
                    // SAFETY: as above.
                    let h = unsafe { bits_to_bytes(q) };
                    _mm256_or_si256(x, _mm256_and_si256(h, _mm256_set1_epi8(0x10)))
                }
            }
        }

        /// One block's 8 lane sums of weight values times activation values, as f32 (ggml's
        /// `mul_sum_i8_pairs_float` for the signed types: |x| times y with x's sign moved onto y,
        /// since `maddubs` needs one unsigned side).
        ///
        /// # Safety
        /// Needs AVX2 and FMA.
        #[target_feature(enable = $fma)]
        #[inline]
        unsafe fn block_sum<const T: u8>(x: __m256i, y: __m256i) -> __m256 {
            // SAFETY: AVX2/FMA are enabled for this function.
            unsafe {
                if has_min(T) {
                    mul_sum_us8(x, y)
                } else {
                    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
                }
            }
        }

        /// A block-32 row against one activation row (ggml's `ggml_vec_dot_{q4_0,q4_1,q5_0,q5_1,
        /// q8_0}_q8_{0,1}` for AVX2).
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds whole blocks of type `T` matching `a`.
        #[target_feature(enable = $fma)]
        pub unsafe fn dot32<const T: u8>(w: &Row<'_>, a: &[ABlock]) -> f32 {
            let kb = kept32(T);
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0f32;
            for (b, ab) in a.iter().enumerate() {
                if has_min(T) {
                    summs += w.m[b] * ab.s;
                }
                // SAFETY: the block has kb bytes; ab.q has 32.
                let p = unsafe {
                    let x = unpack32::<T>(&w.q[b * kb..(b + 1) * kb]);
                    block_sum::<T>(x, _mm256_loadu_si256(ab.q.as_ptr().cast()))
                };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d[b] * ab.d), p, acc);
            }
            // SAFETY: as above.
            unsafe { hsum(acc) + summs }
        }

        /// Rows `r0..` of `m` (as many as `out` holds) against one activation row, each as
        /// `dot32` computes it.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `m` is of type `T` with `a`'s blocks per row.
        #[target_feature(enable = $fma)]
        pub unsafe fn rows_dot32<const T: u8>(
            m: &super::QMat,
            r0: usize,
            out: &mut [f32],
            a: &[ABlock],
        ) {
            for (j, o) in out.iter_mut().enumerate() {
                // SAFETY: as the caller promised.
                *o = unsafe { dot32::<T>(&m.row(r0 + j), a) };
            }
        }

        /// Rows `r0..` of K-type `m` (as many as `out` holds) against one activation row, each as
        /// `dot_k` computes it.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `m` is of K type `T` with `a`'s super-blocks per row.
        #[target_feature(enable = $fma)]
        pub unsafe fn rows_dot_k<const T: u8>(
            m: &super::QMat,
            r0: usize,
            out: &mut [f32],
            a: &[KBlock],
        ) {
            for (j, o) in out.iter_mut().enumerate() {
                // SAFETY: as the caller promised.
                *o = unsafe { dot_k::<T>(&m.row(r0 + j), a) };
            }
        }

        /// An f16 row (`w`, little-endian bytes) against an activation row of f16-rounded values
        /// as `ggml_vec_dot_f16` computes it: four 8-lane FMA accumulators over steps of 32 up to
        /// `np`, ggml's reduction, then the rest one by one in double precision.
        ///
        /// # Safety
        /// Needs AVX2, FMA and F16C; `w` holds `a.len()` values.
        #[target_feature(enable = $f16c)]
        pub unsafe fn f16_vec_dot(w: &[u8], a: &[f32], np: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..np).step_by(32) {
                for (j, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: i + 8j + 8 <= np <= the row's length, in both.
                    unsafe {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(
                            w.as_ptr().add(2 * (i + 8 * j)).cast(),
                        ));
                        let y = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                        *acc = _mm256_fmadd_ps(x, y, *acc);
                    }
                }
            }
            let mut lanes = [[0f32; 8]; 4];
            for (l, v) in lanes.iter_mut().zip(acc) {
                // SAFETY: eight f32 fit.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
            }
            let mut sum = f64::from(crate::ggml_math::reduce4x8(&lanes));
            for (k, y) in a.iter().enumerate().skip(np) {
                let x = half::f16::from_le_bytes([w[2 * k], w[2 * k + 1]]).to_f32();
                sum += f64::from(x * y);
            }
            sum as f32
        }

        /// Eight bf16 values (little-endian bytes at `p`) widened to f32, as ggml's AVX2 `LOAD`.
        #[target_feature(enable = $fma)]
        #[inline]
        unsafe fn bf16x8(p: *const u8) -> __m256 {
            // SAFETY: the caller has 16 readable bytes at p.
            unsafe {
                _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
                    16,
                ))
            }
        }

        /// A bf16 row (`w`, little-endian bytes) against an activation row of bf16-rounded
        /// values as `ggml_vec_dot_bf16` computes it on AVX2 (the `super::bf16_vec_dot`
        /// arithmetic).
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds `a.len()` values.
        #[target_feature(enable = $fma)]
        pub unsafe fn bf16_vec_dot(w: &[u8], a: &[f32]) -> f32 {
            let n = a.len();
            let np = n / 32 * 32;
            let mut c = [_mm256_setzero_ps(); 4];
            for i in (0..np).step_by(32) {
                for (j, c) in c.iter_mut().enumerate() {
                    // SAFETY: i + 8j + 8 <= np values in both rows.
                    unsafe {
                        let x = bf16x8(w.as_ptr().add(2 * (i + 8 * j)));
                        let y = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                        *c = _mm256_fmadd_ps(x, y, *c);
                    }
                }
            }
            let v = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
            let g = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
            let g = _mm_add_ps(g, _mm_movehl_ps(g, g));
            let g = _mm_add_ss(g, _mm_movehdup_ps(g));
            let mut sum = f64::from(_mm_cvtss_f32(g));
            for (k, y) in a.iter().enumerate().skip(np) {
                let x = half::bf16::from_le_bytes([w[2 * k], w[2 * k + 1]]).to_f32();
                sum += f64::from(x * y);
            }
            sum as f32
        }

        /// An f16 (or, with `bf`, bf16) row against `P` activation rows as tinyBLAS computes each:
        /// one 8-lane FMA accumulator per output over the whole row, then its horizontal sum.
        ///
        /// # Safety
        /// Needs AVX2, FMA and F16C; `w` holds a multiple of 8 values, each activation row as many.
        #[target_feature(enable = $f16c)]
        pub unsafe fn half_tiny<const P: usize>(bf: bool, w: &[u8], acts: [&[f32]; P]) -> [f32; P] {
            let n = w.len() / 2;
            let mut acc = [_mm256_setzero_ps(); P];
            for g in (0..n).step_by(8) {
                // SAFETY: g + 8 <= n values in the row and in each activation row.
                let x = unsafe {
                    let p = w.as_ptr().add(2 * g);
                    if bf {
                        bf16x8(p)
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
                    }
                };
                for (acc, a) in acc.iter_mut().zip(&acts) {
                    // SAFETY: as above.
                    let y = unsafe { _mm256_loadu_ps(a.as_ptr().add(g)) };
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
            }
            let mut out = [0f32; P];
            for (o, v) in out.iter_mut().zip(acc) {
                let mut l = [0f32; 8];
                // SAFETY: eight f32 fit.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
                *o = crate::ggml_math::hsum8(&l);
            }
            out
        }

        /// `R` f16 (or bf16) rows against `P` activation rows, each output exactly `half_tiny`'s
        /// (its own 8-lane FMA chain over the row, then the horizontal sum): each activation
        /// chunk loaded once for the `R` rows.
        ///
        /// # Safety
        /// Needs AVX2, FMA and F16C; every row holds a multiple of 8 values, each activation
        /// row as many.
        #[target_feature(enable = $f16c)]
        #[allow(dead_code)] // each build uses the width its registers allow
        #[allow(clippy::needless_range_loop)] // row r, activation j and their accumulator
        pub unsafe fn half_tiny_rows<const R: usize, const P: usize>(
            bf: bool,
            ws: [&[u8]; R],
            acts: [&[f32]; P],
        ) -> [[f32; P]; R] {
            let n = ws[0].len() / 2;
            let mut acc = [[_mm256_setzero_ps(); P]; R];
            for g in (0..n).step_by(8) {
                // SAFETY: g + 8 <= n values in every row and activation row.
                let x: [__m256; R] = std::array::from_fn(|r| unsafe {
                    let p = ws[r].as_ptr().add(2 * g);
                    if bf {
                        bf16x8(p)
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
                    }
                });
                for (j, a) in acts.iter().enumerate() {
                    // SAFETY: as above.
                    let y = unsafe { _mm256_loadu_ps(a.as_ptr().add(g)) };
                    for r in 0..R {
                        acc[r][j] = _mm256_fmadd_ps(x[r], y, acc[r][j]);
                    }
                }
            }
            // By index, the accumulators' values: iterating references to them made the
            // compiler keep the array in memory and store every FMA's result.
            let mut out = [[0f32; P]; R];
            for r in 0..R {
                for j in 0..P {
                    let mut l = [0f32; 8];
                    // SAFETY: eight f32 fit.
                    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc[r][j]) };
                    out[r][j] = crate::ggml_math::hsum8(&l);
                }
            }
            out
        }

        /// `R` weight rows against `A` activation rows at once: each weight block is unpacked
        /// once for the `A` activations and each activation block loaded once for the `R` rows, and
        /// the `R × A` accumulators are independent chains (one block-ordered FMA chain per
        /// output, as in `dot32`, so each result is bit for bit the single product's).
        ///
        /// # Safety
        /// Needs AVX2 and FMA; every row holds whole blocks of type `T` matching every activation
        /// row.
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        #[target_feature(enable = $fma)]
        #[allow(clippy::needless_range_loop)] // block b of every row and activation in lockstep
        pub unsafe fn tile32<const T: u8, const R: usize, const A: usize>(
            ws: [&Row<'_>; R],
            acts: [&[ABlock]; A],
        ) -> [[f32; A]; R] {
            let kb = kept32(T);
            let mut acc = [[_mm256_setzero_ps(); A]; R];
            let mut summs = [[0f32; A]; R];
            let nb = acts[0].len();
            // With VNNI, the signed types put the activations on `vpdpbusd`'s unsigned side as
            // y + 128 and start each sum at -128 Σx (per lane, once per weight block): one
            // instruction per product instead of moving signs, and the same exact integers.
            let flip = _mm256_set1_epi8(0x80u8 as i8);
            for b in 0..nb {
                let mut y = [_mm256_setzero_si256(); A];
                let mut da = [_mm256_setzero_ps(); A];
                for j in 0..A {
                    // SAFETY: an activation block has 32 bytes.
                    y[j] = unsafe { _mm256_loadu_si256(acts[j][b].q.as_ptr().cast()) };
                    if VNNI && !has_min(T) {
                        y[j] = _mm256_xor_si256(y[j], flip);
                    }
                    da[j] = _mm256_set1_ps(acts[j][b].d);
                }
                for r in 0..R {
                    let w = ws[r];
                    // SAFETY: the block has kb bytes.
                    let x = unsafe { unpack32::<T>(&w.q[b * kb..(b + 1) * kb]) };
                    let dw = _mm256_set1_ps(w.d[b]);
                    let start = if VNNI && !has_min(T) {
                        // SAFETY: VNNI is only set where AVX512-VNNI/VL are enabled here.
                        let c = unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, x) };
                        _mm256_sub_epi32(_mm256_setzero_si256(), c)
                    } else {
                        _mm256_setzero_si256()
                    };
                    for j in 0..A {
                        if has_min(T) {
                            summs[r][j] += w.m[b] * acts[j][b].s;
                        }
                        let p = if VNNI {
                            // SAFETY: as above.
                            _mm256_cvtepi32_ps(unsafe {
                                if has_min(T) {
                                    _mm256_dpbusd_epi32(start, x, y[j])
                                } else {
                                    _mm256_dpbusd_epi32(start, y[j], x)
                                }
                            })
                        } else {
                            // SAFETY: AVX2/FMA are enabled for this function.
                            unsafe { block_sum::<T>(x, y[j]) }
                        };
                        // d_w · d_a rounded to f32 as ggml's scalar product is.
                        acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da[j]), p, acc[r][j]);
                    }
                }
            }
            let mut out = [[0f32; A]; R];
            for r in 0..R {
                for j in 0..A {
                    // SAFETY: as above.
                    out[r][j] = unsafe { hsum(acc[r][j]) } + summs[r][j];
                }
            }
            out
        }

        /// One row against eight activation rows, as `tile32` computes each product (the same
        /// operations in the same order, so the same bits), for AVX2 without VNNI: each
        /// activation block is loaded where it is used, so the eight accumulators, the weight
        /// block and its absolute value fit in the 16 registers (`tile32` with two rows and
        /// four activation rows keeps those in registers and spills accumulators, whose FMA
        /// chains then wait on memory).
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds whole blocks of type `T`, as many as every activation.
        #[target_feature(enable = $fma)]
        #[allow(dead_code)] // the AVX-512 build takes its wider tiles instead
        #[allow(clippy::needless_range_loop)] // activation j and its accumulator in lockstep
        pub unsafe fn tile32_row8<const T: u8>(w: &Row<'_>, acts: [&[ABlock]; 8]) -> [f32; 8] {
            let kb = kept32(T);
            let nb = acts[0].len();
            debug_assert!(acts.iter().all(|a| a.len() == nb) && w.q.len() >= nb * kb);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut summs = [0f32; 8];
            for b in 0..nb {
                // SAFETY: the block has kb bytes.
                let x = unsafe { unpack32::<T>(w.q.get_unchecked(b * kb..(b + 1) * kb)) };
                let dw = w.d[b];
                for j in 0..8 {
                    // SAFETY: every activation row has nb blocks (checked above).
                    let a = unsafe { acts[j].get_unchecked(b) };
                    if has_min(T) {
                        summs[j] += w.m[b] * a.s;
                    }
                    // SAFETY: an activation block has 32 bytes; AVX2/FMA are enabled.
                    let p = unsafe { block_sum::<T>(x, _mm256_loadu_si256(a.q.as_ptr().cast())) };
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), p, acc[j]);
                }
            }
            let mut out = [0f32; 8];
            for j in 0..8 {
                // SAFETY: as above.
                out[j] = unsafe { hsum(acc[j]) } + summs[j];
            }
            out
        }

        /// One group of 8 interleaved rows (see `Grouped`) against `A` activation rows: `out`
        /// gets, per activation, the 8 rows' products. Q4_0/Q4_1: the nibbles unpacked once per
        /// block for all activations, products summed in 16 bits within a block (at most
        /// 8 · 2 · 15 · 128), then widened; Q4_0's offset of 8 taken off as `8 Σ a` per block.
        /// Q8_0: signs moved onto the activations (`maddubs` needs one unsigned side), summed in
        /// 32 bits.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `gq`, `gd`, `gm` hold one group's blocks of type `code`, and every
        /// activation row as many blocks.
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        #[target_feature(enable = $fma)]
        #[allow(clippy::needless_range_loop)] // activation a of every array in lockstep
        pub unsafe fn group32<const A: usize>(
            code: u8,
            gq: &[u8],
            gd: &[f32],
            gm: &[f32],
            acts: &[Vec<ABlock>],
            sums: &[Vec<i32>],
            out: &mut [f32],
        ) {
            let nb = gd.len() / 8;
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(0x80u8 as i8);
            let mask = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); A];
            let word = |q: &[i8; QK], at: usize| -> i32 {
                i32::from_le_bytes([
                    q[at] as u8,
                    q[at + 1] as u8,
                    q[at + 2] as u8,
                    q[at + 3] as u8,
                ])
            };
            for b in 0..nb {
                let mut s32 = [_mm256_setzero_si256(); A];
                if code == T8_0 {
                    let mut corr = _mm256_setzero_si256();
                    for j in 0..8 {
                        let at = gq[(b * 8 + j) * 32..].as_ptr();
                        // SAFETY: a Q8_0 block of a group is 8 chunks of 32 bytes.
                        let p = unsafe { _mm256_loadu_si256(at.cast()) };
                        if VNNI {
                            // Activations on the unsigned side as x + 128; the 128 · Σ p it
                            // adds is taken off once per block below.
                            for a in 0..A {
                                let x = word(&acts[a][b].q, 4 * j) ^ 0x8080_8080u32 as i32;
                                let (s, xv) = (s32[a], _mm256_set1_epi32(x));
                                // SAFETY: VNNI is only set where AVX512-VNNI/VL are enabled.
                                s32[a] = unsafe { _mm256_dpbusd_epi32(s, xv, p) };
                            }
                            // SAFETY: as above.
                            corr = unsafe { _mm256_dpbusd_epi32(corr, flip, p) };
                            continue;
                        }
                        let ap = _mm256_sign_epi8(p, p);
                        for a in 0..A {
                            let x = _mm256_set1_epi32(word(&acts[a][b].q, 4 * j));
                            let y = _mm256_sign_epi8(x, p);
                            s32[a] = _mm256_add_epi32(
                                s32[a],
                                _mm256_madd_epi16(_mm256_maddubs_epi16(ap, y), ones),
                            );
                        }
                    }
                    if VNNI {
                        for a in 0..A {
                            s32[a] = _mm256_sub_epi32(s32[a], corr);
                        }
                    }
                } else if VNNI {
                    for j in 0..4 {
                        let at = gq[(b * 4 + j) * 32..].as_ptr();
                        // SAFETY: a Q4 block of a group is 4 chunks of 32 bytes.
                        let p = unsafe { _mm256_loadu_si256(at.cast()) };
                        let lo = _mm256_and_si256(p, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), mask);
                        for a in 0..A {
                            let q = &acts[a][b].q;
                            let x0 = _mm256_set1_epi32(word(q, 4 * j));
                            let x1 = _mm256_set1_epi32(word(q, 16 + 4 * j));
                            // SAFETY: VNNI is only set where AVX512-VNNI/VL are enabled.
                            s32[a] = unsafe {
                                _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s32[a], lo, x0), hi, x1)
                            };
                        }
                    }
                    if code == T4_0 {
                        for a in 0..A {
                            s32[a] = _mm256_sub_epi32(s32[a], _mm256_set1_epi32(8 * sums[a][b]));
                        }
                    }
                } else {
                    let mut s16 = [_mm256_setzero_si256(); A];
                    for j in 0..4 {
                        let at = gq[(b * 4 + j) * 32..].as_ptr();
                        // SAFETY: a Q4 block of a group is 4 chunks of 32 bytes.
                        let p = unsafe { _mm256_loadu_si256(at.cast()) };
                        let lo = _mm256_and_si256(p, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), mask);
                        for a in 0..A {
                            let q = &acts[a][b].q;
                            let x0 = _mm256_set1_epi32(word(q, 4 * j));
                            let x1 = _mm256_set1_epi32(word(q, 16 + 4 * j));
                            s16[a] = _mm256_add_epi16(
                                s16[a],
                                _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, x0),
                                    _mm256_maddubs_epi16(hi, x1),
                                ),
                            );
                        }
                    }
                    for a in 0..A {
                        s32[a] = _mm256_madd_epi16(s16[a], ones);
                        if code == T4_0 {
                            s32[a] = _mm256_sub_epi32(s32[a], _mm256_set1_epi32(8 * sums[a][b]));
                        }
                    }
                }
                // SAFETY: 8 scales (and mins) per block of the group.
                let dv = unsafe { _mm256_loadu_ps(gd[b * 8..].as_ptr()) };
                for a in 0..A {
                    let ab = &acts[a][b];
                    acc[a] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(s32[a]),
                        _mm256_mul_ps(dv, _mm256_set1_ps(ab.d)),
                        acc[a],
                    );
                    if code == T4_1 {
                        // SAFETY: as above.
                        let mv = unsafe { _mm256_loadu_ps(gm[b * 8..].as_ptr()) };
                        acc[a] = _mm256_fmadd_ps(mv, _mm256_set1_ps(ab.s), acc[a]);
                    }
                }
            }
            for a in 0..A {
                // SAFETY: out holds 8 values per activation.
                unsafe { _mm256_storeu_ps(out[a * 8..].as_mut_ptr(), acc[a]) };
            }
        }

        /// One super-block's scaled integer sums against activation block `y`, in ggml's 8 AVX2
        /// lanes (its `vec_dot_*_q8_K` lane contents; integer sums, so any order of adding gives
        /// the same lanes): Σ scale · maddubs(values, q8) per chunk, less Q6_K's offset of 32 as
        /// `32 · Σ scale · bsum` per lane pair. `T`: 0 Q4_K, 1 Q5_K, 2 Q6_K.
        ///
        /// # Safety
        /// Needs AVX2; `blk` holds the type's kept bytes for one super-block.
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        #[target_feature(enable = $fma)]
        #[inline]
        unsafe fn lanes<const T: u8>(
            v: &[__m256i; 8],
            sc: &[__m256i; 8],
            blk: &[u8],
            y: &KBlock,
        ) -> __m256i {
            let mut sumi = _mm256_setzero_si256();
            for c in 0..8 {
                // SAFETY: y.q has 256 bytes.
                let q8 = unsafe { _mm256_loadu_si256(y.q[32 * c..].as_ptr().cast()) };
                let p16 = _mm256_maddubs_epi16(v[c], q8);
                sumi = if VNNI {
                    // SAFETY: as in `mul_sum_us8`; the same wrapping i32 sums as madd then add.
                    unsafe { _mm256_dpwssd_epi32(sumi, sc[c], p16) }
                } else {
                    _mm256_add_epi32(sumi, _mm256_madd_epi16(sc[c], p16))
                };
            }
            if T == 2 {
                // SAFETY: y.bsums has 16 i16, blk[192..208] the 16 scales.
                let (q8sums, sc16) = unsafe {
                    (
                        _mm256_loadu_si256(y.bsums.as_ptr().cast()),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(blk[192..].as_ptr().cast())),
                    )
                };
                sumi = _mm256_sub_epi32(
                    sumi,
                    _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, sc16)),
                );
            }
            sumi
        }

        /// A K-type row against Q8_K activations in ggml's one-row order (`ggml_vec_dot_q4_K_q8_K`,
        /// `_q5_K_`, `_q6_K_` for AVX2): per super-block the lanes converted and FMA'd with
        /// `d_a * d_w`; the min terms (Q4_K, Q5_K) a 4-lane FMA chain (Q4_K) or a scalar FMA'd sum
        /// (Q5_K), as there.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds whole super-blocks of the type matching `a`.
        #[target_feature(enable = $fma)]
        pub unsafe fn dot_k<const T: u8>(w: &Row<'_>, a: &[KBlock]) -> f32 {
            let kb = [144, 176, 208][T as usize];
            let mut acc = _mm256_setzero_ps();
            let mut acc_m = _mm_setzero_ps();
            let mut summs = 0f32;
            for (i, y) in a.iter().enumerate() {
                let blk = &w.q[i * kb..(i + 1) * kb];
                // SAFETY: blk holds one super-block (the layouts of `QMat::new`), y one activation
                // block; AVX2/FMA are enabled here.
                unsafe {
                    let (v, sc) = unpack_k::<T>(blk);
                    let sumi = lanes::<T>(&v, &sc, blk, y);
                    acc = _mm256_fmadd_ps(
                        _mm256_set1_ps(y.d * w.d[i]),
                        _mm256_cvtepi32_ps(sumi),
                        acc,
                    );
                    if T < 2 {
                        let dmin = -y.d * w.m[i];
                        let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(blk[8..].as_ptr().cast()));
                        let q8sums = _mm256_loadu_si256(y.bsums.as_ptr().cast());
                        let q8s = _mm_hadd_epi16(
                            _mm256_castsi256_si128(q8sums),
                            _mm256_extracti128_si256::<1>(q8sums),
                        );
                        let prod = _mm_madd_epi16(mins, q8s);
                        if T == 1 {
                            summs = dmin.mul_add(hsum_i32(prod, _mm_setzero_si128()) as f32, summs);
                        } else {
                            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
                        }
                    }
                }
            }
            acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
            acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
            // SAFETY: AVX2/FMA are enabled for this function.
            let h = unsafe { hsum(acc) };
            match T {
                0 => h + _mm_cvtss_f32(acc_m),
                1 => h + summs,
                _ => h,
            }
        }

        /// One K super-block's 256 values as 8 chunks of 32 unsigned bytes in element order, with
        /// each chunk's scales as 16 i16 lanes (Q4_K/Q5_K: one scale per chunk; Q6_K: one per 16
        /// values, whose offset of 32 the caller takes off with the bsums). `T`: 0 Q4_K, 1 Q5_K,
        /// 2 Q6_K.
        ///
        /// # Safety
        /// Needs AVX2; `blk` holds the type's kept bytes for one super-block.
        #[target_feature(enable = $fma)]
        #[inline]
        unsafe fn unpack_k<const T: u8>(blk: &[u8]) -> ([__m256i; 8], [__m256i; 8]) {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut v = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            // SAFETY: every load reads 32 bytes inside blk (the layouts of `QMat::new`).
            unsafe {
                if T < 2 {
                    let qs_at = if T == 1 { 48 } else { 16 };
                    let hbits = if T == 1 {
                        _mm256_loadu_si256(blk[16..].as_ptr().cast())
                    } else {
                        _mm256_setzero_si256()
                    };
                    let sixteen = _mm256_set1_epi8(16);
                    for j in 0..4 {
                        let bits = _mm256_loadu_si256(blk[qs_at + 32 * j..].as_ptr().cast());
                        let mut lo = _mm256_and_si256(bits, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                        if T == 1 {
                            let bl = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
                            let bh = _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8);
                            let hl = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl);
                            let hh = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh);
                            lo = _mm256_add_epi8(lo, _mm256_and_si256(hl, sixteen));
                            hi = _mm256_add_epi8(hi, _mm256_and_si256(hh, sixteen));
                        }
                        v[2 * j] = lo;
                        v[2 * j + 1] = hi;
                        sc[2 * j] = _mm256_set1_epi16(i16::from(blk[2 * j]));
                        sc[2 * j + 1] = _mm256_set1_epi16(i16::from(blk[2 * j + 1]));
                    }
                } else {
                    let m15 = _mm256_set1_epi8(15);
                    let scales = &blk[192..208];
                    for j in 0..2 {
                        let b1 = _mm256_loadu_si256(blk[64 * j..].as_ptr().cast());
                        let b2 = _mm256_loadu_si256(blk[64 * j + 32..].as_ptr().cast());
                        let bh = _mm256_loadu_si256(blk[128 + 32 * j..].as_ptr().cast());
                        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, _mm256_set1_epi8(3)));
                        let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(12)));
                        let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                        let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(
                            bh,
                            _mm256_set1_epi8(0xc0u8 as i8),
                        ));
                        v[4 * j] = _mm256_or_si256(_mm256_and_si256(b1, m15), h0);
                        v[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(b2, m15), h1);
                        v[4 * j + 2] =
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m15), h2);
                        v[4 * j + 3] =
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m15), h3);
                        for k in 0..4 {
                            let s = 8 * j + 2 * k;
                            sc[4 * j + k] = _mm256_set_m128i(
                                _mm_set1_epi16(i16::from(scales[s + 1] as i8)),
                                _mm_set1_epi16(i16::from(scales[s] as i8)),
                            );
                        }
                    }
                }
            }
            (v, sc)
        }

        /// A K-type row against `A` activation rows in ggml's tiled (many-row) order (see
        /// `super::dot_k`): per super-block the weight values are unpacked once, the exact integer
        /// sums `s1` (and, for Q4_K/Q5_K, the min term `s2`) formed for each activation row, then
        /// `acc = (d_w · s1 − dmin · s2) · d_a + acc`, fused as ggml's AVX2 build fuses them.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds whole super-blocks of the type matching every activation
        /// row.
        #[target_feature(enable = $fma)]
        #[allow(clippy::needless_range_loop)] // super-block i of the row and every activation row
        pub unsafe fn tile_k<const T: u8, const A: usize>(
            w: &Row<'_>,
            acts: [&[KBlock]; A],
        ) -> [f32; A] {
            let kb = [144, 176, 208][T as usize];
            let mut out = [0f32; A];
            for i in 0..acts[0].len() {
                let blk = &w.q[i * kb..(i + 1) * kb];
                // SAFETY: blk holds one super-block; AVX2/FMA are enabled here.
                let (v, sc) = unsafe { unpack_k::<T>(blk) };
                for (j, a) in acts.iter().enumerate() {
                    let y = &a[i];
                    // SAFETY: as above; y is one activation block.
                    let s1 = unsafe {
                        let sumi = lanes::<T>(&v, &sc, blk, y);
                        hsum_i32(
                            _mm256_castsi256_si128(sumi),
                            _mm256_extracti128_si256::<1>(sumi),
                        )
                    };
                    if T == 2 {
                        out[j] = (w.d[i] * s1 as f32).mul_add(y.d, out[j]);
                    } else {
                        // Σ min_g · (bsums_2g + bsums_2g+1) over the 8 groups, in registers
                        // (each pair sum at most 32 · 128: no i16 overflow).
                        // SAFETY: blk[8..16] are the 8 mins, y.bsums 16 i16; AVX2 is enabled.
                        let s2 = unsafe {
                            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(blk[8..].as_ptr().cast()));
                            let q8sums = _mm256_loadu_si256(y.bsums.as_ptr().cast());
                            let q8s = _mm_hadd_epi16(
                                _mm256_castsi256_si128(q8sums),
                                _mm256_extracti128_si256::<1>(q8sums),
                            );
                            hsum_i32(_mm_madd_epi16(mins, q8s), _mm_setzero_si128())
                        };
                        let res = (-w.m[i]).mul_add(s2 as f32, w.d[i] * s1 as f32);
                        out[j] = res.mul_add(y.d, out[j]);
                    }
                }
            }
            out
        }

        /// `tile_k` for eight activation rows at once, to the bit: the weight values unpacked
        /// once per super-block for all eight; the integer sums (exact in any order) reduced for
        /// the eight rows together, the min (Q4_K/Q5_K) or `-32·Σ scale·bsum` (Q6_K) terms taken
        /// as pair products against the tile's prepared sums, and the float steps done in the
        /// eight lanes with `tile_k`'s operations in its order.
        ///
        /// # Safety
        /// Needs AVX2 and FMA; `w` holds whole super-blocks of K type `T`, as many as `t`.
        #[target_feature(enable = $fma)]
        #[allow(unused_unsafe)] // needed where VNNI is not enabled (the dead branch)
        pub unsafe fn tile_k8<const T: u8>(w: &Row<'_>, t: &super::KTile8) -> [f32; 8] {
            let kb = [144, 176, 208][T as usize];
            let mut out = _mm256_setzero_ps();
            let dot2 = |acc: __m256i, a: __m256i, b: __m256i| {
                if VNNI {
                    // SAFETY: VNNI is enabled in this build of the kernels.
                    unsafe { _mm256_dpwssd_epi32(acc, a, b) }
                } else {
                    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
                }
            };
            for i in 0..t.d.len() {
                let blk = &w.q[i * kb..(i + 1) * kb];
                // SAFETY: blk holds one super-block; AVX2/FMA are enabled here.
                let (v, sc) = unsafe { unpack_k::<T>(blk) };
                let qa = &t.q[i];
                let mut acc = [_mm256_setzero_si256(); 8];
                for c in 0..8 {
                    for j in 0..8 {
                        let at = qa[(c * 8 + j) * 32..].as_ptr();
                        // SAFETY: qa has 8 × 8 chunks of 32 bytes.
                        let q8 = unsafe { _mm256_loadu_si256(at.cast()) };
                        acc[j] = dot2(acc[j], sc[c], _mm256_maddubs_epi16(v[c], q8));
                    }
                }
                // The eight rows' lane sums side by side.
                let t01 = _mm256_hadd_epi32(acc[0], acc[1]);
                let t23 = _mm256_hadd_epi32(acc[2], acc[3]);
                let t45 = _mm256_hadd_epi32(acc[4], acc[5]);
                let t67 = _mm256_hadd_epi32(acc[6], acc[7]);
                let u0 = _mm256_hadd_epi32(t01, t23);
                let u1 = _mm256_hadd_epi32(t45, t67);
                let mut s1 = _mm256_add_epi32(
                    _mm256_permute2x128_si256::<0x20>(u0, u1),
                    _mm256_permute2x128_si256::<0x31>(u0, u1),
                );
                // A pair of i16 as one i32, broadcast.
                let pair = |lo: i16, hi: i16| {
                    _mm256_set1_epi32((u32::from(lo as u16) | (u32::from(hi as u16) << 16)) as i32)
                };
                let load = |v: &[i32; 8]| {
                    // SAFETY: the prepared sums are 8 i32 each.
                    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
                };
                let dw = _mm256_set1_ps(w.d[i]);
                // SAFETY: the tile has 8 scales per super-block.
                let yd = unsafe { _mm256_loadu_ps(t.d[i].as_ptr()) };
                if T == 2 {
                    let scales = &blk[192..208];
                    let mut corr = _mm256_setzero_si256();
                    for k in 0..8 {
                        let p = pair(
                            i16::from(scales[2 * k] as i8),
                            i16::from(scales[2 * k + 1] as i8),
                        );
                        corr = dot2(corr, p, load(&t.bs[i][k]));
                    }
                    s1 = _mm256_sub_epi32(s1, _mm256_slli_epi32::<5>(corr));
                    let p = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(s1));
                    out = _mm256_fmadd_ps(p, yd, out);
                } else {
                    let mut s2 = _mm256_setzero_si256();
                    for k in 0..4 {
                        let p = pair(i16::from(blk[8 + 2 * k]), i16::from(blk[9 + 2 * k]));
                        s2 = dot2(s2, p, load(&t.gs[i][k]));
                    }
                    let p = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(s1));
                    let res = _mm256_fmadd_ps(_mm256_set1_ps(-w.m[i]), _mm256_cvtepi32_ps(s2), p);
                    out = _mm256_fmadd_ps(res, yd, out);
                }
            }
            let mut r = [0f32; 8];
            // SAFETY: r holds 8 floats.
            unsafe { _mm256_storeu_ps(r.as_mut_ptr(), out) };
            r
        }
    };
}

/// ggml's AVX2 kernels (AVX2, FMA, F16C).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    x86_kernels!("avx2,fma", "avx2,fma,f16c", false);
}

/// The same kernels where the CPU has AVX-512 F/BW/VL and VNNI (see `x86_kernels`).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    x86_kernels!(
        "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni",
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true
    );
}

/// AVX-512's 512-bit registers for the many-row block-32 products: two activation rows per
/// register (one per 256-bit half), so each instruction does two of `tile32`'s products. Each
/// half computes exactly the lanes `tile32` computes for its activation row (the same integers,
/// the same float operations in the same order), so the results are `tile32`'s bits.
#[cfg(target_arch = "x86_64")]
mod avx512_wide {
    use super::avx512::{hsum, unpack32};
    use super::{has_min, kept32, ABlock, ATile8, Row, T5_0, T8_0};
    use std::arch::x86_64::*;

    /// Two 256-bit halves as one register.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn join(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// `R` rows of type `T` against 8 activation rows (`tile32`'s products, two per register).
    ///
    /// # Safety
    /// Needs AVX2, FMA and AVX-512 F/BW/VL/VNNI; the rows hold whole blocks of type `T`, as
    /// many as every activation row.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // block b of every row and activation in lockstep
    pub unsafe fn tile32x8<const T: u8, const R: usize>(
        ws: [&Row<'_>; R],
        acts: [&[ABlock]; 8],
    ) -> [[f32; 8]; R] {
        let kb = kept32(T);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut summs = [[0f32; 8]; R];
        let flip = _mm512_set1_epi8(0x80u8 as i8);
        let nb = acts[0].len();
        for b in 0..nb {
            let mut y = [_mm512_setzero_si512(); 4];
            let mut da = [_mm512_setzero_ps(); 4];
            for p in 0..4 {
                let (a0, a1) = (&acts[2 * p][b], &acts[2 * p + 1][b]);
                // SAFETY: an activation block has 32 bytes.
                let (lo, hi) = unsafe {
                    (
                        _mm256_loadu_si256(a0.q.as_ptr().cast()),
                        _mm256_loadu_si256(a1.q.as_ptr().cast()),
                    )
                };
                y[p] = join(lo, hi);
                if !has_min(T) {
                    // y + 128 on vpdpbusd's unsigned side (see `tile32`).
                    y[p] = _mm512_xor_si512(y[p], flip);
                }
                da[p] = _mm512_castsi512_ps(join(
                    _mm256_castps_si256(_mm256_set1_ps(a0.d)),
                    _mm256_castps_si256(_mm256_set1_ps(a1.d)),
                ));
            }
            for r in 0..R {
                let w = ws[r];
                // The same block `R` rows on (the next tile's rows lie right after these): a
                // hint only, which the CPU drops past the mapping's end.
                _mm_prefetch::<_MM_HINT_T0>(
                    w.q.as_ptr().wrapping_add(b * kb + R * w.q.len()).cast(),
                );
                // SAFETY: the block has kb bytes.
                let x1 = unsafe { unpack32::<T>(&w.q[b * kb..(b + 1) * kb]) };
                let x = _mm512_broadcast_i64x4(x1);
                let dw = _mm512_set1_ps(w.d[b]);
                let start = if has_min(T) {
                    _mm512_setzero_si512()
                } else {
                    let c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, x);
                    _mm512_sub_epi32(_mm512_setzero_si512(), c)
                };
                for p in 0..4 {
                    if has_min(T) {
                        summs[r][2 * p] += w.m[b] * acts[2 * p][b].s;
                        summs[r][2 * p + 1] += w.m[b] * acts[2 * p + 1][b].s;
                    }
                    let s = if has_min(T) {
                        _mm512_dpbusd_epi32(start, x, y[p])
                    } else {
                        _mm512_dpbusd_epi32(start, y[p], x)
                    };
                    let scale = _mm512_mul_ps(dw, da[p]);
                    acc[r][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r][p]);
                }
            }
        }
        // SAFETY: the same features are enabled here.
        unsafe { finish(acc, &summs) }
    }

    /// The results of the 8-row tiles' accumulators: each 256-bit half's lanes summed as
    /// `tile32` sums them, plus the min terms.
    ///
    /// # Safety
    /// Needs AVX2, FMA and AVX-512 F.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // row r, pair p and their accumulator
    unsafe fn finish<const R: usize>(
        acc: [[__m512; 4]; R],
        summs: &[[f32; 8]; R],
    ) -> [[f32; 8]; R] {
        let mut out = [[0f32; 8]; R];
        for r in 0..R {
            for p in 0..4 {
                let v = acc[r][p];
                let lo = _mm512_castps512_ps256(v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                // SAFETY: AVX2/FMA are enabled here.
                unsafe {
                    out[r][2 * p] = hsum(lo) + summs[r][2 * p];
                    out[r][2 * p + 1] = hsum(hi) + summs[r][2 * p + 1];
                }
            }
        }
        out
    }

    /// A signed type's block as `vpdpbusd`'s unsigned side: `x + K` (`ATile8::offset_slot`),
    /// which is the stored nibbles (Q4_0), the nibbles with the high bit as 16 (Q5_0), or the
    /// byte with its sign bit flipped (Q8_0).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn unpack32u<const T: u8>(q: &[u8]) -> __m256i {
        if T == T8_0 {
            // SAFETY: q has 32 bytes.
            let x = unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
            return _mm256_xor_si256(x, _mm256_set1_epi8(0x80u8 as i8));
        }
        let nib = if T == T5_0 { &q[4..20] } else { &q[..16] };
        // SAFETY: nib has 16 bytes.
        let lo = unsafe { _mm_loadu_si128(nib.as_ptr().cast()) };
        let x = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo),
            _mm256_set1_epi8(0x0f),
        );
        if T == T5_0 {
            let bits = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
            return _mm256_mask_add_epi8(x, bits, x, _mm256_set1_epi8(16));
        }
        x
    }

    /// `tile32x8` for the signed types (Q4_0, Q5_0, Q8_0) against a prepared tile, to the bit:
    /// the weights on `vpdpbusd`'s unsigned side as `x + K` and each lane started at `-K` times
    /// its four activation bytes' sum (the same exact integers as `tile32`'s), the activation
    /// pairs and their scales read ready-made. No per-row start product, no joins, and the
    /// sixteen accumulators stay in registers.
    ///
    /// # Safety
    /// Needs AVX2, FMA and AVX-512 F/BW/VL/VNNI; the rows hold whole blocks of type `T`, as
    /// many as the tile; the tile has type `T`'s starts.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // block b of every row and of the tile in lockstep
    pub unsafe fn tile32x8s<const T: u8, const R: usize>(
        ws: [&Row<'_>; R],
        t: &ATile8,
    ) -> [[f32; 8]; R] {
        let kb = kept32(T);
        let start = &t.start[ATile8::offset_slot(T).0];
        debug_assert_eq!(start.len(), t.y.len());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for b in 0..t.y.len() {
            // SAFETY: each is 64 aligned bytes.
            let y: [__m512i; 4] =
                std::array::from_fn(|p| unsafe { _mm512_load_si512(t.y[b][p].0.as_ptr().cast()) });
            for r in 0..R {
                let w = ws[r];
                // The same block `R` rows on, as in `tile32x8`.
                _mm_prefetch::<_MM_HINT_T0>(
                    w.q.as_ptr().wrapping_add(b * kb + R * w.q.len()).cast(),
                );
                // SAFETY: the block has kb bytes.
                let x =
                    _mm512_broadcast_i64x4(unsafe { unpack32u::<T>(&w.q[b * kb..(b + 1) * kb]) });
                let dw = _mm512_set1_ps(w.d[b]);
                for p in 0..4 {
                    // SAFETY: 64 aligned bytes each.
                    let (s0, da) = unsafe {
                        (
                            _mm512_load_si512(start[b][p].0.as_ptr().cast()),
                            _mm512_load_ps(t.d[b][p].0.as_ptr()),
                        )
                    };
                    let s = _mm512_dpbusd_epi32(s0, x, y[p]);
                    let scale = _mm512_mul_ps(dw, da);
                    acc[r][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r][p]);
                }
            }
        }
        // SAFETY: the same features are enabled here. Zero min terms added as `tile32x8` adds
        // them for these types (a sum of -0.0 comes out as +0.0 there too).
        unsafe { finish(acc, &[[0.0; 8]; R]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The f16 and bf16 products with AVX2 are the portable ones to the bit, for lengths that
    /// are and are not whole steps of 32 (ggml's leftovers in double) and for one activation
    /// row (vec_dot) and several (tinyBLAS).
    #[test]
    fn f16_and_bf16_products_agree_with_the_portable_path() {
        if !has_avx2() {
            return; // nothing to compare on this CPU: the portable path is the only one
        }
        // Nine rows: the AVX2 build's pairs and the AVX-512 build's fours, and one left over.
        const ROWS: usize = 9;
        for cols in [64usize, 96, 77, 8] {
            let vals: Vec<f32> = (0..cols * ROWS)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 97.0)
                .collect();
            let acts: Vec<Vec<f32>> = (0..9)
                .map(|k| {
                    (0..cols)
                        .map(|i| ((i * (k + 3) * 31 % 211) as f32 - 100.0) / 13.0)
                        .collect()
                })
                .collect();
            for wtype in [WType::F16, WType::BF16] {
                let bytes: Vec<u8> = vals
                    .iter()
                    .flat_map(|v| match wtype {
                        WType::F16 => half::f16::from_f32(*v).to_le_bytes(),
                        _ => half::bf16::from_f32(*v).to_le_bytes(),
                    })
                    .collect();
                let m = QMat::new(wtype, ROWS, cols, &bytes).unwrap();
                let round = |v: &f32| match wtype {
                    WType::F16 => half::f16::from_f32(*v).to_f32(),
                    _ => half::bf16::from_f32(*v).to_f32(),
                };
                for n in [1usize, 5, 9] {
                    let a: Vec<Vec<f32>> = acts[..n]
                        .iter()
                        .map(|r| r.iter().map(round).collect())
                        .collect();
                    let mut fast = vec![0f32; ROWS * n];
                    let mut portable = vec![0f32; ROWS * n];
                    rows_half(kernel_isa(), &m, 0, &mut fast, &a);
                    // the portable path, as a CPU without AVX2 takes it
                    for (j, o) in portable.chunks_mut(n).enumerate() {
                        let w = m.row_f32(j);
                        let tiny = cols % 8 == 0 && n >= 2;
                        for (o, x) in o.iter_mut().zip(&a) {
                            *o = crate::ggml_math::with_fma(|| {
                                use crate::ggml_math::{dot, Order};
                                if tiny {
                                    dot(&w, x, Order::TinyBlas)
                                } else if wtype == WType::BF16 {
                                    bf16_vec_dot(&w, x)
                                } else {
                                    let np = cols / 32 * 32;
                                    let mut s = f64::from(dot(&w[..np], &x[..np], Order::VecDot));
                                    for (p, q) in w[np..].iter().zip(&x[np..]) {
                                        s += f64::from(p * q);
                                    }
                                    s as f32
                                }
                            });
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&fast), bits(&portable), "{wtype:?} cols {cols} n {n}");
                }
            }
        }
    }

    const TYPES: [(GgmlDType, WType); 8] = [
        (GgmlDType::Q4_0, WType::Q4_0),
        (GgmlDType::Q4_1, WType::Q4_1),
        (GgmlDType::Q5_0, WType::Q5_0),
        (GgmlDType::Q5_1, WType::Q5_1),
        (GgmlDType::Q8_0, WType::Q8_0),
        (GgmlDType::Q4K, WType::Q4K),
        (GgmlDType::Q5K, WType::Q5K),
        (GgmlDType::Q6K, WType::Q6K),
    ];

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: usize) -> (QMat, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        // Values of both signs, with an offset so that the mins of Q4_1/Q5_1/Q4_K/Q5_K matter.
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * seed % 2003) as f32 / 1001.0 - 0.8) * 0.3)
            .collect();
        let q =
            QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &dev).unwrap(), dtype).unwrap();
        let exact = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let wtype = WType::from_ggml(dtype).unwrap();
        (
            QMat::new(wtype, rows, cols, &q.data().unwrap()).unwrap(),
            exact,
        )
    }

    /// The grouped layout (batched decoding) gives the row-major products up to float rounding.
    /// The AVX-512 build of the kernels computes AVX2's bits (`x86_kernels`): every weight
    /// type, one activation row (decoding) and many (the tiles: 1–3 leftover activation rows, 4
    /// and 2 weight rows at once, the K types' 4-row tiles), row-major and grouped. Where the CPU
    /// lacks AVX-512 VNNI there is nothing to compare and the test says so.
    #[test]
    fn avx512_kernels_give_the_avx2_bits() {
        if detected_isa() != Isa::Avx512 {
            eprintln!("this CPU has no AVX-512 VNNI: the AVX-512 kernels cannot run here");
            return;
        }
        let all = TYPES
            .iter()
            .map(|(d, _)| *d)
            .chain([GgmlDType::F16, GgmlDType::BF16]);
        // 23 rows: five 4-row tiles, a 2-row tile and a lone row; 24: whole groups of 8, so that
        // the batched products take the grouped layout (Q4_0, Q4_1, Q8_0).
        for (t, dtype) in all.enumerate() {
            for rows in [23, 24] {
                let (m, _) = quantized(dtype, rows, 512, 31 + t);
                for n in [1, 2, 3, 4, 5, 7, 8, 9, 13] {
                    let x: Vec<f32> = (0..n * 512)
                        .map(|i| ((i * 7919 + t) % 2003) as f32 / 1001.0 - 1.0)
                        .collect();
                    for batched in [false, true] {
                        let a = QMat::matmul_with(Isa::Avx2, &[&m], &x, n, batched);
                        let b = QMat::matmul_with(Isa::Avx512, &[&m], &x, n, batched);
                        let bits = |v: &[Vec<f32>]| -> Vec<u32> {
                            v[0].iter().map(|f| f.to_bits()).collect()
                        };
                        assert_eq!(
                            bits(&a),
                            bits(&b),
                            "{dtype:?} rows={rows} n={n} batched={batched}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn grouped_products_agree_with_the_row_major_ones() {
        if !has_avx2() {
            return;
        }
        let (rows, cols) = (24, 512);
        for (dtype, seed) in [
            (GgmlDType::Q4_0, 11),
            (GgmlDType::Q4_1, 13),
            (GgmlDType::Q8_0, 17),
        ] {
            let (m, _) = quantized(dtype, rows, cols, seed);
            assert!(m.groupable());
            for n in [2, 3, 4, 5, 8] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919 + seed) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let want = QMat::matmul_many(&[&m], &x, n).pop().unwrap();
                let got = QMat::matmul_many_batched(&[&m], &x, n, true).pop().unwrap();
                assert_eq!(want.len(), got.len());
                for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-6 * a.abs().max(1.0),
                        "{dtype:?} n={n} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Every type: rows dequantize as Candle (ggml's reference) does, and products match the
    /// dequantized weights within what quantizing the activations to 8 bits can move them:
    /// `Σ |w_i| * amax_block(i) / 254` (half a step of each activation) plus the f16 rounding
    /// of the activation scale.
    #[test]
    fn every_type_dequantizes_and_multiplies_like_its_dequantized_weights() {
        let (rows, cols) = (24, 512);
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0)
            .collect();
        for (dtype, wtype) in TYPES {
            let (m, exact) = quantized(dtype, rows, cols, 7919);
            assert_eq!(m.wtype, wtype);
            for (r, want) in exact.iter().enumerate() {
                let row = m.row_f32(r);
                for (a, b) in row.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{wtype:?} row {r}: {a} vs {b}"
                    );
                }
            }
            let got = m.matmul(&x, 2);
            let block = wtype.block();
            for i in 0..2 {
                let xi = &x[i * cols..(i + 1) * cols];
                for r in 0..rows {
                    let want: f32 = exact[r].iter().zip(xi).map(|(a, b)| a * b).sum();
                    let mut bound = 1e-4;
                    for (wb, xb) in exact[r].chunks(block).zip(xi.chunks(block)) {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        bound += wb.iter().map(|w| w.abs()).sum::<f32>() * amax / 254.0 * 1.01;
                        bound += 1e-3 * wb.iter().zip(xb).map(|(w, v)| (w * v).abs()).sum::<f32>();
                    }
                    let g = got[i * rows + r];
                    assert!(
                        (g - want).abs() <= bound,
                        "{wtype:?} row {r}: {g} vs {want} (bound {bound})"
                    );
                }
            }
            // The scalar and AVX2 paths quantize alike and sum the same integers.
            let acts = quantize_row(kernel_isa(), &x[..cols]);
            let scalar = quantize_row_scalar(&x[..cols]);
            for (a, b) in acts.iter().zip(&scalar) {
                assert_eq!((a.q, a.d, a.s), (b.q, b.d, b.s));
            }
            let ak = quantize_row_k(kernel_isa(), &x[..cols]);
            for r in 0..rows {
                let row = m.row(r);
                let (a, b) = if wtype.is_k() {
                    // The many-row order is one scalar chain: both paths give the same bits.
                    assert_eq!(
                        dot_k(wtype, &row, &ak, Isa::Portable, true).to_bits(),
                        dot_k(wtype, &row, &ak, kernel_isa(), true).to_bits(),
                        "{wtype:?}"
                    );
                    (
                        dot_k(wtype, &row, &ak, Isa::Portable, false),
                        dot_k(wtype, &row, &ak, kernel_isa(), false),
                    )
                } else {
                    (
                        dot32(wtype, &row, &acts, Isa::Portable),
                        dot32(wtype, &row, &acts, kernel_isa()),
                    )
                };
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "{wtype:?}: {a} vs {b}"
                );
            }
        }
    }

    /// Q8_K as ggml makes it: the largest magnitude maps to -127 exactly, the sums per 16 are
    /// those of the values, and `d * q` gives the input back within half a step.
    #[test]
    fn q8_k_activations() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 40.0) / 7.0)
            .collect();
        let blocks = quantize_row_k(kernel_isa(), &x);
        for (b, xb) in blocks.iter().zip(x.chunks(QKK)) {
            let (pos, _) = xb.iter().enumerate().fold((0, 0f32), |(p, m), (i, v)| {
                if v.abs() > m {
                    (i, v.abs())
                } else {
                    (p, m)
                }
            });
            assert_eq!(b.q[pos], -127);
            for (s, c) in b.bsums.iter().zip(b.q.chunks(16)) {
                assert_eq!(*s as i32, c.iter().map(|q| *q as i32).sum::<i32>());
            }
            for (q, v) in b.q.iter().zip(xb) {
                assert!((b.d * *q as f32 - v).abs() <= b.d.abs() * 0.5 + 1e-6);
            }
        }
        assert!(quantize_row_k(kernel_isa(), &[0.0; QKK])[0]
            .q
            .iter()
            .all(|q| *q == 0));
        // The SIMD rounding is the scalar one, ties to even included.
        let ties: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) * 0.5).collect();
        let (mut a, mut b) = ([0i8; QKK], [0i8; QKK]);
        round_k(1.0, &ties, &mut a);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { simd!(kernel_isa(), round_k(1.0, &ties, &mut b)) };
            assert_eq!(a, b);
        }
        round_k(1.0, &ties, &mut a);
        assert_eq!(a[129], 0, "0.5 rounds to even");
        assert_eq!(a[131], 2, "1.5 rounds to even");
    }

    #[test]
    fn fused_products_equal_separate_ones() {
        // Matrices of different types behind one input (Gemma 3's Q5_0 query and key with a
        // Q8_0 value; a Q4_K and a Q6_K), fused or one by one: the same bits.
        for types in [
            [GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4_1],
            [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_0],
        ] {
            let mats: Vec<QMat> = types
                .iter()
                .enumerate()
                .map(|(k, t)| quantized(*t, 40 - 8 * k, 256, 7 + 6 * k).0)
                .collect();
            let refs: Vec<&QMat> = mats.iter().collect();
            let x: Vec<f32> = (0..3 * 256).map(|i| (i as f32).sin()).collect();
            let fused = QMat::matmul_many(&refs, &x, 3);
            for (f, m) in fused.iter().zip(&mats) {
                assert_eq!(*f, m.matmul(&x, 3), "{:?}", m.wtype);
            }
        }
        // Several activation rows at once (the prefill tiles, with remainders of rows and of
        // activations) give each row's product to the bit, for every type.
        for (dtype, wtype) in TYPES {
            let (m, _) = quantized(dtype, 41, 256, 31);
            let x: Vec<f32> = (0..7 * 256).map(|i| ((i * 7) as f32).cos()).collect();
            let all = m.matmul(&x, 7);
            for r in 0..7 {
                let one = m.matmul(&x[r * 256..(r + 1) * 256], 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&all[r * 41..(r + 1) * 41]),
                    bits(&one),
                    "{wtype:?} row {r}"
                );
            }
        }
    }

    /// Eight activation rows or more take ggml's tiled order for the K types (eight at a time
    /// through `tile_k8`, then four through `tile_k`, the rest one by one): every result is bit for bit the scalar tiled-order
    /// product's, and within rounding of the one-row (`vec_dot`) order.
    #[test]
    fn many_row_k_products_follow_the_tiled_order() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (m, _) = quantized(dtype, 19, 512, 13);
            // 21 rows: two tiles of eight, one of four, one alone.
            let n = 21;
            let x: Vec<f32> = (0..n * 512).map(|i| ((i * 13) as f32).sin()).collect();
            let all = m.matmul(&x, n);
            for i in 0..n {
                let a = quantize_row_k(kernel_isa(), &x[i * 512..(i + 1) * 512]);
                for r in 0..19 {
                    let want = dot_k(m.wtype, &m.row(r), &a, Isa::Portable, true);
                    let got = all[i * 19 + r];
                    assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} act {i} row {r}");
                    let one = dot_k(m.wtype, &m.row(r), &a, Isa::Portable, false);
                    assert!((got - one).abs() <= 1e-4 * one.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        let err = QMat::new(WType::Q4K, 2, 128, &[0; 144]).unwrap_err();
        assert!(err.to_string().contains("whole blocks of 256"), "{err}");
    }
}
