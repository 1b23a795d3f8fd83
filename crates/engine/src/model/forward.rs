//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), written once over
//! [`Backend`]. Per layer: RMSNorm → fused qkv projection (+bias) → optional q/k norm →
//! RoPE → KV write → paged attention → output projection → residual add + RMSNorm → fused
//! gate|up projection → SiLU·up → down projection → residual add.

use std::path::Path;

use super::shard::{slice, Split, TpShard};
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
    /// `None` when the output layer is tied to the embedding (and not split). In a group
    /// of more than one rank, this rank's vocabulary rows ([`TpShard::vocab`]), padded to
    /// [`TpShard::vocab_width`], tied or not.
    lm_head: Option<B::Weight>,
    norm: B::Vector,
    layers: Vec<Layer<B>>,
    rope_inv_freq: Vec<f32>,
    /// This rank's attention heads (all of them without tensor parallelism).
    layout: AttnLayout,
    /// This rank's share of the MLP's intermediate features.
    intermediate: usize,
    shard: TpShard,
    weight_bytes: usize,
}

/// Calls `upload` with `parts`, each cut to this rank's split (copied only when cut).
fn upload_split<T>(
    parts: &[(HostTensor<'_>, Split)],
    upload: impl FnOnce(&[HostTensor<'_>]) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    let owned = parts
        .iter()
        .map(|(t, s)| slice(t, s))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<HostTensor<'_>> = parts
        .iter()
        .zip(&owned)
        .map(|((t, _), o)| o.as_ref().map_or(*t, |o| o.view()))
        .collect();
    upload(&views)
}

/// This rank's part of `parts` as one fused projection matrix.
fn upload_linear<B: Backend>(
    backend: &B,
    parts: &[(HostTensor<'_>, Split)],
) -> Result<B::Weight, ModelError> {
    upload_split(parts, |v| backend.upload_linear(v))
}

/// This rank's part of `parts` as one 1-D parameter.
fn upload_vector<B: Backend>(
    backend: &B,
    parts: &[(HostTensor<'_>, Split)],
) -> Result<B::Vector, ModelError> {
    upload_split(parts, |v| backend.upload_vector(v))
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
        Self::from_checkpoint_shard(config, ckpt, backend, TpShard::SINGLE, progress)
    }

    /// Loads rank `shard.rank`'s slice of the weights for tensor parallelism.
    pub fn from_checkpoint_shard(
        config: ModelConfig,
        ckpt: &Checkpoint,
        backend: &B,
        shard: TpShard,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        shard.validate(&config).map_err(|msg| ModelError::Config {
            path: "config.json".into(),
            msg,
        })?;
        let c = &config;
        let hd = c.head_dim;
        let heads = shard.heads(c);
        let kv_heads = shard.kv_heads(c);
        let inter_range = shard.intermediate(c);
        let q_rows = Split::Rows(heads.start * hd..heads.end * hd);
        let kv_rows = Split::Rows(kv_heads.start * hd..kv_heads.end * hd);
        let q_cols = Split::Cols(heads.start * hd..heads.end * hd);
        let inter_rows = Split::Rows(inter_range.clone());
        let inter_cols = Split::Cols(inter_range.clone());
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
            let qkv = upload_linear(
                backend,
                &[
                    (
                        get(format!("{attn}.q_proj.weight"), &[q, h])?,
                        q_rows.clone(),
                    ),
                    (
                        get(format!("{attn}.k_proj.weight"), &[kv, h])?,
                        kv_rows.clone(),
                    ),
                    (
                        get(format!("{attn}.v_proj.weight"), &[kv, h])?,
                        kv_rows.clone(),
                    ),
                ],
            )?;
            let qkv_bias = if c.qkv_bias {
                Some(upload_vector(
                    backend,
                    &[
                        (get(format!("{attn}.q_proj.bias"), &[q])?, q_rows.clone()),
                        (get(format!("{attn}.k_proj.bias"), &[kv])?, kv_rows.clone()),
                        (get(format!("{attn}.v_proj.bias"), &[kv])?, kv_rows.clone()),
                    ],
                )?)
            } else {
                None
            };
            // The bias joins the partial sums once: on rank 0.
            let o_bias = if c.o_bias && shard.rank == 0 {
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
                o: upload_linear(
                    backend,
                    &[(
                        get(format!("{attn}.o_proj.weight"), &[h, q])?,
                        q_cols.clone(),
                    )],
                )?,
                o_bias,
                q_norm,
                k_norm,
                post_norm: backend
                    .upload_vector(&[get(format!("{p}.post_attention_layernorm.weight"), &[h])?])?,
                gate_up: upload_linear(
                    backend,
                    &[
                        (
                            get(format!("{mlp}.gate_proj.weight"), &[inter, h])?,
                            inter_rows.clone(),
                        ),
                        (
                            get(format!("{mlp}.up_proj.weight"), &[inter, h])?,
                            inter_rows.clone(),
                        ),
                    ],
                )?,
                down: upload_linear(
                    backend,
                    &[(
                        get(format!("{mlp}.down_proj.weight"), &[h, inter])?,
                        inter_cols.clone(),
                    )],
                )?,
            });
        }
        let norm = backend.upload_vector(&[get("model.norm.weight".into(), &[h])?])?;
        // Some tied checkpoints still carry lm_head.weight; use it only when untied.
        let lm_head = if shard.world > 1 {
            let split = Split::RowsPadded {
                range: shard.vocab(c),
                width: shard.vocab_width(c),
            };
            let t = if c.tie_word_embeddings {
                // Already counted for progress as the embedding.
                ckpt.get("model.embed_tokens.weight", &[v, h])?
            } else {
                get("lm_head.weight".into(), &[v, h])?
            };
            Some(upload_split(&[(t, split)], |p| backend.upload_linear(p))?)
        } else if c.tie_word_embeddings {
            None
        } else {
            Some(backend.upload_linear(&[get("lm_head.weight".into(), &[v, h])?])?)
        };
        let layout = AttnLayout {
            num_heads: heads.len(),
            num_kv_heads: kv_heads.len(),
            head_dim: c.head_dim,
        };
        Ok(Model {
            intermediate: inter_range.len(),
            shard,
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
            num_kv_heads: self.layout.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    pub fn shard(&self) -> TpShard {
        self.shard
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
        let mut gate_up = b.alloc(t, 2 * self.intermediate);
        let mut act = b.alloc(t, self.intermediate);

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
            b.all_reduce(&mut proj);
            b.add_rms_norm(&mut residual, &proj, &layer.post_norm, eps, &mut normed);
            b.matmul(&normed, &layer.gate_up, None, &mut gate_up);
            b.silu_mul(&gate_up, &mut act);
            b.matmul(&act, &layer.down, None, &mut proj);
            b.all_reduce(&mut proj);
        }
        if !self.layers.is_empty() {
            b.add_assign(&mut residual, &proj);
        }

        let rows = batch.logit_rows.len();
        let mut last = b.alloc(rows, c.hidden_size);
        b.gather_logit_rows(&residual, &step, &mut last);
        let mut last_normed = b.alloc(rows, c.hidden_size);
        b.rms_norm(&last, &self.norm, eps, &mut last_normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = b.alloc(rows, c.vocab_size);
        if self.shard.world > 1 {
            // This rank's vocabulary columns of every row, then all of them on every rank.
            let mut local = b.alloc(rows, self.shard.vocab_width(c));
            b.matmul(&last_normed, head, None, &mut local);
            b.all_gather_cols(&local, &mut logits);
        } else {
            b.matmul(&last_normed, head, None, &mut logits);
        }
        logits
    }
}
