//! The router's mirror of every instance's prefix cache, built from the KV events the
//! instances publish.
//!
//! Block hashes are chained (each covers its parent, see `tokens::hash`), so one hash names
//! a whole prefix and the mirror needs no tree: a flat map from block hash to the set of
//! instances holding that block. A lookup walks a prompt's hashes from the first and narrows
//! the candidate set level by level, the way an engine's own prefix-cache lookup stops at its
//! first miss. Instances get dense slot numbers so that a holder set is either a few inline
//! slots (most blocks: the tail of one request) or a bitset (shared prefixes that hundreds of
//! instances hold).
//!
//! The holder sets are the only membership record. Per instance the index keeps a log of the
//! hashes it stored, a superset of what it holds that is compacted once stale entries pile
//! up: clearing, removing or resyncing an instance walks that log, while a store or an
//! eviction touches only the block's holder set, not a second per-instance hash table.
//!
//! Event ids go up by one per instance. The index notices a jump, applies the event anyway
//! and returns a [`Gap`] so that the caller fetches a snapshot and calls [`KvIndex::resync`].

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::size_of;

use protocol::{KvEvent, KvEventData, KvSnapshot};

use crate::InstanceId;

/// Dense instance number; bitsets are indexed by it.
type Slot = u32;

/// Most holders a block keeps inline before it switches to a bitset (128 bytes with 1024
/// slots). Measured with benchmarks/kv-index-compare at 1024 instances, as index bytes
/// for 4 / 8 / 14: blocks with ~2 holders each 9.1 / 10.2 / 13.2 MiB, ~8 holders each
/// 19.3 / 17.3 / 17.3 MiB, ~256 holders each 8.5 to 8.6 MiB; lookup and apply times did not
/// separate from the noise of a shared machine. 8 (48-byte map entries) is the balance.
const INLINE_HOLDERS: usize = 8;

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
type FastSet<K> = HashSet<K, BuildHasherDefault<MulRotHasher>>;

/// The instances holding one block.
#[derive(Debug, Clone)]
enum Holders {
    /// Unordered, the first `len` entries in use, the rest `NO_SLOT`, so that a membership
    /// test compares every entry without looking at `len`.
    Inline {
        len: u8,
        slots: [Slot; INLINE_HOLDERS],
    },
    /// One bit per slot; `len` bits set. Sized for the slots that existed when it was made,
    /// grown on demand.
    Bits { len: u32, words: Box<[u64]> },
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
    fn one(slot: Slot) -> Self {
        let mut slots = [NO_SLOT; INLINE_HOLDERS];
        slots[0] = slot;
        Holders::Inline { len: 1, slots }
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
                    slots[n] = slot;
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
                };
                true
            }
            Holders::Bits { len, words } => {
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
                slots[pos] = slots[n - 1];
                slots[n - 1] = NO_SLOT;
                *len -= 1;
                true
            }
            Holders::Bits { len, words } => {
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

/// Stale log entries tolerated before compaction, beyond as many as the blocks held.
const LOG_SLACK: usize = 8;

/// What the index knows about one instance. A freed slot keeps an empty state until reused.
#[derive(Debug, Default)]
struct InstanceState {
    id: InstanceId,
    /// Every hash the instance holds, at least once, plus hashes evicted since the last
    /// compaction (and repeats of hashes evicted and stored again).
    log: Vec<u64>,
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
}

thread_local! {
    static SCRATCH: RefCell<OverlapScratch> = RefCell::new(OverlapScratch::default());
}

/// A mirror of the prefix caches of many instances; see the module docs.
#[derive(Debug, Default)]
pub struct KvIndex {
    blocks: FastMap<u64, Holders>,
    slots: Vec<InstanceState>,
    slot_of: FastMap<InstanceId, Slot>,
    /// Lowest first, so that bitsets stay as short as the live instances allow.
    free_slots: BinaryHeap<Reverse<Slot>>,
    /// Sum of `held` over instances.
    entries: usize,
    /// Scratch for log compaction: hashes already kept.
    compact_seen: FastSet<u64>,
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
            KvEventData::BlockStored { blocks, .. } => {
                // The parent is not checked: hashes are chained, so a block stands for its
                // prefix whether or not the parent is still cached.
                for block in blocks {
                    self.store(slot, block.hash);
                }
            }
            KvEventData::BlockRemoved { hashes } => {
                for &hash in hashes {
                    self.evict(slot, hash);
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
    /// mirror back past events that will not be delivered again.
    pub fn resync(&mut self, instance: InstanceId, last_event_id: Option<u64>, hashes: &[u64]) {
        let slot = self.slot_or_register(instance);
        self.clear_slot(slot);
        for &hash in hashes {
            self.store(slot, hash);
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
        // The set would keep its capacity; a departed instance should not hold memory.
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
        let Some(first) = hashes.first().and_then(|h| self.blocks.get(h)) else {
            return;
        };
        let mut walk = Walk::start(self, first, scratch, out);
        // Look blocks up a batch at a time: the lookups are independent, so their cache
        // misses overlap instead of queueing behind each level's narrowing.
        let mut depth = 1;
        for batch in hashes[1..].chunks(LOOKUP_BATCH) {
            let mut found: [Option<&Holders>; LOOKUP_BATCH] = [None; LOOKUP_BATCH];
            for (slot, hash) in found.iter_mut().zip(batch) {
                *slot = self.blocks.get(hash);
            }
            for holders in &found[..batch.len()] {
                let level = u32::try_from(depth).unwrap_or(u32::MAX);
                match holders {
                    Some(holders) if walk.narrow(holders, level) => depth += 1,
                    Some(_) => return,
                    None => return walk.finish(level),
                }
            }
        }
        walk.finish(u32::try_from(depth).unwrap_or(u32::MAX));
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
            out.push((self.slots[slot].id, depth));
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
        self.blocks.get(&hash).is_some_and(|h| h.contains(slot))
    }

    /// The hashes `instance` holds, sorted (empty if unknown). Walks its log: for
    /// snapshots and checks, not for the request path.
    pub fn hashes(&self, instance: InstanceId) -> Vec<u64> {
        let Some(&slot) = self.slot_of.get(&instance) else {
            return Vec::new();
        };
        let mut hashes: Vec<u64> = self.slots[slot as usize]
            .log
            .iter()
            .copied()
            .filter(|&h| self.holds_slot(slot, h))
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
        self.blocks.len()
    }

    /// Approximate heap bytes held, from capacities (walks the block map).
    pub fn memory_bytes(&self) -> usize {
        let blocks = table_bytes::<(u64, Holders)>(self.blocks.capacity())
            + self.blocks.values().map(Holders::heap_bytes).sum::<usize>();
        let slots = self.slots.capacity() * size_of::<InstanceState>()
            + self
                .slots
                .iter()
                .map(|s| s.log.capacity() * size_of::<u64>())
                .sum::<usize>();
        let ids = table_bytes::<(InstanceId, Slot)>(self.slot_of.capacity())
            + self.free_slots.capacity() * size_of::<Slot>()
            + table_bytes::<u64>(self.compact_seen.capacity());
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
                Slot::try_from(self.slots.len() - 1).expect("fewer than 2^32 instances")
            }
        };
        let state = &mut self.slots[slot as usize];
        state.id = instance;
        state.next_event = 0;
        state.needs_resync = false;
        self.slot_of.insert(instance, slot);
        slot
    }

    fn store(&mut self, slot: Slot, hash: u64) {
        let added = match self.blocks.entry(hash) {
            Entry::Occupied(holders) => holders.into_mut().insert(slot, self.slots.len()),
            Entry::Vacant(vacant) => {
                vacant.insert(Holders::one(slot));
                true
            }
        };
        if added {
            self.entries += 1;
            let state = &mut self.slots[slot as usize];
            state.held += 1;
            state.log.push(hash);
            self.compact_if_stale(slot);
        }
    }

    fn evict(&mut self, slot: Slot, hash: u64) {
        if release(&mut self.blocks, slot, hash) {
            self.entries -= 1;
            self.slots[slot as usize].held -= 1;
            self.compact_if_stale(slot);
        }
    }

    fn clear_slot(&mut self, slot: Slot) {
        let state = &mut self.slots[slot as usize];
        self.entries -= state.held;
        state.held = 0;
        for hash in state.log.drain(..) {
            release(&mut self.blocks, slot, hash);
        }
    }

    /// Drops evicted hashes and repeats from the log once they outnumber the held ones
    /// (plus some slack), so the log stays within about twice what the instance holds. The
    /// sort costs O(n log n) once per n/2 or more updates.
    fn compact_if_stale(&mut self, slot: Slot) {
        let state = &self.slots[slot as usize];
        if state.log.len() < 2 * state.held + LOG_SLACK {
            return;
        }
        let mut log = std::mem::take(&mut self.slots[slot as usize].log);
        let mut seen = std::mem::take(&mut self.compact_seen);
        seen.clear();
        log.retain(|&h| self.holds_slot(slot, h) && seen.insert(h));
        debug_assert_eq!(log.len(), self.slots[slot as usize].held);
        self.slots[slot as usize].log = log;
        self.compact_seen = seen;
    }
}

/// Blocks looked up together by a lookup walk; beyond the first miss they are wasted, so
/// a handful, not a whole prompt.
const LOOKUP_BATCH: usize = 8;

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
    fn narrow(&mut self, holders: &Holders, depth: u32) -> bool {
        let scratch = &mut *self.scratch;
        if !self.as_bits {
            let (index, out) = (self.index, &mut *self.out);
            scratch.list.retain(|&s| {
                let keep = holders.contains(s);
                if !keep {
                    out.push((index.slots[s as usize].id, depth));
                }
                keep
            });
            self.left = scratch.list.len();
            return self.left > 0;
        }
        match holders {
            Holders::Bits { words, .. } => {
                // Words past the end of the holder bitset hold nobody.
                let shared = words.len().min(scratch.words.len());
                for (i, cand) in scratch.words.iter_mut().enumerate() {
                    let held = if i < shared { words[i] } else { 0 };
                    let lost = *cand & !held;
                    if lost != 0 {
                        self.index.emit_word(i, lost, depth, self.out);
                        self.left -= lost.count_ones() as usize;
                    }
                    *cand &= held;
                }
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
            let slots = &self.index.slots;
            self.out.extend(
                self.scratch
                    .list
                    .iter()
                    .map(|&s| (slots[s as usize].id, depth)),
            );
        }
    }
}

/// Drops `slot` from the holders of `hash`, and the block itself once nobody holds it.
/// Returns whether `slot` held it.
fn release(blocks: &mut FastMap<u64, Holders>, slot: Slot, hash: u64) -> bool {
    let Entry::Occupied(mut holders) = blocks.entry(hash) else {
        return false;
    };
    let held = holders.get_mut().remove(slot);
    if holders.get().len() == 0 {
        holders.remove();
    }
    held
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
        assert!(!index.blocks.contains_key(&200));
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
            let inline = matches!(index.blocks[&1], Holders::Inline { .. });
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
            match &index.blocks.get(&1) {
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
        let Holders::Bits { words, .. } = &index.blocks[&1] else {
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
        let Holders::Inline { len, .. } = index.blocks[&5] else {
            panic!("block 5 should be inline");
        };
        assert_eq!(len, 5);
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
        // 6400 entries: at least a u64 per instance entry and a bitset per block.
        assert!(full > empty + 6400 * 8 + 100 * 8, "{full}");
        for id in 0..64 {
            index.remove_instance(id);
        }
        assert_eq!(index.total_entries(), 0);
        assert!(index.memory_bytes() < full / 2);
    }
}
