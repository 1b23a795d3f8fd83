//! Binds a [`Model`] and its KV cache on one backend to the core's [`Executor`] trait, and
//! builds a ready engine from a model directory.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;

use super::ranks::RankPool;
use super::{Checkpoint, Model, ModelConfig, ModelError, TpShard};
use crate::backend::cpu::{CpuBackend, CpuComm};
use crate::backend::{Backend, ForwardBatch, RowSampling};
use crate::core::{EngineConfig, Executor, LlmEngine, SchedulerConfig};

pub struct ModelExecutor<B: Backend> {
    backend: B,
    model: Model<B>,
    cache: B::KvCache,
}

impl<B: Backend> ModelExecutor<B> {
    pub fn new(
        backend: B,
        model: Model<B>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let cache = backend.alloc_kv_cache(&model.kv_cache_spec(num_blocks, block_size))?;
        Ok(ModelExecutor {
            backend,
            model,
            cache,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: Backend> Executor for ModelExecutor<B> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn execute(&mut self, batch: &ForwardBatch) -> Vec<f32> {
        let logits = self.model.forward(&self.backend, &mut self.cache, batch);
        self.backend.to_host(&logits)
    }

    fn execute_greedy(&mut self, batch: &ForwardBatch) -> Option<Vec<u32>> {
        if !self.backend.has_device_argmax() {
            return None;
        }
        let (model, cache) = (&self.model, &mut self.cache);
        if let Some(ids) = self
            .backend
            .greedy_graph_step(batch, &mut |b, padded| model.forward(b, cache, padded))
        {
            return Some(ids);
        }
        let logits = self.model.forward(&self.backend, &mut self.cache, batch);
        Some(self.backend.argmax_rows(&logits).unwrap_or_else(|| {
            // A backend that claims the kernel but lacks it still samples correctly.
            let vocab = self.model.config().vocab_size;
            let host = self.backend.to_host(&logits);
            host.chunks_exact(vocab)
                .map(|row| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter().position(|&x| x == max).unwrap_or(0) as u32
                })
                .collect()
        }))
    }

    fn has_device_sampling(&self) -> bool {
        self.backend.has_device_sampling()
    }

    fn execute_sample(&mut self, batch: &ForwardBatch, rows: &[RowSampling]) -> Option<Vec<u32>> {
        if !self.backend.has_device_sampling() {
            return None;
        }
        let logits = self.model.forward(&self.backend, &mut self.cache, batch);
        match self.backend.sample_rows(&logits, rows) {
            Some(ids) => Some(ids),
            // A backend that claims the kernel but lacks it: sample on the host with the
            // same uniforms.
            None => {
                let vocab = self.model.config().vocab_size;
                let host = self.backend.to_host(&logits);
                Some(
                    host.chunks_exact(vocab)
                        .zip(rows)
                        .map(|(row, r)| crate::backend::sample_row_host(row, r))
                        .collect(),
                )
            }
        }
    }
}

/// How to size and run an engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub block_size: usize,
    /// Memory for the KV cache, in bytes.
    pub kv_cache_bytes: usize,
    /// Exact number of KV blocks, overriding `kv_cache_bytes` (tests, benchmarks).
    pub num_blocks: Option<usize>,
    pub max_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
    /// Caps the model's context window; `None` uses the model's.
    pub max_model_len: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            num_blocks: None,
            max_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_prefix_caching: true,
            max_model_len: None,
        }
    }
}

/// Loads `dir` onto `backend` and returns an engine over it.
pub fn build_engine<B: Backend>(
    dir: &Path,
    backend: B,
    opts: &EngineOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlmEngine<ModelExecutor<B>>, ModelError> {
    if opts.block_size == 0 {
        return Err(ModelError::Backend("block_size must be positive".into()));
    }
    let model = Model::load(dir, &backend, progress)?;
    let cfg = model.config().clone();
    let spec = model.kv_cache_spec(1, opts.block_size);
    let per_block = spec.bytes_per_token(backend.kv_elem_bytes()) * opts.block_size;
    let num_blocks = match opts.num_blocks {
        Some(n) => n,
        // A device backend sizes the cache from the memory the weights left free.
        None => backend.kv_cache_budget()?.unwrap_or(opts.kv_cache_bytes) / per_block,
    }
    .max(1);
    let exec = ModelExecutor::new(backend, model, num_blocks, opts.block_size)?;
    Ok(LlmEngine::new(engine_config(&cfg, opts, num_blocks), exec))
}

fn engine_config(cfg: &ModelConfig, opts: &EngineOptions, num_blocks: usize) -> EngineConfig {
    let max_model_len = opts
        .max_model_len
        .unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings);
    EngineConfig {
        scheduler: SchedulerConfig {
            block_size: opts.block_size,
            num_blocks,
            max_batched_tokens: opts.max_batched_tokens,
            max_num_seqs: opts.max_num_seqs,
            enable_prefix_caching: opts.enable_prefix_caching,
        },
        max_model_len,
        eos_token_ids: cfg.eos_token_ids.clone(),
    }
}

/// Tensor parallelism: `world` shards of one model, each on its own thread during a step,
/// joined by their backends' all-reduce (in-process on the CPU, NCCL on CUDA). Every rank
/// ends a step with the same logits; rank 0's are returned. Rank 0 runs on the engine's
/// thread, the others on threads kept for the executor's lifetime.
pub struct TpExecutor<B: Backend> {
    shards: Vec<ModelExecutor<B>>,
    ranks: RankPool,
}

/// The shards, reachable from the rank threads during one step: each rank takes only
/// its own element.
struct ShardsPtr<B: Backend>(*mut ModelExecutor<B>);

// SAFETY: ranks take disjoint elements, `ModelExecutor<B>: Send` is required where this is
// used, and the step outlives every use (`RankPool::run` waits for all ranks).
unsafe impl<B: Backend> Sync for ShardsPtr<B> {}

/// The CPU emulation proves the sharding math that multi-GPU backends use, with no GPU; it
/// is not a way to run faster on a CPU.
pub type CpuTpExecutor = TpExecutor<CpuBackend>;

impl<B: Backend> TpExecutor<B>
where
    ModelExecutor<B>: Send,
{
    pub fn world(&self) -> usize {
        self.shards.len()
    }

    /// Rank `rank`'s executor (its model holds that rank's shard).
    pub fn shard(&self, rank: usize) -> &ModelExecutor<B> {
        &self.shards[rank]
    }

    /// Runs `f` on every rank at once (their all-reduces pair up) and returns rank 0's
    /// result; after the all-reduces every rank holds the same logits.
    ///
    /// A rank that panics first aborts the group, so that the ranks waiting for it in an
    /// all-reduce are released (and fail) instead of waiting forever; the panic then
    /// reaches the caller (the engine thread, which stops: the instance is gone, and its
    /// router fails over). Where the backend cannot release them, the process aborts:
    /// a crash is seen and restarted, a hang is not.
    fn on_all_ranks<T>(&mut self, f: impl Fn(&mut ModelExecutor<B>) -> T + Sync) -> T {
        let world = self.shards.len();
        let shards = ShardsPtr(self.shards.as_mut_ptr());
        let shards = &shards;
        // The first rank to fail is the cause: its panic is kept here before the abort
        // releases the others, whose panics follow from it.
        let cause: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
        let step = catch_unwind(AssertUnwindSafe(|| {
            self.ranks.run(&|rank| {
                assert!(rank < world);
                // SAFETY: `rank` is in bounds and each rank is run exactly once per step,
                // so no two threads hold the same shard; `run` returns after every rank
                // is done.
                let shard = unsafe { &mut *shards.0.add(rank) };
                match catch_unwind(AssertUnwindSafe(|| f(&mut *shard))) {
                    Ok(out) => out,
                    Err(panic) => {
                        let panic = {
                            let mut first = cause.lock().unwrap_or_else(|e| e.into_inner());
                            if first.is_none() {
                                *first = Some(panic);
                                Box::new("see the first failed rank") as Box<dyn Any + Send>
                            } else {
                                panic
                            }
                        };
                        if world > 1 && !shard.backend().abort_group() {
                            tracing::error!(
                                rank,
                                "a tensor-parallel rank failed and its group cannot release \
                                 the others from their all-reduce; aborting the process"
                            );
                            std::process::abort();
                        }
                        resume_unwind(panic)
                    }
                }
            })
        }));
        match step {
            Ok(out) => out,
            Err(panic) => {
                let first = cause.into_inner().unwrap_or_else(|e| e.into_inner());
                resume_unwind(first.unwrap_or(panic))
            }
        }
    }
}

impl<B: Backend> Executor for TpExecutor<B>
where
    ModelExecutor<B>: Send,
{
    fn vocab_size(&self) -> usize {
        self.shards[0].vocab_size()
    }

    fn execute(&mut self, batch: &ForwardBatch) -> Vec<f32> {
        self.on_all_ranks(|s| s.execute(batch))
    }

    // The ranks share a backend type and its settings, so they all pick on the device or
    // all decline (`None`: nothing ran), never a mix that would leave an all-reduce waiting.
    // Declining is known up front, without starting the ranks.
    fn execute_greedy(&mut self, batch: &ForwardBatch) -> Option<Vec<u32>> {
        if !self.shards[0].backend().has_device_argmax() {
            return None;
        }
        self.on_all_ranks(|s| s.execute_greedy(batch))
    }

    fn has_device_sampling(&self) -> bool {
        self.shards[0].has_device_sampling()
    }

    fn execute_sample(&mut self, batch: &ForwardBatch, rows: &[RowSampling]) -> Option<Vec<u32>> {
        if !self.has_device_sampling() {
            return None;
        }
        self.on_all_ranks(|s| s.execute_sample(batch, rows))
    }
}

/// Loads `dir` as `world` tensor-parallel shards on the CPU.
pub fn build_cpu_tp_engine(
    dir: &Path,
    world: usize,
    opts: &EngineOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlmEngine<CpuTpExecutor>, ModelError> {
    build_tp_engine(dir, cpu_tp_backends(world), opts, progress)
}

/// `world` CPU backends (at least one), rank `r` at index `r`, joined by one in-process
/// all-reduce.
pub fn cpu_tp_backends(world: usize) -> Vec<CpuBackend> {
    let comm = CpuComm::new(world.max(1));
    (0..world.max(1))
        .map(|rank| CpuBackend::with_comm(rank, comm.clone()))
        .collect()
}

/// Loads `dir` as one tensor-parallel shard per backend (`backends[r]` is rank `r`, its
/// all-reduce already joined to the others'), with a KV cache as large as the fullest
/// rank allows.
pub fn build_tp_engine<B: Backend>(
    dir: &Path,
    backends: Vec<B>,
    opts: &EngineOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlmEngine<TpExecutor<B>>, ModelError> {
    if opts.block_size == 0 {
        return Err(ModelError::Backend("block_size must be positive".into()));
    }
    let world = backends.len();
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let mut models = Vec::with_capacity(world);
    for (rank, backend) in backends.iter().enumerate() {
        let shard = TpShard { rank, world };
        shard.validate(&cfg).map_err(ModelError::Backend)?;
        models.push(Model::from_checkpoint_shard(
            cfg.clone(),
            &ckpt,
            backend,
            shard,
            progress,
        )?);
    }
    let mut num_blocks = usize::MAX;
    for (backend, model) in backends.iter().zip(&models) {
        let spec = model.kv_cache_spec(1, opts.block_size);
        let per_block = spec.bytes_per_token(backend.kv_elem_bytes()) * opts.block_size;
        let n = match opts.num_blocks {
            Some(n) => n,
            None => backend.kv_cache_budget()?.unwrap_or(opts.kv_cache_bytes) / per_block,
        };
        num_blocks = num_blocks.min(n);
    }
    let num_blocks = num_blocks.max(1);
    let mut shards = Vec::with_capacity(world);
    for (backend, model) in backends.into_iter().zip(models) {
        shards.push(ModelExecutor::new(
            backend,
            model,
            num_blocks,
            opts.block_size,
        )?);
    }
    Ok(LlmEngine::new(
        engine_config(&cfg, opts, num_blocks),
        TpExecutor {
            ranks: RankPool::new(shards.len()),
            shards,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::GROUP_ABORTED;
    use crate::backend::Backend;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    /// A rank that fails before its all-reduce must not leave the others waiting in it:
    /// the step fails with that rank's panic, and the group stays failed.
    #[test]
    fn a_rank_failing_mid_step_releases_the_others() {
        let dir = tempfile::tempdir().unwrap();
        synth::synthesize(&synth::SynthOptions {
            out: dir.path().to_path_buf(),
            arch: synth::Arch::Llama,
            size: synth::Size::Tiny,
            dtype: synth::DType::F32,
            seed: 3,
            progress: false,
        })
        .unwrap();
        let opts = EngineOptions {
            num_blocks: Some(16),
            ..EngineOptions::default()
        };
        let mut engine = build_cpu_tp_engine(dir.path(), 4, &opts, &mut |_, _| {}).unwrap();
        let (tx, rx) = channel();
        // On its own thread, so that a regression (a hang) fails the test by its timeout.
        std::thread::spawn(move || {
            let tp = engine.executor_mut();
            let step = |tp: &mut CpuTpExecutor| {
                catch_unwind(AssertUnwindSafe(|| {
                    tp.on_all_ranks(|s| {
                        let b = s.backend();
                        let mut x = b.alloc(1, 8);
                        if s.model().shard().rank == 1 {
                            panic!("rank 1 fails before its all-reduce");
                        }
                        b.all_reduce(&mut x);
                        b.all_reduce(&mut x);
                    })
                }))
                .map_err(|p| panic_text(&*p))
            };
            let first = step(tp);
            // The group stays aborted: the next step fails at once instead of waiting.
            let second = step(tp);
            let _ = tx.send((first, second));
        });
        let (first, second) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the step returned instead of hanging in an all-reduce");
        assert_eq!(
            first.unwrap_err(),
            "rank 1 fails before its all-reduce",
            "the failing rank's panic is the one raised, not the others' abort"
        );
        let second = second.unwrap_err();
        assert!(
            second == GROUP_ABORTED || second == "rank 1 fails before its all-reduce",
            "{second}"
        );
    }
}
