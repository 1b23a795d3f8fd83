//! A sequence's life in the engine: its tokens, how many of them have KV in the cache, its
//! block table and the chained hashes of its full blocks.

use tokens::hash_block;

use super::block_pool::BlockId;
use super::request::{GenerateRequest, RequestId};
use super::sampler::SamplerState;

pub(crate) struct Sequence {
    pub id: RequestId,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub blocks: Vec<BlockId>,
    /// Chained hashes of the full blocks of `tokens` computed so far.
    pub hashes: Vec<u64>,
    /// Leading blocks registered in the prefix cache.
    pub committed: usize,
    pub cached_prompt_tokens: usize,
    pub req: GenerateRequest,
    pub sampler: SamplerState,
}

impl Sequence {
    pub fn new(id: RequestId, req: GenerateRequest) -> Self {
        let sampler = SamplerState::new(&req.sampling, &req.prompt);
        Sequence {
            id,
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            num_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            committed: 0,
            cached_prompt_tokens: 0,
            req,
            sampler,
        }
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next sample.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Extends `hashes` over every full block of `tokens`.
    pub fn update_hashes(&mut self, block_size: usize) {
        while (self.hashes.len() + 1) * block_size <= self.tokens.len() {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied();
            self.hashes.push(hash_block(
                parent,
                &self.tokens[i * block_size..(i + 1) * block_size],
            ));
        }
    }

    /// Forgets all KV state so the sequence can be recomputed after preemption.
    pub fn reset_kv(&mut self) {
        self.num_computed = 0;
        self.blocks.clear();
        self.committed = 0;
    }
}
