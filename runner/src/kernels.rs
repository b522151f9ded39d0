//! Quantized matrix-vector products for the llama forward pass, with ggml's arithmetic: each
//! activation row is quantized per 32 values (Q8_1 for Q4_1 weights, Q8_0 for Q8_0 weights:
//! `d = amax / 127`, values rounded to nearest-even as ggml's AVX2 path does), and each block
//! contributes `d_w * d_a * Σ q_w q_a` (+ `m_w * s_a` for Q4_1) with the scales as f16.
//!
//! AVX2 kernels are chosen at run time (`is_x86_feature_detected!`), with a scalar fallback that
//! computes the same integer sums. Output rows are split across the rayon pool, whose size the
//! runner sets from the profile's CPU limit.

use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;
const Q4_1_BYTES: usize = 20; // f16 d, f16 m, 16 bytes of nibbles
const Q8_0_BYTES: usize = 34; // f16 d, 32 i8

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WType {
    Q4_1,
    Q8_0,
}

/// A weight matrix (rows x cols) in a quantized layout we compute ourselves. The f16 block
/// scales are widened to f32 once at load (converting them in the inner loop cost more than the
/// integer dot products), the quantized values kept as they are.
#[derive(Debug)]
pub struct QMat {
    pub wtype: WType,
    pub rows: usize,
    pub cols: usize,
    /// Per block: d (and m for Q4_1).
    d: Vec<f32>,
    m: Vec<f32>,
    /// Per block: 16 nibble bytes (Q4_1) or 32 signed bytes (Q8_0).
    q: Vec<u8>,
}

/// One activation block: scale, sum term (Q8_1 only), 32 signed values.
#[derive(Debug, Clone, Copy)]
struct ABlock {
    d: f32,
    s: f32,
    q: [i8; QK],
}

impl QMat {
    pub fn new(wtype: WType, rows: usize, cols: usize, data: &[u8]) -> anyhow::Result<QMat> {
        let per = match wtype {
            WType::Q4_1 => Q4_1_BYTES,
            WType::Q8_0 => Q8_0_BYTES,
        };
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * per {
            anyhow::bail!("quantized matrix {rows}x{cols} has {} bytes", data.len());
        }
        let blocks = rows * cols / QK;
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::new();
        let mut q = Vec::with_capacity(blocks * QK);
        for b in data.chunks_exact(per) {
            d.push(f16_at(b, 0));
            match wtype {
                WType::Q4_1 => {
                    m.push(f16_at(b, 2));
                    q.extend_from_slice(&b[4..20]);
                }
                WType::Q8_0 => q.extend_from_slice(&b[2..34]),
            }
        }
        Ok(QMat {
            wtype,
            rows,
            cols,
            d,
            m,
            q,
        })
    }

    /// Row `r` dequantized (an embedding lookup).
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let w = self.row(r);
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..self.cols / QK {
            match self.wtype {
                WType::Q4_1 => {
                    let nib = &w.q[b * 16..(b + 1) * 16];
                    let (d, m) = (w.d[b], w.m[b]);
                    out.extend(nib.iter().map(|n| f32::from(n & 0x0f) * d + m));
                    out.extend(nib.iter().map(|n| f32::from(n >> 4) * d + m));
                }
                WType::Q8_0 => out.extend(
                    w.q[b * QK..(b + 1) * QK]
                        .iter()
                        .map(|q| f32::from(*q as i8) * w.d[b]),
                ),
            }
        }
        out
    }

    fn qbytes(&self) -> usize {
        match self.wtype {
            WType::Q4_1 => QK / 2,
            WType::Q8_0 => QK,
        }
    }

    /// Row `r` as (scales, mins, quants).
    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / QK;
        let qb = self.qbytes();
        Row {
            d: &self.d[r * nb..(r + 1) * nb],
            m: if self.m.is_empty() {
                &[]
            } else {
                &self.m[r * nb..(r + 1) * nb]
            },
            q: &self.q[r * nb * qb..(r + 1) * nb * qb],
        }
    }

    /// Several matrices with the same input width applied to the same `x` (Q, K and V; gate and
    /// up): one activation quantization and one parallel region instead of one each.
    pub fn matmul_many(mats: &[&QMat], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let cols = mats[0].cols;
        debug_assert!(mats.iter().all(|m| m.cols == cols));
        let acts: Vec<Vec<ABlock>> = x.chunks_exact(cols).take(n).map(quantize_row).collect();
        let total: usize = mats.iter().map(|m| m.rows).sum();
        let starts: Vec<usize> = mats
            .iter()
            .scan(0, |acc, m| {
                let s = *acc;
                *acc += m.rows;
                Some(s)
            })
            .collect();
        let avx2 = has_avx2();
        let threads = rayon::current_num_threads().max(1);
        let tasks = if total * cols * n < 400_000 {
            1
        } else {
            threads * 2
        };
        let chunk = total.div_ceil(tasks).max(1);
        let mut all = vec![0f32; total * n];
        // Prefill: two rows against four activation rows at once (`avx2::tile_*`; each result
        // computed exactly as the one-by-one product). Decoding (one activation row) goes row
        // by row: measured, a four-row tile was slower there (the product is memory-bound).
        let compute = |ci: usize, dst: &mut [f32]| {
            let here = dst.len() / n;
            let rows: Vec<(WType, Row<'_>)> = (0..here)
                .map(|k| {
                    let g = ci * chunk + k;
                    let mi = starts.iter().rposition(|s| *s <= g).unwrap_or(0);
                    (mats[mi].wtype, mats[mi].row(g - starts[mi]))
                })
                .collect();
            let mut k = 0;
            while k < here {
                let wt = rows[k].0;
                let pair = avx2 && n > 1 && k + 1 < here && rows[k + 1].0 == wt;
                if !pair {
                    for (i, a) in acts.iter().enumerate() {
                        dst[k * n + i] = match wt {
                            WType::Q4_1 => dot_q4_1(&rows[k].1, a, avx2),
                            WType::Q8_0 => dot_q8_0(&rows[k].1, a, avx2),
                        };
                    }
                    k += 1;
                    continue;
                }
                let ws = [&rows[k].1, &rows[k + 1].1];
                let mut i = 0;
                while i < n {
                    if i + 4 <= n {
                        let a4 = [&acts[i][..], &acts[i + 1], &acts[i + 2], &acts[i + 3]];
                        let out = tile::<2, 4>(wt, ws, a4);
                        for (r, o) in out.iter().enumerate() {
                            dst[(k + r) * n + i..][..4].copy_from_slice(o);
                        }
                        i += 4;
                    } else {
                        let out = tile::<2, 1>(wt, ws, [&acts[i]]);
                        for (r, o) in out.iter().enumerate() {
                            dst[(k + r) * n + i] = o[0];
                        }
                        i += 1;
                    }
                }
                k += 2;
            }
        };
        if tasks == 1 {
            compute(0, &mut all);
        } else {
            all.par_chunks_mut(chunk * n)
                .enumerate()
                .for_each(|(ci, dst)| compute(ci, dst));
        }
        mats.iter()
            .zip(&starts)
            .map(|(m, s)| {
                let part = &all[s * n..(s + m.rows) * n];
                if n == 1 {
                    return part.to_vec();
                }
                let mut out = vec![0f32; n * m.rows];
                for r in 0..m.rows {
                    for i in 0..n {
                        out[i * m.rows + r] = part[r * n + i];
                    }
                }
                out
            })
            .collect()
    }

    /// `x` holds `n` rows of `cols` values; returns `n` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        QMat::matmul_many(&[self], x, n).pop().unwrap_or_default()
    }
}

/// `R` rows of one type against `A` activation rows with the AVX2 tiles (the caller checked
/// AVX2 and FMA).
fn tile<const R: usize, const A: usize>(
    wt: WType,
    ws: [&Row<'_>; R],
    acts: [&[ABlock]; A],
) -> [[f32; A]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called when AVX2 and FMA were detected (`has_avx2`); the rows and
        // activations come from the same matrix product, so their block counts match.
        unsafe {
            match wt {
                WType::Q4_1 => avx2::tile_q4_1(ws, acts),
                WType::Q8_0 => avx2::tile_q8_0(ws, acts),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut out = [[0f32; A]; R];
        for (r, w) in ws.iter().enumerate() {
            for (j, a) in acts.iter().enumerate() {
                out[r][j] = match wt {
                    WType::Q4_1 => dot_q4_1(w, a, false),
                    WType::Q8_0 => dot_q8_0(w, a, false),
                };
            }
        }
        out
    }
}

/// One weight row.
struct Row<'a> {
    d: &'a [f32],
    m: &'a [f32],
    q: &'a [u8],
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// ggml's `quantize_row_q8_1` (the `s` term is used by Q4_1 only).
fn quantize_row(x: &[f32]) -> Vec<ABlock> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::quantize_row(x) };
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

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dot_q4_1(w: &Row<'_>, a: &[ABlock], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::dot_q4_1(w, a) };
    }
    let _ = avx2;
    let mut sum = 0f32;
    let mut summs = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let nib = &w.q[b * 16..(b + 1) * 16];
        let (lo, hi) = ab.q.split_at(16);
        let isum: i32 = nib
            .iter()
            .zip(lo.iter().zip(hi))
            .map(|(n, (l, h))| {
                i32::from(n & 0x0f) * i32::from(*l) + i32::from(n >> 4) * i32::from(*h)
            })
            .sum();
        sum += w.d[b] * ab.d * isum as f32;
        summs += w.m[b] * ab.s;
    }
    sum + summs
}

fn dot_q8_0(w: &Row<'_>, a: &[ABlock], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::dot_q8_0(w, a) };
    }
    let _ = avx2;
    let mut sum = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let q = &w.q[b * QK..(b + 1) * QK];
        let isum: i32 = q
            .iter()
            .zip(&ab.q)
            .map(|(w, a)| i32::from(*w as i8) * i32::from(*a))
            .sum();
        sum += w.d[b] * ab.d * isum as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ABlock, Row, QK};
    use half::f16;
    use std::arch::x86_64::*;

    /// `quantize_row_scalar` with the rounding done by `vroundps` (nearest, ties to even).
    ///
    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
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

    /// Horizontal sum of 8 f32 lanes.
    ///
    /// # Safety
    /// Needs AVX2 and FMA (the caller checked them at run time, as every kernel here does).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 unsigned (0..15) times 32 signed bytes, summed into 8 i32 lanes, as f32.
    ///
    /// # Safety
    /// Needs AVX2 and FMA (the caller checked them at run time, as every kernel here does).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let dot16 = _mm256_maddubs_epi16(u, s);
        let dot32 = _mm256_madd_epi16(dot16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(dot32)
    }

    /// # Safety
    /// Needs AVX2 and FMA; `w` holds whole Q4_1 blocks matching `a`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(w: &Row<'_>, a: &[ABlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let mask = _mm256_set1_epi8(0x0f);
        for (b, ab) in a.iter().enumerate() {
            let d = w.d[b];
            summs += w.m[b] * ab.s;
            let nib = &w.q[b * 16..(b + 1) * 16];
            // SAFETY: nib has 16 bytes; ab.q has 32 bytes.
            let (nib, q) = unsafe {
                (
                    _mm_loadu_si128(nib.as_ptr().cast()),
                    _mm256_loadu_si256(ab.q.as_ptr().cast()),
                )
            };
            let lo = _mm256_castsi128_si256(nib);
            let both = _mm256_insertf128_si256::<1>(lo, _mm_srli_epi16::<4>(nib));
            let x = _mm256_and_si256(both, mask);
            // SAFETY: AVX2/FMA are enabled for this function.
            let p = unsafe { mul_sum_us8(x, q) };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), p, acc);
        }
        // SAFETY: as above.
        unsafe { hsum(acc) + summs }
    }

    /// # Safety
    /// Needs AVX2 and FMA; `w` holds whole Q8_0 blocks matching `a`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(w: &Row<'_>, a: &[ABlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, ab) in a.iter().enumerate() {
            let d = w.d[b];
            let q = &w.q[b * QK..(b + 1) * QK];
            // SAFETY: q and ab.q have 32 bytes each.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_si256(q.as_ptr().cast()),
                    _mm256_loadu_si256(ab.q.as_ptr().cast()),
                )
            };
            // |x| as unsigned times y with x's sign moved onto y: maddubs needs one unsigned side.
            let ax = _mm256_sign_epi8(x, x);
            let sy = _mm256_sign_epi8(y, x);
            // SAFETY: AVX2/FMA are enabled for this function.
            let p = unsafe { mul_sum_us8(ax, sy) };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), p, acc);
        }
        // SAFETY: as above.
        unsafe { hsum(acc) }
    }

    /// `R` weight rows against `A` activation rows at once: each weight block is unpacked
    /// once for the `A` activations and each activation block loaded once for the `R` rows, and
    /// the `R × A` accumulators are independent chains (one block-ordered FMA chain per
    /// output, as in `dot_q4_1`, so each result is bit for bit the single product's).
    ///
    /// # Safety
    /// Needs AVX2 and FMA; every row holds whole Q4_1 blocks matching every activation row.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // block b of every row and activation in lockstep
    pub unsafe fn tile_q4_1<const R: usize, const A: usize>(
        ws: [&Row<'_>; R],
        acts: [&[ABlock]; A],
    ) -> [[f32; A]; R] {
        let mut acc = [[_mm256_setzero_ps(); A]; R];
        let mut summs = [[0f32; A]; R];
        let mask = _mm256_set1_epi8(0x0f);
        let nb = acts[0].len();
        for b in 0..nb {
            let mut q = [_mm256_setzero_si256(); A];
            for j in 0..A {
                // SAFETY: an activation block has 32 bytes.
                q[j] = unsafe { _mm256_loadu_si256(acts[j][b].q.as_ptr().cast()) };
            }
            for r in 0..R {
                let w = ws[r];
                let nib = &w.q[b * 16..(b + 1) * 16];
                // SAFETY: nib has 16 bytes.
                let nib = unsafe { _mm_loadu_si128(nib.as_ptr().cast()) };
                let lo = _mm256_castsi128_si256(nib);
                let both = _mm256_insertf128_si256::<1>(lo, _mm_srli_epi16::<4>(nib));
                let x = _mm256_and_si256(both, mask);
                let (d, m) = (w.d[b], w.m[b]);
                for j in 0..A {
                    let ab = &acts[j][b];
                    summs[r][j] += m * ab.s;
                    // SAFETY: AVX2/FMA are enabled for this function.
                    let p = unsafe { mul_sum_us8(x, q[j]) };
                    acc[r][j] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), p, acc[r][j]);
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

    /// [`tile_q4_1`] for Q8_0 weights (each result bit for bit `dot_q8_0`'s).
    ///
    /// # Safety
    /// Needs AVX2 and FMA; every row holds whole Q8_0 blocks matching every activation row.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // block b of every row and activation in lockstep
    pub unsafe fn tile_q8_0<const R: usize, const A: usize>(
        ws: [&Row<'_>; R],
        acts: [&[ABlock]; A],
    ) -> [[f32; A]; R] {
        let mut acc = [[_mm256_setzero_ps(); A]; R];
        let nb = acts[0].len();
        for b in 0..nb {
            let mut y = [_mm256_setzero_si256(); A];
            for j in 0..A {
                // SAFETY: an activation block has 32 bytes.
                y[j] = unsafe { _mm256_loadu_si256(acts[j][b].q.as_ptr().cast()) };
            }
            for r in 0..R {
                let w = ws[r];
                let q = &w.q[b * QK..(b + 1) * QK];
                // SAFETY: q has 32 bytes.
                let x = unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
                let ax = _mm256_sign_epi8(x, x);
                let d = w.d[b];
                for j in 0..A {
                    let sy = _mm256_sign_epi8(y[j], x);
                    // SAFETY: AVX2/FMA are enabled for this function.
                    let p = unsafe { mul_sum_us8(ax, sy) };
                    acc[r][j] = _mm256_fmadd_ps(_mm256_set1_ps(d * acts[j][b].d), p, acc[r][j]);
                }
            }
        }
        let mut out = [[0f32; A]; R];
        for r in 0..R {
            for j in 0..A {
                // SAFETY: as above.
                out[r][j] = unsafe { hsum(acc[r][j]) };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn check(dtype: GgmlDType, wtype: WType) {
        let dev = Device::Cpu;
        let (rows, cols) = (48, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 0.3)
            .collect();
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0)
            .collect();
        let q =
            QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &dev).unwrap(), dtype).unwrap();
        let exact = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let m = QMat::new(wtype, rows, cols, &q.data().unwrap()).unwrap();
        for r in [0, rows / 2, rows - 1] {
            let row = m.row_f32(r);
            for (a, b) in row.iter().zip(&exact[r]) {
                assert!((a - b).abs() < 1e-6, "row {r}: {a} vs {b}");
            }
        }
        let got = m.matmul(&x, 2);
        for i in 0..2 {
            for r in 0..rows {
                let want: f32 = exact[r]
                    .iter()
                    .zip(&x[i * cols..(i + 1) * cols])
                    .map(|(a, b)| a * b)
                    .sum();
                let g = got[i * rows + r];
                assert!(
                    (g - want).abs() < 0.02 + want.abs() * 0.01,
                    "{wtype:?} row {r}: {g} vs {want}"
                );
            }
        }
        // The scalar and AVX2 paths quantize and compute alike.
        let acts = quantize_row(&x[..cols]);
        let scalar = quantize_row_scalar(&x[..cols]);
        for (a, b) in acts.iter().zip(&scalar) {
            assert_eq!((a.q, a.d, a.s), (b.q, b.d, b.s));
        }
        for r in 0..rows {
            let row = m.row(r);
            let (a, b) = match wtype {
                WType::Q4_1 => (
                    dot_q4_1(&row, &acts, false),
                    dot_q4_1(&row, &acts, has_avx2()),
                ),
                WType::Q8_0 => (
                    dot_q8_0(&row, &acts, false),
                    dot_q8_0(&row, &acts, has_avx2()),
                ),
            };
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn fused_products_equal_separate_ones() {
        let dev = Device::Cpu;
        let mk = |rows: usize, seed: usize| {
            let w: Vec<f32> = (0..rows * 64)
                .map(|i| (i * seed % 1009) as f32 / 504.0 - 1.0)
                .collect();
            let q = QTensor::quantize(
                &Tensor::from_vec(w, (rows, 64), &dev).unwrap(),
                GgmlDType::Q4_1,
            )
            .unwrap();
            QMat::new(WType::Q4_1, rows, 64, &q.data().unwrap()).unwrap()
        };
        let (a, b) = (mk(40, 7), mk(24, 13));
        let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32).sin()).collect();
        let fused = QMat::matmul_many(&[&a, &b], &x, 3);
        assert_eq!(fused[0], a.matmul(&x, 3));
        assert_eq!(fused[1], b.matmul(&x, 3));
        // Several activation rows at once (the prefill tiles, with remainders of rows and of
        // activations) give each row's product to the bit, for both weight types.
        for (dtype, wtype) in [
            (GgmlDType::Q4_1, WType::Q4_1),
            (GgmlDType::Q8_0, WType::Q8_0),
        ] {
            let w: Vec<f32> = (0..41 * 96)
                .map(|i| (i * 31 % 997) as f32 / 498.0 - 1.0)
                .collect();
            let q =
                QTensor::quantize(&Tensor::from_vec(w, (41, 96), &dev).unwrap(), dtype).unwrap();
            let m = QMat::new(wtype, 41, 96, &q.data().unwrap()).unwrap();
            let x: Vec<f32> = (0..7 * 96).map(|i| ((i * 7) as f32).cos()).collect();
            let all = m.matmul(&x, 7);
            for r in 0..7 {
                let one = m.matmul(&x[r * 96..(r + 1) * 96], 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&all[r * 41..(r + 1) * 41]),
                    bits(&one),
                    "{wtype:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn q4_1_and_q8_0_products_match_dequantized_weights() {
        check(GgmlDType::Q4_1, WType::Q4_1);
        check(GgmlDType::Q8_0, WType::Q8_0);
    }
}
