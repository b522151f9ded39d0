//! A [`Device`] that runs `kernels.cu` on the CPU under an emulation of CUDA's execution model
//! (`emulate.cpp`, compiled by `g++` on first use): each launch of `kernels.rs` (its grid, its
//! block, its arguments in order) runs as the GPU would run it, thread by thread, with barriers
//! for `__syncthreads` and warp shuffles. Tests compare each kernel with `host.rs`, the
//! operation it must compute, on shapes that reach every edge of the kernels' tiles and
//! loops.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::kernels::{Arg, Device, Launch};

#[derive(Debug)]
pub struct Emulated {
    exe: PathBuf,
}

impl Emulated {
    /// The emulator, built from the current sources (with AddressSanitizer: a kernel that
    /// reads or writes past a buffer fails its test) and kept under `target/emulate/` by the
    /// sources' digest.
    pub fn new() -> Emulated {
        static EXE: OnceLock<PathBuf> = OnceLock::new();
        let exe = EXE.get_or_init(|| {
            use sha2::Digest;
            let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu");
            let mut h = sha2::Sha256::new();
            for f in ["emulate.cpp", "kernels.cu"] {
                h.update(std::fs::read(src.join(f)).unwrap());
            }
            let digest = corral_protocol::digest::hex(&h.finalize());
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/emulate");
            std::fs::create_dir_all(&dir).unwrap();
            let exe = dir.join(&digest[..16]);
            if exe.is_file() {
                return exe;
            }
            let tmp = dir.join(format!("{}.{}", &digest[..16], std::process::id()));
            let out = Command::new("g++")
                .args(["-std=c++20", "-O1", "-g", "-pthread"])
                .args([
                    "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all",
                    "-o",
                ])
                .arg(&tmp)
                .arg(src.join("emulate.cpp"))
                .output()
                .expect("run g++ (the kernel emulation is C++)");
            assert!(
                out.status.success(),
                "emulate.cpp does not compile:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::rename(&tmp, &exe).unwrap();
            exe
        });
        Emulated { exe: exe.clone() }
    }
}

impl super::OnHost for Emulated {
    fn name(&self) -> String {
        "emulated CUDA".into()
    }
}

impl Device for Emulated {
    fn launch(
        &self,
        kernel: &'static str,
        at: Launch,
        args: &mut [Arg<'_, Vec<f32>>],
    ) -> anyhow::Result<()> {
        let mut input = Vec::new();
        let u32s = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        u32s(&mut input, kernel.len() as u32);
        input.extend_from_slice(kernel.as_bytes());
        for x in [at.grid.0, at.grid.1, at.block, at.smem, args.len() as u32] {
            u32s(&mut input, x);
        }
        for a in args.iter() {
            let buf = |v: &mut Vec<u8>, b: &[f32]| {
                v.push(b'b');
                v.extend_from_slice(&(b.len() as u32).to_le_bytes());
                b.iter().for_each(|f| v.extend_from_slice(&f.to_le_bytes()));
            };
            match a {
                Arg::Buf(b) => buf(&mut input, b),
                Arg::Out(b) => buf(&mut input, b),
                Arg::U32(x) => {
                    input.push(b'u');
                    u32s(&mut input, *x);
                }
                Arg::F32(x) => {
                    input.push(b'f');
                    input.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        let mut child = Command::new(&self.exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output()?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writing to the emulator panicked"))??;
        if !out.status.success() {
            anyhow::bail!(
                "emulated {kernel} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut bytes = &out.stdout[..];
        let mut next = || -> anyhow::Result<Vec<f32>> {
            let (n, rest) = bytes
                .split_first_chunk::<4>()
                .ok_or_else(|| anyhow::anyhow!("short output"))?;
            let n = u32::from_le_bytes(*n) as usize;
            let (data, rest) = rest
                .split_at_checked(n * 4)
                .ok_or_else(|| anyhow::anyhow!("short output"))?;
            bytes = rest;
            Ok(data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        for a in args.iter_mut() {
            match a {
                Arg::Buf(_) => {
                    next()?;
                }
                Arg::Out(b) => **b = next()?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::selftest;
    use super::*;

    /// Every kernel, launched as the GPU would launch it, computes what the host computes
    /// (`selftest.rs`: the shapes and tolerances `corral-runner --gpu-self-test` uses on a GPU).
    #[test]
    fn every_emulated_kernel_computes_what_the_host_computes() {
        let checks = selftest::run(&Emulated::new()).unwrap();
        assert!(checks.len() > 20, "{} checks", checks.len());
        for c in &checks {
            assert!(
                c.ok(),
                "{}: off by {} (tolerance {})",
                c.name,
                c.worst,
                c.tol
            );
        }
    }
}
