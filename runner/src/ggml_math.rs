//! The float arithmetic of llama.cpp's x86 CPU path (AVX2 + FMA), reproduced operation for
//! operation so that corral's greedy output agrees with it token for token.
//!
//! Rounding is where two correct implementations part ways: an exponential that differs in the
//! last bit, or a dot product summed in another order, moves an activation by one ulp; the 8-bit
//! quantization of activations before every weight product can turn that ulp into a different
//! integer, and after a few layers into a different token wherever two candidates are nearly
//! tied. So this module reproduces, not approximates:
//!
//! - ggml's vectorized `expf` (a polynomial from Arm's optimized routines, max error ~1.5 ulp),
//!   used by its softmax and SiLU;
//! - the summation order of its f16 dot product (`ggml_vec_dot_f16`: four 8-lane FMA
//!   accumulators, then a fixed reduction), used for one query row (decoding);
//! - the summation order of llamafile's `tinyBLAS` (one 8-lane FMA accumulator per output, then a
//!   horizontal sum), which ggml uses instead for f16 products of two or more rows (prefill);
//! - its softmax: exponentials eight at a time, each group summed in f32 and added to an f64.
//!
//! Every function is plain Rust over `f32::mul_add`; `with_fma` runs a closure compiled with the
//! FMA instruction set when the CPU has it (the results are the same, only faster).

/// `f32` from its bit pattern, for ggml's hexadecimal float constants.
const fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// ggml's AVX2 `ggml_v_expf`, one lane.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x / ln 2, rounded
    let n = z - r;
    // b = x - n ln2, with ln 2 split in two parts for precision
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits().wrapping_shl(23);
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    // false for NaN, as ggml's ordered compare is
    let scaled = n.abs() > 126.0;
    if !scaled {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// ggml's `ggml_v_silu`: `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// Horizontal sum of eight lanes as `hsum(__m256)` in tinyBLAS and ggml's softmax compute it.
#[inline(always)]
pub(crate) fn hsum8(v: &[f32; 8]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// The reduction of `GGML_F32x8_REDUCE` over four 8-lane accumulators.
#[inline(always)]
pub(crate) fn reduce4x8(acc: &[[f32; 8]; 4]) -> f32 {
    let mut x = [0f32; 8];
    for (l, x) in x.iter_mut().enumerate() {
        *x = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let t = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
    (t[0] + t[1]) + (t[2] + t[3])
}

/// Which of ggml's two f16 matrix-product paths a product takes: one activation row goes through
/// `ggml_vec_dot_f16`, two or more through tinyBLAS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    VecDot,
    TinyBlas,
}

impl Order {
    pub fn for_rows(rows: usize) -> Order {
        if rows >= 2 {
            Order::TinyBlas
        } else {
            Order::VecDot
        }
    }
}

/// `a · b` in `order` (values already rounded to f16; a shorter tail is summed as ggml sums the
/// zero padding of its KV cache, that is, as if it were not there).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32], order: Order) -> f32 {
    let n = a.len().min(b.len());
    let (xs, x_tail) = a[..n].as_chunks::<8>();
    let (ys, y_tail) = b[..n].as_chunks::<8>();
    // the last partial group, its missing lanes zero (ggml's padding)
    let mut x_last = [0f32; 8];
    let mut y_last = [0f32; 8];
    x_last[..x_tail.len()].copy_from_slice(x_tail);
    y_last[..y_tail.len()].copy_from_slice(y_tail);
    let tail = (!x_tail.is_empty()).then_some((&x_last, &y_last));
    let groups = xs.iter().zip(ys).chain(tail);
    match order {
        Order::VecDot => {
            let mut acc = [[0f32; 8]; 4];
            for (g, (x, y)) in groups.enumerate() {
                fma8(&mut acc[g % 4], x, y);
            }
            reduce4x8(&acc)
        }
        Order::TinyBlas => {
            let mut acc = [0f32; 8];
            for (x, y) in groups {
                fma8(&mut acc, x, y);
            }
            hsum8(&acc)
        }
    }
}

/// `a · b` for `P` vectors `b` at once, in tinyBLAS's order (each result is `dot(a, b,
/// Order::TinyBlas)` to the bit): the `P` accumulator chains are independent, so their FMAs
/// overlap instead of waiting on one another.
#[inline(always)]
pub fn dot_many_tinyblas<const P: usize>(a: &[f32], bs: [&[f32]; P]) -> [f32; P] {
    let [out] = dot_tile_tinyblas([a], bs);
    out
}

/// `a[r] · b[p]` for every pair, each in tinyBLAS's order (to the bit what `dot_many_tinyblas`
/// and `dot(.., Order::TinyBlas)` give): a register tile of `R × P` independent chains, each
/// loaded 8-float group of an `a` serving `P` chains and of a `b` serving `R` (one row against
/// `P` reloads every `b` group for each row: twice the loads per FMA with `R = 2`).
#[inline(always)]
pub fn dot_tile_tinyblas<const R: usize, const P: usize>(
    a: [&[f32]; R],
    b: [&[f32]; P],
) -> [[f32; P]; R] {
    let n = a.iter().chain(&b).fold(usize::MAX, |n, s| n.min(s.len()));
    let n = if R + P == 0 { 0 } else { n };
    let mut acc = [[[0f32; 8]; P]; R];
    let full = n / 8 * 8;
    for g in (0..full).step_by(8) {
        let xs: [[f32; 8]; R] = std::array::from_fn(|r| {
            let mut x = [0f32; 8];
            x.copy_from_slice(&a[r][g..g + 8]);
            x
        });
        for (p, bp) in b.iter().enumerate() {
            let mut y = [0f32; 8];
            y.copy_from_slice(&bp[g..g + 8]);
            for (r, x) in xs.iter().enumerate() {
                fma8(&mut acc[r][p], x, &y);
            }
        }
    }
    if full < n {
        let xs: [[f32; 8]; R] = std::array::from_fn(|r| {
            let mut x = [0f32; 8];
            x[..n - full].copy_from_slice(&a[r][full..n]);
            x
        });
        for (p, bp) in b.iter().enumerate() {
            let mut y = [0f32; 8];
            y[..n - full].copy_from_slice(&bp[full..n]);
            for (r, x) in xs.iter().enumerate() {
                fma8(&mut acc[r][p], x, &y);
            }
        }
    }
    let mut out = [[0f32; P]; R];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = hsum8(a);
        }
    }
    out
}

#[inline(always)]
fn fma8(acc: &mut [f32; 8], x: &[f32; 8], y: &[f32; 8]) {
    for l in 0..8 {
        acc[l] = x[l].mul_add(y[l], acc[l]);
    }
}

/// Accumulates `out[d] = Σ_j w[j] · rows[j][d]` for several output dims at once, each in the
/// summation order of `dot(column d, w, order)`. `acc` is scratch of `32 * out.len()` floats.
pub struct ColumnDot<'a> {
    acc: &'a mut [f32],
    dims: usize,
    order: Order,
}

impl<'a> ColumnDot<'a> {
    pub fn new(acc: &'a mut [f32], dims: usize, order: Order) -> ColumnDot<'a> {
        let acc = &mut acc[..32 * dims];
        acc.fill(0.0);
        ColumnDot { acc, dims, order }
    }

    /// Adds row `j` (position in the sum) weighted by `w`.
    #[inline(always)]
    pub fn add(&mut self, j: usize, w: f32, row: &[f32]) {
        let slot = match self.order {
            Order::VecDot => ((j % 32) / 8) * 8 + j % 8,
            Order::TinyBlas => j % 8,
        };
        let acc = &mut self.acc[slot * self.dims..][..self.dims];
        for (a, v) in acc.iter_mut().zip(row) {
            *a = v.mul_add(w, *a);
        }
    }

    /// `add(j, w[j], row j)` for every `j` in `0..w.len()`, row `j` being
    /// `rows[j * stride..][..dims]`. With AVX-512, in `ggml_vec_dot_f16`'s order (`VecDot`, whose
    /// slot for position `j` is `j % 32`) and dims in whole 16s, sixteen slots at a time held in
    /// registers (with AVX2, eight slots of 8 dims): each slot's sums are the same operations in
    /// the same order as `add`'s.
    pub fn add_all(&mut self, w: &[f32], rows: &[f32], stride: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.order == Order::VecDot
            && self.dims.is_multiple_of(8)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && rows.len() >= self.dims
            && w.len() <= (rows.len() - self.dims) / stride.max(1) + 1
        {
            // Every row read lies inside `rows` (checked just above: row w.len() - 1 ends
            // within it).
            if self.dims.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F and FMA were just detected.
                unsafe { x86::column_dot_vecdot_512(self.acc, self.dims, w, rows, stride) };
            } else {
                // SAFETY: AVX2 and FMA were just detected.
                unsafe { x86::column_dot_vecdot_256(self.acc, self.dims, w, rows, stride) };
            }
            return;
        }
        for (j, wj) in w.iter().enumerate() {
            self.add(j, *wj, &rows[j * stride..][..self.dims]);
        }
    }

    pub fn finish(self, out: &mut [f32]) {
        let lane = |a: usize, l: usize, d: usize| self.acc[(a * 8 + l) * self.dims + d];
        for (d, o) in out.iter_mut().enumerate().take(self.dims) {
            *o = match self.order {
                Order::VecDot => {
                    let mut acc = [[0f32; 8]; 4];
                    for (a, row) in acc.iter_mut().enumerate() {
                        for (l, v) in row.iter_mut().enumerate() {
                            *v = lane(a, l, d);
                        }
                    }
                    reduce4x8(&acc)
                }
                Order::TinyBlas => {
                    let mut acc = [0f32; 8];
                    for (l, v) in acc.iter_mut().enumerate() {
                        *v = lane(0, l, d);
                    }
                    hsum8(&acc)
                }
            };
        }
    }
}

/// ggml's softmax of already scaled scores, in place.
#[inline(always)]
pub fn softmax(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU was just found to support AVX2 and FMA.
        unsafe { x86::softmax_rest(s, max) };
        return;
    }
    softmax_rest(s, max);
}

/// `softmax` after the maximum: one lane at a time.
#[inline(always)]
fn softmax_rest(s: &mut [f32], max: f32) {
    let mut sum = 0f64;
    for block in s.chunks_mut(8) {
        // positions past the end are masked (-inf) in ggml's padded cache: they add 0
        let mut v = [0f32; 8];
        for (v, x) in v.iter_mut().zip(block.iter_mut()) {
            // a masked position (outside a sliding window) weighs nothing
            *x = if *x == f32::NEG_INFINITY {
                0.0
            } else {
                expf(*x - max)
            };
            *v = *x;
        }
        sum += f64::from(hsum8(&v));
    }
    let inv = (1.0 / sum) as f32;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// `expf` and the softmax eight lanes at a time, as ggml's AVX2 code computes them: every lane
/// goes through exactly the operations of the one-lane functions above (so the bits are theirs),
/// with both of `expf`'s paths computed and blended where any lane needs the scaled one.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::c;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub fn expf8(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(c(0x4b40_0000));
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(c(0x3fb8_aa3b)), r);
        let n = _mm256_sub_ps(z, r);
        let neg_n = _mm256_xor_ps(n, _mm256_set1_ps(-0.0));
        let b = _mm256_fmadd_ps(
            neg_n,
            _mm256_set1_ps(c(0x35bf_be8e)),
            _mm256_fmadd_ps(neg_n, _mm256_set1_ps(c(0x3f31_7200)), x),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f80_0000)));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_set1_ps(c(0x3c07_2010)),
                    b,
                    _mm256_set1_ps(c(0x3d2b_9f17)),
                ),
                u,
                _mm256_fmadd_ps(
                    _mm256_set1_ps(c(0x3e2a_af33)),
                    b,
                    _mm256_set1_ps(c(0x3eff_fedb)),
                ),
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(c(0x3f7f_fff6)), b),
        );
        let fast = _mm256_fmadd_ps(j, k, k);
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        // Ordered compares: false for NaN, as the one-lane `>` is.
        let scaled = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        if _mm256_movemask_ps(scaled) == 0 {
            return fast;
        }
        let le0 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps()));
        let g = _mm256_and_si256(le0, _mm256_set1_epi32(0x8200_0000u32 as i32));
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        let slow = _mm256_blendv_ps(
            _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1),
            _mm256_mul_ps(s1, s1),
            huge,
        );
        _mm256_blendv_ps(fast, slow, scaled)
    }

    /// `ColumnDot::add_all` in the `VecDot` order, `$lanes` dims per register: for each `$lanes`
    /// dims and each `$lanes` of the 32 slots, the slot accumulators stay in registers while the
    /// positions stream past (position `j` goes to slot `j % 32`).
    ///
    /// # Safety
    /// Needs the target features named; `acc` holds `32 * dims` values, `dims` is a multiple of
    /// `$lanes`, and `rows[j * stride..][..dims]` lies inside `rows` for every `j < w.len()`.
    macro_rules! column_dot_vecdot {
        ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $store:ident,
         $fmadd:ident, $set1:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                acc: &mut [f32],
                dims: usize,
                w: &[f32],
                rows: &[f32],
                stride: usize,
            ) {
                let n = w.len();
                debug_assert!(acc.len() >= 32 * dims && dims.is_multiple_of($lanes));
                for d0 in (0..dims).step_by($lanes) {
                    for first in (0..32).step_by($lanes) {
                        let mut a = [$zero(); $lanes];
                        for (s, a) in a.iter_mut().enumerate() {
                            // SAFETY: slot first + s has dims values at d0..d0 + $lanes.
                            *a = unsafe { $load(acc.as_ptr().add((first + s) * dims + d0)) };
                        }
                        let mut j0 = first;
                        while j0 < n {
                            let m = (n - j0).min($lanes);
                            for (s, a) in a.iter_mut().enumerate() {
                                if s < m {
                                    let j = j0 + s;
                                    // SAFETY: row j lies inside rows (the caller's promise).
                                    let v = unsafe { $load(rows.as_ptr().add(j * stride + d0)) };
                                    *a = $fmadd(v, $set1(w[j]), *a);
                                }
                            }
                            j0 += 32;
                        }
                        for (s, a) in a.iter().enumerate() {
                            // SAFETY: as for the loads.
                            unsafe { $store(acc.as_mut_ptr().add((first + s) * dims + d0), *a) };
                        }
                    }
                }
            }
        };
    }
    column_dot_vecdot!(
        column_dot_vecdot_512,
        "avx2,fma,avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps
    );
    column_dot_vecdot!(
        column_dot_vecdot_256,
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps
    );

    /// `super::softmax_rest`, eight lanes at a time; a last partial block one lane at a time.
    ///
    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_rest(s: &mut [f32], max: f32) {
        let mut sum = 0f64;
        let m = _mm256_set1_ps(max);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut blocks = s.chunks_exact_mut(8);
        for block in &mut blocks {
            // SAFETY: block holds 8 f32.
            let x = unsafe { _mm256_loadu_ps(block.as_ptr()) };
            let masked = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, neg_inf);
            let v = _mm256_andnot_ps(masked, expf8(_mm256_sub_ps(x, m)));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(block.as_mut_ptr(), v) };
            // hsum8's order: the halves, then pairs.
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            sum += f64::from(_mm_cvtss_f32(h));
        }
        let rest = blocks.into_remainder();
        if !rest.is_empty() {
            let mut v = [0f32; 8];
            for (v, x) in v.iter_mut().zip(rest.iter_mut()) {
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    super::expf(*x - max)
                };
                *v = *x;
            }
            sum += f64::from(super::hsum8(&v));
        }
        let inv = _mm256_set1_ps((1.0 / sum) as f32);
        let mut blocks = s.chunks_exact_mut(8);
        for block in &mut blocks {
            // SAFETY: block holds 8 f32.
            unsafe {
                let x = _mm256_loadu_ps(block.as_ptr());
                _mm256_storeu_ps(block.as_mut_ptr(), _mm256_mul_ps(x, inv));
            }
        }
        let inv = (1.0 / sum) as f32;
        for x in blocks.into_remainder() {
            *x *= inv;
        }
    }
}

/// Rounds every value to the nearest f16 (ties to even) and back, in place: what ggml's f16 KV
/// cache and its conversion of f32 operands to f16 do. With F16C eight at a time (the same
/// rounding as `half`'s one-by-one conversion, which costs a call per value).
pub fn round_f16(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx,f16c")]
        fn eights(xs: &mut [f32]) -> usize {
            use std::arch::x86_64::*;
            let mut chunks = xs.chunks_exact_mut(8);
            for c in &mut chunks {
                // SAFETY: c holds 8 f32.
                unsafe {
                    let v = _mm256_loadu_ps(c.as_ptr());
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            }
            xs.len() / 8 * 8
        }
        if std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU was just found to support AVX and F16C.
            let done = unsafe { eights(xs) };
            for x in &mut xs[done..] {
                *x = half::f16::from_f32(*x).to_f32();
            }
            return;
        }
    }
    for x in xs {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

/// Each value's nearest f16 (ties to even), as bits: with F16C eight at a time (the same
/// rounding as `half`'s one-by-one conversion).
pub fn f16_bits(xs: &[f32], out: &mut [u16]) {
    debug_assert_eq!(xs.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx,f16c")]
        fn eights(xs: &[f32], out: &mut [u16]) -> usize {
            use std::arch::x86_64::*;
            for (c, o) in xs.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                // SAFETY: c holds 8 f32, o 8 u16.
                unsafe {
                    let h =
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                    _mm_storeu_si128(o.as_mut_ptr().cast(), h);
                }
            }
            xs.len().min(out.len()) / 8 * 8
        }
        if std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU was just found to support AVX and F16C.
            done = unsafe { eights(xs, out) };
        }
    }
    for (x, o) in xs[done..].iter().zip(&mut out[done..]) {
        *o = half::f16::from_f32(*x).to_bits();
    }
}

/// Runs `f`, compiled with AVX2 and FMA when the CPU has them so that `mul_add` is one
/// instruction instead of a call into libm. The results are identical.
#[inline(always)]
pub fn with_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU was just found to support AVX2 and FMA.
            return unsafe { run(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_lane_expf_and_softmax_are_the_one_lane_ones() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                eprintln!("no AVX2/FMA here: only the one-lane code runs");
                return;
            }
            use std::arch::x86_64::*;
            // Both paths of expf (|n| > 126 and > 192), overflow, underflow, ±0, NaN.
            let mut xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.07).collect();
            xs.extend([
                0.0,
                -0.0,
                88.7,
                89.0,
                -87.0,
                -88.0,
                -104.0,
                -200.0,
                f32::NAN,
            ]);
            xs.extend([
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e-30,
                -1e-30,
                0.5,
                -0.5,
                3.0,
            ]);
            for c in xs.chunks_exact(8) {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and FMA were just detected; c and got hold 8 f32.
                unsafe {
                    let v = x86::expf8(_mm256_loadu_ps(c.as_ptr()));
                    _mm256_storeu_ps(got.as_mut_ptr(), v);
                }
                for (x, g) in c.iter().zip(got) {
                    let want = expf(*x);
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "expf({x}): {g} vs {want}"
                    );
                }
            }
            for n in [1, 7, 8, 9, 64, 100, 1027] {
                let mut a: Vec<f32> = (0..n)
                    .map(|i| {
                        ((i * 7919 % 1000) as f32 - 500.0) * if i % 3 == 0 { 0.5 } else { 0.02 }
                    })
                    .collect();
                if n > 8 {
                    a[3] = f32::NEG_INFINITY;
                    a[n - 2] = f32::NEG_INFINITY;
                }
                let mut want = a.clone();
                let max = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                softmax_rest(&mut want, max);
                softmax(&mut a);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&want), "n={n}");
            }
        }
    }

    #[test]
    fn column_sums_of_all_rows_at_once_are_row_by_rows() {
        for (dims, stride) in [(64, 192), (16, 16), (24, 48)] {
            for n in [1, 5, 16, 17, 31, 32, 33, 100, 257] {
                let rows: Vec<f32> = (0..n * stride)
                    .map(|i| ((i * 7919 % 1999) as f32 - 999.0) / 333.0)
                    .collect();
                let w: Vec<f32> = (0..n).map(|j| ((j * 31 % 97) as f32) / 97.0).collect();
                let (mut s1, mut s2) = (vec![0f32; 32 * dims], vec![0f32; 32 * dims]);
                let (mut o1, mut o2) = (vec![0f32; dims], vec![0f32; dims]);
                let mut one = ColumnDot::new(&mut s1, dims, Order::VecDot);
                for (j, wj) in w.iter().enumerate() {
                    one.add(j, *wj, &rows[j * stride..][..dims]);
                }
                one.finish(&mut o1);
                let mut all = ColumnDot::new(&mut s2, dims, Order::VecDot);
                all.add_all(&w, &rows, stride);
                all.finish(&mut o2);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o1), bits(&o2), "dims {dims} n {n}");
                // The 256-bit path too, where it would not be chosen (AVX-512 present).
                #[cfg(target_arch = "x86_64")]
                if dims % 8 == 0
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    let mut s3 = vec![0f32; 32 * dims];
                    // SAFETY: AVX2 and FMA were just detected; rows hold n rows of stride.
                    unsafe { x86::column_dot_vecdot_256(&mut s3, dims, &w, &rows, stride) };
                    let mut o3 = vec![0f32; dims];
                    ColumnDot {
                        acc: &mut s3,
                        dims,
                        order: Order::VecDot,
                    }
                    .finish(&mut o3);
                    assert_eq!(bits(&o1), bits(&o3), "256-bit: dims {dims} n {n}");
                }
            }
        }
    }

    #[test]
    fn f16_rounding_in_bulk_is_halfs() {
        // Ties, subnormals, overflow to infinity, signed zeros and a NaN, and a leftover past 8.
        let mut xs: Vec<f32> = vec![
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            -(1.0 + 1.0 / 2048.0),
            6.0e-8,
            3.0e-8,
            -1.0e-6,
            65504.0,
            65520.0,
            1.0e6,
            -0.0,
            0.0,
            f32::NAN,
            0.1,
            0.7,
            123.456,
            -9.87e-3,
            1.0e-5,
        ];
        xs.extend((0..100).map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 9 - 4)));
        let want: Vec<f32> = xs
            .iter()
            .map(|x| half::f16::from_f32(*x).to_f32())
            .collect();
        round_f16(&mut xs);
        for (i, (a, b)) in xs.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "[{i}] {a} vs {b}"
            );
        }
    }

    #[test]
    fn dot_many_is_each_dot_to_the_bit() {
        let a: Vec<f32> = (0..67)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let bs: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                (0..67)
                    .map(|i| ((i * (k + 3) % 89) as f32 - 40.0) / 9.0)
                    .collect()
            })
            .collect();
        for n in [64, 67, 5] {
            let many = dot_many_tinyblas(
                &a[..n],
                [&bs[0][..n], &bs[1][..n], &bs[2][..n], &bs[3][..n]],
            );
            for (k, m) in many.iter().enumerate() {
                assert_eq!(
                    m.to_bits(),
                    dot(&a[..n], &bs[k][..n], Order::TinyBlas).to_bits()
                );
            }
        }
    }

    #[test]
    fn a_dot_tile_is_each_dot_to_the_bit() {
        let row = |k: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * (k + 3) % 89) as f32 - 40.0) / (7.0 + k as f32))
                .collect()
        };
        for n in [64, 67, 5, 8, 0] {
            let a: Vec<Vec<f32>> = (0..3).map(|k| row(k + 10, n)).collect();
            let b: Vec<Vec<f32>> = (0..4).map(|k| row(k, n)).collect();
            let tile = dot_tile_tinyblas(
                [&a[0][..], &a[1][..], &a[2][..]],
                [&b[0][..], &b[1][..], &b[2][..], &b[3][..]],
            );
            for r in 0..3 {
                for p in 0..4 {
                    assert_eq!(
                        tile[r][p].to_bits(),
                        dot(&a[r], &b[p], Order::TinyBlas).to_bits(),
                        "n {n} row {r} col {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn expf_is_close_to_exp_and_handles_the_edges() {
        for i in -2000..=880 {
            let x = i as f32 / 10.0;
            let (got, want) = (expf(x), x.exp());
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || want == 0.0 && got < 1e-37,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
        assert!(expf(100.0).is_infinite());
    }

    #[test]
    fn dot_orders_sum_the_same_products() {
        let a: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..70).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        for order in [Order::VecDot, Order::TinyBlas] {
            assert!((f64::from(dot(&a, &b, order)) - exact).abs() < 1e-4);
            let mut scratch = vec![0f32; 32 * 2];
            let mut cd = ColumnDot::new(&mut scratch, 2, order);
            for j in 0..70 {
                cd.add(j, b[j], &[a[j], 2.0 * a[j]]);
            }
            let mut out = [0f32; 2];
            cd.finish(&mut out);
            assert_eq!(
                out[0],
                dot(&a, &b, order),
                "column sums follow the dot's order"
            );
        }
        let mut s = vec![1.0, 2.0, 3.0, f32::NEG_INFINITY, 0.5, 0.0, 1.0, 2.0, 9.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[3] == 0.0 && s[8] > 0.99);
    }
}
