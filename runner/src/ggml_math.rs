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
    let n = bs.iter().fold(a.len(), |n, b| n.min(b.len()));
    let mut acc = [[0f32; 8]; P];
    let full = n / 8 * 8;
    for g in (0..full).step_by(8) {
        let Ok(x) = <&[f32; 8]>::try_from(&a[g..g + 8]) else {
            continue;
        };
        for (acc, b) in acc.iter_mut().zip(&bs) {
            if let Ok(y) = <&[f32; 8]>::try_from(&b[g..g + 8]) {
                fma8(acc, x, y);
            }
        }
    }
    if full < n {
        let mut x = [0f32; 8];
        x[..n - full].copy_from_slice(&a[full..n]);
        for (acc, b) in acc.iter_mut().zip(&bs) {
            let mut y = [0f32; 8];
            y[..n - full].copy_from_slice(&b[full..n]);
            fma8(acc, &x, &y);
        }
    }
    let mut out = [0f32; P];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = hsum8(a);
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
