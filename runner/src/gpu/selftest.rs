//! Each device operation against the host reference (`host.rs`) on inputs that reach every
//! edge of the kernels' tiles and loops: run by the tests on the emulated GPU (`emulate.rs`)
//! and by `corral-runner --gpu-self-test` on a real one (no model needed: the first check a GPU
//! machine gets).

use super::host::Host;
use super::kernels::MATVEC_ROWS;
use super::{AttnShape, Backend};

/// One operation's result: the largest difference from the host's, relative to 1 + |value|.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub worst: f32,
    pub tol: f32,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.worst <= self.tol
    }
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn worst(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_nan() && w.is_nan() {
                0.0
            } else if g.is_nan() || w.is_nan() {
                f32::INFINITY
            } else {
                (g - w).abs() / (1.0 + w.abs())
            }
        })
        .fold(0f32, f32::max)
}

/// Runs every operation on `dev` and on the host; an error is a check that failed.
pub fn run<B: Backend>(dev: &B) -> anyhow::Result<Vec<Check>> {
    let host = Host;
    let mut out = Vec::new();
    let mut check = |name: String, got: Vec<f32>, want: &[f32], tol: f32| {
        out.push(Check {
            worst: worst(&got, want),
            name,
            tol,
        });
    };
    // Products: one row, the most rows `matvec` takes, one more (the tiled kernel), many rows;
    // widths that are not multiples of the warp, the 16-wide k step or the 64-wide tile.
    for (rows, k, n) in [
        (1, 70, 37),
        (MATVEC_ROWS, 64, 9),
        (MATVEC_ROWS + 1, 33, 65),
        (70, 17, 130),
        (3, 640, 1000),
    ] {
        let x = values(rows * k, 1, 1.0);
        let w = values(n * k, 2, 0.5);
        let got = dev.matmul(&dev.upload(&x)?, &dev.upload(&w)?, rows, k, n)?;
        let got = dev.download(&got, 0, rows * n)?;
        let want = host.matmul(&x, &w, rows, k, n)?;
        check(format!("matmul {rows}x{k} . {n}x{k}"), got, &want, 1e-5);
    }
    // Norms: rows of a length the block does not divide, and longer than it.
    for (rows, n) in [(3, 576), (5, 64), (2, 1000)] {
        let x = values(rows * n, 3, 4.0);
        let w = values(n, 4, 1.0);
        let got = dev.rms_norm(&dev.upload(&x)?, &dev.upload(&w)?, rows, n, 1e-6)?;
        let got = dev.download(&got, 0, rows * n)?;
        let want = host.rms_norm(&x, &w, rows, n, 1e-6)?;
        check(format!("rms_norm {rows}x{n}"), got, &want, 1e-6);
    }
    // Element-wise operations, in place.
    let n = 1000;
    let x = values(n, 5, 12.0);
    let y = values(n, 6, 2.0);
    let b = values(40, 7, 1.0);
    for name in [
        "add",
        "add_rows",
        "scale",
        "round_f16",
        "softcap",
        "silu",
        "gelu",
    ] {
        let mut d = dev.upload(&x)?;
        let mut h = x.clone();
        let (dy, db) = (dev.upload(&y)?, dev.upload(&b)?);
        match name {
            "add" => {
                dev.add(&mut d, &dy, n)?;
                host.add(&mut h, &y, n)?;
            }
            "add_rows" => {
                dev.add_rows(&mut d, &db, n / 40, 40)?;
                host.add_rows(&mut h, &b, n / 40, 40)?;
            }
            "scale" => {
                dev.scale(&mut d, n, 0.125)?;
                host.scale(&mut h, n, 0.125)?;
            }
            "round_f16" => {
                dev.round_f16(&mut d, n)?;
                host.round_f16(&mut h, n)?;
            }
            "softcap" => {
                dev.softcap(&mut d, n, 5.0)?;
                host.softcap(&mut h, n, 5.0)?;
            }
            _ => {
                let gelu = name == "gelu";
                dev.gated(&mut d, &dy, n, gelu)?;
                host.gated(&mut h, &y, n, gelu)?;
            }
        }
        // The GPU's tanhf and expf may differ from the CPU's in the last bits (GELU's value
        // is then rounded to f16).
        let tol = if name == "gelu" { 1e-3 } else { 1e-6 };
        check(name.to_string(), dev.download(&d, 0, n)?, &h, tol);
    }
    // Rotations: adjacent pairs, halves, part of a head.
    for (neox, n_rot) in [(false, 64), (true, 64), (true, 32)] {
        let (rows, n_head, head_dim) = (3, 4, 64);
        let x = values(rows * n_head * head_dim, 8, 2.0);
        let cs: Vec<f32> = (0..rows * n_rot / 2)
            .flat_map(|i| {
                let t = i as f32 * 0.37;
                [t.cos(), t.sin()]
            })
            .collect();
        let mut d = dev.upload(&x)?;
        dev.rope(
            &mut d,
            &dev.upload(&cs)?,
            rows,
            n_head,
            head_dim,
            n_rot,
            neox,
        )?;
        let mut h = x.clone();
        host.rope(&mut h, &cs, rows, n_head, head_dim, n_rot, neox)?;
        check(
            format!("rope neox={neox} n_rot={n_rot}"),
            dev.download(&d, 0, x.len())?,
            &h,
            1e-6,
        );
    }
    // Attention: a prompt chunk after earlier positions, grouped heads, a sliding window
    // shorter than the context, Gemma 2's cap, a single decoding row, a long context.
    for (rows, pos, group, window, softcap) in [
        (1, 0, 1, 0, 0.0),
        (4, 150, 3, 0, 0.0),
        (5, 200, 2, 64, 0.0),
        (3, 20, 1, 0, 50.0),
        (1, 3000, 2, 0, 0.0),
    ] {
        let (n_head, head_dim) = (6, 64);
        let kv_dim = n_head / group * head_dim;
        let q_dim = n_head * head_dim;
        let q_row = 2;
        let q = values((q_row + rows) * q_dim, 9, 3.0);
        let k = values((pos + rows) * kv_dim, 10, 3.0);
        let v = values((pos + rows) * kv_dim, 11, 1.0);
        let a = AttnShape {
            q_row,
            rows,
            pos,
            n_head,
            group,
            head_dim,
            kv_dim,
            scale: 0.125,
            softcap,
            window,
        };
        let before = vec![7.0; (q_row + rows) * q_dim];
        let mut d = dev.upload(&before)?;
        dev.attention(
            &dev.upload(&q)?,
            &dev.upload(&k)?,
            &dev.upload(&v)?,
            &a,
            &mut d,
        )?;
        let mut h = before.clone();
        host.attention(&q, &k, &v, &a, &mut h)?;
        // The weights are rounded to f16 after sums in another order: a weight can land on
        // the neighbouring f16 value.
        check(
            format!("attention rows={rows} pos={pos} group={group} window={window} cap={softcap}"),
            dev.download(&d, 0, before.len())?,
            &h,
            2e-3,
        );
    }
    Ok(out)
}
