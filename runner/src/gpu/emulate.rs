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

impl Device for Emulated {
    type Buf = Vec<f32>;

    fn describe(&self) -> String {
        "emulated CUDA".into()
    }

    fn free_bytes(&self) -> Option<usize> {
        None
    }

    fn upload(&self, data: &[f32]) -> anyhow::Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn zeros(&self, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(vec![0.0; n.max(1)])
    }

    fn download(&self, b: &Vec<f32>, from: usize, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(b[from..from + n].to_vec())
    }

    fn copy(
        &self,
        src: &Vec<f32>,
        from: usize,
        dst: &mut Vec<f32>,
        to: usize,
        n: usize,
    ) -> anyhow::Result<()> {
        dst[to..to + n].copy_from_slice(&src[from..from + n]);
        Ok(())
    }

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
    use super::super::host::Host;
    use super::super::kernels::{Kernels, MATVEC_ROWS};
    use super::super::{AttnShape, Backend};
    use super::*;

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

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
            assert!(ok, "{what}: element {i} is {g}, the host computes {w}");
        }
    }

    /// The products: one row, the most rows `matvec` takes, one more (the tiled kernel), many
    /// rows; widths that are not multiples of the warp, the 16-wide k step or the 64-wide tile.
    #[test]
    fn emulated_products_compute_what_the_host_computes() {
        let (dev, host) = (Kernels(Emulated::new()), Host);
        for (rows, k, n) in [
            (1, 70, 37),
            (MATVEC_ROWS, 64, 9),
            (MATVEC_ROWS + 1, 33, 65),
            (70, 17, 130),
        ] {
            let x = values(rows * k, 1, 1.0);
            let w = values(n * k, 2, 0.5);
            let got = dev.matmul(&x, &w, rows, k, n).unwrap();
            let want = host.matmul(&x, &w, rows, k, n).unwrap();
            close(
                &got[..rows * n],
                &want,
                1e-5,
                &format!("matmul {rows}x{k} . {n}x{k}"),
            );
        }
    }

    #[test]
    fn emulated_norms_and_element_wise_kernels_compute_what_the_host_computes() {
        let (dev, host) = (Kernels(Emulated::new()), Host);
        // rows of a length the block does not divide (and longer than it)
        for (rows, n) in [(3, 576), (5, 64), (2, 1000)] {
            let x = values(rows * n, 3, 4.0);
            let w = values(n, 4, 1.0);
            let got = dev.rms_norm(&x, &w, rows, n, 1e-6).unwrap();
            let want = host.rms_norm(&x, &w, rows, n, 1e-6).unwrap();
            close(&got, &want, 1e-6, &format!("rms_norm {rows}x{n}"));
        }
        let n = 1000;
        let x = values(n, 5, 12.0);
        let y = values(n, 6, 2.0);
        let b = values(40, 7, 1.0);
        type Op<'a> = (
            &'a str,
            Box<dyn Fn(&dyn Backend<Buf = Vec<f32>>, &mut Vec<f32>) + 'a>,
        );
        let ops: Vec<Op<'_>> = vec![
            ("add", Box::new(|d, v| d.add(v, &y, n).unwrap())),
            (
                "add_rows",
                Box::new(|d, v| d.add_rows(v, &b, n / 40, 40).unwrap()),
            ),
            ("scale", Box::new(|d, v| d.scale(v, n, 0.125).unwrap())),
            ("round_f16", Box::new(|d, v| d.round_f16(v, n).unwrap())),
            ("softcap", Box::new(|d, v| d.softcap(v, n, 5.0).unwrap())),
            ("silu", Box::new(|d, v| d.gated(v, &y, n, false).unwrap())),
            ("gelu", Box::new(|d, v| d.gated(v, &y, n, true).unwrap())),
        ];
        for (name, op) in &ops {
            let (mut got, mut want) = (x.clone(), x.clone());
            op(&dev, &mut got);
            op(&host, &mut want);
            close(&got, &want, 1e-6, name);
        }
    }

    #[test]
    fn emulated_rotations_compute_what_the_host_computes() {
        let (dev, host) = (Kernels(Emulated::new()), Host);
        for (neox, n_rot) in [(false, 64), (true, 64), (true, 32)] {
            let (rows, n_head, head_dim) = (3, 4, 64);
            let x = values(rows * n_head * head_dim, 8, 2.0);
            let cs: Vec<f32> = (0..rows * n_rot / 2)
                .flat_map(|i| {
                    let t = i as f32 * 0.37;
                    [t.cos(), t.sin()]
                })
                .collect();
            let (mut got, mut want) = (x.clone(), x.clone());
            dev.rope(&mut got, &cs, rows, n_head, head_dim, n_rot, neox)
                .unwrap();
            host.rope(&mut want, &cs, rows, n_head, head_dim, n_rot, neox)
                .unwrap();
            close(
                &got,
                &want,
                1e-6,
                &format!("rope neox={neox} n_rot={n_rot}"),
            );
        }
    }

    /// Attention: a prompt chunk after earlier positions, grouped heads, a sliding window
    /// shorter than the context, Gemma 2's cap, and a single decoding row; scores that the
    /// 128 threads of a block share unevenly.
    #[test]
    fn emulated_attention_computes_what_the_host_computes() {
        let (dev, host) = (Kernels(Emulated::new()), Host);
        for (rows, pos, group, window, softcap) in [
            (1, 0, 1, 0, 0.0),
            (4, 150, 3, 0, 0.0),
            (5, 200, 2, 64, 0.0),
            (3, 20, 1, 0, 50.0),
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
            let mut got = vec![7.0; (q_row + rows) * q_dim];
            let mut want = got.clone();
            dev.attention(&q, &k, &v, &a, &mut got).unwrap();
            host.attention(&q, &k, &v, &a, &mut want).unwrap();
            // The weights are rounded to f16 after sums in another order: a weight can land on
            // the neighbouring f16 value.
            close(&got, &want, 2e-3, &format!("attention {a:?}"));
            assert!(
                got[..q_row * q_dim].iter().all(|x| *x == 7.0),
                "rows before q_row written"
            );
        }
    }
}
