//! With the `cuda` feature: compiles `src/gpu/kernels.cu` to PTX with NVRTC (loaded from
//! `libnvrtc.so.12` on the library path; scripts/build-cuda.sh installs one from PyPI). The PTX
//! targets `compute_80` and is JIT-compiled by the driver for the GPU it finds.

fn main() -> Result<(), String> {
    println!("cargo:rerun-if-changed=src/gpu/kernels.cu");
    println!("cargo:rerun-if-env-changed=LD_LIBRARY_PATH");
    #[cfg(feature = "cuda")]
    cuda::compile()?;
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn compile() -> Result<(), String> {
        let src = std::fs::read_to_string("src/gpu/kernels.cu")
            .map_err(|e| format!("src/gpu/kernels.cu: {e}"))?;
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some("compute_80"),
            // IEEE division and square root, no flush to zero, no multiply-adds but the
            // kernels' explicit `fmaf`s: the CPU path's arithmetic.
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            fmad: Some(false),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        };
        // cudarc panics when it cannot load the library.
        let compiled =
            std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(&src, opts));
        let ptx = match compiled {
            Ok(Ok(ptx)) => ptx,
            Ok(Err(e)) => return Err(format!("NVRTC could not compile src/gpu/kernels.cu: {e:?}")),
            Err(_) => {
                return Err(
                    "the `cuda` feature compiles the GPU kernels with NVRTC at build \
                            time, and libnvrtc.so.12 was not found: build with \
                            scripts/build-cuda.sh (it installs NVRTC from PyPI) or put a CUDA 12 \
                            libnvrtc on LD_LIBRARY_PATH"
                        .into(),
                )
            }
        };
        let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?)
            .join("kernels.ptx");
        std::fs::write(&out, ptx.to_src()).map_err(|e| format!("{}: {e}", out.display()))
    }
}
