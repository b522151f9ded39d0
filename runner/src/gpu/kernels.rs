//! The [`Backend`] operations as launches of `kernels.cu`, written once for every [`Device`]
//! (memory, and a kernel launched by name): CUDA (`cuda.rs`) in the runner, a CPU emulation
//! of CUDA's execution model (`emulate.rs`) in tests. The launch shapes and argument lists the
//! tests run are the ones the GPU runs.

use super::{AttnShape, Backend, Memory};

/// A kernel argument, in the kernel's parameter order.
pub enum Arg<'a, B> {
    Buf(&'a B),
    Out(&'a mut B),
    U32(u32),
    F32(f32),
}

/// A grid of blocks of `block` threads (one dimension each), with `smem` bytes of dynamic
/// shared memory per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32),
    pub block: u32,
    pub smem: u32,
}

/// A device that launches the kernels of `kernels.cu` by name.
pub trait Device: Memory {
    fn launch(
        &self,
        kernel: &'static str,
        at: Launch,
        args: &mut [Arg<'_, Self::Buf>],
    ) -> anyhow::Result<()>;
}

/// Every kernel of `kernels.cu`.
pub const NAMES: &[&str] = &[
    "matvec",
    "matmul",
    "rms_norm",
    "add_rows",
    "add",
    "scale",
    "round_f16_all",
    "rope",
    "gated",
    "softcap",
    "attention",
];

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;
/// Rows up to which a product reads each weight once for all rows (`matvec`).
pub const MATVEC_ROWS: usize = 8;

fn u(n: usize) -> anyhow::Result<u32> {
    u32::try_from(n).map_err(|_| anyhow::anyhow!("{n} is too large for a kernel argument"))
}

fn elems(n: usize) -> anyhow::Result<Launch> {
    Ok(Launch {
        grid: (u(n)?.div_ceil(BLOCK).max(1), 1),
        block: BLOCK,
        smem: 0,
    })
}

/// An element-wise kernel over `n` values (nothing to launch for none).
fn each<D: Device>(
    d: &D,
    kernel: &'static str,
    n: usize,
    args: &mut [Arg<'_, D::Buf>],
) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    d.launch(kernel, elems(n)?, args)
}

/// The operations on a [`Device`].
impl<D: Device> Backend for D {
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
    ) -> anyhow::Result<Self::Buf> {
        let mut out = self.zeros(rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(out);
        }
        let (kernel, at) = if rows <= MATVEC_ROWS {
            // One warp per weight row, eight warps a block.
            (
                "matvec",
                Launch {
                    grid: (u(n)?.div_ceil(8), 1),
                    block: 256,
                    smem: 0,
                },
            )
        } else {
            // 64 x 64 output tiles.
            (
                "matmul",
                Launch {
                    grid: (u(n)?.div_ceil(64), u(rows)?.div_ceil(64)),
                    block: 256,
                    smem: 0,
                },
            )
        };
        self.launch(
            kernel,
            at,
            &mut [
                Arg::Out(&mut out),
                Arg::Buf(x),
                Arg::Buf(w),
                Arg::U32(u(rows)?),
                Arg::U32(u(k)?),
                Arg::U32(u(n)?),
            ],
        )?;
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> anyhow::Result<Self::Buf> {
        let mut out = self.zeros(rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(out);
        }
        self.launch(
            "rms_norm",
            Launch {
                grid: (u(rows)?.max(1), 1),
                block: 256,
                smem: 0,
            },
            &mut [
                Arg::Out(&mut out),
                Arg::Buf(x),
                Arg::Buf(w),
                Arg::U32(u(n)?),
                Arg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn add_rows(
        &self,
        x: &mut Self::Buf,
        b: &Self::Buf,
        rows: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        each(
            self,
            "add_rows",
            rows * n,
            &mut [
                Arg::Out(x),
                Arg::Buf(b),
                Arg::U32(u(rows * n)?),
                Arg::U32(u(n)?),
            ],
        )
    }

    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> anyhow::Result<()> {
        each(
            self,
            "add",
            n,
            &mut [Arg::Out(x), Arg::Buf(y), Arg::U32(u(n)?)],
        )
    }

    fn scale(&self, x: &mut Self::Buf, n: usize, s: f32) -> anyhow::Result<()> {
        each(
            self,
            "scale",
            n,
            &mut [Arg::Out(x), Arg::U32(u(n)?), Arg::F32(s)],
        )
    }

    fn round_f16(&self, x: &mut Self::Buf, n: usize) -> anyhow::Result<()> {
        each(
            self,
            "round_f16_all",
            n,
            &mut [Arg::Out(x), Arg::U32(u(n)?)],
        )
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        cos_sin: &Self::Buf,
        rows: usize,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        neox: bool,
    ) -> anyhow::Result<()> {
        each(
            self,
            "rope",
            rows * n_head * (n_rot / 2),
            &mut [
                Arg::Out(x),
                Arg::Buf(cos_sin),
                Arg::U32(u(rows)?),
                Arg::U32(u(n_head)?),
                Arg::U32(u(head_dim)?),
                Arg::U32(u(n_rot)?),
                Arg::U32(u32::from(neox)),
            ],
        )
    }

    fn gated(&self, g: &mut Self::Buf, up: &Self::Buf, n: usize, gelu: bool) -> anyhow::Result<()> {
        each(
            self,
            "gated",
            n,
            &mut [
                Arg::Out(g),
                Arg::Buf(up),
                Arg::U32(u(n)?),
                Arg::U32(u32::from(gelu)),
            ],
        )
    }

    fn softcap(&self, x: &mut Self::Buf, n: usize, cap: f32) -> anyhow::Result<()> {
        each(
            self,
            "softcap",
            n,
            &mut [Arg::Out(x), Arg::U32(u(n)?), Arg::F32(cap)],
        )
    }

    fn attention(
        &self,
        q: &Self::Buf,
        kc: &Self::Buf,
        vc: &Self::Buf,
        a: &AttnShape,
        out: &mut Self::Buf,
    ) -> anyhow::Result<()> {
        // Dynamic shared memory: the query (head_dim) and the scores of the longest row's
        // window (pos + rows keys).
        let smem = (a.head_dim + a.pos + a.rows) * 4;
        // 48 KiB a block without opting in, less the kernel's static shared memory (two
        // reduction arrays: 384 bytes).
        if smem + 384 > 48 << 10 {
            anyhow::bail!(
                "{} positions are more than the GPU attention kernel holds (48 KiB of scores)",
                a.pos + a.rows
            );
        }
        self.launch(
            "attention",
            Launch {
                grid: (u(a.rows)?, u(a.n_head)?),
                block: 128,
                smem: u(smem)?,
            },
            &mut [
                Arg::Out(out),
                Arg::Buf(q),
                Arg::Buf(kc),
                Arg::Buf(vc),
                Arg::U32(u(a.q_row)?),
                Arg::U32(u(a.pos)?),
                Arg::U32(u(a.n_head)?),
                Arg::U32(u(a.group)?),
                Arg::U32(u(a.head_dim)?),
                Arg::U32(u(a.kv_dim)?),
                Arg::F32(a.scale),
                Arg::F32(a.softcap),
                Arg::U32(u(a.window)?),
            ],
        )
    }
}
