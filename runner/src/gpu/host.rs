//! The device operations on the CPU, one plain loop each, with the arithmetic of `kernels.cu`
//! (f32 products with fused multiply-adds, sums of squares and softmax sums in f64, f16
//! rounding where the kernels round): the device graph runs here in tests, on machines without
//! a GPU, against the CPU forward pass.

use super::{AttnShape, Backend, OnHost};
use half::f16;

#[derive(Debug, Default)]
pub struct Host;

fn r16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl OnHost for Host {
    fn name(&self) -> String {
        "host reference".into()
    }
}

impl Backend for Host {
    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> anyhow::Result<Vec<f32>> {
        use rayon::prelude::*;
        let mut out = vec![0f32; rows * n];
        // Each output is one sum in order, whichever thread computes it.
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| {
            let xr = &x[r * k..(r + 1) * k];
            o.par_iter_mut().enumerate().for_each(|(j, o)| {
                let wr = &w[j * k..(j + 1) * k];
                *o = xr.iter().zip(wr).fold(0f32, |a, (x, w)| x.mul_add(*w, a));
            });
        });
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> anyhow::Result<Vec<f32>> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            let xr = &x[r * n..(r + 1) * n];
            let sum: f64 = xr.iter().map(|v| f64::from(v * v)).sum();
            let mean = (sum / n as f64) as f32;
            let s = 1.0 / (mean + eps).sqrt();
            for i in 0..n {
                out[r * n + i] = xr[i] * s * w[i];
            }
        }
        Ok(out)
    }

    fn add_rows(
        &self,
        x: &mut Vec<f32>,
        b: &Vec<f32>,
        rows: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        for row in x[..rows * n].chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) -> anyhow::Result<()> {
        x[..n].iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, n: usize, s: f32) -> anyhow::Result<()> {
        x[..n].iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn round_f16(&self, x: &mut Vec<f32>, n: usize) -> anyhow::Result<()> {
        x[..n].iter_mut().for_each(|v| *v = r16(*v));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        cos_sin: &Vec<f32>,
        rows: usize,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        neox: bool,
    ) -> anyhow::Result<()> {
        let half = n_rot / 2;
        for r in 0..rows {
            for h in 0..n_head {
                let head = &mut x[(r * n_head + h) * head_dim..][..head_dim];
                for k in 0..half {
                    let (c, s) = (cos_sin[(r * half + k) * 2], cos_sin[(r * half + k) * 2 + 1]);
                    let (i0, i1) = if neox {
                        (k, k + half)
                    } else {
                        (2 * k, 2 * k + 1)
                    };
                    let (a, b) = (head[i0], head[i1]);
                    head[i0] = a.mul_add(c, -(b * s));
                    head[i1] = a.mul_add(s, b * c);
                }
            }
        }
        Ok(())
    }

    fn gated(&self, g: &mut Vec<f32>, u: &Vec<f32>, n: usize, gelu: bool) -> anyhow::Result<()> {
        for (a, u) in g[..n].iter_mut().zip(u) {
            let r = if gelu {
                if *a <= -10.0 {
                    0.0
                } else if *a >= 10.0 {
                    *a
                } else {
                    let v = r16(*a);
                    r16(0.5 * v * (1.0 + (0.797_884_6 * v * (1.0 + 0.044_715 * v * v)).tanh()))
                }
            } else {
                *a / (1.0 + (0.0 - *a).exp())
            };
            *a = r * u;
        }
        Ok(())
    }

    fn softcap(&self, x: &mut Vec<f32>, n: usize, cap: f32) -> anyhow::Result<()> {
        x[..n]
            .iter_mut()
            .for_each(|v| *v = (*v * (1.0 / cap)).tanh() * cap);
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        kc: &Vec<f32>,
        vc: &Vec<f32>,
        a: &AttnShape,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()> {
        let hd = a.head_dim;
        let q_dim = a.n_head * hd;
        for i in 0..a.rows {
            for hh in 0..a.n_head {
                let n_ctx = a.pos + i + 1;
                let lo = if a.window > 0 {
                    n_ctx.saturating_sub(a.window)
                } else {
                    0
                };
                let kvh = hh / a.group;
                let qr = &q[(a.q_row + i) * q_dim + hh * hd..][..hd];
                let q16: Vec<f32> = qr.iter().map(|v| r16(*v)).collect();
                let mut s = vec![f32::NEG_INFINITY; n_ctx];
                for (j, sj) in s.iter_mut().enumerate().skip(lo) {
                    let kr = &kc[j * a.kv_dim + kvh * hd..][..hd];
                    let dot = kr
                        .iter()
                        .zip(&q16)
                        .fold(0f32, |acc, (k, q)| k.mul_add(*q, acc));
                    *sj = if a.softcap > 0.0 {
                        (dot * (1.0 / a.softcap)).tanh() * a.softcap * a.scale
                    } else {
                        dot * a.scale
                    };
                }
                let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for v in s.iter_mut() {
                    *v = if *v == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (*v - mx).exp()
                    };
                    sum += f64::from(*v);
                }
                let inv = (1.0 / sum) as f32;
                s.iter_mut().for_each(|v| *v = r16(*v * inv));
                let o = &mut out[(a.q_row + i) * q_dim + hh * hd..][..hd];
                for (d, od) in o.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for (j, sj) in s.iter().enumerate().skip(lo) {
                        acc = sj.mul_add(vc[j * a.kv_dim + kvh * hd + d], acc);
                    }
                    *od = acc;
                }
            }
        }
        Ok(())
    }
}
