//! The event stream and the queries both indexes see, generated from a seed so that every
//! cell (each in its own process) rebuilds exactly the same workload.
//!
//! `prefixes` groups of `depth` chained blocks stand for shared prompts (system prompts,
//! few-shot templates, long documents). Each instance caches a fixed subset of
//! `groups_per_instance` groups, so with many instances every group is held by a large
//! share of them. An engine's cache of one group is always a prefix of it: stores extend
//! the cached prefix (the parent is the last cached block), evictions cut its tail, leaf
//! first, as an LRU prefix cache does. Queries ask for a whole group plus a few blocks that
//! nobody holds.

use serde::{Deserialize, Serialize};

/// splitmix64: small, fast and good enough to draw a workload.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub instances: usize,
    pub depth: usize,
    pub prefixes: usize,
    pub groups_per_instance: usize,
    pub events: usize,
    pub queries: usize,
    pub block_size: usize,
    pub remove_frac: f64,
    pub extra_blocks: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Blocks `from..to` of the group were cached (parent: block `from - 1`).
    Store,
    /// Blocks `from..to` of the group were evicted, the last one first.
    Remove,
}

#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub kind: Kind,
    pub instance: u32,
    /// Per-instance event id.
    pub id: u64,
    pub group: u32,
    pub from: u16,
    pub to: u16,
}

/// One block in both naming schemes: the chained hash Switchyard's engines publish (and
/// Dynamo calls the external sequence hash) and the hash of the block's own tokens (Dynamo's
/// local hash, which its radix tree walks by).
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub seq: u64,
    pub local: u64,
}

pub struct Query {
    pub group: u32,
    /// Blocks after the group that no instance holds.
    pub tail: Vec<Block>,
}

pub struct Workload {
    pub params: Params,
    pub groups: Vec<Vec<Block>>,
    pub ops: Vec<Op>,
    pub queries: Vec<Query>,
}

impl Workload {
    pub fn generate(params: &Params) -> Self {
        let mut rng = Rng::new(params.seed);
        let groups: Vec<Vec<Block>> = (0..params.prefixes)
            .map(|_| {
                let tokens: Vec<u32> = (0..params.depth * params.block_size)
                    .map(|_| rng.below(50_000) as u32)
                    .collect();
                blocks_of(&tokens, params.block_size)
            })
            .collect();

        let per = params.groups_per_instance.min(params.prefixes);
        let affinity: Vec<Vec<u32>> = (0..params.instances)
            .map(|_| {
                let mut chosen: Vec<u32> = Vec::with_capacity(per);
                while chosen.len() < per {
                    let g = rng.below(params.prefixes) as u32;
                    if !chosen.contains(&g) {
                        chosen.push(g);
                    }
                }
                chosen
            })
            .collect();

        // Cached depth of each (instance, affinity slot).
        let mut cached = vec![0u16; params.instances * per];
        let mut next_id = vec![0u64; params.instances];
        let depth = params.depth as u16;
        let mut ops = Vec::with_capacity(params.events);
        while ops.len() < params.events {
            let instance = rng.below(params.instances);
            let want_remove = rng.chance(params.remove_frac);
            // A few random picks find a group the chosen kind applies to; if none does,
            // the other kind does (a full cache can only evict, an empty one only store).
            let mut op = None;
            for kind in [want_remove, !want_remove] {
                for _ in 0..8 {
                    let k = rng.below(per);
                    let h = cached[instance * per + k];
                    let fits = if kind { h > 0 } else { h < depth };
                    if !fits {
                        continue;
                    }
                    let (kind, from, to) = if kind {
                        (Kind::Remove, rng.below(h as usize) as u16, h)
                    } else {
                        (
                            Kind::Store,
                            h,
                            h + 1 + rng.below((depth - h) as usize) as u16,
                        )
                    };
                    cached[instance * per + k] = if kind == Kind::Store { to } else { from };
                    op = Some(Op {
                        kind,
                        instance: instance as u32,
                        id: next_id[instance],
                        group: affinity[instance][k],
                        from,
                        to,
                    });
                    break;
                }
                if op.is_some() {
                    break;
                }
            }
            if let Some(op) = op {
                next_id[instance] += 1;
                ops.push(op);
            }
        }

        let queries = (0..params.queries)
            .map(|_| Query {
                group: rng.below(params.prefixes) as u32,
                tail: (0..params.extra_blocks)
                    .map(|_| Block {
                        seq: rng.next_u64(),
                        local: rng.next_u64(),
                    })
                    .collect(),
            })
            .collect();

        Self {
            params: params.clone(),
            groups,
            ops,
            queries,
        }
    }

    /// The blocks one event names, in event order.
    pub fn blocks<'a>(&'a self, op: &Op) -> Box<dyn Iterator<Item = Block> + 'a> {
        let blocks = &self.groups[op.group as usize][op.from as usize..op.to as usize];
        match op.kind {
            Kind::Store => Box::new(blocks.iter().copied()),
            Kind::Remove => Box::new(blocks.iter().rev().copied()),
        }
    }

    pub fn parent(&self, op: &Op) -> Option<Block> {
        (op.from > 0).then(|| self.groups[op.group as usize][op.from as usize - 1])
    }

    pub fn query_blocks<'a>(&'a self, q: &'a Query) -> impl Iterator<Item = Block> + 'a {
        self.groups[q.group as usize].iter().chain(&q.tail).copied()
    }

    pub fn blocks_in_events(&self) -> u64 {
        self.ops.iter().map(|op| u64::from(op.to - op.from)).sum()
    }
}

/// Both hashes of every full block of `tokens`, each computed the way its system does.
fn blocks_of(tokens: &[u32], block_size: usize) -> Vec<Block> {
    let seq = tokens::block_hashes(tokens, block_size);
    let local = dynamo_kv_router::compute_block_hash_for_seq(
        tokens,
        block_size as u32,
        dynamo_kv_router::protocols::BlockHashOptions::default(),
    );
    seq.into_iter()
        .zip(local)
        .map(|(seq, local)| Block {
            seq,
            local: local.0,
        })
        .collect()
}
