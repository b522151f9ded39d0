//! The model catalog: model definitions (the schema of `slm.model_allow_lists.global_models`),
//! the built-in `models/catalog.toml`, and the allow-list checks the config validates.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The catalog shipped with corral.
pub const BUILTIN_CATALOG: &str = include_str!("../../models/catalog.toml");
/// The model `corral run` uses when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDef {
    pub id: String,
    pub name: String,
    pub provider: ModelProvider,
    /// Hex sha256 of the model file, verified at every load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    #[serde(default)]
    pub resource_requirements: ResourceRequirements,
    /// Profile its runner uses (default: `slm.default_sandbox_profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_profile: Option<String>,
    /// The file's `general.architecture` (`llama`, `gemma3`, ...), as its runner reports it;
    /// shown by `corral models list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The file's weight types, as its runner reports them (`F32+Q4_1+Q8_0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelProvider {
    HuggingFace {
        model_path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
    },
    LocalFile {
        file_path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Capability {
    TextGeneration,
    Chat,
    CodeGeneration,
    Reasoning,
    ToolUse,
    Summarization,
    Translation,
    Extraction,
    Embeddings,
    /// Answers constrained to a JSON object or a JSON schema (`response_format`).
    StructuredOutput,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequirements {
    #[serde(default)]
    pub min_memory_mb: u64,
    #[serde(default)]
    pub preferred_cpu_cores: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_requirements: Option<GpuRequirements>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuRequirements {
    pub min_vram_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
}

/// A catalog file: `[[models]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    #[serde(default)]
    pub models: Vec<ModelDef>,
}

/// Every model known to a configuration, with where each was defined.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, (ModelDef, String)>,
}

impl Catalog {
    /// Adds `model`, defined at `origin`; a second definition of the same id is an error
    /// returning the first origin.
    pub fn insert(&mut self, model: ModelDef, origin: String) -> Result<(), String> {
        if let Some((_, first)) = self.models.get(&model.id) {
            return Err(first.clone());
        }
        self.models.insert(model.id.clone(), (model, origin));
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&ModelDef> {
        self.models.get(id).map(|(m, _)| m)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.models.contains_key(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelDef> {
        self.models.values().map(|(m, _)| m)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

/// Checks a sha256 string: 64 hex digits.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_the_default_model() {
        let file: CatalogFile = toml::from_str(BUILTIN_CATALOG).unwrap();
        let m = file.models.iter().find(|m| m.id == DEFAULT_MODEL).unwrap();
        assert_eq!(
            m.sha256.as_deref(),
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
        );
        assert!(valid_sha256(m.sha256.as_deref().unwrap()));
    }
}
