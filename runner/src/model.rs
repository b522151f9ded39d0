//! Loading a model with Candle: GGUF (llama family, Qwen2, Phi-3, Gemma 3) and, for the same
//! architectures, safetensors directories with a `tokenizer.json`.
//!
//! Candle has AVX2 kernels for Q4_0, Q8_0 and the K-quants but computes Q4_1 with scalar code.
//! Q4_1 tensors are converted to Q8_0 at load time, block by block (each Q4_1 value is exactly
//! representable before Q8_0's rounding, so the loss is Q8_0's alone); `--keep-quantization`
//! turns that off.

use std::io::{Cursor, Read, Seek};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, phi3, quantized_phi3, quantized_qwen2, qwen2};

use crate::tokenizer::TokenizerSpec;

/// The largest context window a runner offers (memory grows with it).
const MAX_CONTEXT: usize = 4096;

enum Weights {
    Llama(crate::llama::Llama),
    Qwen2(quantized_qwen2::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
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
        requantize: bool,
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
        // Our llama forward pass computes Q4_1 directly; Candle's models get Q8_0 instead.
        let ours = matches!(architecture.as_str(), "llama" | "mistral" | "gemma3");
        let needs = requantize
            && !ours
            && ct.tensor_infos.values().any(|t| {
                t.ggml_dtype == GgmlDType::Q4_1
                    && t.shape.dims().last().is_some_and(|d| d % 32 == 0)
            });
        let quantization = dtypes
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join("+");
        let (weights, quantization) = if needs {
            let (ct2, data) = requantized(&ct, bytes)?;
            (
                build(
                    &architecture,
                    ct2,
                    &data,
                    &mut Cursor::new(&data),
                    device,
                    context_length,
                )?,
                format!("{quantization} -> Q8_0"),
            )
        } else {
            (
                build(&architecture, ct, bytes, &mut file, device, context_length)?,
                quantization,
            )
        };
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
            Weights::Qwen2(m) => m.forward(&input, pos)?,
            Weights::Phi3(m) => m.forward(&input, pos)?,
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

fn build<R: Read + Seek>(
    arch: &str,
    ct: gguf_file::Content,
    bytes: &[u8],
    r: &mut R,
    device: &Device,
    max_seq: usize,
) -> anyhow::Result<Weights> {
    Ok(match arch {
        "llama" | "mistral" | "gemma3" => Weights::Llama(crate::llama::Llama::from_gguf(&ct, bytes, r, device, max_seq)?),
        "qwen2" => Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, r, device)?),
        "phi3" => Weights::Phi3(quantized_phi3::ModelWeights::from_gguf(false, ct, r, device)?),
        other => anyhow::bail!("unsupported GGUF architecture '{other}' (llama, mistral, qwen2, phi3 and gemma3 are supported)"),
    })
}

/// Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles (32 values).
const Q4_1_BLOCK: usize = 20;
/// Q8_0 block: f16 scale, 32 signed bytes.
const Q8_0_BLOCK: usize = 34;

/// Converts Q4_1 blocks to Q8_0 blocks directly, the way ggml quantizes rows to Q8_0
/// (`d = amax / 127`, values rounded half away from zero).
pub fn q4_1_to_q8_0(src: &[u8]) -> Vec<u8> {
    use rayon::prelude::*;
    let blocks = src.len() / Q4_1_BLOCK;
    let mut out = vec![0u8; blocks * Q8_0_BLOCK];
    out.par_chunks_mut(Q8_0_BLOCK * 256)
        .zip(src.par_chunks(Q4_1_BLOCK * 256))
        .for_each(|(dst, s)| {
            for (o, b) in dst
                .chunks_exact_mut(Q8_0_BLOCK)
                .zip(s.chunks_exact(Q4_1_BLOCK))
            {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
                let mut x = [0f32; 32];
                for j in 0..16 {
                    x[j] = f32::from(b[4 + j] & 0x0f) * d + m;
                    x[j + 16] = f32::from(b[4 + j] >> 4) * d + m;
                }
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                o[..2].copy_from_slice(&half::f16::from_f32(scale).to_le_bytes());
                for j in 0..32 {
                    o[2 + j] = ((x[j] * inv).round() as i8) as u8;
                }
            }
        });
    out
}

/// A copy of `ct` whose tensor data lives in one in-memory buffer, with slow-kernel tensors
/// converted to Q8_0. `bytes` is the whole GGUF file.
fn requantized(
    ct: &gguf_file::Content,
    bytes: &[u8],
) -> anyhow::Result<(gguf_file::Content, Vec<u8>)> {
    let mut infos = std::collections::HashMap::new();
    let mut data: Vec<u8> = Vec::with_capacity(bytes.len() * 2);
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort_by_key(|n| ct.tensor_infos[*n].offset);
    for name in names {
        let info = &ct.tensor_infos[name];
        let n = info.shape.elem_count();
        let size = n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = usize::try_from(ct.tensor_data_offset + info.offset)?;
        let src = bytes
            .get(start..start + size)
            .ok_or_else(|| anyhow::anyhow!("tensor {name} lies outside the file"))?;
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        let offset = data.len() as u64;
        let dtype = if info.ggml_dtype == GgmlDType::Q4_1
            && info.shape.dims().last().is_some_and(|d| d % 32 == 0)
        {
            data.extend_from_slice(&q4_1_to_q8_0(src));
            GgmlDType::Q8_0
        } else {
            data.extend_from_slice(src);
            info.ggml_dtype
        };
        infos.insert(
            name.clone(),
            gguf_file::TensorInfo {
                ggml_dtype: dtype,
                shape: info.shape.clone(),
                offset,
            },
        );
    }
    let content = gguf_file::Content {
        magic: ct.magic,
        metadata: ct.metadata.clone(),
        tensor_infos: infos,
        tensor_data_offset: 0,
    };
    Ok((content, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn direct_q4_1_to_q8_0_matches_a_dequantize_requantize_round_trip() {
        let dev = Device::Cpu;
        let vals: Vec<f32> = (0..32 * 64)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let t = Tensor::from_vec(vals, (64, 32), &dev).unwrap();
        let q41 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let via_f32 = QTensor::quantize(&q41.dequantize(&dev).unwrap(), GgmlDType::Q8_0).unwrap();
        let direct = q4_1_to_q8_0(&q41.data().unwrap());
        assert_eq!(direct, via_f32.data().unwrap().to_vec());
    }
}
