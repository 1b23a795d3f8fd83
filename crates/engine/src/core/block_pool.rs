//! The paged KV cache's block pool and prefix cache, after vLLM's `BlockPool` and
//! `FreeKVCacheBlockQueue`: fixed-size blocks with reference counts, a plain free list for
//! blocks that hold nothing reusable, and an intrusive LRU (prev/next arrays over block
//! indices) of cached blocks nobody references, from which allocation evicts when the
//! free list runs dry. Full blocks are registered under their chained hash
//! (`tokens::hash_block`), and every change to the set of cached hashes is recorded as a
//! [`KvEvent`] so that a router can mirror this cache exactly. Every operation costs O(1)
//! per block it touches.

use std::collections::HashMap;

use protocol::{KvEvent, KvEventData};

/// Index of one KV block in the cache, `0..num_blocks`.
pub type BlockId = u32;

/// End-of-list marker for the LRU links.
const NIL: u32 = u32::MAX;

pub struct BlockPool {
    block_size: usize,
    enable_prefix_caching: bool,
    ref_count: Vec<u32>,
    /// The hash a block is registered under in the prefix cache, if any.
    hash: Vec<Option<u64>>,
    /// LRU links; only meaningful for blocks that are cached and unreferenced.
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Least recently freed cached block: the next one to evict.
    lru_head: u32,
    /// Most recently freed cached block: the last one to evict.
    lru_tail: u32,
    num_evictable: usize,
    /// Unreferenced blocks holding nothing reusable, handed out before any eviction.
    free: Vec<BlockId>,
    num_used: usize,
    /// std's SipHash rather than a pass-through hasher: block hashes are unkeyed xxh3 of
    /// client-chosen tokens, so a pass-through would let a client aim at one bucket.
    cached: HashMap<u64, BlockId>,
    events: Vec<KvEvent>,
    next_event_id: u64,
}

impl BlockPool {
    /// # Panics
    /// If `block_size` is 0 or `num_blocks` does not fit a [`BlockId`]; both are
    /// configuration errors that validation catches before the pool is built.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks < NIL as usize, "num_blocks must be below {NIL}");
        BlockPool {
            block_size,
            enable_prefix_caching,
            ref_count: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            lru_head: NIL,
            lru_tail: NIL,
            num_evictable: 0,
            // Popped from the back, so block 0 goes out first: predictable tables in tests.
            free: (0..num_blocks as BlockId).rev().collect(),
            num_used: 0,
            cached: HashMap::new(),
            events: Vec::new(),
            next_event_id: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that [`allocate`](Self::allocate) could hand out now: uncached free blocks
    /// plus cached blocks nobody references (evictable).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.num_evictable
    }

    /// Blocks with at least one reference.
    pub fn num_used(&self) -> usize {
        self.num_used
    }

    /// Fraction of blocks in use, 0 for an empty pool.
    pub fn usage(&self) -> f32 {
        if self.num_blocks() == 0 {
            0.0
        } else {
            self.num_used as f32 / self.num_blocks() as f32
        }
    }

    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_prefix_caching
    }

    /// How many leading `hashes` are cached, in use or not. Changes nothing, so admission
    /// can ask before it commits to anything.
    pub fn cached_prefix_len(&self, hashes: &[u64]) -> usize {
        if !self.enable_prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Takes a reference on each block of the longest cached prefix of `hashes` and returns
    /// their ids in order. Blocks nobody referenced leave the evictable LRU.
    pub fn acquire_cached_prefix(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        if !self.enable_prefix_caching {
            return Vec::new();
        }
        let mut out = Vec::new();
        for h in hashes {
            let Some(&id) = self.cached.get(h) else { break };
            if self.ref_count[id as usize] == 0 {
                self.lru_unlink(id);
                self.num_used += 1;
            }
            self.ref_count[id as usize] += 1;
            out.push(id);
        }
        out
    }

    /// `n` blocks with one reference each, or `None` (changing nothing) if fewer than `n`
    /// are free. Uncached free blocks go first; then the least recently freed cached blocks
    /// are evicted, announced in one `BlockRemoved` event.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    let id = self.lru_head;
                    debug_assert_ne!(id, NIL, "num_free counted an evictable block");
                    self.lru_unlink(id);
                    if let Some(h) = self.hash[id as usize].take() {
                        self.cached.remove(&h);
                        evicted.push(h);
                    }
                    id
                }
            };
            self.ref_count[id as usize] = 1;
            out.push(id);
        }
        self.num_used += n;
        if !evicted.is_empty() {
            self.emit(KvEventData::BlockRemoved { hashes: evicted });
        }
        Some(out)
    }

    /// Registers consecutive full blocks of one sequence in the prefix cache.
    ///
    /// `blocks[i]` is `(id, hash, tokens)` of one full block and `parent` the hash of the
    /// block before `blocks[0]` (`None` at the sequence start). Newly registered blocks are
    /// announced in `BlockStored` events. A block whose hash is already cached under
    /// another id (two sequences computed the same block) stays unregistered, so the first
    /// copy keeps serving hits and the router hears of each hash once; the announced run is
    /// split there and the next run names the skipped block's hash as its parent, which
    /// keeps the chain the router rebuilds intact. Re-committing an already registered
    /// block is a no-op, as is everything when prefix caching is disabled.
    pub fn commit_full_blocks(&mut self, parent: Option<u64>, blocks: &[(BlockId, u64, &[u32])]) {
        if !self.enable_prefix_caching {
            return;
        }
        let mut run_parent = parent;
        let mut hashes: Vec<u64> = Vec::new();
        let mut run_tokens: Vec<u32> = Vec::new();
        for &(id, hash, tokens) in blocks {
            if self.try_register(id, hash, tokens) {
                hashes.push(hash);
                run_tokens.extend_from_slice(tokens);
            } else if !hashes.is_empty() {
                self.emit(KvEventData::BlockStored {
                    parent_hash: run_parent,
                    hashes: std::mem::take(&mut hashes),
                    tokens: std::mem::take(&mut run_tokens),
                });
            }
            if hashes.is_empty() {
                // The next announced block, if any, follows this one.
                run_parent = Some(hash);
            }
        }
        if !hashes.is_empty() {
            self.emit(KvEventData::BlockStored {
                parent_hash: run_parent,
                hashes,
                tokens: run_tokens,
            });
        }
    }

    /// Registers one block under `hash`; false if it was not newly registered.
    fn try_register(&mut self, id: BlockId, hash: u64, tokens: &[u32]) -> bool {
        let i = id as usize;
        if i >= self.num_blocks() {
            debug_assert!(false, "commit of unknown block {id}");
            return false;
        }
        if let Some(old) = self.hash[i] {
            debug_assert_eq!(old, hash, "block {id} re-committed under another hash");
            return false;
        }
        if self.ref_count[i] == 0 {
            // Only a sequence holding the block may vouch for its contents.
            debug_assert!(false, "commit of unreferenced block {id}");
            return false;
        }
        if tokens.len() != self.block_size {
            debug_assert!(false, "commit of a partial block {id}");
            return false;
        }
        if self.cached.contains_key(&hash) {
            return false;
        }
        self.cached.insert(hash, id);
        self.hash[i] = Some(hash);
        true
    }

    /// Drops one reference per block. A block left with none joins the evictable LRU if it
    /// is cached, the plain free list otherwise. Pass a sequence's blocks in order: they are
    /// freed tail first, so its tail is evicted before its head and a prefix shared with
    /// later requests survives longest.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &id in blocks.iter().rev() {
            let i = id as usize;
            if i >= self.num_blocks() || self.ref_count[i] == 0 {
                debug_assert!(false, "release of unreferenced block {id}");
                continue;
            }
            self.ref_count[i] -= 1;
            if self.ref_count[i] > 0 {
                continue;
            }
            self.num_used -= 1;
            if self.hash[i].is_some() {
                self.lru_push_back(id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Drops the whole prefix cache (after a weight update, say) and announces it with
    /// `AllBlocksCleared`. Refused, changing nothing, while any block is in use: a running
    /// sequence's blocks would keep stale KV under a name the router had forgotten.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_used > 0 {
            return false;
        }
        if !self.enable_prefix_caching {
            return true;
        }
        while self.lru_head != NIL {
            let id = self.lru_head;
            self.lru_unlink(id);
            self.hash[id as usize] = None;
            self.free.push(id);
        }
        self.cached.clear();
        self.emit(KvEventData::AllBlocksCleared);
        true
    }

    /// Events since the last drain, oldest first. Ids run consecutively from 0 over the
    /// pool's lifetime, so a consumer can detect a gap.
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Hashes in the prefix cache, in use or evictable, in no particular order.
    pub fn cached_hashes(&self) -> Vec<u64> {
        self.cached.keys().copied().collect()
    }

    /// Id of the last event emitted (drained or not); `None` before the first.
    pub fn last_event_id(&self) -> Option<u64> {
        self.next_event_id.checked_sub(1)
    }

    fn emit(&mut self, data: KvEventData) {
        self.events.push(KvEvent {
            id: self.next_event_id,
            data,
        });
        self.next_event_id += 1;
    }

    fn lru_push_back(&mut self, id: BlockId) {
        let i = id as usize;
        self.prev[i] = self.lru_tail;
        self.next[i] = NIL;
        match self.lru_tail {
            NIL => self.lru_head = id,
            tail => self.next[tail as usize] = id,
        }
        self.lru_tail = id;
        self.num_evictable += 1;
    }

    fn lru_unlink(&mut self, id: BlockId) {
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.lru_head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.lru_tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.num_evictable -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokens::block_hashes;

    const BS: usize = 4;

    fn stored(ev: &KvEvent) -> (Option<u64>, Vec<u64>) {
        match &ev.data {
            KvEventData::BlockStored {
                parent_hash,
                hashes,
                ..
            } => (*parent_hash, hashes.clone()),
            other => panic!("expected BlockStored, got {other:?}"),
        }
    }

    /// Allocates blocks for `tokens` and commits its full blocks; returns (blocks, hashes).
    fn fill(pool: &mut BlockPool, tokens: &[u32]) -> (Vec<BlockId>, Vec<u64>) {
        let hashes = block_hashes(tokens, BS);
        let blocks = pool.allocate(tokens.len().div_ceil(BS)).expect("room");
        let full: Vec<_> = hashes
            .iter()
            .enumerate()
            .map(|(i, &h)| (blocks[i], h, &tokens[i * BS..(i + 1) * BS]))
            .collect();
        pool.commit_full_blocks(None, &full);
        (blocks, hashes)
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4, BS, true);
        assert_eq!(pool.allocate(3), Some(vec![0, 1, 2]));
        assert_eq!(pool.allocate(2), None);
        assert_eq!((pool.num_free(), pool.num_used()), (1, 3));
        assert_eq!(pool.allocate(0), Some(vec![]));
        pool.release(&[0, 1, 2]);
        assert_eq!((pool.num_free(), pool.num_used()), (4, 0));
        assert_eq!(pool.usage(), 0.0);
    }

    #[test]
    fn cached_prefix_is_shared_and_counted() {
        let mut pool = BlockPool::new(8, BS, true);
        let tokens: Vec<u32> = (0..10).collect();
        let (blocks, hashes) = fill(&mut pool, &tokens);
        assert_eq!(pool.cached_prefix_len(&hashes), 2);
        let shared = pool.acquire_cached_prefix(&hashes);
        assert_eq!(shared, blocks[..2]);
        assert_eq!(pool.num_used(), 3);
        pool.release(&blocks);
        // Still referenced by the second holder.
        assert_eq!(pool.num_used(), 2);
        pool.release(&shared);
        assert_eq!((pool.num_free(), pool.num_used()), (8, 0));
        // A miss in the middle ends the prefix.
        assert_eq!(pool.cached_prefix_len(&[hashes[0], 7, hashes[1]]), 1);
    }

    #[test]
    fn eviction_prefers_free_then_lru_tail_first() {
        let mut pool = BlockPool::new(4, BS, true);
        let tokens: Vec<u32> = (0..12).collect();
        let (blocks, hashes) = fill(&mut pool, &tokens);
        pool.release(&blocks);
        pool.drain_events();
        // One never-used block is free; it goes first, evicting nothing.
        assert_eq!(pool.allocate(1), Some(vec![3]));
        assert!(pool.drain_events().is_empty());
        // Then the sequence's tail is evicted before its head.
        assert_eq!(pool.allocate(1), Some(vec![blocks[2]]));
        let ev = pool.drain_events();
        assert_eq!(
            ev[0].data,
            KvEventData::BlockRemoved {
                hashes: vec![hashes[2]]
            }
        );
        assert_eq!(pool.cached_prefix_len(&hashes), 2);
    }

    #[test]
    fn acquiring_a_block_protects_it_from_eviction() {
        let mut pool = BlockPool::new(3, BS, true);
        let tokens: Vec<u32> = (0..12).collect();
        let (blocks, hashes) = fill(&mut pool, &tokens);
        pool.release(&blocks);
        let held = pool.acquire_cached_prefix(&hashes[..1]);
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.allocate(2), Some(vec![blocks[2], blocks[1]]));
        assert_eq!(pool.allocate(1), None);
        assert_eq!(pool.cached_hashes(), vec![hashes[0]]);
        pool.release(&held);
    }

    #[test]
    fn duplicate_blocks_keep_the_first_and_split_the_event() {
        let mut pool = BlockPool::new(8, BS, true);
        let a: Vec<u32> = (0..12).collect();
        let hashes = block_hashes(&a, BS);
        let first = pool.allocate(3).expect("room");
        // The first sequence computed only its middle block so far (parent = block 0).
        pool.commit_full_blocks(Some(hashes[0]), &[(first[1], hashes[1], &a[4..8])]);
        let second = pool.allocate(3).expect("room");
        let full: Vec<_> = (0..3)
            .map(|i| (second[i], hashes[i], &a[i * BS..(i + 1) * BS]))
            .collect();
        pool.commit_full_blocks(None, &full);
        let ev = pool.drain_events();
        assert_eq!(ev.len(), 3);
        assert_eq!(stored(&ev[0]), (Some(hashes[0]), vec![hashes[1]]));
        assert_eq!(stored(&ev[1]), (None, vec![hashes[0]]));
        assert_eq!(stored(&ev[2]), (Some(hashes[1]), vec![hashes[2]]));
        assert_eq!(ev.iter().map(|e| e.id).collect::<Vec<_>>(), vec![0, 1, 2]);
        // Hits go to the first copy of the duplicate.
        let hit = pool.acquire_cached_prefix(&hashes);
        assert_eq!(hit, vec![second[0], first[1], second[2]]);
        // Re-committing is a no-op.
        pool.commit_full_blocks(None, &full);
        assert!(pool.drain_events().is_empty());
        // The unregistered duplicate goes back to the plain free list, not the LRU.
        pool.release(&second);
        pool.release(&first);
        pool.release(&hit);
        assert_eq!(pool.num_free(), 8);
        assert_eq!(pool.num_evictable, 3);
    }

    #[test]
    fn reset_only_when_idle() {
        let mut pool = BlockPool::new(4, BS, true);
        let tokens: Vec<u32> = (0..8).collect();
        let (blocks, hashes) = fill(&mut pool, &tokens);
        assert!(!pool.reset_prefix_cache());
        assert_eq!(pool.cached_prefix_len(&hashes), 2);
        pool.release(&blocks);
        pool.drain_events();
        assert!(pool.reset_prefix_cache());
        assert_eq!(pool.drain_events()[0].data, KvEventData::AllBlocksCleared);
        assert!(pool.cached_hashes().is_empty());
        assert_eq!(pool.num_free(), 4);
        // Cleared blocks are plain free blocks again: allocating evicts nothing.
        assert_eq!(pool.allocate(4).map(|b| b.len()), Some(4));
        assert!(pool.drain_events().is_empty());
    }

    #[test]
    fn disabled_prefix_caching_caches_nothing() {
        let mut pool = BlockPool::new(4, BS, false);
        let tokens: Vec<u32> = (0..8).collect();
        let (blocks, hashes) = fill(&mut pool, &tokens);
        assert_eq!(pool.cached_prefix_len(&hashes), 0);
        assert!(pool.acquire_cached_prefix(&hashes).is_empty());
        pool.release(&blocks);
        assert!(pool.reset_prefix_cache());
        assert!(pool.drain_events().is_empty());
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn event_ids_continue_across_drains() {
        let mut pool = BlockPool::new(4, BS, true);
        let (blocks, _) = fill(&mut pool, &(0..4).collect::<Vec<_>>());
        assert_eq!(pool.drain_events()[0].id, 0);
        pool.release(&blocks);
        pool.reset_prefix_cache();
        assert_eq!(pool.drain_events()[0].id, 1);
    }
}
