//! Loading a model: GGUF files of the architectures corral's own forward pass reads
//! (`llama::ARCHITECTURES`: Llama/Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3) and safetensors
//! directories with a `tokenizer.json` of the same families (converted at load, in f32, onto the
//! same pass).

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};

use crate::tokenizer::{Tokenizer, TokenizerSpec};

/// The largest context window a runner offers (memory grows with it).
const MAX_CONTEXT: usize = 4096;

pub struct Model {
    weights: crate::llama::Llama,
    /// The weights on a device and the pass there (`gpu.rs`), when the runner computes on one.
    device: Option<Box<dyn crate::gpu::DeviceForward>>,
    pub architecture: String,
    pub context_length: usize,
    pub quantization: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.architecture)
            .field("context_length", &self.context_length)
            .field("device", &self.device_name())
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
    /// Loads a GGUF model from the file's bytes (read once: the caller also hashes them) with
    /// its tokenizer, built on a second thread while the weights are laid out (Gemma's
    /// 262k-token tokenizer took 90 ms of a 530 ms load), and its chat template. The thread has
    /// ended when this returns.
    pub fn load_gguf(
        path: &Path,
        bytes: &[u8],
        device: &Device,
    ) -> anyhow::Result<(Model, Option<String>, Tokenizer)> {
        let mut file = Cursor::new(bytes);
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        let architecture = md_str(&ct, "general.architecture").unwrap_or_default();
        let spec = tokenizer_spec(&ct);
        let chat_template = md_str(&ct, "tokenizer.chat_template");
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
        let (weights, tok) = std::thread::scope(|s| -> anyhow::Result<_> {
            // The main thread's stack size: the tokenizer compiles its pre-tokenizer patterns.
            let tok = std::thread::Builder::new()
                .name("tokenizer".into())
                .stack_size(8 << 20)
                .spawn_scoped(s, move || Tokenizer::new(spec))
                .map_err(|e| {
                    anyhow::anyhow!("starting the thread that loads the tokenizer: {e}")
                })?;
            let weights =
                crate::llama::Llama::from_gguf(&ct, bytes, &mut file, device, context_length);
            Ok((weights, tok.join()))
        })?;
        let tok = tok.map_err(|_| anyhow::anyhow!("loading the tokenizer panicked"))??;
        Ok((
            Model {
                weights: weights?,
                device: None,
                architecture,
                context_length,
                quantization,
            },
            chat_template,
            tok,
        ))
    }

    /// Moves the computation to the device chosen (nothing for the CPU): the weights are
    /// uploaded, the CPU model keeps the embedding table and the tokenizer's side.
    pub fn place(
        &mut self,
        choice: crate::gpu::Choice,
        cap_mb: Option<usize>,
        needs: &crate::gpu::Requirements,
        slots: usize,
    ) -> anyhow::Result<()> {
        if let Some(d) = crate::gpu::open(choice, &self.weights, cap_mb, needs, slots)? {
            self.attach(d);
        }
        Ok(())
    }

    /// Computes on `device` from now on. The CPU model keeps only what the device pass reads
    /// on the host (the embedding table, the configuration); its layers are freed.
    pub(crate) fn attach(&mut self, device: Box<dyn crate::gpu::DeviceForward>) {
        self.device = Some(device);
        self.weights.release_layers();
    }

    /// Bytes of KV cache a device's memory cap leaves (None on the CPU or without a cap).
    pub fn device_kv_room(&self) -> Option<usize> {
        self.device.as_ref().and_then(|d| d.kv_room())
    }

    /// The CPU model (tests build device models from it).
    #[cfg(test)]
    pub(crate) fn weights_for_tests(&self) -> &crate::llama::Llama {
        &self.weights
    }

    /// The device computing, for logs ("cpu" when none).
    pub fn device_name(&self) -> String {
        match &self.device {
            Some(d) => d.describe(),
            None => "cpu".into(),
        }
    }

    /// Several sequences in one pass ([`crate::llama::Llama::forward_batch`], or the device's).
    pub fn forward_batch(
        &self,
        items: &mut [crate::llama::Item<'_>],
    ) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
        match &self.device {
            Some(d) => d.forward_batch(&self.weights, items),
            None => self.weights.forward_batch(items),
        }
    }

    /// Bytes the grouped copies of the weights take once batched products have run.
    pub fn grouped_bytes(&self) -> usize {
        self.weights.grouped_bytes()
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> crate::llama::KvCache {
        match &self.device {
            Some(d) => d.new_cache(&self.weights),
            None => self.weights.new_cache(),
        }
    }

    /// Bytes a sequence's cache takes per position.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.weights.kv_bytes_per_token()
    }

    /// Loads a safetensors checkpoint: `config` is `config.json`, `tensors` the contents of every
    /// `*.safetensors` file (already verified by the caller). Converted as llama.cpp's converter
    /// would (`checkpoint.rs`), in f32, and run on the same forward pass as GGUF files.
    pub fn load_safetensors(
        dir: &Path,
        config: &serde_json::Value,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Model> {
        let mut dtypes: Vec<String> = tensors
            .values()
            .map(|t| format!("{:?}", t.dtype()))
            .collect();
        dtypes.sort();
        dtypes.dedup();
        let quantization = format!("{} -> F32", dtypes.join("+"));
        let (ct, tensors, arch) = crate::checkpoint::to_gguf(config, tensors)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let ctx = md_u32(&ct, &format!("{arch}.context_length")).unwrap_or(2048) as usize;
        let context_length = ctx.min(MAX_CONTEXT);
        let weights = crate::llama::Llama::from_tensors(&ct, tensors, device, context_length)?;
        Ok(Model {
            weights,
            device: None,
            architecture: arch.to_string(),
            context_length,
            quantization,
        })
    }
}
