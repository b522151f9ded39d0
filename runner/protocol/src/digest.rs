//! The digest that identifies a model on disk, computed the same way by the supervisor (before
//! it starts a runner) and by the runner (at every load, inside its sandbox).
//!
//! - A single file (GGUF): the sha256 of its bytes.
//! - A directory (safetensors checkpoint): the sha256 of its manifest, the output of
//!   `sha256sum` over the files the runner reads, sorted by name:
//!   `config.json`, every `*.safetensors`, `tokenizer.json` and, when present,
//!   `tokenizer_config.json`. Other files (READMEs, `*.bin` weights) are neither read nor
//!   hashed. The same value comes from the shell:
//!   `cd DIR && LC_ALL=C ls config.json *.safetensors tokenizer.json tokenizer_config.json | xargs sha256sum | sha256sum`.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Lower-case hex of a sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of a digest's bytes.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of a safetensors model directory that the runner reads (and the digest covers),
/// sorted by name. Fails when `config.json`, `tokenizer.json` or the weights are missing.
pub fn model_dir_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let wanted = matches!(
            name.as_str(),
            "config.json" | "tokenizer.json" | "tokenizer_config.json"
        ) || name.ends_with(".safetensors");
        if wanted && e.file_type()?.is_file() {
            names.push(name);
        }
    }
    names.sort();
    for need in ["config.json", "tokenizer.json"] {
        if !names.iter().any(|n| n == need) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no {need}", dir.display()),
            ));
        }
    }
    if !names.iter().any(|n| n.ends_with(".safetensors")) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no *.safetensors weights", dir.display()),
        ));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The manifest digest of a directory from each file's name and sha256 (in any order).
pub fn manifest_digest(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest: String = sorted
        .iter()
        .map(|(name, sha)| format!("{sha}  {name}\n"))
        .collect();
    sha256_hex(manifest.as_bytes())
}

/// The digest of a model file or directory (streamed: files are not held in memory).
pub fn model_digest(path: &Path) -> io::Result<String> {
    if !path.is_dir() {
        return file_sha256(path);
    }
    let mut files = Vec::new();
    for f in model_dir_files(path)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push((name, file_sha256(&f)?));
    }
    Ok(manifest_digest(&files))
}

fn file_sha256(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_digest_is_sha256sum_of_the_manifest() {
        let dir = std::env::temp_dir().join(format!("corral-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{\"model\":{}}").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(dir.join("README.md"), b"not covered").unwrap();
        let d = model_digest(&dir).unwrap();
        // what `sha256sum config.json model.safetensors tokenizer.json | sha256sum` prints
        let manifest = format!(
            "{}  config.json\n{}  model.safetensors\n{}  tokenizer.json\n",
            sha256_hex(b"{}"),
            sha256_hex(b"weights"),
            sha256_hex(b"{\"model\":{}}")
        );
        assert_eq!(d, sha256_hex(manifest.as_bytes()));
        std::fs::write(dir.join("README.md"), b"changed").unwrap();
        assert_eq!(
            model_digest(&dir).unwrap(),
            d,
            "files outside the set do not count"
        );
        std::fs::write(dir.join("model.safetensors"), b"weightz").unwrap();
        assert_ne!(model_digest(&dir).unwrap(), d);
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let e = model_digest(&dir).unwrap_err();
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
