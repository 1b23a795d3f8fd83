//! The router's mirror of every instance's prefix cache, built from the KV events the
//! instances publish.
//!
//! Block hashes are chained (each covers its parent, see `tokens::hash`), so one hash names
//! a whole prefix, and an instance holds a prompt's first `n` blocks exactly when it holds
//! each of them. Engines cache prefixes: they store a request's blocks after its cached
//! ones and evict the tails of chains first. The mirror is shaped for that.
//!
//! Blocks are kept in **runs**: sequences of block hashes, each block in exactly one run,
//! with a map from hash to (run, offset). Every instance on a run holds a *prefix* of it,
//! so a run records one depth per instance instead of a holder set per block:
//!
//! - storing a chain that continues what an instance holds raises its depth on the run
//!   (the event's blocks are checked against the run in order, no map probe per block);
//! - evicting a tail, last block first, lowers it;
//! - a lookup finds how far the prompt follows the run, then reads each instance's depth
//!   once: its overlap is where its depth ends, or the run's match goes on into the next
//!   run, found through the map. Neighbours on a run are parent and child, so where the
//!   prompt's hash equals the run's at some offset, all before it are equal too: one
//!   compare at the end of the span settles a prompt that follows the run, and a binary
//!   search one that parts from it. A prompt that follows one stored chain costs one map
//!   probe, a compare or a few, and one pass over the run's holders. (A snapshot, whose
//!   order is no chain, marks the runs it extends as unlinked; those compare every hash.)
//!
//! What does not fit a prefix is made to fit by cutting a run in two: an instance storing
//! a block whose predecessors on the run it lacks, or evicting a block while keeping the
//! ones after it, splits the run there, and each piece again holds prefixes. New blocks go
//! on the end of their parent's run when the instance holds all of it, otherwise they start
//! a run of their own. A run whose last blocks nobody holds is cut back, so every block in
//! the map is held by someone. Runs are only a grouping: a lookup never assumes that
//! consecutive blocks of a run are parent and child beyond comparing hashes, so the answer
//! is exact whatever the grouping, and the grouping only decides the speed.
//!
//! Instances get dense slot numbers; each run's holders are (slot, depth) pairs sorted by
//! slot, and a lookup keeps its candidates sorted the same way, so moving from one run to
//! the next is a merge.
//!
//! Per instance the index keeps a log of the runs it joined, a superset of those it is on,
//! compacted once stale entries pile up: clearing, removing or resyncing an instance walks
//! it. Runs are far fewer than blocks, so the log is short.
//!
//! Event ids go up by one per instance. The index notices a jump, applies the event anyway
//! and returns a [`Gap`] so that the caller fetches a snapshot and calls [`KvIndex::resync`].

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::size_of;

use protocol::{KvEvent, KvEventData, KvSnapshot};

use crate::InstanceId;

/// Dense instance number.
type Slot = u32;

/// Position of a run in [`KvIndex::runs`].
type RunId = u32;

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

/// Where a block sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    run: RunId,
    off: u32,
}

/// A sequence of blocks and the instances on it, each holding a prefix of it. A free run
/// (in [`KvIndex::free_runs`]) is empty.
#[derive(Debug, Default)]
struct Run {
    hashes: Vec<u64>,
    /// (slot, depth), ascending by slot, depth >= 1: the slot holds `hashes[..depth]`.
    holders: Vec<(Slot, u32)>,
    /// With many holders: 1 + each holder's index in `holders`, by slot (0: not on the
    /// run), so that an event finds its instance without a binary search (which was 40% of
    /// applying an event with 256 holders per run).
    pos: Option<Box<[u32]>>,
    /// Some neighbours on the run may not be parent and child: blocks of a snapshot, whose
    /// order says nothing, were appended. Lookups then compare every hash; on a linked
    /// run they need not (see `chained_prefix`).
    unlinked: bool,
}

/// Holders from which a run keeps `pos` whatever it costs. The index costs 4 bytes per
/// instance slot up to the run's highest, so below this a run keeps one only where that is
/// small beside the holders themselves (`POS_DENSE`).
const POS_MIN: usize = 32;

/// A run with fewer holders keeps `pos` while it has at most this many slots per holder
/// (and at least `POS_FEW` holders): with a few dozen instances that is every shared run,
/// and a binary search over 16 holders was a fifth of applying an event there.
const POS_DENSE: usize = 16;
const POS_FEW: usize = 4;

/// Whether a run with `n` holders, the highest in slot `top`, should keep `pos`. Once it
/// has one it keeps it until both measures fall to half, so that one holder joining and
/// leaving does not rebuild it every time.
fn wants_pos(n: usize, top: usize, has: bool) -> bool {
    let slots = top + 1;
    if has {
        n >= POS_MIN / 2 || (n >= POS_FEW / 2 && slots <= 2 * POS_DENSE * n)
    } else {
        n >= POS_MIN || (n >= POS_FEW && slots <= POS_DENSE * n)
    }
}

impl Run {
    fn len(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// `Ok(index)` of `slot` in `holders`, or `Err(where it would go)`.
    fn find(&self, slot: Slot) -> Result<usize, usize> {
        if let Some(pos) = &self.pos {
            if let Some(&p) = pos.get(slot as usize) {
                if p != 0 {
                    return Ok(p as usize - 1);
                }
            }
        }
        self.holders.binary_search_by_key(&slot, |&(s, _)| s)
    }

    /// How many of the run's blocks `slot` holds (0 when it is not on the run).
    fn depth(&self, slot: Slot) -> u32 {
        self.find(slot).map_or(0, |i| self.holders[i].1)
    }

    fn insert_holder(&mut self, at: usize, slot: Slot, depth: u32) {
        self.holders.insert(at, (slot, depth));
        self.reindex_from(at);
    }

    fn remove_holder(&mut self, at: usize) -> u32 {
        let (slot, depth) = self.holders.remove(at);
        if let Some(pos) = &mut self.pos {
            pos[slot as usize] = 0;
        }
        self.reindex_from(at);
        depth
    }

    /// Brings `pos` up to date from holder `from` on, making or dropping it as the holders
    /// cross the thresholds of [`wants_pos`].
    fn reindex_from(&mut self, from: usize) {
        let n = self.holders.len();
        let top = self.holders.last().map_or(0, |&(s, _)| s as usize);
        match &mut self.pos {
            Some(_) if !wants_pos(n, top, true) => self.pos = None,
            Some(pos) => {
                if pos.len() <= top {
                    let mut grown = std::mem::take(pos).into_vec();
                    grown.resize(top + 1, 0);
                    *pos = grown.into_boxed_slice();
                }
                for (i, &(slot, _)) in self.holders.iter().enumerate().skip(from) {
                    pos[slot as usize] = i as u32 + 1;
                }
            }
            None if wants_pos(n, top, false) => {
                let mut pos = vec![0u32; top + 1].into_boxed_slice();
                for (i, &(slot, _)) in self.holders.iter().enumerate() {
                    pos[slot as usize] = i as u32 + 1;
                }
                self.pos = Some(pos);
            }
            None => {}
        }
    }
}

/// Stale log entries tolerated before compaction, beyond as many as the runs held.
const LOG_SLACK: usize = 8;

/// What the index knows about one instance. A freed slot keeps an empty state until reused.
#[derive(Debug, Default)]
struct InstanceState {
    /// Every run the instance is on, at least once, plus runs it left since the last
    /// compaction (an entry may since name another run, when the id was reused) and
    /// repeats.
    log: Vec<RunId>,
    /// Runs the instance is on.
    runs: usize,
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
    /// Instances that held every block so far, ascending by slot.
    cand: Vec<Slot>,
    /// The next run's survivors, built while merging.
    next: Vec<Slot>,
}

thread_local! {
    static SCRATCH: RefCell<OverlapScratch> = RefCell::new(OverlapScratch::default());
}

/// A mirror of the prefix caches of many instances; see the module docs.
#[derive(Debug, Default)]
pub struct KvIndex {
    /// Every block held by some instance, and where it sits.
    locs: FastMap<u64, Loc>,
    runs: Vec<Run>,
    /// Empty entries of `runs`, reused before it grows.
    free_runs: Vec<RunId>,
    slots: Vec<InstanceState>,
    /// The instance in each slot, apart from its state: lookups read only this.
    slot_ids: Vec<InstanceId>,
    slot_of: FastMap<InstanceId, Slot>,
    /// Lowest first, so that slot numbers stay dense.
    free_slots: BinaryHeap<Reverse<Slot>>,
    /// Sum of `held` over instances.
    entries: usize,
    /// Scratch for log compaction, one bit per run; all zero between passes.
    compact_seen: Vec<u64>,
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
                hashes,
                ..
            } => {
                // The parent is not checked: hashes are chained, so a block stands for its
                // prefix whether or not the parent is still cached. It only tells which
                // run new blocks may extend.
                self.store(slot, *parent_hash, true, hashes);
            }
            KvEventData::BlockRemoved { hashes } => self.evict(slot, hashes),
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
        // A snapshot is a set in no useful order. Blocks already on runs go first, in run
        // order, so that they join runs as prefixes instead of cutting them; new ones keep
        // the snapshot's order.
        let mut order: Vec<(Loc, u64)> = hashes
            .iter()
            .map(|&h| {
                let loc = self.locs.get(&h).copied().unwrap_or(Loc {
                    run: RunId::MAX,
                    off: 0,
                });
                (loc, h)
            })
            .collect();
        order.sort_by_key(|&(loc, _)| (loc.run, loc.off));
        let order: Vec<u64> = order.into_iter().map(|(_, h)| h).collect();
        self.store(slot, None, false, &order);
        let state = &mut self.slots[slot as usize];
        state.next_event = snapshot_next;
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
    ///
    /// `hashes` are a prompt's chained block hashes (`tokens::block_hashes`, as the engines
    /// hash): the lookup relies on a hash naming its whole prefix to skip comparing every
    /// block of a run the prompt follows.
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
        let Some(&start) = hashes.first().and_then(|h| self.locs.get(h)) else {
            return;
        };
        let OverlapScratch { cand, next } = scratch;
        cand.clear();
        let (mut run_id, mut off) = (start.run, start.off);
        // Prompt position of the run's block at `off`.
        let mut pos = 0u32;
        let mut first = true;
        loop {
            let run = &self.runs[run_id as usize];
            let o = off as usize;
            let p = pos as usize;
            let avail = (run.hashes.len() - o).min(hashes.len() - p);
            // hashes[p] is the run's block at `off`: the map said so.
            let matched = if run.unlinked {
                1 + common_prefix(&run.hashes[o + 1..o + avail], &hashes[p + 1..p + avail])
            } else {
                chained_prefix(&run.hashes[o..o + avail], &hashes[p..p + avail])
            } as u32;
            let end = off + matched;
            if first {
                // Holders at or below `off` lack the prompt's first block: no overlap.
                for &(slot, depth) in &run.holders {
                    if depth >= end {
                        cand.push(slot);
                    } else if depth > off {
                        out.push((self.slot_ids[slot as usize], depth - off));
                    }
                }
                first = false;
            } else {
                // Candidates and holders are both ascending by slot: one merge.
                next.clear();
                let holders = &run.holders;
                let mut j = 0;
                for &slot in cand.iter() {
                    while j < holders.len() && holders[j].0 < slot {
                        j += 1;
                    }
                    let depth = match holders.get(j) {
                        Some(&(s, d)) if s == slot => d,
                        _ => 0,
                    };
                    if depth >= end {
                        next.push(slot);
                    } else {
                        out.push((
                            self.slot_ids[slot as usize],
                            pos + depth.saturating_sub(off),
                        ));
                    }
                }
                std::mem::swap(cand, next);
            }
            pos += matched;
            if cand.is_empty() {
                return;
            }
            let found = hashes
                .get(pos as usize)
                .and_then(|h| self.locs.get(h).copied());
            let Some(loc) = found else {
                out.extend(cand.iter().map(|&s| (self.slot_ids[s as usize], pos)));
                return;
            };
            (run_id, off) = (loc.run, loc.off);
        }
    }

    /// Whether `instance` holds the block `hash`.
    pub fn holds(&self, instance: InstanceId, hash: u64) -> bool {
        let Some(&slot) = self.slot_of.get(&instance) else {
            return false;
        };
        self.locs
            .get(&hash)
            .is_some_and(|loc| self.runs[loc.run as usize].depth(slot) > loc.off)
    }

    /// The hashes `instance` holds, sorted (empty if unknown). Walks its log: for
    /// snapshots and checks, not for the request path.
    pub fn hashes(&self, instance: InstanceId) -> Vec<u64> {
        let Some(&slot) = self.slot_of.get(&instance) else {
            return Vec::new();
        };
        let mut runs = self.slots[slot as usize].log.clone();
        runs.sort_unstable();
        runs.dedup();
        let mut hashes: Vec<u64> = runs
            .iter()
            .flat_map(|&r| {
                let run = &self.runs[r as usize];
                run.hashes[..run.depth(slot) as usize].iter().copied()
            })
            .collect();
        hashes.sort_unstable();
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
        self.locs.len()
    }

    /// Approximate heap bytes held, from capacities (walks the runs).
    pub fn memory_bytes(&self) -> usize {
        let blocks = table_bytes::<(u64, Loc)>(self.locs.capacity())
            + self.runs.capacity() * size_of::<Run>()
            + self.free_runs.capacity() * size_of::<RunId>()
            + self
                .runs
                .iter()
                .map(|r| {
                    r.hashes.capacity() * size_of::<u64>()
                        + r.holders.capacity() * size_of::<(Slot, u32)>()
                        + r.pos.as_ref().map_or(0, |p| p.len() * size_of::<u32>())
                })
                .sum::<usize>();
        let slots = self.slots.capacity() * size_of::<InstanceState>()
            + self.slot_ids.capacity() * size_of::<InstanceId>()
            + self
                .slots
                .iter()
                .map(|s| s.log.capacity() * size_of::<RunId>())
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

    /// `slot` comes to hold the blocks `hashes`, stored in that order after the block
    /// `parent` (if any).
    ///
    /// `chain`: each block is the child of the one before it (and the first of `parent`),
    /// as in an event. Without it (a snapshot) runs extended here are marked unlinked.
    fn store(&mut self, slot: Slot, parent: Option<u64>, chain: bool, hashes: &[u64]) {
        let n = hashes.len();
        let mut prev = parent;
        let mut i = 0;
        while i < n {
            let h = hashes[i];
            if let Some(&loc) = self.locs.get(&h) {
                let (mut run_id, mut off) = (loc.run, loc.off);
                let mut depth = self.runs[run_id as usize].depth(slot);
                if depth < off {
                    // The slot lacks blocks before this one on the run: from here on the
                    // run's holders continue on a run of their own, where the slot starts.
                    run_id = self.split(run_id, off);
                    (off, depth) = (0, 0);
                }
                // The event's next blocks, as far as they follow the run. Two chains that
                // share a block agree up to some point and differ after it: usually one
                // compare at the span's end settles it, not one per block.
                let run = &self.runs[run_id as usize];
                let on_run = &run.hashes[off as usize..];
                let ours = &hashes[i..];
                let len = if chain && !run.unlinked {
                    chained_prefix(on_run, ours)
                } else {
                    common_prefix(on_run, ours)
                };
                let end = off + len as u32;
                if depth < end {
                    self.set_depth(run_id, slot, end);
                }
                prev = Some(hashes[i + len - 1]);
                i += len;
            } else {
                // New blocks go on the end of the previous block's run when the slot holds
                // all of it, so that a chain grown by later requests stays one run.
                let tail = prev.and_then(|p| self.locs.get(&p).copied()).filter(|loc| {
                    let run = &self.runs[loc.run as usize];
                    loc.off + 1 == run.len() && run.depth(slot) == run.len()
                });
                let run_id = match tail {
                    Some(loc) => loc.run,
                    None => self.new_run(),
                };
                let mut off = self.runs[run_id as usize].len();
                let first_new = off;
                while i < n {
                    let h = hashes[i];
                    if self.locs.contains_key(&h) {
                        break;
                    }
                    self.locs.insert(h, Loc { run: run_id, off });
                    self.runs[run_id as usize].hashes.push(h);
                    prev = Some(h);
                    off += 1;
                    i += 1;
                }
                if !chain && off > first_new && off > 1 {
                    // A snapshot's order is not a chain: these neighbours may be unrelated.
                    self.runs[run_id as usize].unlinked = true;
                }
                self.set_depth(run_id, slot, off);
            }
        }
    }

    /// `slot` drops the blocks `hashes` (those it does not hold are ignored).
    fn evict(&mut self, slot: Slot, hashes: &[u64]) {
        let mut i = 0;
        while i < hashes.len() {
            let Some(&loc) = self.locs.get(&hashes[i]) else {
                i += 1;
                continue;
            };
            let (run_id, off) = (loc.run, loc.off);
            let depth = self.runs[run_id as usize].depth(slot);
            if depth <= off {
                i += 1;
                continue;
            }
            if depth > off + 1 {
                // The slot keeps blocks after this one: they continue on a run of their
                // own, so that what it keeps here stays a prefix.
                self.split(run_id, off + 1);
            }
            // This is now the slot's last block on the run. Those just before it, evicted
            // next (engines evict a chain's tail last block first), go in the same step.
            let run = &self.runs[run_id as usize];
            let mut len = 1;
            while i + len < hashes.len()
                && len <= off as usize
                && run.hashes[off as usize - len] == hashes[i + len]
            {
                len += 1;
            }
            self.set_depth(run_id, slot, off + 1 - len as u32);
            i += len;
        }
    }

    fn clear_slot(&mut self, slot: Slot) {
        let mut log = std::mem::take(&mut self.slots[slot as usize].log);
        for &run in &log {
            // Stale and repeated entries have depth 0 here, a no-op.
            self.set_depth(run, slot, 0);
        }
        log.clear();
        let state = &mut self.slots[slot as usize];
        debug_assert_eq!((state.held, state.runs), (0, 0));
        state.log = log;
    }

    fn new_run(&mut self) -> RunId {
        match self.free_runs.pop() {
            Some(id) => id,
            None => {
                self.runs.push(Run::default());
                RunId::try_from(self.runs.len() - 1).expect("fewer than 2^32 runs")
            }
        }
    }

    /// Moves the blocks of run `id` from offset `at` (0 < at < len) to a new run, with the
    /// holders that reach past `at`, and returns the new run.
    fn split(&mut self, id: RunId, at: u32) -> RunId {
        let tail_id = self.new_run();
        let run = &mut self.runs[id as usize];
        debug_assert!(0 < at && at < run.len());
        let hashes = run.hashes.split_off(at as usize);
        let mut holders = Vec::new();
        for (slot, depth) in &mut run.holders {
            if *depth > at {
                holders.push((*slot, *depth - at));
                *depth = at;
            }
        }
        for (off, h) in hashes.iter().enumerate() {
            if let Some(loc) = self.locs.get_mut(h) {
                *loc = Loc {
                    run: tail_id,
                    off: off as u32,
                };
            }
        }
        for &(slot, _) in &holders {
            let state = &mut self.slots[slot as usize];
            state.runs += 1;
            state.log.push(tail_id);
        }
        let mut tail = Run {
            hashes,
            holders,
            pos: None,
            unlinked: run.unlinked,
        };
        tail.reindex_from(0);
        self.runs[tail_id as usize] = tail;
        for i in 0..self.runs[tail_id as usize].holders.len() {
            let slot = self.runs[tail_id as usize].holders[i].0;
            self.compact_if_stale(slot);
        }
        tail_id
    }

    /// Sets how many blocks of run `id` `slot` holds, keeping the counts, the slot's log and
    /// the run's length (cut back to its deepest holder; freed when nobody is left).
    fn set_depth(&mut self, id: RunId, slot: Slot, depth: u32) {
        let run = &mut self.runs[id as usize];
        debug_assert!(depth <= run.len());
        let old = match run.find(slot) {
            Ok(i) if depth == 0 => run.remove_holder(i),
            Ok(i) => std::mem::replace(&mut run.holders[i].1, depth),
            Err(_) if depth == 0 => return,
            Err(i) => {
                run.insert_holder(i, slot, depth);
                0
            }
        };
        if old == depth {
            return;
        }
        let cut_back = depth < old && old == run.len();
        let state = &mut self.slots[slot as usize];
        if depth > old {
            let more = (depth - old) as usize;
            state.held += more;
            self.entries += more;
        } else {
            let fewer = (old - depth) as usize;
            state.held -= fewer;
            self.entries -= fewer;
        }
        if old == 0 {
            state.runs += 1;
            state.log.push(id);
            self.compact_if_stale(slot);
        } else if depth == 0 {
            state.runs -= 1;
            self.compact_if_stale(slot);
        }
        if cut_back {
            self.cut_back(id);
        }
    }

    /// Drops the blocks of run `id` past its deepest holder, and frees the run if that
    /// leaves nothing.
    fn cut_back(&mut self, id: RunId) {
        let run = &mut self.runs[id as usize];
        let keep = run.holders.iter().map(|&(_, d)| d).max().unwrap_or(0) as usize;
        for h in run.hashes.drain(keep..) {
            self.locs.remove(&h);
        }
        if keep == 0 {
            // Release the buffers: a free run holds no memory.
            *run = Run::default();
            self.free_runs.push(id);
        }
    }

    /// Drops left runs and repeats from the log once they outnumber the runs the slot is on
    /// (plus some slack), so the log stays within about twice that. A pass scans at most
    /// two entries per run left since the previous pass: O(1) amortised.
    fn compact_if_stale(&mut self, slot: Slot) {
        let state = &mut self.slots[slot as usize];
        if state.log.len() < 2 * state.runs + LOG_SLACK {
            return;
        }
        let seen = &mut self.compact_seen;
        if seen.len() < self.runs.len().div_ceil(64) {
            seen.resize(self.runs.len().div_ceil(64), 0);
        }
        let runs = &self.runs;
        state.log.retain(|&id| {
            let (w, mask) = ((id / 64) as usize, 1u64 << (id % 64));
            let keep = seen[w] & mask == 0 && runs[id as usize].find(slot).is_ok();
            if keep {
                seen[w] |= mask;
            }
            keep
        });
        for &id in &state.log {
            seen[(id / 64) as usize] = 0;
        }
        debug_assert_eq!(state.log.len(), state.runs);
    }
}

/// How many leading entries `a` and `b` share, given that they share the first and that
/// both are chains of block hashes: each hash names its whole prefix, so the entries agree
/// up to some point and differ from there on. The last entry settles the usual case (the
/// prompt follows the run to its end, or the run to the prompt's end) in one compare;
/// otherwise a binary search finds the point. A long prompt costs a few reads of it, not
/// a pass over every hash.
fn chained_prefix(a: &[u64], b: &[u64]) -> usize {
    let n = a.len().min(b.len());
    debug_assert!(n > 0 && a[0] == b[0]);
    if a[n - 1] == b[n - 1] {
        return n;
    }
    // a[lo] == b[lo], a[hi] != b[hi].
    let (mut lo, mut hi) = (0, n - 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if a[mid] == b[mid] {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo + 1
}

/// How many leading entries `a` and `b` share. Eight at a time first: the XORs of a chunk
/// fold into one test, which the compiler turns into a few vector instructions.
fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let diff = a[i..i + 8]
            .iter()
            .zip(&b[i..i + 8])
            .fold(0, |d, (x, y)| d | (x ^ y));
        if diff != 0 {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Heap bytes of a hashbrown table with `capacity` entries of `T` (buckets, one control
/// byte each, a group of trailing control bytes).
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

    fn stored(id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent {
            id,
            data: KvEventData::BlockStored {
                parent_hash: parent,
                hashes: hashes.to_vec(),
                tokens: Vec::new(),
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
        feed(index, instance, stored(0, None, hashes).data);
    }

    fn store_after(index: &mut KvIndex, instance: InstanceId, parent: u64, hashes: &[u64]) {
        feed(index, instance, stored(0, Some(parent), hashes).data);
    }

    fn remove(index: &mut KvIndex, instance: InstanceId, hashes: &[u64]) {
        feed(index, instance, removed(0, hashes).data);
    }

    /// The run each hash sits on and its offset, for checking how blocks are grouped.
    fn run_of(index: &KvIndex, hash: u64) -> (RunId, u32) {
        let loc = index.locs[&hash];
        (loc.run, loc.off)
    }

    /// Every structural invariant: each block in the map sits where the map says, each run
    /// is as long as its deepest holder, holders are sorted with depths >= 1, free runs are
    /// empty, and the counts agree with the runs.
    fn check_invariants(index: &KvIndex) {
        let mut located = 0;
        let mut entries = 0;
        let mut held = vec![0usize; index.slots.len()];
        let mut on = vec![0usize; index.slots.len()];
        for (id, run) in index.runs.iter().enumerate() {
            if index.free_runs.contains(&(id as RunId)) {
                assert!(run.hashes.is_empty() && run.holders.is_empty());
                continue;
            }
            let deepest = run.holders.iter().map(|&(_, d)| d).max().unwrap_or(0);
            assert_eq!(
                deepest,
                run.len(),
                "run {id} longer than its deepest holder"
            );
            assert!(run.holders.windows(2).all(|w| w[0].0 < w[1].0));
            let top = run.holders.last().map_or(0, |&(s, _)| s as usize);
            if run.pos.is_some() {
                assert!(wants_pos(run.holders.len(), top, true), "run {id} kept pos");
            }
            if wants_pos(run.holders.len(), top, false) {
                assert!(
                    run.pos.is_some(),
                    "run {id} with {} holders has no pos",
                    run.holders.len()
                );
            }
            if let Some(pos) = &run.pos {
                let mut want = vec![0u32; pos.len()];
                for (i, &(slot, _)) in run.holders.iter().enumerate() {
                    want[slot as usize] = i as u32 + 1;
                }
                assert_eq!(&want[..], &pos[..], "run {id}: stale pos");
            }
            for &(slot, depth) in &run.holders {
                assert!(depth >= 1);
                held[slot as usize] += depth as usize;
                on[slot as usize] += 1;
                entries += depth as usize;
                assert!(index.slots[slot as usize].log.contains(&(id as RunId)));
            }
            for (off, h) in run.hashes.iter().enumerate() {
                assert_eq!(
                    index.locs[h],
                    Loc {
                        run: id as RunId,
                        off: off as u32
                    }
                );
                located += 1;
            }
        }
        assert_eq!(located, index.locs.len());
        assert_eq!(entries, index.entries);
        for (slot, state) in index.slots.iter().enumerate() {
            assert_eq!(state.held, held[slot]);
            assert_eq!(state.runs, on[slot]);
        }
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
        assert_eq!(overlaps(&index, &[2, 3]), [(10, 2), (20, 1), (30, 2)]);
        assert_eq!(overlaps(&index, &[]), []);
        assert_eq!(index.total_entries(), 7);
        assert_eq!(index.distinct_blocks(), 3);
        check_invariants(&index);
    }

    #[test]
    fn overlap_stops_at_first_missing_block() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1, 2, 3])).unwrap();
        // The engine evicted the middle block and kept its child.
        index.apply(1, &removed(1, &[2])).unwrap();
        assert!(index.holds(1, 3));
        assert!(!index.holds(1, 2));
        assert_eq!(overlaps(&index, &[1, 2, 3]), [(1, 1)]);
        assert_eq!(index.distinct_blocks(), 2);
        check_invariants(&index);
    }

    #[test]
    fn a_chain_grown_by_later_requests_stays_one_run() {
        let mut index = KvIndex::new();
        store(&mut index, 1, &[1, 2, 3]);
        store_after(&mut index, 1, 3, &[4, 5]);
        store(&mut index, 2, &[1, 2]);
        store_after(&mut index, 2, 2, &[3, 4]);
        let run = run_of(&index, 1).0;
        for (off, h) in (1..=5).enumerate() {
            assert_eq!(run_of(&index, h), (run, off as u32));
        }
        assert_eq!(index.runs[run as usize].holders.len(), 2);
        assert_eq!(overlaps(&index, &[1, 2, 3, 4, 5, 6]), [(1, 5), (2, 4)]);
        // Tails evicted last block first shorten the depth; the run follows its deepest
        // holder.
        remove(&mut index, 1, &[5, 4, 3]);
        assert_eq!(overlaps(&index, &[1, 2, 3, 4, 5]), [(1, 2), (2, 4)]);
        assert_eq!(index.distinct_blocks(), 4);
        remove(&mut index, 2, &[4, 3]);
        assert_eq!(index.distinct_blocks(), 2);
        assert_eq!(index.runs[run as usize].len(), 2);
        check_invariants(&index);
    }

    #[test]
    fn a_branch_off_the_middle_of_a_run_starts_its_own() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1, 2, 3])).unwrap();
        // Another branch under block 2, then the old one asked for again.
        index.apply(2, &stored(0, Some(2), &[7, 8])).unwrap();
        index.apply(2, &stored(1, None, &[1, 2])).unwrap();
        assert_ne!(run_of(&index, 7).0, run_of(&index, 1).0);
        assert_eq!(overlaps(&index, &[1, 2, 3]), [(1, 3), (2, 2)]);
        assert_eq!(overlaps(&index, &[1, 2, 7, 8]), [(1, 2), (2, 4)]);
        check_invariants(&index);
    }

    #[test]
    fn holes_split_runs_and_keep_every_answer() {
        let chain: Vec<u64> = (100..110).collect();
        let mut index = KvIndex::new();
        for id in 0..4 {
            store(&mut index, id, &chain);
        }
        // Instance 1 drops block 4 and keeps 5..10; instance 2 stores a child whose
        // parents it lacks; instance 3 drops its head.
        remove(&mut index, 1, &[chain[4]]);
        remove(&mut index, 2, &chain[..]);
        store(&mut index, 2, &[chain[7], chain[8]]);
        remove(&mut index, 3, &[chain[0]]);
        check_invariants(&index);
        assert_eq!(overlaps(&index, &chain), [(0, 10), (1, 4)]);
        assert_eq!(overlaps(&index, &chain[5..]), [(0, 5), (1, 5), (3, 5)]);
        assert_eq!(
            overlaps(&index, &chain[7..]),
            [(0, 3), (1, 3), (2, 2), (3, 3)]
        );
        assert_eq!(index.hashes(2), [chain[7], chain[8]]);
        assert_eq!(index.num_blocks(1), 9);
        assert_eq!(index.num_blocks(3), 9);
        assert_eq!(index.total_entries(), 10 + 9 + 2 + 9);
        // Refilling the holes brings the answers back.
        store(&mut index, 1, &chain);
        store(&mut index, 3, &chain);
        assert_eq!(overlaps(&index, &chain), [(0, 10), (1, 10), (3, 10)]);
        check_invariants(&index);
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
        check_invariants(&index);
    }

    #[test]
    fn removing_unheld_hashes_is_harmless() {
        let mut index = KvIndex::new();
        index.apply(1, &stored(0, None, &[1])).unwrap();
        index.apply(2, &stored(0, None, &[2])).unwrap();
        index.apply(1, &removed(1, &[2, 7])).unwrap();
        assert!(index.holds(2, 2));
        assert_eq!(index.total_entries(), 2);
        check_invariants(&index);
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
        assert!(!index.locs.contains_key(&200));
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
        check_invariants(&index);
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
        check_invariants(&index);
    }

    #[test]
    fn a_snapshot_in_any_order_joins_runs_without_cutting_them() {
        let chain: Vec<u64> = (10..20).collect();
        let mut index = KvIndex::new();
        store(&mut index, 1, &chain);
        let run = run_of(&index, 10).0;
        // Sorted descending: the reverse of chain order.
        let mut snapshot = chain[..6].to_vec();
        snapshot.reverse();
        index.resync(2, Some(0), &snapshot);
        assert_eq!(run_of(&index, 19), (run, 9), "the run was not cut");
        assert_eq!(overlaps(&index, &chain), [(1, 10), (2, 6)]);
        check_invariants(&index);
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
        check_invariants(&index);
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
    fn long_chains_stop_at_a_miss_anywhere() {
        let chain: Vec<u64> = (1000..1040).collect();
        let mut index = KvIndex::new();
        // Instance i holds the first i % 41 blocks: every depth.
        for id in 0..200u64 {
            let depth = (id % 41) as usize;
            if depth > 0 {
                store(&mut index, id, &chain[..depth]);
            }
        }
        check_invariants(&index);
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
        // A prompt that parts from the chain deep in it stops everyone there. Hashes are
        // chained, so from the first differing block on every hash differs.
        let mut query = chain.clone();
        for (k, h) in query.iter_mut().enumerate().skip(20) {
            *h = 5000 + k as u64;
        }
        let want: Vec<_> = (0..200u64)
            .map(|id| (id, (id % 41).min(20) as u32))
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(overlaps(&index, &query), want);
        // Starting in the middle of the run counts from there.
        let want: Vec<_> = (0..200u64)
            .map(|id| (id, (id % 41).saturating_sub(30) as u32))
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(overlaps(&index, &chain[30..]), want);
    }

    #[test]
    fn candidates_merge_across_runs() {
        let mut index = KvIndex::new();
        // Block 3 is reached from two places, so 1..=2 and 3..=5 are separate runs: 3 was
        // stored first on its own.
        for id in 0..50u64 {
            store(&mut index, id, &[3, 4, 5][..(id % 4) as usize]);
        }
        for id in 0..50u64 {
            store(&mut index, id, &[1, 2][..(id % 3) as usize]);
        }
        assert_ne!(run_of(&index, 1).0, run_of(&index, 3).0);
        check_invariants(&index);
        // Overlap of [1, 2, 3, 4, 5]: the blocks 1, 2 held (id % 3), then 3, 4, 5 (id % 4)
        // only by those with both of 1 and 2.
        let want: Vec<_> = (0..50u64)
            .map(|id| {
                let head = id % 3;
                (id, if head == 2 { 2 + id % 4 } else { head } as u32)
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(overlaps(&index, &[1, 2, 3, 4, 5]), want);
    }

    #[test]
    fn common_prefix_finds_the_first_difference_anywhere() {
        let a: Vec<u64> = (0..40).collect();
        for cut in 0..=40 {
            let mut b = a.clone();
            if cut < 40 {
                b[cut] = 999;
            }
            assert_eq!(common_prefix(&a, &b), cut);
            assert_eq!(common_prefix(&a[..cut.min(17)], &b), cut.min(17));
        }
        assert_eq!(common_prefix(&[], &a), 0);
    }

    #[test]
    fn chained_prefix_finds_where_two_chains_part() {
        // Two chains that agree up to `cut` differ everywhere after it, as chained hashes do.
        for len in 1..=40usize {
            let a: Vec<u64> = (0..len as u64).collect();
            for cut in 1..=len {
                let b: Vec<u64> = (0..len as u64)
                    .map(|i| if (i as usize) < cut { i } else { 1000 + i })
                    .collect();
                assert_eq!(chained_prefix(&a, &b), cut, "len {len}, cut {cut}");
                assert_eq!(chained_prefix(&b, &a), cut, "len {len}, cut {cut}");
                assert_eq!(chained_prefix(&a[..cut], &b), cut);
            }
        }
    }

    #[test]
    fn scratch_is_reused_without_growing() {
        let mut index = KvIndex::new();
        for id in 0..100 {
            store(&mut index, id, &[1, 2, 3]);
        }
        let mut scratch = OverlapScratch::default();
        let mut out = Vec::new();
        index.overlaps_with(&[1, 2, 3, 4], &mut scratch, &mut out);
        let caps = (
            scratch.cand.capacity(),
            scratch.next.capacity(),
            out.capacity(),
        );
        for _ in 0..10 {
            index.overlaps_with(&[1, 2, 3, 4], &mut scratch, &mut out);
            assert_eq!(out.len(), 100);
        }
        assert_eq!(
            caps,
            (
                scratch.cand.capacity(),
                scratch.next.capacity(),
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
            assert!(state.log.len() < 2 * state.runs + LOG_SLACK + 1);
        }
        // The last round touching each hash decides: 195 (0) and 198 (3) kept it.
        let want = [0, 3, 100, 101];
        assert_eq!(index.hashes(1), want);
        assert_eq!(index.num_blocks(1), want.len());
        check_invariants(&index);
        index
            .apply(1, &cleared(index.next_event_id(1).unwrap()))
            .unwrap();
        assert_eq!(index.distinct_blocks(), 0);
        assert_eq!(index.total_entries(), 0);
        check_invariants(&index);
    }

    /// Random stores (chains under held or unheld parents, snapshots), evictions in any
    /// order, clears and removals, with the invariants and every overlap checked against
    /// hash sets after each step.
    #[test]
    fn random_events_keep_invariants_and_answers() {
        random_events(6, 4000, 0x9e37_79b9_7f4a_7c15);
        // Enough instances that runs cross POS_MIN holders and back.
        random_events(96, 3000, 0x2545_f491_4f6c_dd1d);
    }

    fn random_events(instances: u64, steps: usize, seed: u64) {
        use std::collections::HashSet;
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        // Chains over a small tree of hashes: block k of chain c is 1000 * c + k, and chains
        // 1..4 share chain 0's first 3 * c blocks, so runs get shared and cut.
        let chain = |c: u64| -> Vec<u64> {
            (0..12)
                .map(|k| if k < 3 * c { k } else { 1000 * c + k })
                .collect()
        };
        let mut index = KvIndex::new();
        let mut truth: Vec<HashSet<u64>> = vec![HashSet::new(); instances as usize];
        let mut widest = 0;
        for step in 0..steps {
            let inst = next(instances);
            let c = next(5);
            let blocks = chain(c);
            match next(10) {
                0..=3 => {
                    // A stretch of the chain, under its parent or not.
                    let from = next(12) as usize;
                    let to = from + 1 + next((12 - from) as u64) as usize;
                    let parent = (from > 0 && next(2) == 0).then(|| blocks[from - 1]);
                    feed(&mut index, inst, stored(0, parent, &blocks[from..to]).data);
                    truth[inst as usize].extend(&blocks[from..to]);
                }
                4..=6 => {
                    // Some held blocks, tail first or in random order.
                    let mut held: Vec<u64> = truth[inst as usize].iter().copied().collect();
                    held.sort_unstable();
                    let k = 1 + next(4) as usize;
                    let mut picks: Vec<u64> = (0..k.min(held.len()))
                        .map(|_| held[next(held.len() as u64) as usize])
                        .collect();
                    if next(2) == 0 {
                        picks.sort_unstable_by(|a, b| b.cmp(a));
                    }
                    remove(&mut index, inst, &picks);
                    for h in picks {
                        truth[inst as usize].remove(&h);
                    }
                }
                7 => {
                    let mut snapshot: Vec<u64> = (0..next(8))
                        .map(|_| chain(next(5))[next(12) as usize])
                        .collect();
                    snapshot.sort_unstable();
                    snapshot.dedup();
                    let last = index.next_event_id(inst).unwrap_or(0);
                    index.resync(inst, Some(last), &snapshot);
                    truth[inst as usize] = snapshot.into_iter().collect();
                }
                8 => {
                    feed(&mut index, inst, cleared(0).data);
                    truth[inst as usize].clear();
                }
                _ => {
                    if next(4) == 0 {
                        index.remove_instance(inst);
                        truth[inst as usize].clear();
                    }
                }
            }
            check_invariants(&index);
            widest = index
                .runs
                .iter()
                .map(|r| r.holders.len())
                .max()
                .unwrap_or(0)
                .max(widest);
            let all: HashSet<u64> = truth.iter().flatten().copied().collect();
            assert_eq!(index.distinct_blocks(), all.len(), "step {step}");
            for c in 0..5 {
                let q = chain(c);
                for start in [0, 2, 5] {
                    let q = &q[start..];
                    let want: Vec<(InstanceId, u32)> = (0..instances)
                        .map(|i| {
                            let n = q
                                .iter()
                                .take_while(|h| truth[i as usize].contains(h))
                                .count();
                            (i, n as u32)
                        })
                        .filter(|&(_, n)| n > 0)
                        .collect();
                    assert_eq!(
                        overlaps(&index, q),
                        want,
                        "step {step}, chain {c} from {start}"
                    );
                }
            }
        }
        if instances as usize >= POS_MIN {
            assert!(
                widest >= POS_MIN,
                "no run reached {POS_MIN} holders ({widest})"
            );
        }
    }

    #[test]
    fn memory_tracks_what_is_held() {
        let mut index = KvIndex::new();
        let empty = index.memory_bytes();
        for id in 0..64 {
            store(&mut index, id, &(0..100).collect::<Vec<_>>());
        }
        let full = index.memory_bytes();
        // 100 blocks in the map and on the run, a (slot, depth) per instance.
        assert!(full > empty + 100 * 16 + 100 * 8 + 64 * 8, "{full}");
        for id in 0..64 {
            index.remove_instance(id);
        }
        assert_eq!(index.total_entries(), 0);
        assert_eq!(index.distinct_blocks(), 0);
        assert!(index.memory_bytes() < full);
    }
}
