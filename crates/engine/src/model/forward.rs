//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), written once over
//! [`Backend`]. Per layer: RMSNorm → fused qkv projection (+bias) → optional q/k norm →
//! RoPE → KV write → paged attention → output projection → residual add + RMSNorm → fused
//! gate|up projection → SiLU·up → down projection → residual add.

use std::path::Path;

use super::{Checkpoint, HostTensor, ModelConfig, ModelError};
use crate::backend::{AttnLayout, Backend, ForwardBatch, KvCacheSpec, QkNorm};

struct Layer<B: Backend> {
    input_norm: B::Vector,
    qkv: B::Weight,
    qkv_bias: Option<B::Vector>,
    o: B::Weight,
    o_bias: Option<B::Vector>,
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
    post_norm: B::Vector,
    gate_up: B::Weight,
    down: B::Weight,
}

/// A loaded model: its config and its weights on one backend.
pub struct Model<B: Backend> {
    config: ModelConfig,
    embed: B::Weight,
    /// `None` when the output layer is tied to the embedding.
    lm_head: Option<B::Weight>,
    norm: B::Vector,
    layers: Vec<Layer<B>>,
    rope_inv_freq: Vec<f32>,
    layout: AttnLayout,
    weight_bytes: usize,
}

impl<B: Backend> Model<B> {
    /// Loads config.json and the safetensors weights of `dir` onto `backend`.
    /// `progress(done_bytes, total_bytes)` is called as tensors are uploaded.
    pub fn load(
        dir: &Path,
        backend: &B,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ckpt, backend, progress)
    }

    pub fn from_checkpoint(
        config: ModelConfig,
        ckpt: &Checkpoint,
        backend: &B,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (h, q, kv, inter, v) = (
            c.hidden_size,
            c.q_size(),
            c.kv_size(),
            c.intermediate_size,
            c.vocab_size,
        );
        let total = ckpt.total_bytes();
        let mut done = 0usize;
        let mut get = |name: String, shape: &[usize]| -> Result<HostTensor<'_>, ModelError> {
            let t = ckpt.get(&name, shape)?;
            done += t.bytes.len();
            progress(done, total);
            Ok(t)
        };

        let embed = backend.upload_matrix(&[get("model.embed_tokens.weight".into(), &[v, h])?])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let qkv = backend.upload_matrix(&[
                get(format!("{attn}.q_proj.weight"), &[q, h])?,
                get(format!("{attn}.k_proj.weight"), &[kv, h])?,
                get(format!("{attn}.v_proj.weight"), &[kv, h])?,
            ])?;
            let qkv_bias = if c.qkv_bias {
                Some(backend.upload_vector(&[
                    get(format!("{attn}.q_proj.bias"), &[q])?,
                    get(format!("{attn}.k_proj.bias"), &[kv])?,
                    get(format!("{attn}.v_proj.bias"), &[kv])?,
                ])?)
            } else {
                None
            };
            let o_bias = if c.o_bias {
                Some(backend.upload_vector(&[get(format!("{attn}.o_proj.bias"), &[h])?])?)
            } else {
                None
            };
            let (q_norm, k_norm) =
                if c.qk_norm {
                    (
                        Some(backend.upload_vector(&[get(
                            format!("{attn}.q_norm.weight"),
                            &[c.head_dim],
                        )?])?),
                        Some(backend.upload_vector(&[get(
                            format!("{attn}.k_norm.weight"),
                            &[c.head_dim],
                        )?])?),
                    )
                } else {
                    (None, None)
                };
            layers.push(Layer {
                input_norm: backend
                    .upload_vector(&[get(format!("{p}.input_layernorm.weight"), &[h])?])?,
                qkv,
                qkv_bias,
                o: backend.upload_matrix(&[get(format!("{attn}.o_proj.weight"), &[h, q])?])?,
                o_bias,
                q_norm,
                k_norm,
                post_norm: backend
                    .upload_vector(&[get(format!("{p}.post_attention_layernorm.weight"), &[h])?])?,
                gate_up: backend.upload_matrix(&[
                    get(format!("{mlp}.gate_proj.weight"), &[inter, h])?,
                    get(format!("{mlp}.up_proj.weight"), &[inter, h])?,
                ])?,
                down: backend
                    .upload_matrix(&[get(format!("{mlp}.down_proj.weight"), &[h, inter])?])?,
            });
        }
        let norm = backend.upload_vector(&[get("model.norm.weight".into(), &[h])?])?;
        // Some tied checkpoints still carry lm_head.weight; use it only when untied.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(backend.upload_matrix(&[get("lm_head.weight".into(), &[v, h])?])?)
        };
        let layout = AttnLayout {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        Ok(Model {
            rope_inv_freq: config.rope_inv_freq(),
            config,
            embed,
            lm_head,
            norm,
            layers,
            layout,
            weight_bytes: total,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights in the checkpoint.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The KV cache geometry this model needs for `num_blocks` blocks of `block_size`.
    pub fn kv_cache_spec(&self, num_blocks: usize, block_size: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: self.config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step and returns the logits of `batch.logit_rows`, `[rows, vocab]`.
    pub fn forward(&self, b: &B, cache: &mut B::KvCache, batch: &ForwardBatch) -> B::Act {
        let c = &self.config;
        let t = batch.num_tokens();
        let step = b.prepare_step(batch, &self.rope_inv_freq);
        let eps = c.rms_norm_eps;

        let mut residual = b.alloc(t, c.hidden_size);
        b.embed(&self.embed, &step, &mut residual);
        let mut normed = b.alloc(t, c.hidden_size);
        let mut qkv = b.alloc(t, self.layout.qkv_size());
        let mut attn = b.alloc(t, self.layout.q_size());
        let mut proj = b.alloc(t, c.hidden_size);
        let mut gate_up = b.alloc(t, 2 * c.intermediate_size);
        let mut act = b.alloc(t, c.intermediate_size);

        for (i, layer) in self.layers.iter().enumerate() {
            if i == 0 {
                b.rms_norm(&residual, &layer.input_norm, eps, &mut normed);
            } else {
                // Fold the previous layer's MLP output into the residual stream.
                b.add_rms_norm(&mut residual, &proj, &layer.input_norm, eps, &mut normed);
            }
            b.matmul(&normed, &layer.qkv, layer.qkv_bias.as_ref(), &mut qkv);
            let qk_norm = match (&layer.q_norm, &layer.k_norm) {
                (Some(q), Some(k)) => Some(QkNorm { q, k, eps }),
                _ => None,
            };
            b.qk_norm_rope(&mut qkv, &self.layout, qk_norm, &step);
            b.write_kv(cache, i, &qkv, &self.layout, &step);
            b.attention(cache, i, &qkv, &self.layout, &step, &mut attn);
            b.matmul(&attn, &layer.o, layer.o_bias.as_ref(), &mut proj);
            b.add_rms_norm(&mut residual, &proj, &layer.post_norm, eps, &mut normed);
            b.matmul(&normed, &layer.gate_up, None, &mut gate_up);
            b.silu_mul(&gate_up, &mut act);
            b.matmul(&act, &layer.down, None, &mut proj);
        }
        if !self.layers.is_empty() {
            b.add_assign(&mut residual, &proj);
        }

        let rows = batch.logit_rows.len();
        let mut last = b.alloc(rows, c.hidden_size);
        b.gather_logit_rows(&residual, &step, &mut last);
        let mut last_normed = b.alloc(rows, c.hidden_size);
        b.rms_norm(&last, &self.norm, eps, &mut last_normed);
        let mut logits = b.alloc(rows, c.vocab_size);
        b.matmul(
            &last_normed,
            self.lm_head.as_ref().unwrap_or(&self.embed),
            None,
            &mut logits,
        );
        logits
    }
}
