//! The device operations as CUDA kernels (`kernels.cu`, compiled to PTX by NVRTC when the
//! runner is built: build.rs), launched through `cudarc` on one stream. Only the driver is
//! loaded at run time (`libcuda.so.1`, by `cudarc`'s dynamic loading), when a GPU is asked for:
//! a runner built with this feature starts on a host without one as long as it computes on
//! the CPU.
//!
//! Untested on a real GPU so far (no GPU machine was available to the project); the graph the
//! kernels serve is tested on the CPU (`host.rs`), and `scripts/gpu-check.sh` is the check to
//! run on one.

use std::sync::Arc;

use anyhow::Context;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::{AttnShape, Backend};

/// The kernels, as NVRTC compiled them for `compute_80` (the driver compiles the PTX for the
/// GPU it finds: Ampere, Hopper and later).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

struct Kernels {
    matvec: CudaFunction,
    matmul: CudaFunction,
    rms_norm: CudaFunction,
    add_rows: CudaFunction,
    add: CudaFunction,
    scale: CudaFunction,
    round_f16: CudaFunction,
    rope: CudaFunction,
    gated: CudaFunction,
    softcap: CudaFunction,
    attention: CudaFunction,
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    name: String,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

fn elems(n: usize) -> anyhow::Result<(u32, LaunchConfig)> {
    let n32 = u32::try_from(n).context("a buffer too large for one kernel launch")?;
    Ok((
        n32,
        LaunchConfig {
            grid_dim: (n32.div_ceil(BLOCK).max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        },
    ))
}

fn u(n: usize) -> anyhow::Result<u32> {
    u32::try_from(n).context("a size too large for a kernel argument")
}

impl Cuda {
    /// The GPU `ordinal` (among those the sandbox shows: `CUDA_VISIBLE_DEVICES`), with the
    /// kernels loaded.
    pub fn new(ordinal: usize) -> anyhow::Result<Cuda> {
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            anyhow::anyhow!(
                "CUDA device {ordinal} could not be opened ({e}): the driver (libcuda.so.1) and \
                 the device nodes must be reachable from the sandbox (a profile with gpu_access)"
            )
        })?;
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
            .context("loading corral's CUDA kernels")?;
        let f = |name: &str| {
            module
                .load_function(name)
                .with_context(|| format!("CUDA kernel {name}"))
        };
        let k = Kernels {
            matvec: f("matvec")?,
            matmul: f("matmul")?,
            rms_norm: f("rms_norm")?,
            add_rows: f("add_rows")?,
            add: f("add")?,
            scale: f("scale")?,
            round_f16: f("round_f16_all")?,
            rope: f("rope")?,
            gated: f("gated")?,
            softcap: f("softcap")?,
            attention: f("attention")?,
        };
        let (major, minor) = ctx.compute_capability()?;
        let name = format!(
            "cuda:{ordinal} {} (compute {major}.{minor}, {} MB)",
            ctx.name()?,
            ctx.total_mem()? >> 20
        );
        Ok(Cuda {
            ctx,
            stream,
            k,
            name,
        })
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn free_bytes(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free)
    }

    fn upload(&self, data: &[f32]) -> anyhow::Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(data)?)
    }

    fn zeros(&self, n: usize) -> anyhow::Result<CudaSlice<f32>> {
        Ok(self.stream.alloc_zeros::<f32>(n.max(1))?)
    }

    fn download(&self, b: &CudaSlice<f32>, from: usize, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(self.stream.clone_dtoh(&b.slice(from..from + n))?)
    }

    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> anyhow::Result<CudaSlice<f32>> {
        let mut out = self.zeros(rows * n)?;
        let (r, k32, n32) = (u(rows)?, u(k)?, u(n)?);
        if rows <= 8 {
            // One warp per weight row, eight warps a block.
            let cfg = LaunchConfig {
                grid_dim: (n32.div_ceil(8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads rows*k values of x and n*k of w and writes rows*n of
            // out, all within the buffers (the Backend contract and `zeros` above).
            unsafe {
                self.stream
                    .launch_builder(&self.k.matvec)
                    .arg(&mut out)
                    .arg(x)
                    .arg(w)
                    .arg(&r)
                    .arg(&k32)
                    .arg(&n32)
                    .launch(cfg)?;
            }
        } else {
            let cfg = LaunchConfig {
                grid_dim: (n32.div_ceil(64), r.div_ceil(64), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the tiles are bounds-checked in the kernel.
            unsafe {
                self.stream
                    .launch_builder(&self.k.matmul)
                    .arg(&mut out)
                    .arg(x)
                    .arg(w)
                    .arg(&r)
                    .arg(&k32)
                    .arg(&n32)
                    .launch(cfg)?;
            }
        }
        Ok(out)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> anyhow::Result<CudaSlice<f32>> {
        let mut out = self.zeros(rows * n)?;
        let n32 = u(n)?;
        let cfg = LaunchConfig {
            grid_dim: (u(rows)?.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per row of n values of x and out; w holds n values.
        unsafe {
            self.stream
                .launch_builder(&self.k.rms_norm)
                .arg(&mut out)
                .arg(x)
                .arg(w)
                .arg(&n32)
                .arg(&eps)
                .launch(cfg)?;
        }
        Ok(out)
    }

    fn add_rows(
        &self,
        x: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        let (total, cfg) = elems(rows * n)?;
        let n32 = u(n)?;
        // SAFETY: total elements of x; b read at i % n < n.
        unsafe {
            self.stream
                .launch_builder(&self.k.add_rows)
                .arg(x)
                .arg(b)
                .arg(&total)
                .arg(&n32)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> anyhow::Result<()> {
        let (n32, cfg) = elems(n)?;
        // SAFETY: n elements of each.
        unsafe {
            self.stream
                .launch_builder(&self.k.add)
                .arg(x)
                .arg(y)
                .arg(&n32)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn scale(&self, x: &mut CudaSlice<f32>, n: usize, s: f32) -> anyhow::Result<()> {
        let (n32, cfg) = elems(n)?;
        // SAFETY: n elements.
        unsafe {
            self.stream
                .launch_builder(&self.k.scale)
                .arg(x)
                .arg(&n32)
                .arg(&s)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn round_f16(&self, x: &mut CudaSlice<f32>, n: usize) -> anyhow::Result<()> {
        let (n32, cfg) = elems(n)?;
        // SAFETY: n elements.
        unsafe {
            self.stream
                .launch_builder(&self.k.round_f16)
                .arg(x)
                .arg(&n32)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos_sin: &CudaSlice<f32>,
        rows: usize,
        n_head: usize,
        head_dim: usize,
        n_rot: usize,
        neox: bool,
    ) -> anyhow::Result<()> {
        let (_, cfg) = elems(rows * n_head * (n_rot / 2))?;
        let (r, h, d, nr, nx) = (
            u(rows)?,
            u(n_head)?,
            u(head_dim)?,
            u(n_rot)?,
            u32::from(neox),
        );
        // SAFETY: one thread per (row, head, pair), each within its head of x; cos_sin holds
        // rows * n_rot / 2 pairs.
        unsafe {
            self.stream
                .launch_builder(&self.k.rope)
                .arg(x)
                .arg(cos_sin)
                .arg(&r)
                .arg(&h)
                .arg(&d)
                .arg(&nr)
                .arg(&nx)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn gated(
        &self,
        g: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
        gelu: bool,
    ) -> anyhow::Result<()> {
        let (n32, cfg) = elems(n)?;
        let gelu = u32::from(gelu);
        // SAFETY: n elements of each.
        unsafe {
            self.stream
                .launch_builder(&self.k.gated)
                .arg(g)
                .arg(up)
                .arg(&n32)
                .arg(&gelu)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn softcap(&self, x: &mut CudaSlice<f32>, n: usize, cap: f32) -> anyhow::Result<()> {
        let (n32, cfg) = elems(n)?;
        // SAFETY: n elements.
        unsafe {
            self.stream
                .launch_builder(&self.k.softcap)
                .arg(x)
                .arg(&n32)
                .arg(&cap)
                .launch(cfg)?;
        }
        Ok(())
    }

    fn copy(
        &self,
        src: &CudaSlice<f32>,
        from: usize,
        dst: &mut CudaSlice<f32>,
        to: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&src.slice(from..from + n), &mut dst.slice_mut(to..to + n))?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        kc: &CudaSlice<f32>,
        vc: &CudaSlice<f32>,
        a: &AttnShape,
        out: &mut CudaSlice<f32>,
    ) -> anyhow::Result<()> {
        // Shared memory: the query (head_dim) and the scores of the longest row's window.
        let smem = (a.head_dim + a.pos + a.rows) * 4;
        let cfg = LaunchConfig {
            grid_dim: (u(a.rows)?, u(a.n_head)?, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: u(smem)?,
        };
        let (q_row, pos, n_head, group, head_dim, kv_dim, window) = (
            u(a.q_row)?,
            u(a.pos)?,
            u(a.n_head)?,
            u(a.group)?,
            u(a.head_dim)?,
            u(a.kv_dim)?,
            u(a.window)?,
        );
        // SAFETY: block (i, h) reads row q_row + i of q, positions < pos + i + 1 of the caches
        // (which hold pos + rows), and writes row q_row + i, head h of out.
        unsafe {
            self.stream
                .launch_builder(&self.k.attention)
                .arg(out)
                .arg(q)
                .arg(kc)
                .arg(vc)
                .arg(&q_row)
                .arg(&pos)
                .arg(&n_head)
                .arg(&group)
                .arg(&head_dim)
                .arg(&kv_dim)
                .arg(&a.scale)
                .arg(&a.softcap)
                .arg(&window)
                .launch(cfg)?;
        }
        Ok(())
    }
}
