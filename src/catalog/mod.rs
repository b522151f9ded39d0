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
    /// Its confidence calibrator (the `calibrated` method, docs/confidence.md): a JSON file
    /// written by `examples/eval-confidence.rs --write-calibrator`. A relative path is read
    /// from the directory of the file that defines the model; the built-in catalog's entries
    /// name the calibrators shipped inside corral (`models/calibrators/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrator: Option<PathBuf>,
}

/// The calibrators shipped with corral, by the name the built-in catalog gives them.
pub const BUILTIN_CALIBRATORS: &[(&str, &str)] = &[
    (
        "calibrators/smollm2-135m-instruct.json",
        include_str!("../../models/calibrators/smollm2-135m-instruct.json"),
    ),
    (
        "calibrators/gemma3-270m.json",
        include_str!("../../models/calibrators/gemma3-270m.json"),
    ),
];

/// Reads the calibrator `m` names, defined in `origin` (a file, or the built-in catalog).
pub fn load_calibrator(
    m: &ModelDef,
    origin: &str,
) -> Result<Option<crate::confidence::Calibrator>, String> {
    let Some(path) = &m.calibrator else {
        return Ok(None);
    };
    let text = if origin.starts_with("built-in") {
        BUILTIN_CALIBRATORS
            .iter()
            .find(|(name, _)| std::path::Path::new(name) == path)
            .map(|(_, text)| text.to_string())
            .ok_or_else(|| format!("no built-in calibrator {}", path.display()))?
    } else {
        let full = match std::path::Path::new(origin).parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.clone(),
        };
        crate::files::read_text(&full, crate::files::MAX_CONFIG_BYTES)
            .map_err(|e| format!("{}: {e}", full.display()))?
    };
    crate::confidence::Calibrator::from_json(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
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

    /// Every model's calibrator, read; an unreadable or mismatched one is an error naming its
    /// model (a score the configuration asked for is never quietly replaced).
    pub fn calibrators(
        &self,
    ) -> Result<BTreeMap<String, crate::confidence::Calibrator>, (String, String)> {
        let mut out = BTreeMap::new();
        for (id, (m, origin)) in &self.models {
            match load_calibrator(m, origin) {
                Ok(Some(c)) if c.model != *id => {
                    return Err((
                        id.clone(),
                        format!(
                            "{origin}: calibrator: fitted for model '{}', not '{id}'",
                            c.model
                        ),
                    ))
                }
                Ok(Some(c)) => {
                    out.insert(id.clone(), c);
                }
                Ok(None) => {}
                Err(e) => return Err((id.clone(), format!("{origin}: calibrator: {e}"))),
            }
        }
        Ok(out)
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
    fn every_builtin_model_has_a_calibrator_fitted_for_it_and_a_bad_one_is_refused() {
        let file: CatalogFile = toml::from_str(BUILTIN_CATALOG).unwrap();
        let mut cat = Catalog::default();
        for m in file.models {
            cat.insert(m, "built-in models/catalog.toml".into())
                .unwrap();
        }
        let cals = cat.calibrators().unwrap();
        for m in cat.iter() {
            let c = cals
                .get(&m.id)
                .unwrap_or_else(|| panic!("{} has no calibrator", m.id));
            assert_eq!(c.model, m.id);
            assert!(
                c.items >= 500 && c.correct > 0,
                "{}: fitted on {}",
                m.id,
                c.fitted_on
            );
        }
        // A user's entry naming a file that is not a calibrator fails, naming the model.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cal.json"), "{\"version\": 1}").unwrap();
        let origin = dir.path().join("catalog.toml").display().to_string();
        let mut m = cat.get(DEFAULT_MODEL).unwrap().clone();
        m.id = "mine".into();
        m.calibrator = Some("cal.json".into());
        let mut mine = Catalog::default();
        mine.insert(m, origin).unwrap();
        let (id, msg) = mine.calibrators().unwrap_err();
        assert_eq!(id, "mine");
        assert!(msg.contains("cal.json"), "{msg}");
    }

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
