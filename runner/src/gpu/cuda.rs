//! The device of `kernels.rs` on CUDA: `kernels.cu` compiled to PTX by NVRTC when the runner
//! is built (build.rs), launched through `cudarc` on one stream. Only the driver is loaded at
//! run time (`libcuda.so.1`, by `cudarc`'s dynamic loading), when a GPU is asked for: a runner
//! built with this feature starts on a host without one as long as it computes on the CPU.
//!
//! Not yet run on a real GPU (none was available to the project): the graph is tested on the
//! CPU (`host.rs`), the kernels under an emulation of CUDA's execution model (`emulate.rs`),
//! and `scripts/gpu-check.sh` is the check to run on one.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::kernels::{Arg, Device, Launch, NAMES};
use super::Memory;

/// The kernels, as NVRTC compiled them for `compute_80` (the driver compiles the PTX for the
/// GPU it finds: Ampere, Hopper and later).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

pub struct Cuda {
    ctx: Arc<CudaContext>,
    capability: (u32, u32),
    total: usize,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Cuda {
    /// The GPU `ordinal` (among those the sandbox shows), with the kernels loaded.
    pub fn new(ordinal: usize) -> anyhow::Result<Cuda> {
        // SAFETY: only tries to open the library (cudarc would panic at the first call
        // without it).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            anyhow::bail!(
                "the CUDA driver (libcuda.so.1) could not be loaded: is the NVIDIA driver \
                 installed, and its libraries readable from the sandbox?"
            );
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            anyhow::anyhow!(
                "CUDA device {ordinal} could not be opened ({e}): the device nodes must be \
                     reachable from the sandbox (a profile with gpu_access)"
            )
        })?;
        // One stream, in order: the per-buffer events cudarc would record on every launch
        // to order several streams are of no use here.
        // SAFETY: every buffer is used on this one stream only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(PTX))
            .context("loading corral's CUDA kernels")?;
        let mut functions = HashMap::new();
        for name in NAMES {
            let f = module
                .load_function(name)
                .with_context(|| format!("CUDA kernel {name}"))?;
            functions.insert(*name, f);
        }
        let (major, minor) = ctx.compute_capability()?;
        let total = ctx.total_mem()?;
        let name = format!(
            "cuda:{ordinal} {} (compute {major}.{minor}, {} MB)",
            ctx.name()?,
            total >> 20
        );
        Ok(Cuda {
            ctx,
            capability: (u32::try_from(major)?, u32::try_from(minor)?),
            total,
            stream,
            functions,
            name,
        })
    }
}

impl Cuda {
    pub fn name(&self) -> String {
        self.name.clone()
    }

    pub fn capability(&self) -> (u32, u32) {
        self.capability
    }

    pub fn total_bytes(&self) -> usize {
        self.total
    }
}

impl Memory for Cuda {
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
}

impl Device for Cuda {
    fn launch(
        &self,
        kernel: &'static str,
        at: Launch,
        args: &mut [Arg<'_, CudaSlice<f32>>],
    ) -> anyhow::Result<()> {
        let f = self
            .functions
            .get(kernel)
            .ok_or_else(|| anyhow::anyhow!("no CUDA kernel {kernel}"))?;
        let mut b = self.stream.launch_builder(f);
        for a in args.iter_mut() {
            match a {
                Arg::Buf(x) => b.arg(*x),
                Arg::Out(x) => b.arg(&mut **x),
                Arg::U32(v) => b.arg(&*v),
                Arg::F32(v) => b.arg(&*v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (at.grid.0, at.grid.1, 1),
            block_dim: (at.block, 1, 1),
            shared_mem_bytes: at.smem,
        };
        // SAFETY: the argument list matches the kernel's parameters in `kernels.cu` (both are
        // the ones `kernels.rs` passes, which the emulated kernels are tested with), and each
        // kernel stays within the lengths its buffers were made with.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
