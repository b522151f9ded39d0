//! Loading a model: GGUF files of the architectures corral's own forward pass reads
//! (`llama::ARCHITECTURES`: Llama/Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3) and safetensors
//! directories with a `tokenizer.json` (llama, Qwen2 and Phi-3 checkpoints, in f32 on Candle's
//! models).

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, phi3, qwen2};

use crate::tokenizer::TokenizerSpec;

/// The largest context window a runner offers (memory grows with it).
const MAX_CONTEXT: usize = 4096;

enum Weights {
    Llama(crate::llama::Llama),
    /// Safetensors checkpoints, computed in f32 by Candle's models.
    SafeLlama {
        model: llama::Llama,
        config: llama::Config,
        cache: llama::Cache,
    },
    SafeQwen2(qwen2::ModelForCausalLM),
    SafePhi3(phi3::Model),
}

pub struct Model {
    weights: Weights,
    pub architecture: String,
    pub context_length: usize,
    pub quantization: String,
    device: Device,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.architecture)
            .field("context_length", &self.context_length)
            .finish()
    }
}

/// What the model file says besides the weights (GGUF metadata, or a checkpoint's JSON files).
#[derive(Debug)]
pub struct ModelMeta {
    pub tokenizer: TokenizerSpec,
    pub chat_template: Option<String>,
}

fn md_str(ct: &gguf_file::Content, k: &str) -> Option<String> {
    ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned()
}

fn md_u32(ct: &gguf_file::Content, k: &str) -> Option<u32> {
    ct.metadata
        .get(k)
        .and_then(|v| {
            v.to_u64()
                .ok()
                .or_else(|| v.to_i32().ok().map(|x| x as u64))
        })
        .and_then(|v| u32::try_from(v).ok())
}

fn md_bool(ct: &gguf_file::Content, k: &str) -> Option<bool> {
    ct.metadata.get(k).and_then(|v| v.to_bool().ok())
}

fn md_strings(ct: &gguf_file::Content, k: &str) -> Vec<String> {
    ct.metadata
        .get(k)
        .and_then(|v| v.to_vec().ok())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.to_string().ok().cloned())
                .collect()
        })
        .unwrap_or_default()
}

fn tokenizer_spec(ct: &gguf_file::Content) -> TokenizerSpec {
    let arr = |k: &str| ct.metadata.get(k).and_then(|v| v.to_vec().ok());
    TokenizerSpec {
        model: md_str(ct, "tokenizer.ggml.model").unwrap_or_default(),
        pre: md_str(ct, "tokenizer.ggml.pre"),
        pre_patterns: Vec::new(),
        tokens: md_strings(ct, "tokenizer.ggml.tokens"),
        token_types: arr("tokenizer.ggml.token_type")
            .map(|a| a.iter().filter_map(|x| x.to_i32().ok()).collect())
            .unwrap_or_default(),
        merges: md_strings(ct, "tokenizer.ggml.merges"),
        scores: arr("tokenizer.ggml.scores")
            .map(|a| a.iter().filter_map(|x| x.to_f32().ok()).collect())
            .unwrap_or_default(),
        bos: md_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos: md_u32(ct, "tokenizer.ggml.eos_token_id"),
        eot: md_u32(ct, "tokenizer.ggml.eot_token_id"),
        add_bos: md_bool(ct, "tokenizer.ggml.add_bos_token"),
        add_space_prefix: md_bool(ct, "tokenizer.ggml.add_space_prefix"),
    }
}

impl Model {
    /// Loads a GGUF model from the file's bytes (read once: the caller also hashes them).
    pub fn load_gguf(
        path: &Path,
        bytes: &[u8],
        device: &Device,
    ) -> anyhow::Result<(Model, ModelMeta)> {
        let mut file = Cursor::new(bytes);
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        let architecture = md_str(&ct, "general.architecture").unwrap_or_default();
        let meta = ModelMeta {
            tokenizer: tokenizer_spec(&ct),
            chat_template: md_str(&ct, "tokenizer.chat_template"),
        };
        let file_ctx =
            md_u32(&ct, &format!("{architecture}.context_length")).unwrap_or(2048) as usize;
        // The KV cache grows with use; cap the window so a runner's memory stays predictable.
        let context_length = file_ctx.min(MAX_CONTEXT);

        let mut dtypes: Vec<GgmlDType> = ct.tensor_infos.values().map(|t| t.ggml_dtype).collect();
        dtypes.sort_by_key(|d| format!("{d:?}"));
        dtypes.dedup();
        let quantization = dtypes
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join("+");
        let weights = Weights::Llama(crate::llama::Llama::from_gguf(
            &ct,
            bytes,
            &mut file,
            device,
            context_length,
        )?);
        Ok((
            Model {
                weights,
                architecture,
                context_length,
                quantization,
                device: device.clone(),
            },
            meta,
        ))
    }

    /// Whether `forward` at a `pos` short of what was fed before continues from the first
    /// `pos` positions (corral's own kernels keep and cut their KV cache; candle's append).
    pub fn resumable(&self) -> bool {
        matches!(self.weights, Weights::Llama(_))
    }

    /// Logits for the last position of `tokens`, fed at position `pos` (0 starts a new sequence
    /// and clears the KV cache).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> anyhow::Result<Vec<f32>> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.weights {
            Weights::Llama(m) => return m.forward(tokens, pos),
            Weights::SafeLlama {
                model,
                config,
                cache,
            } => {
                if pos == 0 {
                    *cache = llama::Cache::new(true, DType::F32, config, &self.device)?;
                }
                model.forward(&input, pos, cache)?
            }
            Weights::SafeQwen2(m) => {
                if pos == 0 {
                    m.clear_kv_cache();
                }
                m.forward(&input, pos)?
            }
            Weights::SafePhi3(m) => {
                if pos == 0 {
                    m.clear_kv_cache();
                }
                m.forward(&input, pos)?
            }
        };
        // The last position's logits, whatever leading dimensions the model keeps.
        let logits = logits.to_dtype(DType::F32)?.flatten_all()?;
        let n = logits.dim(0)?;
        let vocab = self.vocab_size().unwrap_or(n);
        Ok(logits
            .narrow(0, n - vocab.min(n), vocab.min(n))?
            .to_vec1()?)
    }

    fn vocab_size(&self) -> Option<usize> {
        match &self.weights {
            Weights::Llama(m) => Some(m.vocab_size()),
            Weights::SafeLlama { config, .. } => Some(config.vocab_size),
            _ => None,
        }
    }

    /// Loads a safetensors checkpoint: `config` is `config.json`, `tensors` the contents of every
    /// `*.safetensors` file (already verified by the caller). Weights are computed in f32.
    pub fn load_safetensors(
        dir: &Path,
        config: &serde_json::Value,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Model> {
        let arch = config["model_type"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut dtypes: Vec<String> = tensors
            .values()
            .map(|t| format!("{:?}", t.dtype()))
            .collect();
        dtypes.sort();
        dtypes.dedup();
        let quantization = format!("{} -> F32", dtypes.join("+"));
        let bad = |e: serde_json::Error| anyhow::anyhow!("{}/config.json: {e}", dir.display());
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let (weights, ctx) = match arch.as_str() {
            "llama" | "mistral" => {
                let raw: llama::LlamaConfig =
                    serde_json::from_value(config.clone()).map_err(bad)?;
                let ctx = raw.max_position_embeddings;
                let config = raw.into_config(false);
                let model = llama::Llama::load(vb, &config)?;
                let cache = llama::Cache::new(true, DType::F32, &config, device)?;
                (
                    Weights::SafeLlama {
                        model,
                        config,
                        cache,
                    },
                    ctx,
                )
            }
            "qwen2" => {
                let c: qwen2::Config = serde_json::from_value(config.clone()).map_err(bad)?;
                let ctx = c.max_position_embeddings;
                (Weights::SafeQwen2(qwen2::ModelForCausalLM::new(&c, vb)?), ctx)
            }
            "phi3" => {
                let c: phi3::Config = serde_json::from_value(config.clone()).map_err(bad)?;
                let ctx = c.max_position_embeddings;
                (Weights::SafePhi3(phi3::Model::new(&c, vb)?), ctx)
            }
            other => anyhow::bail!(
                "{}/config.json: model_type {other:?} is not supported (llama, mistral, qwen2 and phi3 are)",
                dir.display()
            ),
        };
        Ok(Model {
            weights,
            architecture: arch,
            context_length: ctx.min(MAX_CONTEXT),
            quantization,
            device: device.clone(),
        })
    }
}
