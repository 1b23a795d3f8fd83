//! Continuous batching with chunked prefill, in the style of vLLM's unified scheduler.
//!
//! Each step has a token budget. Running sequences go first (a decode costs one token, an
//! unfinished prompt continues with the next chunk), then waiting sequences are admitted in
//! arrival order while budget, sequence slots and KV blocks last. Admission reuses cached
//! prefix blocks. When a running sequence needs a block and none is free, the most recently
//! admitted sequence is preempted: its blocks are freed and it returns to the front of the
//! queue to be recomputed later (its cached prefix usually makes that cheap).

use std::collections::VecDeque;

use super::block_pool::BlockPool;
use super::request::RequestId;
use super::sequence::Sequence;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Tokens per forward step across all sequences.
    pub max_batched_tokens: usize,
    /// Sequences per step.
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: 16,
            num_blocks: 1024,
            max_batched_tokens: 2048,
            max_num_seqs: 256,
            enable_prefix_caching: true,
        }
    }
}

/// One sequence's part of a step: `running[index]` computes `num_new` tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scheduled {
    pub index: usize,
    pub num_new: usize,
}

pub(crate) struct Scheduler {
    pub cfg: SchedulerConfig,
    pub pool: BlockPool,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub num_preemptions: u64,
    /// Prompt tokens of admitted sequences, and how many of them the prefix cache served.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            pool: BlockPool::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Frees a sequence's blocks and queues it for recomputation.
    fn preempt(&mut self, mut seq: Sequence) {
        self.pool.release(&seq.blocks);
        seq.reset_kv();
        self.num_preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Decides this step's work. Sequences that can never fit the cache are returned in
    /// the second list, already removed, for the engine to finish.
    pub fn schedule(&mut self) -> (Vec<Scheduled>, Vec<Sequence>) {
        let mut budget = self.cfg.max_batched_tokens;
        let mut out = Vec::new();
        let mut unfit = Vec::new();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let num_new = seq.num_pending().min(budget);
            let need = self
                .blocks_for(seq.num_computed + num_new)
                .saturating_sub(seq.blocks.len());
            let mut scheduled_self = true;
            if need > 0 {
                loop {
                    if let Some(blocks) = self.pool.allocate(need) {
                        self.running[i].blocks.extend(blocks);
                        break;
                    }
                    // Preempt the newest sequence; if that is this one, it waits too.
                    let victim = self.running.pop().expect("running is not empty");
                    preempted = true;
                    let is_self = self.running.len() == i;
                    if is_self
                        && i == 0
                        && self.blocks_for(victim.tokens.len() + 1) > self.cfg.num_blocks
                    {
                        unfit.push(victim);
                    } else {
                        self.preempt(victim);
                    }
                    if is_self {
                        scheduled_self = false;
                        break;
                    }
                }
            }
            if !scheduled_self {
                break;
            }
            out.push(Scheduled { index: i, num_new });
            budget -= num_new;
            i += 1;
        }

        // Admit waiting sequences in arrival order; not in a step that had to preempt.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let bs = self.cfg.block_size;
            let num_blocks = self.cfg.num_blocks;
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            seq.update_hashes(bs);
            if (seq.tokens.len() + 1).div_ceil(bs) > num_blocks {
                unfit.push(self.waiting.pop_front().expect("front exists"));
                continue;
            }
            // Leave at least one token to compute: its logits produce the next token.
            let max_cached = (seq.tokens.len() - 1) / bs;
            let cached = self
                .pool
                .acquire_cached_prefix(&seq.hashes[..max_cached.min(seq.hashes.len())]);
            let num_cached = cached.len() * bs;
            let num_new = (seq.tokens.len() - num_cached).min(budget);
            let need = self.blocks_for(num_cached + num_new) - cached.len();
            match self.pool.allocate(need) {
                Some(fresh) => {
                    let mut seq = self.waiting.pop_front().expect("front exists");
                    seq.committed = cached.len();
                    seq.blocks = cached;
                    seq.blocks.extend(fresh);
                    seq.num_computed = num_cached;
                    self.prefix_query_tokens += seq.tokens.len() as u64;
                    self.prefix_hit_tokens += num_cached as u64;
                    if seq.num_output() == 0 {
                        seq.cached_prompt_tokens = num_cached;
                    }
                    self.running.push(seq);
                    out.push(Scheduled {
                        index: self.running.len() - 1,
                        num_new,
                    });
                    budget -= num_new;
                }
                None => {
                    self.pool.release(&cached);
                    break;
                }
            }
        }
        (out, unfit)
    }

    /// Registers the sequence's newly completed full blocks in the prefix cache.
    pub fn commit_blocks(&mut self, index: usize) {
        let bs = self.cfg.block_size;
        let seq = &mut self.running[index];
        let full = seq.num_computed / bs;
        if full <= seq.committed {
            return;
        }
        seq.update_hashes(bs);
        let parent = seq.committed.checked_sub(1).map(|p| seq.hashes[p]);
        let blocks: Vec<(u32, u64, &[u32])> = (seq.committed..full)
            .map(|b| {
                (
                    seq.blocks[b],
                    seq.hashes[b],
                    &seq.tokens[b * bs..(b + 1) * bs],
                )
            })
            .collect();
        self.pool.commit_full_blocks(parent, &blocks);
        seq.committed = full;
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: RequestId) -> Option<Sequence> {
        if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(pos);
            self.pool.release(&seq.blocks);
            return Some(seq);
        }
        if let Some(pos) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(pos).expect("position is valid");
            self.pool.release(&seq.blocks);
            return Some(seq);
        }
        None
    }
}
