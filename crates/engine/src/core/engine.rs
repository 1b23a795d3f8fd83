//! The synchronous engine loop: schedule → forward → sample → stop checks → commit blocks.
//! [`super::handle::EngineHandle`] runs it on its own thread behind an async API; benchmarks
//! and tests may drive it directly.

use protocol::KvEvent;

use super::block_pool::BlockPool;
use super::request::{FinishReason, GenerateRequest, RequestId, SubmitError, TokenEvent};
use super::sampler::Sampled;
use super::scheduler::{Scheduler, SchedulerConfig};
use super::sequence::Sequence;
use super::step_times::StepTimes;
use crate::backend::{ForwardBatch, RowSampling, SeqSlice};

/// Runs forward steps: the only thing the core needs from a model and a device.
pub trait Executor: Send + 'static {
    fn vocab_size(&self) -> usize;
    /// Runs `batch` and returns the logits of its `logit_rows`, row-major `[rows, vocab]`.
    fn execute(&mut self, batch: &ForwardBatch) -> Vec<f32>;
    /// Runs `batch` and returns the argmax token of each logit row, when the executor can
    /// pick it on its device without copying the logits out. `None` means nothing ran and
    /// the caller uses [`Executor::execute`]. Called only when every row samples greedily
    /// with no penalties and no logprobs.
    fn execute_greedy(&mut self, _batch: &ForwardBatch) -> Option<Vec<u32>> {
        None
    }
    /// Whether [`Executor::execute_sample`] can sample on the device (asked before the
    /// engine draws the rows' uniforms, so executors without it leave the generators as
    /// they were).
    fn has_device_sampling(&self) -> bool {
        false
    }
    /// Runs `batch` and samples each logit row on the device with `rows[i]` (filters and
    /// one uniform from the sequence's generator), returning the tokens. `None` means
    /// nothing ran and the caller uses [`Executor::execute`]. Called only when no row has
    /// penalties or logprobs.
    fn execute_sample(&mut self, _batch: &ForwardBatch, _rows: &[RowSampling]) -> Option<Vec<u32>> {
        None
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Longest sequence (prompt + output) the engine accepts.
    pub max_model_len: usize,
    /// Token ids that end a sequence unless the request ignores EOS.
    pub eos_token_ids: Vec<u32>,
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    pub kv_usage: f32,
    /// Tokens of admitted sequences looked up in the prefix cache, and how many hit.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// How long the steps took (scheduling, forward pass, sampling).
    pub step_times: StepTimes,
}

pub struct LlmEngine<E: Executor> {
    cfg: EngineConfig,
    exec: E,
    sched: Scheduler,
    steps: u64,
    step_times: StepTimes,
    logits_scratch: Vec<f32>,
}

impl<E: Executor> LlmEngine<E> {
    pub fn new(cfg: EngineConfig, exec: E) -> Self {
        LlmEngine {
            sched: Scheduler::new(cfg.scheduler.clone()),
            cfg,
            exec,
            steps: 0,
            step_times: StepTimes::default(),
            logits_scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// For checking tools: a forward pass run through this writes KV blocks the scheduler
    /// does not know about, so use it only while no request is in flight.
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.exec
    }

    /// Checks a request against the model and the cache before it is queued.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(), SubmitError> {
        validate_request(
            req,
            self.exec.vocab_size(),
            self.cfg.max_model_len,
            self.cfg.scheduler.num_blocks * self.cfg.scheduler.block_size,
        )
    }

    /// Queues a validated request.
    pub fn add_request(&mut self, id: RequestId, req: GenerateRequest) {
        self.sched.waiting.push_back(Sequence::new(id, req));
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    pub fn num_waiting(&self) -> usize {
        self.sched.waiting.len()
    }

    /// Removes a request and frees its blocks at once. Returns its final event, if it existed.
    pub fn abort(&mut self, id: RequestId) -> Option<TokenEvent> {
        let seq = self.sched.remove(id)?;
        Some(final_event(&seq, None, FinishReason::Abort))
    }

    /// Ids of every request in the engine.
    pub fn request_ids(&self) -> Vec<RequestId> {
        self.sched
            .running
            .iter()
            .chain(self.sched.waiting.iter())
            .map(|s| s.id)
            .collect()
    }

    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        self.sched.pool.drain_events()
    }

    pub fn block_pool(&self) -> &BlockPool {
        &self.sched.pool
    }

    /// Drops the prefix cache; refused (false) while sequences hold blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.sched.pool.reset_prefix_cache()
    }

    pub fn stats(&self) -> EngineStats {
        let pool = &self.sched.pool;
        EngineStats {
            running: self.sched.running.len(),
            waiting: self.sched.waiting.len(),
            blocks_total: pool.num_blocks(),
            blocks_used: pool.num_used(),
            blocks_free: pool.num_free(),
            kv_usage: pool.usage(),
            prefix_query_tokens: self.sched.prefix_query_tokens,
            prefix_hit_tokens: self.sched.prefix_hit_tokens,
            preemptions: self.sched.num_preemptions,
            steps: self.steps,
            step_times: self.step_times.clone(),
        }
    }

    /// Runs one step and returns the events it produced, in sequence order.
    pub fn step(&mut self) -> Vec<(RequestId, TokenEvent)> {
        let start = std::time::Instant::now();
        let mut events = Vec::new();
        let (scheduled, unfit) = self.sched.schedule();
        for seq in unfit {
            events.push((seq.id, final_event(&seq, None, FinishReason::Length)));
        }
        if scheduled.is_empty() {
            return events;
        }
        self.steps += 1;

        let bs = self.cfg.scheduler.block_size;
        let mut batch = ForwardBatch {
            block_size: bs,
            ..ForwardBatch::default()
        };
        let mut samplers = Vec::new();
        for s in &scheduled {
            let seq = &self.sched.running[s.index];
            let q_start = batch.token_ids.len();
            let start = seq.num_computed;
            let end = start + s.num_new;
            batch.token_ids.extend_from_slice(&seq.tokens[start..end]);
            for pos in start..end {
                batch.positions.push(pos as u32);
                batch
                    .slots
                    .push(seq.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            batch.seqs.push(SeqSlice {
                q_start,
                q_len: s.num_new,
                ctx_len: end,
                block_table: seq.blocks.clone(),
            });
            if end == seq.tokens.len() {
                batch.logit_rows.push((q_start + s.num_new - 1) as u32);
                samplers.push(s.index);
            }
        }

        let plain = |p: &super::SamplingParams| {
            p.logprobs.is_none()
                && p.repetition_penalty == 1.0
                && p.presence_penalty == 0.0
                && p.frequency_penalty == 0.0
        };
        let all_plain = !samplers.is_empty()
            && samplers
                .iter()
                .all(|&i| plain(&self.sched.running[i].req.sampling));
        let greedy_only = all_plain
            && samplers
                .iter()
                .all(|&i| self.sched.running[i].req.sampling.is_greedy());
        let device_tokens = if greedy_only {
            self.exec.execute_greedy(&batch)
        } else if all_plain && self.exec.has_device_sampling() {
            let rows: Vec<RowSampling> = samplers
                .iter()
                .map(|&i| {
                    let seq = &mut self.sched.running[i];
                    let p = &seq.req.sampling;
                    RowSampling {
                        temperature: if p.is_greedy() { 0.0 } else { p.temperature },
                        top_k: p.top_k,
                        top_p: p.top_p,
                        min_p: p.min_p,
                        // Greedy rows draw nothing, as on the host.
                        uniform: if p.is_greedy() {
                            0.0
                        } else {
                            (seq.sampler.next_uniform() as f32).min(1.0 - f32::EPSILON / 2.0)
                        },
                    }
                })
                .collect();
            self.exec.execute_sample(&batch, &rows)
        } else {
            None
        };
        let logits = match device_tokens {
            Some(_) => Vec::new(),
            None => self.exec.execute(&batch),
        };
        let vocab = self.exec.vocab_size();

        let mut finished = Vec::new();
        for s in &scheduled {
            self.sched.running[s.index].num_computed += s.num_new;
            self.sched.commit_blocks(s.index);
        }
        for (row, &index) in samplers.iter().enumerate() {
            if device_tokens.is_none() {
                self.logits_scratch.clear();
                self.logits_scratch
                    .extend_from_slice(&logits[row * vocab..(row + 1) * vocab]);
            }
            let seq = &mut self.sched.running[index];
            let sampled = match &device_tokens {
                Some(tokens) => Sampled {
                    token: tokens[row],
                    logprob: f32::NAN,
                    top_logprobs: Vec::new(),
                },
                None => seq
                    .sampler
                    .sample(&seq.req.sampling, &mut self.logits_scratch),
            };
            seq.sampler.record(sampled.token);
            seq.tokens.push(sampled.token);
            let finish = finish_reason(&self.cfg, seq, sampled.token);
            let want_logprobs = seq.req.sampling.logprobs.is_some();
            let ev = TokenEvent {
                token: Some(sampled.token),
                logprob: want_logprobs.then_some(sampled.logprob),
                top_logprobs: if want_logprobs {
                    sampled.top_logprobs
                } else {
                    Vec::new()
                },
                finish_reason: finish,
                prompt_tokens: seq.prompt_len as u32,
                cached_prompt_tokens: seq.cached_prompt_tokens as u32,
                sent_at: None,
            };
            events.push((seq.id, ev));
            if finish.is_some() {
                finished.push(seq.id);
            }
        }
        for id in finished {
            self.sched.remove(id);
        }
        self.step_times.record(start.elapsed());
        events
    }
}

fn finish_reason(cfg: &EngineConfig, seq: &Sequence, token: u32) -> Option<FinishReason> {
    let req = &seq.req;
    if (!req.ignore_eos && cfg.eos_token_ids.contains(&token))
        || req.stop_token_ids.contains(&token)
    {
        return Some(FinishReason::Stop);
    }
    if seq.num_output() >= req.max_tokens as usize || seq.tokens.len() >= cfg.max_model_len {
        return Some(FinishReason::Length);
    }
    None
}

fn final_event(seq: &Sequence, token: Option<u32>, reason: FinishReason) -> TokenEvent {
    TokenEvent {
        token,
        logprob: None,
        top_logprobs: Vec::new(),
        finish_reason: Some(reason),
        prompt_tokens: seq.prompt_len as u32,
        cached_prompt_tokens: seq.cached_prompt_tokens as u32,
        sent_at: None,
    }
}

/// Request checks shared by the engine and its async handle.
pub fn validate_request(
    req: &GenerateRequest,
    vocab_size: usize,
    max_model_len: usize,
    kv_capacity_tokens: usize,
) -> Result<(), SubmitError> {
    if req.prompt.is_empty() {
        return Err(SubmitError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(SubmitError::invalid(
            "prompt",
            format!("token id {bad} is out of range for a vocabulary of {vocab_size}"),
        ));
    }
    if req.max_tokens == 0 {
        return Err(SubmitError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let limit = max_model_len.min(kv_capacity_tokens);
    if req.prompt.len() >= limit {
        return Err(SubmitError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens; this model accepts at most {} (context window {}, KV cache {})",
                req.prompt.len(),
                limit.saturating_sub(1),
                max_model_len,
                kv_capacity_tokens
            ),
        ));
    }
    req.sampling
        .validate()
        .map_err(|e| SubmitError::invalid(e.field(), e.to_string()))?;
    Ok(())
}
