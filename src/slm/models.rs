//! Model files: where a catalog model lives on disk, fetching it from the Hugging Face hub, and
//! checking its sha256 (the runner checks it again at every load, inside its sandbox).

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, ModelDef, ModelProvider};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model '{id}' (known: {known})")]
    Unknown { id: String, known: String },
    #[error("model '{id}' is not on this machine ({}); fetch it with `corral models pull {id}` (or scripts/fetch-model.sh)", path.display())]
    Missing { id: String, path: PathBuf },
    #[error("{}: sha256 {got} does not match the catalog's {expected}; delete the file and fetch it again", path.display())]
    Checksum {
        path: PathBuf,
        got: String,
        expected: String,
    },
    #[error("fetching '{id}' from the Hugging Face hub failed: {message}")]
    Hub { id: String, message: String },
    #[error("model '{id}' is a local file ({}) and cannot be pulled", path.display())]
    Local { id: String, path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The catalog's definition of `id`.
pub fn lookup<'a>(catalog: &'a Catalog, id: &str) -> Result<&'a ModelDef, ModelError> {
    catalog.get(id).ok_or_else(|| ModelError::Unknown {
        id: id.to_string(),
        known: catalog.ids().collect::<Vec<_>>().join(", "),
    })
}

/// Where the model's file is (or will be, once pulled into `model_dir`, `slm.model_dir`).
pub fn model_path(model_dir: &Path, m: &ModelDef) -> PathBuf {
    match &m.provider {
        ModelProvider::LocalFile { file_path } => file_path.clone(),
        ModelProvider::HuggingFace {
            model_path,
            filename,
            ..
        } => {
            let name = filename.clone().unwrap_or_else(|| {
                model_path
                    .rsplit('/')
                    .next()
                    .unwrap_or(model_path)
                    .to_string()
            });
            model_dir.join(name)
        }
    }
}

/// The model's file (GGUF) or directory (safetensors), which must exist.
pub fn require(model_dir: &Path, m: &ModelDef) -> Result<PathBuf, ModelError> {
    let p = model_path(model_dir, m);
    if p.is_file() || p.is_dir() {
        Ok(p)
    } else {
        Err(ModelError::Missing {
            id: m.id.clone(),
            path: p,
        })
    }
}

/// What a runner needs to load catalog model `id`: its file (which must exist), its digest, the
/// runner binary.
pub fn runner_spec(
    catalog: &Catalog,
    model_dir: &Path,
    id: &str,
) -> Result<super::runner::RunnerSpec, ModelError> {
    let m = lookup(catalog, id)?;
    Ok(super::runner::RunnerSpec {
        model_path: require(model_dir, m)?,
        sha256: m.sha256.clone(),
        binary: super::runner::runner_binary(),
        slots: 1,
        gpu: m.resource_requirements.gpu_requirements.clone(),
    })
}

/// The model's digest: the sha256 of a file, or of a safetensors directory's manifest (see
/// `corral_protocol::digest`; the runner computes the same at every load).
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    corral_protocol::digest::model_digest(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn verify(path: &Path, expected: &str) -> Result<(), ModelError> {
    let got = sha256_file(path)?;
    if got.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(ModelError::Checksum {
            path: path.to_path_buf(),
            got,
            expected: expected.to_string(),
        })
    }
}

/// Downloads the model from the hub (with a progress bar), verifies it, and places it in the
/// model directory. Returns the path.
pub fn pull(model_dir: &Path, m: &ModelDef, progress: bool) -> Result<PathBuf, ModelError> {
    let dest = model_path(model_dir, m);
    let ModelProvider::HuggingFace {
        model_path: repo,
        filename,
        revision,
    } = &m.provider
    else {
        return Err(ModelError::Local {
            id: m.id.clone(),
            path: dest,
        });
    };
    if dest.is_file() {
        if let Some(sha) = &m.sha256 {
            verify(&dest, sha)?;
        }
        return Ok(dest);
    }
    let hub = |e: &dyn std::fmt::Display| ModelError::Hub {
        id: m.id.clone(),
        message: e.to_string(),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .build()
        .map_err(|e| hub(&e))?;
    let repo = match revision {
        Some(r) => hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, r.clone()),
        None => hf_hub::Repo::model(repo.clone()),
    };
    let file = filename.clone().unwrap_or_default();
    let cached = api.repo(repo).get(&file).map_err(|e| hub(&e))?;
    if let Some(sha) = &m.sha256 {
        verify(&cached, sha)?;
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tmp = dest.with_extension("part");
    std::fs::copy(&cached, &tmp).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &dest).map_err(|source| ModelError::Io {
        path: dest.clone(),
        source,
    })?;
    Ok(dest)
}
