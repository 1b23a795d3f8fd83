//! Property tests of the block pool: random interleavings of sequences that share prefixes,
//! commit their full blocks late or early, grow, release and run the pool out of free
//! blocks, checked after every operation against a model of what the pool must hold and
//! against the picture a router rebuilds from the pool's KV events alone.

use std::collections::{HashMap, HashSet};

use engine::core::block_pool::{BlockId, BlockPool};
use proptest::prelude::*;
use protocol::{KvEvent, KvEventData};
use tokens::{block_hashes, hash_block};

const BS: usize = 4;
const BASE_LEN: usize = 48;
const NUM_BASES: u32 = 3;

#[derive(Clone, Debug)]
enum Op {
    /// A new sequence: a prefix of one base stream, then a few tokens from a tiny alphabet
    /// (so suffixes collide too).
    Admit {
        base: u32,
        cut: usize,
        extra: Vec<u32>,
    },
    /// Registers up to `n` more of a sequence's full blocks.
    Commit {
        seq: usize,
        n: usize,
    },
    /// Decodes a few tokens, allocating blocks as they fill up.
    Grow {
        seq: usize,
        extra: Vec<u32>,
    },
    Release {
        seq: usize,
    },
    /// Blocks held by no prefix at all, to push the pool into evicting.
    Pressure {
        n: usize,
    },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let tokens = || prop::collection::vec(0u32..3, 0..10);
    prop_oneof![
        4 => (0..NUM_BASES, 0..=BASE_LEN, tokens())
            .prop_map(|(base, cut, extra)| Op::Admit { base, cut, extra }),
        4 => (any::<usize>(), 1usize..4).prop_map(|(seq, n)| Op::Commit { seq, n }),
        2 => (any::<usize>(), tokens()).prop_map(|(seq, extra)| Op::Grow { seq, extra }),
        3 => any::<usize>().prop_map(|seq| Op::Release { seq }),
        1 => (1usize..6).prop_map(|n| Op::Pressure { n }),
        1 => Just(Op::Reset),
    ]
}

fn base_stream(base: u32) -> Vec<u32> {
    (0..BASE_LEN as u32).map(|i| base * 1000 + i).collect()
}

struct Seq {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    /// Leading blocks registered (or found already cached).
    committed: usize,
}

/// The test's side of the story: live sequences, what each block holds, and the cache as
/// a router rebuilds it from events.
struct Harness {
    pool: BlockPool,
    seqs: Vec<Seq>,
    /// Tokens last written into each block; `None` once it is handed out fresh.
    content: Vec<Option<Vec<u32>>>,
    mirror: HashSet<u64>,
    next_event_id: u64,
}

impl Harness {
    fn new(num_blocks: usize) -> Self {
        Harness {
            pool: BlockPool::new(num_blocks, BS, true),
            seqs: Vec::new(),
            content: vec![None; num_blocks],
            mirror: HashSet::new(),
            next_event_id: 0,
        }
    }

    fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        let blocks = self.pool.allocate(n)?;
        for &b in &blocks {
            self.content[b as usize] = None;
        }
        Some(blocks)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Admit { base, cut, extra } => {
                let mut tokens = base_stream(*base)[..*cut].to_vec();
                tokens.extend(extra);
                if tokens.is_empty() {
                    return;
                }
                let hashes = block_hashes(&tokens, BS);
                // As the scheduler does: leave at least one token to compute.
                let max_cached = ((tokens.len() - 1) / BS).min(hashes.len());
                let expected = self.pool.cached_prefix_len(&hashes[..max_cached]);
                let cached = self.pool.acquire_cached_prefix(&hashes[..max_cached]);
                assert_eq!(
                    cached.len(),
                    expected,
                    "cached_prefix_len disagrees with acquire"
                );
                for (i, &b) in cached.iter().enumerate() {
                    let want = &tokens[i * BS..(i + 1) * BS];
                    assert_eq!(
                        self.content[b as usize].as_deref(),
                        Some(want),
                        "prefix hit on block {b} whose contents were overwritten"
                    );
                }
                let need = tokens.len().div_ceil(BS) - cached.len();
                match self.allocate(need) {
                    Some(fresh) => {
                        let committed = cached.len();
                        let mut blocks = cached;
                        blocks.extend(fresh);
                        self.seqs.push(Seq {
                            tokens,
                            blocks,
                            committed,
                        });
                    }
                    None => self.pool.release(&cached),
                }
            }
            Op::Commit { seq, n } => {
                if self.seqs.is_empty() {
                    return;
                }
                let i = seq % self.seqs.len();
                let s = &mut self.seqs[i];
                let full = s.tokens.len() / BS;
                let upto = (s.committed + n).min(full);
                if upto <= s.committed {
                    return;
                }
                let hashes = block_hashes(&s.tokens, BS);
                let parent = s.committed.checked_sub(1).map(|p| hashes[p]);
                let batch: Vec<(BlockId, u64, &[u32])> = (s.committed..upto)
                    .map(|i| (s.blocks[i], hashes[i], &s.tokens[i * BS..(i + 1) * BS]))
                    .collect();
                for &(b, _, t) in &batch {
                    self.content[b as usize] = Some(t.to_vec());
                }
                self.pool.commit_full_blocks(parent, &batch);
                s.committed = upto;
            }
            Op::Grow { seq, extra } => {
                if self.seqs.is_empty() {
                    return;
                }
                let i = seq % self.seqs.len();
                let len = self.seqs[i].tokens.len() + extra.len();
                let need = len.div_ceil(BS).saturating_sub(self.seqs[i].blocks.len());
                if let Some(fresh) = self.allocate(need) {
                    let s = &mut self.seqs[i];
                    s.blocks.extend(fresh);
                    s.tokens.extend(extra);
                }
            }
            Op::Release { seq } => {
                if self.seqs.is_empty() {
                    return;
                }
                let s = self.seqs.swap_remove(seq % self.seqs.len());
                self.pool.release(&s.blocks);
            }
            Op::Pressure { n } => {
                if let Some(blocks) = self.allocate(*n) {
                    self.seqs.push(Seq {
                        tokens: Vec::new(),
                        blocks,
                        committed: 0,
                    });
                }
            }
            Op::Reset => {
                let before = self.pool.cached_hashes().len();
                let idle = self.pool.num_used() == 0;
                assert_eq!(self.pool.reset_prefix_cache(), idle);
                if !idle {
                    assert_eq!(self.pool.cached_hashes().len(), before);
                }
            }
        }
    }

    /// Replays new events into the mirror, checking ids and the announced chains.
    fn consume_events(&mut self) {
        for KvEvent { id, data } in self.pool.drain_events() {
            assert_eq!(id, self.next_event_id, "event ids must be consecutive");
            self.next_event_id += 1;
            match data {
                KvEventData::BlockStored {
                    parent_hash,
                    hashes,
                    tokens,
                } => {
                    assert!(!hashes.is_empty(), "empty BlockStored");
                    assert_eq!(
                        tokens.len(),
                        hashes.len() * BS,
                        "a block's worth of tokens each"
                    );
                    let mut parent = parent_hash;
                    for (&hash, block) in hashes.iter().zip(tokens.chunks_exact(BS)) {
                        assert_eq!(hash_block(parent, block), hash, "broken chain");
                        assert!(self.mirror.insert(hash), "hash {hash} stored twice");
                        parent = Some(hash);
                    }
                }
                KvEventData::BlockRemoved { hashes } => {
                    for h in hashes {
                        assert!(self.mirror.remove(&h), "removed unknown hash {h}");
                    }
                }
                KvEventData::AllBlocksCleared => self.mirror.clear(),
            }
        }
    }

    fn check(&mut self) {
        self.consume_events();
        let cached: HashSet<u64> = self.pool.cached_hashes().into_iter().collect();
        assert_eq!(cached, self.mirror, "events disagree with the cache");

        let n = self.pool.num_blocks();
        assert_eq!(self.pool.num_free() + self.pool.num_used(), n);
        let mut refs: HashMap<BlockId, usize> = HashMap::new();
        for s in &self.seqs {
            for &b in &s.blocks {
                *refs.entry(b).or_default() += 1;
            }
        }
        assert_eq!(self.pool.num_used(), refs.len(), "blocks in use");
        assert!(cached.len() <= n);
    }

    fn release_all(&mut self) {
        for s in std::mem::take(&mut self.seqs) {
            self.pool.release(&s.blocks);
        }
        self.check();
        let n = self.pool.num_blocks();
        assert_eq!(self.pool.num_used(), 0);
        assert_eq!(self.pool.num_free(), n);
        // Every block can be handed out again, which evicts the whole cache.
        let all = self.pool.allocate(n).expect("no block leaked");
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), n);
        self.seqs.push(Seq {
            tokens: Vec::new(),
            blocks: all,
            committed: 0,
        });
        self.check();
        assert!(self.mirror.is_empty());
        for s in std::mem::take(&mut self.seqs) {
            self.pool.release(&s.blocks);
        }
        self.check();
    }
}

proptest! {
    // No regression files: they would land in the source tree unasked.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn events_mirror_the_cache(
        num_blocks in 6usize..40,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut h = Harness::new(num_blocks);
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.release_all();
    }
}

/// A pool that must evict takes a finished sequence's tail before its head, so the part
/// most likely shared with later requests survives longest.
#[test]
fn shared_head_outlives_private_tail() {
    let mut h = Harness::new(6);
    h.apply(&Op::Admit {
        base: 0,
        cut: 24,
        extra: Vec::new(),
    });
    h.apply(&Op::Commit { seq: 0, n: 6 });
    h.apply(&Op::Release { seq: 0 });
    h.check();
    h.apply(&Op::Pressure { n: 4 });
    h.check();
    let head = block_hashes(&base_stream(0)[..8], BS);
    assert_eq!(h.pool.cached_prefix_len(&head), 2);
    h.release_all();
}
