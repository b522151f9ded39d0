//! A Hugging Face safetensors checkpoint read as the GGUF llama.cpp's converter would write from
//! it (`config.json` keys as GGUF metadata, tensors under GGUF names and layouts, in f32), so that
//! it runs on the same forward pass as GGUF files (`llama.rs`) with the same options.
//!
//! What the conversion does, per family, as `convert_hf_to_gguf.py` does it:
//! - llama/mistral: Q and K rows reordered from rotary halves to adjacent pairs; Llama 3's
//!   `rope_scaling` (`rope_type: llama3`) becomes per-frequency divisors (`rope_freqs.weight`);
//! - qwen2: q/k/v biases; qwen3: per-head q/k norms;
//! - phi3: fused `qkv_proj` and `gate_up_proj`; LongRoPE's short and long factors with the
//!   attention factor `sqrt(1 + ln(scale) / ln(original context))`;
//! - gemma2/gemma3: norms stored as `1 + w` (Gemma's RMS norm multiplies by `1 + w`), the
//!   sliding window, soft-capping and local rope base from the config.
//!
//! Linear rope scaling is kept; YaRN and other kinds are refused by name.

use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Tensor};
use serde_json::Value;

/// The GGUF architecture for a `config.json`, and the language model's configuration as
/// Hugging Face would read it: Gemma 3's multimodal checkpoints nest it under `text_config`
/// (merged over the top level), keys a config leaves out take the family's defaults
/// (transformers' config classes), and transformers 5's `rope_parameters` stand for
/// `rope_theta`/`rope_scaling` (per layer type for Gemma 3).
fn architecture(config: &Value) -> anyhow::Result<(&'static str, Value)> {
    let model_type = config["model_type"].as_str().unwrap_or_default();
    let (arch, mut c) = match model_type {
        "llama" | "mistral" => ("llama", config.clone()),
        "qwen2" => ("qwen2", config.clone()),
        "qwen3" => ("qwen3", config.clone()),
        "phi3" => ("phi3", config.clone()),
        "gemma2" => ("gemma2", config.clone()),
        "gemma3_text" => ("gemma3", config.clone()),
        "gemma3" if config["text_config"].is_object() => {
            let mut merged = config.clone();
            if let (Some(m), Some(t)) = (merged.as_object_mut(), config["text_config"].as_object())
            {
                for (k, v) in t {
                    m.insert(k.clone(), v.clone());
                }
            }
            ("gemma3", merged)
        }
        other => anyhow::bail!(
            "model_type {other:?} is not supported (llama, mistral, qwen2, qwen3, phi3, gemma2, \
             gemma3 and gemma3_text are)"
        ),
    };
    let defaults = match arch {
        "gemma3" => serde_json::json!({"num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "sliding_window": 4096, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 131_072, "tie_word_embeddings": true}),
        "gemma2" => serde_json::json!({"head_dim": 256, "rope_theta": 10_000.0,
            "sliding_window": 4096, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true}),
        "qwen3" => serde_json::json!({"head_dim": 128}),
        _ => serde_json::json!({}),
    };
    let Some(m) = c.as_object_mut() else {
        anyhow::bail!("config.json is not an object");
    };
    let rp = m.get("rope_parameters").cloned().unwrap_or(Value::Null);
    if rp.is_object() {
        let (full, sliding) = if rp["full_attention"].is_object() {
            (
                rp["full_attention"].clone(),
                rp["sliding_attention"].clone(),
            )
        } else {
            (rp.clone(), Value::Null)
        };
        if let Some(t) = full.get("rope_theta") {
            m.entry("rope_theta").or_insert(t.clone());
        }
        if let Some(t) = sliding.get("rope_theta") {
            m.entry("rope_local_base_freq").or_insert(t.clone());
        }
        let kind = full["rope_type"].as_str().unwrap_or("default");
        if kind != "default" && !m.get("rope_scaling").is_some_and(Value::is_object) {
            m.insert("rope_scaling".into(), full);
        }
    }
    if let Some(d) = defaults.as_object() {
        for (k, v) in d {
            if m.get(k).is_none_or(Value::is_null) {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    Ok((arch, c))
}

/// A multimodal checkpoint's language-model tensors under the plain names (`model.layers...`,
/// `lm_head.weight`); its vision tower and projector dropped.
fn language_model(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(k, _)| !k.contains("vision_tower.") && !k.contains("multi_modal_projector."))
        .map(|(k, v)| {
            let k = if let Some(rest) = k.strip_prefix("language_model.") {
                rest.to_string()
            } else if let Some(rest) = k.strip_prefix("model.language_model.") {
                format!("model.{rest}")
            } else {
                k
            };
            (k, v)
        })
        .collect()
}

/// A GGUF metadata value.
fn u32v(v: u64) -> anyhow::Result<gguf_file::Value> {
    Ok(gguf_file::Value::U32(u32::try_from(v)?))
}

/// Converts `config` and `tensors` (Hugging Face names) into GGUF metadata and tensors under
/// GGUF names. Returns the content (metadata and tensor shapes), the tensors and the
/// architecture.
pub fn to_gguf(
    config: &Value,
    tensors: HashMap<String, Tensor>,
) -> anyhow::Result<(gguf_file::Content, HashMap<String, Tensor>, &'static str)> {
    let (arch, c) = architecture(config)?;
    let c = &c;
    let mut tensors = language_model(tensors);
    let num = |k: &str| c[k].as_u64();
    let req = |k: &str| num(k).ok_or_else(|| anyhow::anyhow!("config.json: {k} is missing"));
    let float = |k: &str| c[k].as_f64();
    let n_embd = req("hidden_size")?;
    let n_head = req("num_attention_heads")?;
    let n_kv = num("num_key_value_heads").unwrap_or(n_head);
    let n_layer = req("num_hidden_layers")?;
    if n_head == 0 || n_kv == 0 {
        anyhow::bail!("config.json: no attention heads");
    }
    let head_dim = num("head_dim").unwrap_or(n_embd / n_head);
    let mut md: Vec<(String, gguf_file::Value)> = Vec::new();
    let mut put = |k: &str, v: gguf_file::Value| md.push((format!("{arch}.{k}"), v));
    put("embedding_length", u32v(n_embd)?);
    put("block_count", u32v(n_layer)?);
    put("attention.head_count", u32v(n_head)?);
    put("attention.head_count_kv", u32v(n_kv)?);
    put("attention.key_length", u32v(head_dim)?);
    put("attention.value_length", u32v(head_dim)?);
    put("feed_forward_length", u32v(req("intermediate_size")?)?);
    // Phi-3 family (Phi-4-mini): rotation over part of each head, as the converter counts it.
    if let Some(pct) = float("partial_rotary_factor").filter(|p| *p < 1.0) {
        put(
            "rope.dimension_count",
            u32v((pct * n_embd as f64) as u64 / n_head)?,
        );
    }
    put(
        "context_length",
        u32v(num("max_position_embeddings").unwrap_or(2048))?,
    );
    let eps = float("rms_norm_eps").unwrap_or(1e-6) as f32;
    put(
        "attention.layer_norm_rms_epsilon",
        gguf_file::Value::F32(eps),
    );
    let base = float("rope_theta").unwrap_or(10_000.0) as f32;
    put("rope.freq_base", gguf_file::Value::F32(base));
    if arch.starts_with("gemma") {
        if let Some(w) = num("sliding_window") {
            put("attention.sliding_window", u32v(w)?);
        }
        if let Some(p) = num("sliding_window_pattern") {
            put("attention.sliding_window_pattern", u32v(p)?);
        }
        if let Some(b) = float("rope_local_base_freq") {
            put("rope.freq_base_swa", gguf_file::Value::F32(b as f32));
        }
        for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(v) = float(k) {
                put(k, gguf_file::Value::F32(v as f32));
            }
        }
    }
    // Rope scaling: linear as a factor, Llama 3's as divisors, LongRoPE as factor tensors.
    let mut extra: Vec<(String, Vec<f32>)> = Vec::new();
    let scaling = &c["rope_scaling"];
    if scaling.is_object() {
        let kind = scaling["rope_type"]
            .as_str()
            .or_else(|| scaling["type"].as_str())
            .unwrap_or_default();
        let factor = scaling["factor"].as_f64().unwrap_or(1.0);
        match kind {
            "linear" => put("rope.scaling.factor", gguf_file::Value::F32(factor as f32)),
            // Dynamic NTK changes nothing within the trained context; the converter writes
            // such a model unscaled, as here.
            "default" | "dynamic" => {}
            "llama3" => extra.push((
                "rope_freqs.weight".into(),
                llama3_divisors(head_dim as usize, base, factor, scaling),
            )),
            "longrope" | "su" => {
                let orig = c["original_max_position_embeddings"]
                    .as_u64()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "config.json: longrope needs original_max_position_embeddings"
                        )
                    })?;
                let ctx = num("max_position_embeddings").unwrap_or(orig);
                put("rope.scaling.original_context_length", u32v(orig)?);
                let scale = ctx as f64 / orig as f64;
                let attn = if scale <= 1.0 {
                    1.0
                } else {
                    (1.0 + scale.ln() / (orig as f64).ln()).sqrt()
                };
                put(
                    "rope.scaling.attn_factor",
                    gguf_file::Value::F32(attn as f32),
                );
                for (key, name) in [
                    ("long_factor", "rope_factors_long.weight"),
                    ("short_factor", "rope_factors_short.weight"),
                ] {
                    let f: Vec<f32> = scaling[key]
                        .as_array()
                        .ok_or_else(|| {
                            anyhow::anyhow!("config.json: rope_scaling.{key} is missing")
                        })?
                        .iter()
                        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                        .collect();
                    extra.push((name.into(), f));
                }
            }
            other => anyhow::bail!(
                "config.json: rope_scaling of type '{other}' is not supported (linear, llama3, \
                 longrope and dynamic are)"
            ),
        }
    }

    // Tensors, renamed (moved, not copied: the forward pass takes each matrix as it builds
    // itself, so the weights are held once), matrices in their own type (f16, bf16, f32),
    // vectors in f32. Every one must be used.
    let gemma = arch.starts_with("gemma");
    let mut take = |name: &str| -> anyhow::Result<Tensor> {
        tensors
            .remove(name)
            .ok_or_else(|| anyhow::anyhow!("tensor {name} is missing"))
    };
    let f32_of = |t: Tensor| -> anyhow::Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
    // Gemma's RMS norm multiplies by 1 + w, computed in f32 as Hugging Face's is.
    let norm = |t: Tensor| -> anyhow::Result<Tensor> {
        let t = f32_of(t)?;
        Ok(if gemma { (t + 1.0)? } else { t })
    };
    let mut buf = Buffer::default();
    buf.add("token_embd.weight", take("model.embed_tokens.weight")?)?;
    buf.add("output_norm.weight", norm(take("model.norm.weight")?)?)?;
    // As the converter: an lm_head is the output matrix wherever the checkpoint has one (Gemma
    // always reads the embedding), its absence means tied embeddings.
    if let Ok(t) = take("lm_head.weight") {
        if !gemma {
            buf.add("output.weight", t)?;
        }
    }
    for i in 0..n_layer {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let b = |name: &str| format!("blk.{i}.{name}");
        buf.add(
            &b("attn_norm.weight"),
            norm(take(&format!("{p}.input_layernorm.weight"))?)?,
        )?;
        if gemma {
            for (gguf, hf) in [
                ("post_attention_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm"),
            ] {
                buf.add(
                    &b(&format!("{gguf}.weight")),
                    norm(take(&format!("{p}.{hf}.weight"))?)?,
                )?;
            }
        } else {
            buf.add(
                &b("ffn_norm.weight"),
                f32_of(take(&format!("{p}.post_attention_layernorm.weight"))?)?,
            )?;
        }
        if arch == "phi3" {
            buf.add(
                &b("attn_qkv.weight"),
                take(&format!("{a}.qkv_proj.weight"))?,
            )?;
            buf.add(
                &b("ffn_up.weight"),
                take(&format!("{p}.mlp.gate_up_proj.weight"))?,
            )?;
        } else {
            let (mut q, mut k) = (
                take(&format!("{a}.q_proj.weight"))?,
                take(&format!("{a}.k_proj.weight"))?,
            );
            if arch == "llama" {
                q = interleave_rotary(q, n_head as usize)?;
                k = interleave_rotary(k, n_kv as usize)?;
            }
            buf.add(&b("attn_q.weight"), q)?;
            buf.add(&b("attn_k.weight"), k)?;
            buf.add(&b("attn_v.weight"), take(&format!("{a}.v_proj.weight"))?)?;
            for (x, heads) in [("q", n_head), ("k", n_kv), ("v", 0)] {
                if let Ok(bias) = take(&format!("{a}.{x}_proj.bias")) {
                    let mut bias = f32_of(bias)?;
                    if arch == "llama" && heads > 0 {
                        // Reordered like the rows they add to.
                        let n = bias.elem_count();
                        bias =
                            interleave_rotary(bias.reshape((n, 1))?, heads as usize)?.reshape(n)?;
                    }
                    buf.add(&b(&format!("attn_{x}.bias")), bias)?;
                }
            }
            buf.add(
                &b("ffn_gate.weight"),
                take(&format!("{p}.mlp.gate_proj.weight"))?,
            )?;
            buf.add(
                &b("ffn_up.weight"),
                take(&format!("{p}.mlp.up_proj.weight"))?,
            )?;
        }
        if arch == "qwen3" || arch == "gemma3" {
            buf.add(
                &b("attn_q_norm.weight"),
                norm(take(&format!("{a}.q_norm.weight"))?)?,
            )?;
            buf.add(
                &b("attn_k_norm.weight"),
                norm(take(&format!("{a}.k_norm.weight"))?)?,
            )?;
        }
        buf.add(
            &b("attn_output.weight"),
            take(&format!("{a}.o_proj.weight"))?,
        )?;
        if let Ok(bias) = take(&format!("{a}.o_proj.bias")) {
            buf.add(&b("attn_output.bias"), f32_of(bias)?)?;
        }
        buf.add(
            &b("ffn_down.weight"),
            take(&format!("{p}.mlp.down_proj.weight"))?,
        )?;
    }
    // Rotary buffers some checkpoints save are derived, not weights.
    tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    if let Some(name) = tensors.keys().next() {
        anyhow::bail!(
            "tensor {name} is not part of a {arch} model as corral reads it ({} unused)",
            tensors.len()
        );
    }
    for (name, values) in extra {
        let n = values.len();
        buf.add(
            &name,
            Tensor::from_vec(values, n, &candle_core::Device::Cpu)?,
        )?;
    }
    md.push((
        "general.architecture".into(),
        gguf_file::Value::String(arch.into()),
    ));
    let content = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: md.into_iter().collect(),
        tensor_infos: buf.infos,
        tensor_data_offset: 0,
    };
    Ok((content, buf.tensors, arch))
}

/// The converted tensors under their GGUF names, with the index a GGUF would give them.
#[derive(Default)]
struct Buffer {
    tensors: HashMap<String, Tensor>,
    infos: HashMap<String, gguf_file::TensorInfo>,
}

impl Buffer {
    /// Keeps `t` under `name`: f16 and bf16 as they are, anything else as f32.
    fn add(&mut self, name: &str, t: Tensor) -> anyhow::Result<()> {
        let (t, ggml_dtype) = match t.dtype() {
            DType::F16 => (t, GgmlDType::F16),
            DType::BF16 => (t, GgmlDType::BF16),
            _ => (t.to_dtype(DType::F32)?, GgmlDType::F32),
        };
        self.infos.insert(
            name.to_string(),
            gguf_file::TensorInfo {
                ggml_dtype,
                shape: t.dims().to_vec().into(),
                offset: 0,
            },
        );
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }
}

/// Reads a `.safetensors` file tensor by tensor, hashing every byte as it goes: returns its
/// tensors and the file's sha256. Memory stays at the tensors themselves (plus one tensor's
/// bytes), where reading the file whole and then parsing it would hold it twice. f32, f16 and
/// bf16 tensors are read; other types are refused by name. Nothing read may be used before the
/// caller has checked the digest.
pub fn read_safetensors(
    path: &std::path::Path,
) -> anyhow::Result<(HashMap<String, Tensor>, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let file_len = usize::try_from(file.metadata()?.len())?;
    let mut f = std::io::BufReader::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut read = |n: usize, hash: &mut Sha256| -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)?;
        hash.update(&buf);
        Ok(buf)
    };
    let len = read(8, &mut hash)?;
    let header_len = usize::try_from(u64::from_le_bytes(len.as_slice().try_into()?))?;
    if header_len > (100 << 20).min(file_len.saturating_sub(8)) {
        anyhow::bail!("header of {header_len} bytes in a file of {file_len}");
    }
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&read(header_len, &mut hash)?)?;
    let mut entries: Vec<(String, String, Vec<usize>, usize, usize)> = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap_or_default().to_string();
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{name}: no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("{name}: bad shape"))?;
        let off = |i: usize| v["data_offsets"][i].as_u64().map(|o| o as usize);
        let (Some(start), Some(end)) = (off(0), off(1)) else {
            anyhow::bail!("{name}: no data_offsets");
        };
        entries.push((name, dtype, shape, start, end));
    }
    entries.sort_by_key(|e| e.3);
    let mut pos = 0usize;
    let mut tensors = HashMap::new();
    for (name, dtype, shape, start, end) in entries {
        if start < pos || end < start || end > file_len {
            anyhow::bail!(
                "{name}: data_offsets {start}..{end} overlap, reverse or pass the file's end"
            );
        }
        let width = match dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                anyhow::bail!("{name}: dtype {other} is not supported (F32, F16 and BF16 are)")
            }
        };
        let elems = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
        if elems.and_then(|e| e.checked_mul(width)) != Some(end - start) {
            anyhow::bail!(
                "{name}: {} bytes for shape {shape:?} of {dtype}",
                end - start
            );
        }
        read(start - pos, &mut hash)?;
        let bytes = read(end - start, &mut hash)?;
        pos = end;
        let dev = &candle_core::Device::Cpu;
        let t = match width {
            4 => {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            }
            _ if dtype == "F16" => {
                let v: Vec<half::f16> = bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            }
            _ => {
                let v: Vec<half::bf16> = bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            }
        };
        tensors.insert(name, t);
    }
    // Whatever follows the last tensor is part of the file and of its digest.
    let mut rest = Vec::new();
    f.read_to_end(&mut rest)?;
    hash.update(&rest);
    Ok((tensors, format!("{:x}", hash.finalize())))
}

/// Rows of Hugging Face's Q or K (each head's rotary halves) in llama's GGUF order (pairs
/// adjacent): within a head, row k of the first half goes to 2k, of the second half to 2k + 1.
fn interleave_rotary(t: Tensor, heads: usize) -> anyhow::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        anyhow::bail!("{rows} rows do not split into {heads} heads of rotary pairs");
    }
    Ok(t.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Llama 3's per-frequency divisors (what llama.cpp's converter writes as `rope_freqs.weight`):
/// 1 for wavelengths shorter than original/high_freq_factor, `factor` for those longer than
/// original/low_freq_factor, a smooth mix between.
fn llama3_divisors(head_dim: usize, base: f32, factor: f64, s: &Value) -> Vec<f32> {
    let low = s["low_freq_factor"].as_f64().unwrap_or(1.0);
    let high = s["high_freq_factor"].as_f64().unwrap_or(4.0);
    let orig = s["original_max_position_embeddings"]
        .as_f64()
        .unwrap_or(8192.0);
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / f64::from(base).powf(i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor as f32
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_divisors_follow_the_published_rule() {
        // Llama 3.1/3.2: factor 8, low 1, high 4, original 8192, base 500000, head_dim 64/128.
        let s = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let d = llama3_divisors(128, 500_000.0, 8.0, &s);
        assert_eq!(d.len(), 64);
        assert_eq!(d[0], 1.0); // the fastest rotation is kept
        assert_eq!(d[63], 8.0); // the slowest is stretched by the factor
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
    }

    /// Gemma 3 270M's weights (dequantized to f32) as a Hugging Face checkpoint holds them —
    /// HF names, norms as `w` where the GGUF has `1 + w`, the config's keys — converted back by
    /// `to_gguf`, compute the same logits as the file's own tensors and metadata (up to the
    /// rounding of `(1 + w) - 1 + 1`), sliding layers and local rope base included.
    #[test]
    fn a_gemma3_checkpoint_computes_what_its_gguf_computes() {
        use candle_core::Device;
        let path = crate::llama::tests::model_named(
            "gemma-3-270m-q4_k_m.gguf",
            "scripts/fetch-model.sh gemma3-270m",
        );
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let md = |k: &str| ct.metadata[&format!("gemma3.{k}")].clone();
        let u = |k: &str| md(k).to_u32().unwrap();
        let mut gguf_named = HashMap::new();
        let mut hf = HashMap::new();
        for name in ct.tensor_infos.keys() {
            let t = ct
                .tensor(&mut f, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            gguf_named.insert(name.clone(), t.clone());
            let is_norm = name.ends_with("norm.weight");
            let t = if is_norm { (t - 1.0).unwrap() } else { t };
            let hf_name = match name.as_str() {
                "token_embd.weight" => "model.embed_tokens.weight".to_string(),
                "output_norm.weight" => "model.norm.weight".to_string(),
                _ => {
                    let (layer, rest) = name.strip_prefix("blk.").unwrap().split_once('.').unwrap();
                    let p = format!("model.layers.{layer}");
                    let part = match rest {
                        "attn_norm.weight" => "input_layernorm",
                        "post_attention_norm.weight" => "post_attention_layernorm",
                        "ffn_norm.weight" => "pre_feedforward_layernorm",
                        "post_ffw_norm.weight" => "post_feedforward_layernorm",
                        "attn_q.weight" => "self_attn.q_proj",
                        "attn_k.weight" => "self_attn.k_proj",
                        "attn_v.weight" => "self_attn.v_proj",
                        "attn_output.weight" => "self_attn.o_proj",
                        "attn_q_norm.weight" => "self_attn.q_norm",
                        "attn_k_norm.weight" => "self_attn.k_norm",
                        "ffn_gate.weight" => "mlp.gate_proj",
                        "ffn_up.weight" => "mlp.up_proj",
                        "ffn_down.weight" => "mlp.down_proj",
                        other => panic!("unexpected tensor {other}"),
                    };
                    format!("{p}.{part}.weight")
                }
            };
            hf.insert(hf_name, t);
        }
        let config = serde_json::json!({
            "model_type": "gemma3_text",
            "hidden_size": u("embedding_length"),
            "intermediate_size": u("feed_forward_length"),
            "num_hidden_layers": u("block_count"),
            "num_attention_heads": u("attention.head_count"),
            "num_key_value_heads": u("attention.head_count_kv"),
            "head_dim": u("attention.key_length"),
            "max_position_embeddings": u("context_length"),
            "rms_norm_eps": md("attention.layer_norm_rms_epsilon").to_f32().unwrap(),
            "rope_theta": md("rope.freq_base").to_f32().unwrap(),
            "rope_local_base_freq": 10000.0,
            "sliding_window": u("attention.sliding_window"),
            "sliding_window_pattern": 6,
            "query_pre_attn_scalar": 256,
        });
        let (hf_ct, hf_tensors, arch) = to_gguf(&config, hf).unwrap();
        assert_eq!(arch, "gemma3");
        let from_hf =
            crate::llama::Llama::from_tensors(&hf_ct, hf_tensors, &Device::Cpu, 4096).unwrap();
        // The file's own metadata and tensor names, its tensors widened to f32 the same way.
        let own_ct = gguf_file::Content {
            magic: ct.magic,
            metadata: ct.metadata.clone(),
            tensor_infos: gguf_named
                .iter()
                .map(|(k, t)| {
                    let info = gguf_file::TensorInfo {
                        ggml_dtype: GgmlDType::F32,
                        shape: t.dims().to_vec().into(),
                        offset: 0,
                    };
                    (k.clone(), info)
                })
                .collect(),
            tensor_data_offset: 0,
        };
        let from_file =
            crate::llama::Llama::from_tensors(&own_ct, gguf_named, &Device::Cpu, 4096).unwrap();
        // Longer than the 512-token window would be slow here; 24 positions still cross the
        // local and global layers and both rope bases.
        let tokens: Vec<u32> = (0..24).map(|i| 2 + (i * 7919) % 5000).collect();
        let a = from_hf
            .forward(&mut from_hf.new_cache(), &tokens, 0)
            .unwrap();
        let b = from_file
            .forward(&mut from_file.new_cache(), &tokens, 0)
            .unwrap();
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0
        };
        assert_eq!(argmax(&a), argmax(&b));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-2, "largest logit difference {worst}");
    }

    #[test]
    fn unknown_families_and_rope_kinds_are_refused_by_name() {
        let e = to_gguf(&serde_json::json!({"model_type": "gpt2"}), HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("\"gpt2\""), "{e}");
        let cfg = serde_json::json!({"model_type": "qwen2", "hidden_size": 8,
            "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16,
            "rope_scaling": {"type": "yarn", "factor": 4.0}});
        let e = to_gguf(&cfg, HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("'yarn'"), "{e}");
    }
}
