//! The router's mirror of every instance's prefix cache, built from the KV events the
//! instances publish.
//!
//! Block hashes are chained (each covers its parent, see `tokens::hash`), so one hash names
//! a whole prefix and the mirror needs no tree: a flat map from block hash to the block's
//! entry in a slab, which holds the set of instances holding that block. A lookup walks a
//! prompt's hashes from the first and narrows the candidate set level by level, the way an
//! engine's own prefix-cache lookup stops at its first miss. Instances get dense slot numbers
//! so that a holder set is either a few sorted inline slots (most blocks: the tail of one
//! request) or a bitset (shared prefixes that hundreds of instances hold).
//!
//! What a radix tree gets from its edges, the slab gets from links: each entry remembers the
//! block stored right after it, and the blocks of one event are allocated together, so a
//! lookup mostly moves to the next entry in memory and checks its hash, asking the map only
//! where the prompt leaves the chain as stored. Links are hints, always checked against the
//! hash and never needed for correctness; there is nothing to split or merge. Where a block
//! has the same holders as the one before it (blocks stored together by the same instances),
//! the lookup compares the two sorted arrays instead of testing every candidate. A bitset
//! keeps, against the block its `prev` link names, the words in which it lacks holders of
//! that block (taken by the first lookup after either changes, checked by version numbers):
//! a lookup coming from there narrows only those words, a few of the 16 that 1024 instances
//! take.
//!
//! The holder sets are the only membership record. Per instance the index keeps a log of the
//! blocks it stored, a superset of what it holds that is compacted once stale entries pile
//! up: clearing, removing or resyncing an instance walks that log, while a store or an
//! eviction touches only the block's holder set, not a second per-instance hash table.
//!
//! Event ids go up by one per instance. The index notices a jump, applies the event anyway
//! and returns a [`Gap`] so that the caller fetches a snapshot and calls [`KvIndex::resync`].

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::{KvEvent, KvEventData, KvSnapshot};

use crate::InstanceId;

/// Dense instance number; bitsets are indexed by it.
type Slot = u32;

/// Most holders a block keeps inline before it switches to a bitset (128 bytes with 1024
/// slots). Measured with benchmarks/kv-index-compare at 1024 instances, heap for 8 / 12:
/// blocks with ~2 holders each (`--prefixes 4096`) 22.4 / 26.4 MiB, ~8 holders each
/// (`--prefixes 1024`) 12.8 / 11.2 MiB, ~256 holders each 4.5 / 4.5 MiB. With 12, blocks
/// with ~8 holders rarely turn into bitsets and back (a bitset is an allocation, and a
/// pointer to chase on every store and lookup): events applied about 30% faster there, at a
/// cost in memory only where holders are very few (a slab entry is 72 bytes rather than 56).
const INLINE_HOLDERS: usize = 12;

/// A bitset that shrinks to this many holders goes back inline. Below `INLINE_HOLDERS` so
/// that one instance storing and evicting the same block does not convert it back and forth.
const BACK_TO_INLINE: usize = INLINE_HOLDERS / 2;

/// The instance's event ids jumped: events were lost between it and the router. The event
/// that revealed the jump was applied, but the mirror of this instance may be wrong until
/// [`KvIndex::resync`] replaces it with a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance {instance} skipped KV events (expected id {expected}, got {got}); resync it from a snapshot")]
pub struct Gap {
    pub instance: InstanceId,
    pub expected: u64,
    pub got: u64,
}

/// Hasher for keys that are already well mixed (xxh3 block hashes) or small ids: one
/// multiply spreads the bits upwards, and the rotation brings the best-mixed high bits down
/// to where the table takes its bucket index.
#[derive(Debug, Default, Clone, Copy)]
struct MulRotHasher(u64);

/// 2^64 divided by the golden ratio, rounded to odd: a multiplier with no bit pattern.
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for MulRotHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MulRotHasher>>;

/// The instances holding one block.
#[derive(Debug)]
enum Holders {
    /// Ascending, the first `len` entries in use, the rest `NO_SLOT`, so that a membership
    /// test compares every entry without looking at `len`, and equal sets are equal arrays.
    Inline {
        len: u8,
        slots: [Slot; INLINE_HOLDERS],
    },
    /// One bit per slot; `len` bits set. Sized for the slots that existed when it was made,
    /// grown on demand.
    Bits {
        len: u32,
        words: Box<[u64]>,
        /// Changes with the set (a number drawn from `KvIndex::versions`, so it also
        /// names the block; 0: not yet).
        version: u64,
        /// Bit `i` set where word `i` of the block before this one (its `prev` link) has
        /// holders that this one lacks: the only words a lookup coming from there needs
        /// to narrow. Valid while `seen` is that block's `version` (0: never); a change to
        /// this set resets it. Taken by the first lookup that finds it stale, not by the
        /// events: keeping it current read the neighbouring blocks' bitsets, a cache miss
        /// or two per event, while a lookup that needs it has both at hand. Atomic because
        /// lookups share the index: they all store the same value for the same versions,
        /// and the `seen` they publish comes after the `drops` it vouches for.
        drops: AtomicU64,
        seen: AtomicU64,
    },
}

/// Filler of unused inline entries; no instance gets this slot (that would take 2^32 - 1
/// instances).
const NO_SLOT: Slot = Slot::MAX;

fn words_for(slots: usize) -> usize {
    slots.div_ceil(64)
}

fn bit(slot: Slot) -> (usize, u64) {
    ((slot / 64) as usize, 1u64 << (slot % 64))
}

fn test_bit(words: &[u64], slot: Slot) -> bool {
    let (w, mask) = bit(slot);
    words.get(w).is_some_and(|word| word & mask != 0)
}

impl Holders {
    fn empty() -> Self {
        Holders::Inline {
            len: 0,
            slots: [NO_SLOT; INLINE_HOLDERS],
        }
    }

    /// Whether both are inline and hold the same slots.
    fn same_inline(&self, other: &Holders) -> bool {
        match (self, other) {
            // A fold rather than `==`, which calls memcmp.
            (Holders::Inline { slots: a, .. }, Holders::Inline { slots: b, .. }) => {
                a.iter().zip(b).fold(true, |same, (x, y)| same & (x == y))
            }
            _ => false,
        }
    }

    fn len(&self) -> usize {
        match self {
            Holders::Inline { len, .. } => *len as usize,
            Holders::Bits { len, .. } => *len as usize,
        }
    }

    fn contains(&self, slot: Slot) -> bool {
        match self {
            // Branch-free over the whole array: a couple of vector compares.
            Holders::Inline { slots, .. } => slots.iter().fold(false, |hit, &s| hit | (s == slot)),
            Holders::Bits { words, .. } => test_bit(words, slot),
        }
    }

    /// `slot_count` is the number of slots index-wide, so that a new bitset is sized once
    /// for every instance that may join it.
    fn insert(&mut self, slot: Slot, slot_count: usize) -> bool {
        match self {
            Holders::Inline { len, slots } => {
                let n = *len as usize;
                if slots.contains(&slot) {
                    return false;
                }
                if n < INLINE_HOLDERS {
                    let at = slots[..n].partition_point(|&s| s < slot);
                    slots.copy_within(at..n, at + 1);
                    slots[at] = slot;
                    *len += 1;
                    return true;
                }
                let highest = slots.iter().copied().max().unwrap_or(0).max(slot);
                let mut words =
                    vec![0u64; words_for(slot_count.max(highest as usize + 1))].into_boxed_slice();
                for &s in slots.iter().chain([&slot]) {
                    let (w, mask) = bit(s);
                    words[w] |= mask;
                }
                *self = Holders::Bits {
                    len: n as u32 + 1,
                    words,
                    version: 0,
                    drops: AtomicU64::new(0),
                    seen: AtomicU64::new(0),
                };
                true
            }
            Holders::Bits { len, words, .. } => {
                let (w, mask) = bit(slot);
                if w >= words.len() {
                    let mut grown = std::mem::take(words).into_vec();
                    grown.resize(words_for(slot_count.max(slot as usize + 1)), 0);
                    *words = grown.into_boxed_slice();
                }
                if words[w] & mask != 0 {
                    return false;
                }
                words[w] |= mask;
                *len += 1;
                true
            }
        }
    }

    fn remove(&mut self, slot: Slot) -> bool {
        match self {
            Holders::Inline { len, slots } => {
                let n = *len as usize;
                let Some(pos) = slots[..n].iter().position(|&s| s == slot) else {
                    return false;
                };
                slots.copy_within(pos + 1..n, pos);
                slots[n - 1] = NO_SLOT;
                *len -= 1;
                true
            }
            Holders::Bits { len, words, .. } => {
                let (w, mask) = bit(slot);
                match words.get_mut(w) {
                    Some(word) if *word & mask != 0 => *word &= !mask,
                    _ => return false,
                }
                *len -= 1;
                if *len as usize <= BACK_TO_INLINE {
                    let mut slots = [NO_SLOT; INLINE_HOLDERS];
                    let mut n = 0;
                    for_each_bit(words, |s| {
                        slots[n] = s;
                        n += 1;
                    });
                    *self = Holders::Inline {
                        len: n as u8,
                        slots,
                    };
                }
                true
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Holders::Inline { .. } => 0,
            Holders::Bits { words, .. } => words.len() * size_of::<u64>(),
        }
    }
}

/// Asks the CPU to start loading `words` into the cache (a hint: no effect on results).
/// Used for the next block's bitset, a separate allocation the walk cannot reach early.
fn prefetch(words: &[u64]) {
    #[cfg(target_arch = "x86_64")]
    for line in words.chunks(8) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch reads nothing architecturally and cannot fault; the pointer
        // comes from a live slice anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = words;
}

/// Calls `f` with the slot of every set bit of `words`.
fn for_each_bit(words: &[u64], mut f: impl FnMut(Slot)) {
    for (i, &word) in words.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            f(i as Slot * 64 + rest.trailing_zeros());
            rest &= rest - 1;
        }
    }
}

/// Bitsets of at most this many words (128 instances) are narrowed in one pass.
const SHORT_BITSET: usize = 2;

/// Keeps in `cand` the bits also set in `held` (missing words of `held` are zero) and calls
/// `emit(word index, bits)` for every word that lost bits. Two passes, so that the first
/// (one AND-NOT per word, no branch) vectorises and the second visits only the words that
/// lost someone: a shared prefix drops a few of its hundreds of holders per block, and a
/// branch per word was mispredicted about once per lost holder.
fn narrow_bits(
    cand: &mut [u64],
    lost: &mut Vec<u64>,
    held: &[u64],
    mut emit: impl FnMut(usize, u64),
) {
    let n = cand.len();
    if n <= SHORT_BITSET {
        // Too few words for the two passes to pay.
        for (i, c) in cand.iter_mut().enumerate() {
            let h = held.get(i).copied().unwrap_or(0);
            let l = *c & !h;
            *c &= h;
            if l != 0 {
                emit(i, l);
            }
        }
        return;
    }
    if lost.len() < n {
        lost.resize(n, 0);
    }
    let lost = &mut lost[..n];
    let shared = n.min(held.len());
    let mut any = 0u64;
    for ((c, l), &h) in cand[..shared]
        .iter_mut()
        .zip(&mut lost[..shared])
        .zip(&held[..shared])
    {
        *l = *c & !h;
        *c &= h;
        any |= *l;
    }
    for (c, l) in cand[shared..].iter_mut().zip(&mut lost[shared..]) {
        *l = *c;
        *c = 0;
        any |= *l;
    }
    if any == 0 {
        return;
    }
    for (chunk, words) in lost.chunks(64).enumerate() {
        let mut nonzero = words
            .iter()
            .enumerate()
            .fold(0u64, |m, (i, &w)| m | (u64::from(w != 0) << i));
        while nonzero != 0 {
            let i = nonzero.trailing_zeros() as usize;
            emit(chunk * 64 + i, words[i]);
            nonzero &= nonzero - 1;
        }
    }
}

/// Where a stored block goes: after the block stored before it in the same event or
/// snapshot, or under the event's parent.
#[derive(Debug, Clone, Copy)]
enum Link {
    After(BlockId),
    Parent(Option<u64>),
}

/// Lookups use no drops against bitsets shorter than this: narrowing all of their words
/// costs about what taking and using drops does. 256 instances.
const DROPS_MIN_WORDS: usize = 4;

/// The drops of `block` against `up`, the block its `prev` link names, taking them anew
/// (and keeping them for the next lookup) where a change to either made them stale. `None`
/// where either is inline or `up` is too short or too long for drops to pay or fit.
fn drops_against(block: &Holders, up: &Holders) -> Option<u64> {
    let (
        Holders::Bits {
            words: down,
            drops,
            seen,
            ..
        },
        Holders::Bits {
            words: up, version, ..
        },
    ) = (block, up)
    else {
        return None;
    };
    if !(DROPS_MIN_WORDS..=64).contains(&up.len()) || *version == 0 {
        return None;
    }
    if seen.load(Ordering::Acquire) == *version {
        return Some(drops.load(Ordering::Relaxed));
    }
    let fresh = up.iter().enumerate().fold(0u64, |m, (i, &w)| {
        m | (u64::from(w & !down.get(i).copied().unwrap_or(0) != 0) << i)
    });
    drops.store(fresh, Ordering::Relaxed);
    seen.store(*version, Ordering::Release);
    Some(fresh)
}

/// Stale log entries tolerated before compaction, beyond as many as the blocks held.
const LOG_SLACK: usize = 8;

/// What the index knows about one instance. A freed slot keeps an empty state until reused.
#[derive(Debug, Default)]
struct InstanceState {
    /// Every block the instance holds, at least once, plus blocks it dropped since the last
    /// compaction (an entry may since name another block, when the slab reused it) and
    /// repeats. Block ids rather than hashes: checking an entry reads the block, no map.
    log: Vec<BlockId>,
    /// Blocks held.
    held: usize,
    /// Id of the next event to apply; lower ids are stale duplicates. Always known: a new
    /// instance expects 0, a snapshot sets it past its last event.
    next_event: u64,
    needs_resync: bool,
}

/// Reusable buffers for [`KvIndex::overlaps_with`]. Once they have grown to the largest
/// candidate set, lookups allocate nothing. [`KvIndex::overlaps`] keeps one per thread.
#[derive(Debug, Default)]
pub struct OverlapScratch {
    /// Candidates as a bitset, while many remain.
    words: Vec<u64>,
    /// Candidates as a list, once few remain.
    list: Vec<Slot>,
    /// Per word of `words`, the candidates the current block dropped.
    lost: Vec<u64>,
}

thread_local! {
    static SCRATCH: RefCell<OverlapScratch> = RefCell::new(OverlapScratch::default());
}

/// Position of a block in [`KvIndex::blocks`].
type BlockId = u32;

/// Link to no block.
const NO_BLOCK: BlockId = BlockId::MAX;

/// One block held by at least one instance (or a free entry of the slab: no holders).
#[derive(Debug)]
struct Block {
    hash: u64,
    /// The block stored right after this one the last time one was (its child in a chain),
    /// and the one stored right before it. Hints only: whoever follows a link checks that
    /// the block there is live and has the hash it expects, and otherwise asks the map.
    next: BlockId,
    prev: BlockId,
    holders: Holders,
}

impl Block {
    fn is(&self, hash: u64) -> bool {
        self.hash == hash && self.holders.len() > 0
    }
}

/// A mirror of the prefix caches of many instances; see the module docs.
#[derive(Debug, Default)]
pub struct KvIndex {
    /// Hash to block, for every live block; each live block's hash maps to it.
    ids: FastMap<u64, BlockId>,
    /// Slab of blocks: a chain stored in one event lands in consecutive entries, so a walk
    /// along its links reads memory in order.
    blocks: Vec<Block>,
    /// Entries of `blocks` with no holders, reused before the slab grows (it never shrinks:
    /// its high-water mark is the most blocks held at once).
    free_blocks: Vec<BlockId>,
    slots: Vec<InstanceState>,
    /// The instance in each slot, apart from its state: lookups read only this, and it
    /// stays in the L1 cache (8 KiB for 1024 instances).
    slot_ids: Vec<InstanceId>,
    slot_of: FastMap<InstanceId, Slot>,
    /// Lowest first, so that bitsets stay as short as the live instances allow.
    free_slots: BinaryHeap<Reverse<Slot>>,
    /// Sum of `held` over instances.
    entries: usize,
    /// Scratch for log compaction, one bit per slab entry; all zero between passes.
    compact_seen: Vec<u64>,
    /// Last version handed to a bitset (see `Holders::Bits`); never reused.
    versions: u64,
}

impl KvIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an instance with no blocks, expecting event 0 next. [`apply`](Self::apply)
    /// and [`resync`](Self::resync) also register on first sight. No-op if already known.
    pub fn add_instance(&mut self, instance: InstanceId) {
        self.slot_or_register(instance);
    }

    /// Applies one event of `instance`.
    ///
    /// An id below the expected one is a stale duplicate and is ignored. An id above it
    /// means events were lost: the event is applied anyway (best effort), the instance is
    /// flagged [`needs_resync`](Self::needs_resync), expectations move past it, and the
    /// [`Gap`] tells the caller to fetch a snapshot. An instance seen for the first time
    /// expects id 0, so a router that attaches late reports a gap on its first event.
    pub fn apply(&mut self, instance: InstanceId, ev: &KvEvent) -> Result<(), Gap> {
        let slot = self.slot_or_register(instance);
        let state = &mut self.slots[slot as usize];
        let expected = state.next_event;
        if ev.id < expected {
            return Ok(());
        }
        state.next_event = ev.id.saturating_add(1);
        let gap = ev.id > expected;
        if gap {
            state.needs_resync = true;
        }
        match &ev.data {
            KvEventData::BlockStored {
                parent_hash,
                blocks,
            } => {
                // The parent is not checked: hashes are chained, so a block stands for its
                // prefix whether or not the parent is still cached. It only tells where a
                // new chain hangs, so that lookups can follow the link.
                let mut at = Link::Parent(*parent_hash);
                for block in blocks {
                    at = Link::After(self.store(slot, block.hash, at));
                }
            }
            KvEventData::BlockRemoved { hashes } => {
                let mut near = NO_BLOCK;
                for &hash in hashes {
                    near = self.evict(slot, hash, near);
                }
            }
            KvEventData::AllBlocksCleared => self.clear_slot(slot),
        }
        if gap {
            Err(Gap {
                instance,
                expected,
                got: ev.id,
            })
        } else {
            Ok(())
        }
    }

    /// Replaces everything known about `instance` with a snapshot: the hashes it holds after
    /// event `last_event_id` (`None`: before any event, so event 0 comes next). Clears
    /// `needs_resync`; events with ids up to `last_event_id` are then ignored as stale.
    ///
    /// The snapshot must be taken after the gap was reported: an older one would roll the
    /// mirror back past events that will not be delivered again. A snapshot older than a
    /// mirror with no gap (events reached the router before the snapshot it asked for when
    /// the instance joined) is ignored for that reason.
    pub fn resync(&mut self, instance: InstanceId, last_event_id: Option<u64>, hashes: &[u64]) {
        let slot = self.slot_or_register(instance);
        let snapshot_next = last_event_id.map_or(0, |id| id.saturating_add(1));
        let state = &self.slots[slot as usize];
        if !state.needs_resync && snapshot_next < state.next_event {
            // Older than a mirror that has seen every event since the instance's first:
            // the join-time snapshot of an instance whose events got here before it. The
            // mirror is exact and newer; replacing it would drop blocks until the next gap.
            return;
        }
        self.clear_slot(slot);
        let mut at = Link::Parent(None);
        for &hash in hashes {
            at = Link::After(self.store(slot, hash, at));
        }
        let state = &mut self.slots[slot as usize];
        state.next_event = last_event_id.map_or(0, |id| id.saturating_add(1));
        state.needs_resync = false;
    }

    /// [`resync`](Self::resync) from the snapshot an engine serves.
    pub fn resync_snapshot(&mut self, instance: InstanceId, snapshot: &KvSnapshot) {
        self.resync(instance, snapshot.last_event_id, &snapshot.hashes);
    }

    /// Whether a gap was seen since the instance's last resync (false for unknown ones).
    pub fn needs_resync(&self, instance: InstanceId) -> bool {
        self.state(instance).is_some_and(|s| s.needs_resync)
    }

    /// The event id the index expects next from `instance`, `None` if it is unknown.
    pub fn next_event_id(&self, instance: InstanceId) -> Option<u64> {
        self.state(instance).map(|s| s.next_event)
    }

    /// Forgets the instance and its blocks; its slot is reused by the next new instance.
    pub fn remove_instance(&mut self, instance: InstanceId) {
        let Some(slot) = self.slot_of.remove(&instance) else {
            return;
        };
        self.clear_slot(slot);
        // The log would keep its capacity; a departed instance should not hold memory.
        self.slots[slot as usize] = InstanceState::default();
        self.free_slots.push(Reverse(slot));
    }

    /// Known instances, in ascending order.
    pub fn instances(&self) -> Vec<InstanceId> {
        let mut ids: Vec<InstanceId> = self.slot_of.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// For each instance that holds `hashes[0]`: how many leading hashes of `hashes` it holds
    /// consecutively, in no particular order. Instances with zero overlap are omitted.
    /// `out` is cleared first. Uses a per-thread [`OverlapScratch`].
    pub fn overlaps(&self, hashes: &[u64], out: &mut Vec<(InstanceId, u32)>) {
        SCRATCH.with_borrow_mut(|scratch| self.overlaps_with(hashes, scratch, out));
    }

    /// [`overlaps`](Self::overlaps) with caller-owned buffers.
    pub fn overlaps_with(
        &self,
        hashes: &[u64],
        scratch: &mut OverlapScratch,
        out: &mut Vec<(InstanceId, u32)>,
    ) {
        out.clear();
        let Some(mut at) = hashes.first().and_then(|h| self.ids.get(h).copied()) else {
            return;
        };
        let mut walk = Walk::start(self, &self.blocks[at as usize].holders, scratch, out);
        let mut prev = at;
        for (depth, &hash) in hashes.iter().enumerate().skip(1) {
            let level = u32::try_from(depth).unwrap_or(u32::MAX);
            // A chain stored together sits in consecutive slab entries: the link is a read
            // close by, the map only where the prompt leaves the chain as stored.
            at = match self.follow(at, hash) {
                Some(id) => id,
                None => match self.ids.get(&hash) {
                    Some(&id) => id,
                    None => return walk.finish(level),
                },
            };
            let block = &self.blocks[at as usize];
            // The next block's bitset is a separate allocation: start loading it while this
            // one narrows the candidates.
            if let Some(Holders::Bits { words, .. }) =
                self.blocks.get(block.next as usize).map(|b| &b.holders)
            {
                prefetch(words);
            }
            // The same holders as the block before (sorted, so equal sets are equal arrays):
            // nobody is lost, and one compare of two arrays replaces a test per candidate.
            // Blocks stored together by the same instances are like this.
            let before = &self.blocks[prev as usize].holders;
            let same = block.holders.same_inline(before);
            // Coming from the block this one's drops are taken against: only the words
            // that lose holders there need narrowing.
            let drops = if block.prev == prev {
                drops_against(&block.holders, before)
            } else {
                None
            };
            prev = at;
            if !same && !walk.narrow(&block.holders, drops, level) {
                return;
            }
        }
        walk.finish(u32::try_from(hashes.len()).unwrap_or(u32::MAX));
    }

    /// The block after `from` if it has `hash`.
    fn follow(&self, from: BlockId, hash: u64) -> Option<BlockId> {
        let next = self.blocks[from as usize].next;
        self.blocks
            .get(next as usize)
            .is_some_and(|b| b.is(hash))
            .then_some(next)
    }

    /// The block with `hash`, trying the links of block `near` (any id) before the map.
    fn find(&self, hash: u64, near: BlockId) -> Option<BlockId> {
        if let Some(block) = self.blocks.get(near as usize) {
            for id in [block.next, block.prev] {
                if self.blocks.get(id as usize).is_some_and(|b| b.is(hash)) {
                    return Some(id);
                }
            }
        }
        self.ids.get(&hash).copied()
    }

    fn emit_word(
        &self,
        word_index: usize,
        bits: u64,
        depth: u32,
        out: &mut Vec<(InstanceId, u32)>,
    ) {
        let mut rest = bits;
        while rest != 0 {
            let slot = word_index * 64 + rest.trailing_zeros() as usize;
            out.push((self.slot_ids[slot], depth));
            rest &= rest - 1;
        }
    }

    /// Whether `instance` holds the block `hash`.
    pub fn holds(&self, instance: InstanceId, hash: u64) -> bool {
        self.slot_of
            .get(&instance)
            .is_some_and(|&slot| self.holds_slot(slot, hash))
    }

    fn holds_slot(&self, slot: Slot, hash: u64) -> bool {
        self.ids
            .get(&hash)
            .is_some_and(|&id| self.blocks[id as usize].holders.contains(slot))
    }

    /// The hashes `instance` holds, sorted (empty if unknown). Walks its log: for
    /// snapshots and checks, not for the request path.
    pub fn hashes(&self, instance: InstanceId) -> Vec<u64> {
        let Some(&slot) = self.slot_of.get(&instance) else {
            return Vec::new();
        };
        let blocks = &self.blocks;
        let mut hashes: Vec<u64> = self.slots[slot as usize]
            .log
            .iter()
            .map(|&id| &blocks[id as usize])
            .filter(|b| b.holders.contains(slot))
            .map(|b| b.hash)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// Blocks held by `instance` (0 if unknown).
    pub fn num_blocks(&self, instance: InstanceId) -> usize {
        self.state(instance).map_or(0, |s| s.held)
    }

    /// Blocks held, summed over instances.
    pub fn total_entries(&self) -> usize {
        self.entries
    }

    /// Distinct block hashes held by at least one instance.
    pub fn distinct_blocks(&self) -> usize {
        self.ids.len()
    }

    /// Approximate heap bytes held, from capacities (walks the slab).
    pub fn memory_bytes(&self) -> usize {
        let blocks = table_bytes::<(u64, BlockId)>(self.ids.capacity())
            + self.blocks.capacity() * size_of::<Block>()
            + self.free_blocks.capacity() * size_of::<BlockId>()
            + self
                .blocks
                .iter()
                .map(|b| b.holders.heap_bytes())
                .sum::<usize>();
        let slots = self.slots.capacity() * size_of::<InstanceState>()
            + self.slot_ids.capacity() * size_of::<InstanceId>()
            + self
                .slots
                .iter()
                .map(|s| s.log.capacity() * size_of::<BlockId>())
                .sum::<usize>();
        let ids = table_bytes::<(InstanceId, Slot)>(self.slot_of.capacity())
            + self.free_slots.capacity() * size_of::<Slot>()
            + self.compact_seen.capacity() * size_of::<u64>();
        blocks + slots + ids
    }

    fn state(&self, instance: InstanceId) -> Option<&InstanceState> {
        self.slot_of
            .get(&instance)
            .map(|&slot| &self.slots[slot as usize])
    }

    fn slot_or_register(&mut self, instance: InstanceId) -> Slot {
        if let Some(&slot) = self.slot_of.get(&instance) {
            return slot;
        }
        let slot = match self.free_slots.pop() {
            Some(Reverse(slot)) => slot,
            None => {
                self.slots.push(InstanceState::default());
                self.slot_ids.push(instance);
                Slot::try_from(self.slots.len() - 1).expect("fewer than 2^32 instances")
            }
        };
        self.slot_ids[slot as usize] = instance;
        let state = &mut self.slots[slot as usize];
        state.next_event = 0;
        state.needs_resync = false;
        self.slot_of.insert(instance, slot);
        slot
    }

    /// Adds `slot` to the holders of `hash`, stored right after the block `at` names.
    /// Returns the block.
    fn store(&mut self, slot: Slot, hash: u64, at: Link) -> BlockId {
        let after = match at {
            Link::After(prev) => prev,
            Link::Parent(_) => NO_BLOCK,
        };
        let id = match self.blocks.get(after as usize).map(|b| b.next) {
            Some(next) if self.blocks.get(next as usize).is_some_and(|b| b.is(hash)) => next,
            _ => {
                let id = match self.ids.get(&hash) {
                    Some(&id) => id,
                    None => self.new_block(hash),
                };
                let after = match at {
                    Link::After(prev) => prev,
                    // Only a new chain needs the parent: an existing one is linked already.
                    Link::Parent(parent) if self.blocks[id as usize].holders.len() == 0 => parent
                        .and_then(|p| self.ids.get(&p).copied())
                        .unwrap_or(NO_BLOCK),
                    Link::Parent(_) => NO_BLOCK,
                };
                if let Some(prev) = self.blocks.get_mut(after as usize) {
                    prev.next = id;
                    let block = &mut self.blocks[id as usize];
                    if block.prev != after {
                        block.prev = after;
                        if let Holders::Bits { seen, .. } = &mut block.holders {
                            // Drops were against another block.
                            *seen.get_mut() = 0;
                        }
                    }
                }
                id
            }
        };
        if self.blocks[id as usize]
            .holders
            .insert(slot, self.slots.len())
        {
            self.changed(id);
            self.entries += 1;
            let state = &mut self.slots[slot as usize];
            state.held += 1;
            state.log.push(id);
            self.compact_if_stale(slot);
        }
        id
    }

    /// A block with no holders yet, in the map.
    fn new_block(&mut self, hash: u64) -> BlockId {
        let block = Block {
            hash,
            next: NO_BLOCK,
            prev: NO_BLOCK,
            holders: Holders::empty(),
        };
        let id = match self.free_blocks.pop() {
            Some(id) => {
                self.blocks[id as usize] = block;
                id
            }
            None => {
                self.blocks.push(block);
                BlockId::try_from(self.blocks.len() - 1).expect("fewer than 2^32 blocks")
            }
        };
        self.ids.insert(hash, id);
        id
    }

    /// Drops `slot` from the holders of `hash`, found near block `near` (any id). Returns
    /// the block, or `NO_BLOCK` when nobody held it.
    fn evict(&mut self, slot: Slot, hash: u64, near: BlockId) -> BlockId {
        let Some(id) = self.find(hash, near) else {
            return NO_BLOCK;
        };
        if self.release(slot, id) {
            self.entries -= 1;
            self.slots[slot as usize].held -= 1;
            self.compact_if_stale(slot);
        }
        id
    }

    /// Drops `slot` from the holders of block `id`, and the block itself once nobody holds
    /// it. Returns whether `slot` held it.
    fn release(&mut self, slot: Slot, id: BlockId) -> bool {
        let block = &mut self.blocks[id as usize];
        let held = block.holders.remove(slot);
        if held && block.holders.len() == 0 {
            self.ids.remove(&block.hash);
            self.free_blocks.push(id);
        }
        if held {
            self.changed(id);
        }
        held
    }

    fn clear_slot(&mut self, slot: Slot) {
        let state = &mut self.slots[slot as usize];
        self.entries -= state.held;
        state.held = 0;
        let mut log = std::mem::take(&mut state.log);
        for &id in &log {
            self.release(slot, id);
        }
        log.clear();
        self.slots[slot as usize].log = log;
    }

    /// After an instance joined or left block `id`: a new version for its bitset, which
    /// makes stale the drops of its child, and its own drops stale.
    fn changed(&mut self, id: BlockId) {
        if let Holders::Bits { version, seen, .. } = &mut self.blocks[id as usize].holders {
            self.versions += 1;
            *version = self.versions;
            *seen.get_mut() = 0;
        }
    }

    /// Drops dropped blocks and repeats from the log once they outnumber the held ones
    /// (plus some slack), so the log stays within about twice what the instance holds. A pass
    /// scans at most two entries per eviction since the previous pass: O(1) amortised.
    /// Repeats are found with a bitset over the slab, cleared again by the entries kept
    /// (sorting the log instead took a quarter of the event time).
    fn compact_if_stale(&mut self, slot: Slot) {
        let state = &mut self.slots[slot as usize];
        if state.log.len() < 2 * state.held + LOG_SLACK {
            return;
        }
        let seen = &mut self.compact_seen;
        if seen.len() < words_for(self.blocks.len()) {
            seen.resize(words_for(self.blocks.len()), 0);
        }
        let blocks = &self.blocks;
        state.log.retain(|&id| {
            let (w, mask) = bit(id);
            let keep = seen[w] & mask == 0 && blocks[id as usize].holders.contains(slot);
            if keep {
                seen[w] |= mask;
            }
            keep
        });
        for &id in &state.log {
            seen[(id / 64) as usize] = 0;
        }
        debug_assert_eq!(state.log.len(), state.held);
    }
}

/// One lookup in progress: the candidates are the instances that held every block so far.
/// Many of them (a shared prefix) are a bitset that advances a word at a time; few are a
/// list tested one by one.
struct Walk<'a> {
    index: &'a KvIndex,
    scratch: &'a mut OverlapScratch,
    out: &'a mut Vec<(InstanceId, u32)>,
    as_bits: bool,
    left: usize,
}

impl<'a> Walk<'a> {
    fn start(
        index: &'a KvIndex,
        first: &Holders,
        scratch: &'a mut OverlapScratch,
        out: &'a mut Vec<(InstanceId, u32)>,
    ) -> Self {
        let as_bits = match first {
            Holders::Inline { len, slots } => {
                scratch.list.clear();
                scratch.list.extend_from_slice(&slots[..*len as usize]);
                false
            }
            Holders::Bits { words, .. } => {
                scratch.words.clear();
                scratch.words.extend_from_slice(words);
                true
            }
        };
        // Every result comes from the first block's holders: no growth while emitting.
        out.reserve(first.len());
        Self {
            index,
            scratch,
            out,
            as_bits,
            left: first.len(),
        }
    }

    /// Keeps the candidates that also hold the block at `depth` (0-based); the others stop
    /// with `depth` blocks. Returns whether any candidate is left.
    fn narrow(&mut self, holders: &Holders, drops: Option<u64>, depth: u32) -> bool {
        let scratch = &mut *self.scratch;
        if !self.as_bits {
            let (index, out) = (self.index, &mut *self.out);
            scratch.list.retain(|&s| {
                let keep = holders.contains(s);
                if !keep {
                    out.push((index.slot_ids[s as usize], depth));
                }
                keep
            });
            self.left = scratch.list.len();
            return self.left > 0;
        }
        match holders {
            Holders::Bits { words, .. } => {
                let emitted = self.out.len();
                if let Some(mut drops) = drops {
                    // The candidates all hold the block before: only these words change.
                    while drops != 0 {
                        let i = drops.trailing_zeros() as usize;
                        drops &= drops - 1;
                        let Some(cand) = scratch.words.get_mut(i) else {
                            break;
                        };
                        let lost = *cand & !words.get(i).copied().unwrap_or(0);
                        if lost != 0 {
                            *cand &= !lost;
                            self.index.emit_word(i, lost, depth, self.out);
                        }
                    }
                } else {
                    narrow_bits(&mut scratch.words, &mut scratch.lost, words, |i, lost| {
                        self.index.emit_word(i, lost, depth, self.out)
                    });
                }
                self.left -= self.out.len() - emitted;
                // Scanning every word costs more than testing few candidates.
                if self.left > 0 && self.left < scratch.words.len() {
                    scratch.list.clear();
                    for_each_bit(&scratch.words, |s| scratch.list.push(s));
                    self.as_bits = false;
                }
            }
            Holders::Inline { len, slots } => {
                scratch.list.clear();
                for &s in &slots[..*len as usize] {
                    let (w, mask) = bit(s);
                    if let Some(cand) = scratch.words.get_mut(w) {
                        if *cand & mask != 0 {
                            *cand &= !mask;
                            scratch.list.push(s);
                        }
                    }
                }
                // What remains in the bitset are the candidates that stop here.
                for (i, &lost) in scratch.words.iter().enumerate() {
                    if lost != 0 {
                        self.index.emit_word(i, lost, depth, self.out);
                    }
                }
                self.as_bits = false;
                self.left = scratch.list.len();
            }
        }
        self.left > 0
    }

    /// Every remaining candidate stops with `depth` blocks.
    fn finish(self, depth: u32) {
        if self.as_bits {
            for (i, &word) in self.scratch.words.iter().enumerate() {
                self.index.emit_word(i, word, depth, self.out);
            }
        } else {
            let ids = &self.index.slot_ids;
            self.out
                .extend(self.scratch.list.iter().map(|&s| (ids[s as usize], depth)));
        }
    }
}

/// Heap bytes of a hashbrown table (std's `HashMap`) reporting `capacity`: buckets of `T`,
/// one control byte per bucket and a group of trailing control bytes.
fn table_bytes<T>(capacity: usize) -> usize {
    let buckets = match capacity {
        0 => return 0,
        1..=3 => 4,
        4..=7 => 8,
        _ => (capacity / 7 * 8).next_power_of_two(),
    };
    buckets * (size_of::<T>() + 1) + 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::StoredBlock;

    fn stored(id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent {
            id,
            data: KvEventData::BlockStored {
                parent_hash: parent,
                blocks: hashes
                    .iter()
                    .map(|&hash| StoredBlock {
                        hash,
                        tokens: Vec::new(),
                    })
                    .collect(),
            },
        }
    }

    fn removed(id: u64, hashes: &[u64]) -> KvEvent {
        KvEvent {
            id,
            data: KvEventData::BlockRemoved {
                hashes: hashes.to_vec(),
            },
        }
    }

    fn cleared(id: u64) -> KvEvent {
        KvEvent {
            id,
            data: KvEventData::AllBlocksCleared,
        }
    }

    fn holders(index: &KvIndex, hash: u64) -> Option<&Holders> {
        let id = *index.ids.get(&hash)?;
        Some(&index.blocks[id as usize].holders)
    }

    fn overlaps(index: &KvIndex, hashes: &[u64]) -> Vec<(InstanceId, u32)> {
        let mut out = Vec::new();
        index.overlaps(hashes, &mut out);
        out.sort_unstable();
        out
    }

    /// Feeds in-order events to `instance`, starting at its expected id.
    fn feed(index: &mut KvIndex, instance: InstanceId, data: KvEventData) {
        let id = index.next_event_id(instance).unwrap_or(0);
        index.apply(instance, &KvEvent { id, data }).unwrap();
    }

    fn store(index: &mut KvIndex, instance: InstanceId, hashes: &[u64]) {
        let ev = stored(0, None, hashes);
        feed(index, instance, ev.data);
    }

    fn remove(index: &mut KvIndex, instance: InstanceId, hashes: &[u64]) {
        feed(index, instance, removed(0, hashes).data);
    }

    #[test]
    fn overlap_counts_leading_blocks_held() {
        let mut index = KvIndex::new();
        index.apply(10, &stored(0, None, &[1, 2, 3])).unwrap();
        index.apply(20, &stored(0, None, &[1, 2])).unwrap();
        index.apply(30, &stored(0, None, &[2, 3])).unwrap();
        assert_eq!(overlaps(&index, &[1, 2, 3, 4]), [(10, 3), (20, 2)]);
        assert_eq!(overlaps(&index, &[1]), [(10, 1), (20, 1)]);
        // Instance 30 holds 2 and 3 but not the first block: no overlap.
        assert_eq!(overlaps(&index, &[9, 2, 3]), []);
        assert_eq!(overlaps(&index, &[]), []);
        assert_eq!(index.total_entries(), 7);
        assert_eq!(index.distinct_blocks(), 3);
    }

    #[test]
    fn overlap_stops_at_first_missing_block() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1, 2, 3])).unwrap();
        // The engine evicted the middle block and kept its child.
        index.apply(1, &removed(1, &[2])).unwrap();
        assert!(index.holds(1, 3));
        assert_eq!(overlaps(&index, &[1, 2, 3]), [(1, 1)]);
    }

    #[test]
    fn store_twice_counts_once_and_clear_drops_everything() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1, 2])).unwrap();
        index.apply(1, &stored(1, Some(1), &[2, 3])).unwrap();
        index.apply(2, &stored(0, None, &[1])).unwrap();
        assert_eq!(index.num_blocks(1), 3);
        assert_eq!(index.total_entries(), 4);

        index.apply(1, &cleared(2)).unwrap();
        assert_eq!(index.num_blocks(1), 0);
        assert_eq!(index.total_entries(), 1);
        assert_eq!(index.distinct_blocks(), 1);
        assert_eq!(overlaps(&index, &[1, 2]), [(2, 1)]);
        assert_eq!(index.instances(), [1, 2]);
    }

    #[test]
    fn removing_unheld_hashes_is_harmless() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1])).unwrap();
        index.apply(2, &stored(0, None, &[2])).unwrap();
        index.apply(1, &removed(1, &[2, 7])).unwrap();
        assert!(index.holds(2, 2));
        assert_eq!(index.total_entries(), 2);
    }

    #[test]
    fn removed_instance_frees_its_slot_for_the_next() {
        let mut index = KvIndex::new();
        for id in [100, 200, 300] {
            index.apply(id, &stored(0, None, &[1, id])).unwrap();
        }
        index.remove_instance(200);
        assert_eq!(index.instances(), [100, 300]);
        assert_eq!(index.total_entries(), 4);
        assert!(holders(&index, 200).is_none());
        assert_eq!(overlaps(&index, &[1]), [(100, 1), (300, 1)]);

        index.add_instance(400);
        assert_eq!(index.slots.len(), 3);
        assert_eq!(index.slot_of[&400], 1);
        assert_eq!(index.num_blocks(400), 0);
        assert_eq!(overlaps(&index, &[1]), [(100, 1), (300, 1)]);
        index.apply(400, &stored(0, None, &[1])).unwrap();
        assert_eq!(overlaps(&index, &[1]), [(100, 1), (300, 1), (400, 1)]);

        // A removed instance that comes back starts over.
        index.apply(200, &stored(0, None, &[5])).unwrap();
        assert_eq!(index.slot_of[&200], 3);
        assert_eq!(index.num_blocks(200), 1);
    }

    #[test]
    fn stale_events_are_ignored() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1])).unwrap();
        index.apply(1, &removed(1, &[1])).unwrap();
        // Re-delivered store: must not resurrect the block.
        index.apply(1, &stored(0, None, &[1])).unwrap();
        assert!(!index.holds(1, 1));
        assert_eq!(index.next_event_id(1), Some(2));
        assert!(!index.needs_resync(1));
    }

    #[test]
    fn a_snapshot_older_than_a_gap_free_mirror_is_ignored() {
        // An instance's events from id 0 arrive before its join-time snapshot, taken
        // before any of them: the mirror is exact and newer, and must keep its blocks.
        let mut index = KvIndex::new();
        index.add_instance(1);
        index.apply(1, &stored(0, None, &[1, 2])).unwrap();
        index.apply(1, &stored(1, Some(2), &[3])).unwrap();
        index.resync(1, None, &[]);
        assert_eq!(index.num_blocks(1), 3);
        assert_eq!(index.next_event_id(1), Some(2));
        index.resync(1, Some(0), &[1, 2]);
        assert_eq!(index.num_blocks(1), 3, "still older than the mirror");
        // A snapshot as new as the mirror, or newer, replaces it.
        index.resync(1, Some(1), &[5]);
        assert_eq!(index.num_blocks(1), 1);
        assert!(index.holds(1, 5));
        // After a gap the mirror is not exact: any snapshot taken since replaces it.
        index.apply(1, &stored(4, None, &[6])).unwrap_err();
        index.resync(1, Some(3), &[7]);
        assert!(index.holds(1, 7) && !index.holds(1, 6));
        assert!(!index.needs_resync(1));
    }

    #[test]
    fn gap_is_applied_flagged_and_cleared_by_resync() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1])).unwrap();
        let gap = index.apply(1, &stored(3, Some(1), &[2])).unwrap_err();
        assert_eq!(
            gap,
            Gap {
                instance: 1,
                expected: 1,
                got: 3
            }
        );
        assert!(index.needs_resync(1));
        assert!(index.holds(1, 2), "a gap event is applied anyway");
        // Later events follow the jump and are fine, but the flag stays.
        index.apply(1, &stored(4, Some(2), &[3])).unwrap();
        assert!(index.needs_resync(1));

        index.resync(1, Some(10), &[7, 8]);
        assert!(!index.needs_resync(1));
        assert_eq!(index.num_blocks(1), 2);
        assert_eq!(overlaps(&index, &[1]), []);
        index.apply(1, &stored(10, None, &[9])).unwrap();
        assert!(!index.holds(1, 9), "covered by the snapshot");
        index.apply(1, &stored(11, None, &[9])).unwrap();
        assert!(index.holds(1, 9));
        assert_eq!(index.total_entries(), 3);
    }

    #[test]
    fn first_event_of_a_late_attach_is_a_gap() {
        let mut index = KvIndex::new();
        let gap = index.apply(7, &stored(5, None, &[1])).unwrap_err();
        assert_eq!(gap.expected, 0);
        assert_eq!(gap.got, 5);
        assert!(index.needs_resync(7));
        assert!(!index.needs_resync(8));

        index.resync_snapshot(
            7,
            &KvSnapshot {
                last_event_id: None,
                hashes: vec![2],
            },
        );
        assert_eq!(index.next_event_id(7), Some(0));
        assert_eq!(index.next_event_id(8), None);
        index.apply(7, &stored(0, None, &[3])).unwrap();
        assert_eq!(index.num_blocks(7), 2);
    }

    #[test]
    fn holders_switch_to_a_bitset_and_back() {
        let mut index = KvIndex::new();
        let n = 150u64;
        for id in 0..n {
            store(&mut index, id, &[1]);
            let inline = matches!(*holders(&index, 1).unwrap(), Holders::Inline { .. });
            assert_eq!(
                inline,
                id < INLINE_HOLDERS as u64,
                "after {} holders",
                id + 1
            );
        }
        assert_eq!(overlaps(&index, &[1]).len(), n as usize);
        for id in 0..n {
            remove(&mut index, id, &[1]);
            let left = (n - id - 1) as usize;
            match holders(&index, 1) {
                None => assert_eq!(left, 0),
                Some(holders) => {
                    assert_eq!(holders.len(), left);
                    let inline = matches!(holders, Holders::Inline { .. });
                    assert_eq!(inline, left <= BACK_TO_INLINE, "{left} holders left");
                }
            }
            let expect: Vec<_> = (id + 1..n).map(|i| (i, 1)).collect();
            assert_eq!(overlaps(&index, &[1]), expect);
        }
        assert_eq!(index.distinct_blocks(), 0);
    }

    #[test]
    fn bitset_grows_for_instances_added_after_it() {
        let mut index = KvIndex::new();
        for id in 0..20 {
            store(&mut index, id, &[1]);
        }
        for id in 20..300 {
            store(&mut index, id, &[1, 2]);
        }
        let Holders::Bits { words, .. } = holders(&index, 1).unwrap() else {
            panic!("expected a bitset");
        };
        assert_eq!(words.len(), 5);
        let got = overlaps(&index, &[1, 2]);
        let expect: Vec<_> = (0..300).map(|i| (i, if i < 20 { 1 } else { 2 })).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn walk_mixes_bitsets_and_lists() {
        let mut index = KvIndex::new();
        // Depth held: instances 0..5 hold 5 blocks, 5..100 hold 4, 100..150 hold 3,
        // 150..200 hold only block 1.
        for id in 0..200u64 {
            let depth = match id {
                0..5 => 5,
                5..100 => 4,
                100..150 => 3,
                _ => 1,
            };
            store(&mut index, id, &[1, 2, 3, 4, 5][..depth]);
        }
        // An unrelated holder of block 3 that lacks 1 and 2 must not appear.
        store(&mut index, 999, &[3]);
        let expect_depth = |id: u64| match id {
            0..5 => 5,
            5..100 => 4,
            100..150 => 3,
            _ => 1,
        };
        let expect: Vec<_> = (0..200).map(|i| (i, expect_depth(i))).collect();
        assert_eq!(overlaps(&index, &[1, 2, 3, 4, 5, 6]), expect);
        assert_eq!(overlaps(&index, &[1, 2, 3, 4, 5]), expect);
        // A query stopping in the middle caps every count.
        let capped: Vec<_> = (0..200).map(|i| (i, expect_depth(i).min(2))).collect();
        assert_eq!(overlaps(&index, &[1, 2]), capped);

        // Bitset candidates meeting an inline holder set (block 5: five holders).
        let Holders::Inline { len, .. } = *holders(&index, 5).unwrap() else {
            panic!("block 5 should be inline");
        };
        assert_eq!(len, 5);
    }

    #[test]
    fn long_chains_stop_at_a_miss_anywhere() {
        let chain: Vec<u64> = (1000..1040).collect();
        let mut index = KvIndex::new();
        // Instance i holds the first i % 41 blocks: every depth, bitset and list phases.
        for id in 0..200u64 {
            let depth = (id % 41) as usize;
            if depth > 0 {
                store(&mut index, id, &chain[..depth]);
            }
        }
        for len in [1, 7, 8, 9, 16, 17, 33, 40] {
            let want: Vec<_> = (0..200u64)
                .map(|id| (id, (id % 41).min(len as u64) as u32))
                .filter(|&(_, n)| n > 0)
                .collect();
            assert_eq!(
                overlaps(&index, &chain[..len]),
                want,
                "query of {len} blocks"
            );
        }
        // A miss deep in the chain stops everyone there.
        let mut query = chain.clone();
        query[20] = 5;
        let want: Vec<_> = (0..200u64)
            .map(|id| (id, (id % 41).min(20) as u32))
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(overlaps(&index, &query), want);
    }

    #[test]
    fn links_to_reused_or_freed_entries_are_not_trusted() {
        let mut index = KvIndex::new();
        store(&mut index, 1, &[1, 2]);
        store(&mut index, 1, &[3]);
        // Block 2 and then 3 are freed; 2 comes back in 3's old entry, stored without a
        // parent, so block 1 still links to 2's old (free) entry.
        remove(&mut index, 1, &[2]);
        remove(&mut index, 1, &[3]);
        store(&mut index, 1, &[2]);
        assert_eq!(overlaps(&index, &[1, 2]), [(1, 2)]);
        // A new block in 2's old entry, not a child of 1.
        store(&mut index, 2, &[9]);
        assert_eq!(overlaps(&index, &[1, 9]), [(1, 1)]);
        assert_eq!(overlaps(&index, &[9]), [(2, 1)]);
    }

    #[test]
    fn a_new_child_relinks_its_parent() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1, 2, 3])).unwrap();
        // Another branch under block 2, then the old one asked for again.
        index.apply(2, &stored(0, Some(2), &[7, 8])).unwrap();
        index.apply(2, &stored(1, None, &[1, 2])).unwrap();
        assert_eq!(overlaps(&index, &[1, 2, 3]), [(1, 3), (2, 2)]);
        assert_eq!(overlaps(&index, &[1, 2, 7, 8]), [(1, 2), (2, 4)]);
    }

    #[test]
    fn equal_holder_sets_are_skipped_whatever_the_store_order() {
        let mut index = KvIndex::new();
        // Blocks 1..=3 held by 5 and 6, stored in opposite orders per block.
        store(&mut index, 5, &[1, 2, 3]);
        store(&mut index, 6, &[1, 2, 3]);
        remove(&mut index, 5, &[2]);
        store(&mut index, 5, &[2]);
        for block in [1, 2, 3] {
            let Holders::Inline { slots, .. } = holders(&index, block).unwrap() else {
                panic!("inline");
            };
            assert_eq!(slots[..2], [0, 1], "block {block}");
        }
        // A third instance in the middle only, a fourth at the end only.
        store(&mut index, 7, &[1, 2]);
        store(&mut index, 8, &[3]);
        assert_eq!(overlaps(&index, &[1, 2, 3, 4]), [(5, 3), (6, 3), (7, 2)]);
        remove(&mut index, 6, &[3]);
        assert_eq!(overlaps(&index, &[1, 2, 3]), [(5, 3), (6, 2), (7, 2)]);
    }

    /// Every block whose drops claim to be up to date against its `prev` has exactly the
    /// drops that the two bitsets give. Returns how many blocks have such drops.
    fn assert_drops_hold(index: &KvIndex) -> usize {
        let mut current = 0;
        for (id, block) in index.blocks.iter().enumerate() {
            let Holders::Bits {
                words, drops, seen, ..
            } = &block.holders
            else {
                continue;
            };
            let Some(Holders::Bits {
                words: up, version, ..
            }) = index.blocks.get(block.prev as usize).map(|b| &b.holders)
            else {
                continue;
            };
            let (drops, seen) = (drops.load(Ordering::Relaxed), seen.load(Ordering::Relaxed));
            if seen == 0 || seen != *version {
                continue;
            }
            let want = (0..up.len()).fold(0u64, |m, i| {
                m | (u64::from(up[i] & !words.get(i).copied().unwrap_or(0) != 0) << i)
            });
            assert_eq!(drops, want, "block {id}");
            current += 1;
        }
        current
    }

    #[test]
    fn drops_taken_by_lookups_stay_right_through_stores_and_evictions() {
        let chain: Vec<u64> = (500..530).collect();
        let mut index = KvIndex::new();
        let mut depth = vec![0usize; 400];
        let mut state = 1u64;
        let mut draw = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        for step in 0..6000 {
            let id = draw(depth.len());
            let held = depth[id];
            if held > 0 && draw(3) == 0 {
                // Evict the tail, leaf first; now and then a block in the middle too.
                let to = draw(held);
                let tail: Vec<u64> = chain[to..held].iter().rev().copied().collect();
                remove(&mut index, id as u64, &tail);
                depth[id] = to;
            } else if held < chain.len() {
                let to = held + 1 + draw(chain.len() - held);
                let ev = stored(0, held.checked_sub(1).map(|p| chain[p]), &chain[held..to]);
                feed(&mut index, id as u64, ev.data);
                depth[id] = to;
            }
            if step % 500 == 0 {
                assert_drops_hold(&index);
                let want: Vec<_> = (0..depth.len())
                    .filter(|&i| depth[i] > 0)
                    .map(|i| (i as u64, depth[i] as u32))
                    .collect();
                assert_eq!(overlaps(&index, &chain), want, "step {step}");
                // The second lookup uses the drops the first one took.
                assert_eq!(overlaps(&index, &chain), want, "step {step}, again");
            }
            if step % 100 == 0 {
                assert_drops_hold(&index);
            }
        }
        overlaps(&index, &chain);
        assert!(assert_drops_hold(&index) > 0, "the lookup took no drops");
    }

    #[test]
    fn scratch_is_reused_without_growing() {
        let mut index = KvIndex::new();
        for id in 0..100 {
            store(&mut index, id, &[1, 2, 3]);
        }
        let mut scratch = OverlapScratch::default();
        let mut out = Vec::new();
        index.overlaps_with(&[1, 2, 3], &mut scratch, &mut out);
        let caps = (
            scratch.words.capacity(),
            scratch.list.capacity(),
            out.capacity(),
        );
        for _ in 0..10 {
            index.overlaps_with(&[1, 2, 3], &mut scratch, &mut out);
            assert_eq!(out.len(), 100);
        }
        assert_eq!(
            caps,
            (
                scratch.words.capacity(),
                scratch.list.capacity(),
                out.capacity()
            )
        );
    }

    #[test]
    fn log_stays_bounded_under_churn() {
        let mut index = KvIndex::new();
        store(&mut index, 1, &[100, 101]);
        for round in 0..200u64 {
            let h = round % 5;
            store(&mut index, 1, &[h]);
            if round % 3 != 0 {
                remove(&mut index, 1, &[h]);
            }
            let state = &index.slots[index.slot_of[&1] as usize];
            assert!(state.log.len() < 2 * state.held + LOG_SLACK + 1);
        }
        // The last round touching each hash decides: 195 (0) and 198 (3) kept it.
        let want = [0, 3, 100, 101];
        assert_eq!(index.hashes(1), want);
        assert_eq!(index.num_blocks(1), want.len());
        index
            .apply(1, &cleared(index.next_event_id(1).unwrap()))
            .unwrap();
        assert_eq!(index.distinct_blocks(), 0);
        assert_eq!(index.total_entries(), 0);
    }

    #[test]
    fn memory_tracks_what_is_held() {
        let mut index = KvIndex::new();
        let empty = index.memory_bytes();
        for id in 0..64 {
            store(&mut index, id, &(0..100).collect::<Vec<_>>());
        }
        let full = index.memory_bytes();
        // 6400 entries: at least a block id per instance entry and a bitset per block.
        assert!(full > empty + 6400 * 4 + 100 * 8, "{full}");
        for id in 0..64 {
            index.remove_instance(id);
        }
        assert_eq!(index.total_entries(), 0);
        assert!(index.memory_bytes() < full / 2);
    }
}
