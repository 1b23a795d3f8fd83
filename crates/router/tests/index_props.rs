//! `KvIndex` under random event streams, checked two ways:
//!
//! - against a naive mirror (a hash set per instance, the same id rules) after every step:
//!   same instances, same blocks, same flags, and overlaps equal to "count the leading
//!   hashes held";
//! - against the engines' true caches: whenever the router has seen every event an engine
//!   emitted (directly or through a snapshot) and has no gap pending, its mirror of that
//!   engine must be exact. At the end every gap is resolved and everything must match.
//!
//! Engines store chains (fresh or continuing a cached parent), evict arbitrary held blocks
//! (parents before children too), clear, restart; events are dropped, delayed and
//! duplicated in transit; the router forgets and re-adds instances. Some instances share
//! prefixes widely, so runs gain and lose holders across the index's position-index
//! threshold (32 holders), and stores and evictions in any order cut runs apart.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use proptest::prelude::*;
use protocol::{KvEvent, KvEventData};
use router::index::KvIndex;
use router::InstanceId;

/// More than twice the holders from which a run keeps a position index.
const INSTANCES: usize = 72;
const BUSY: usize = 4;

/// Sparse, non-sequential ids, so that nothing relies on ids being slots.
fn instance_id(i: usize) -> InstanceId {
    (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xabcd
}

/// Block size 1 over a 3-letter alphabet: short prompts share prefixes often.
fn hashes_of(prompt: &[u32]) -> Vec<u64> {
    tokens::block_hashes(prompt, 1)
}

#[derive(Debug, Clone)]
enum Op {
    /// Engines `first..first + count` cache `prompt` from block `start` on (the blocks
    /// before it are their parents, cached or not). `dropped`: offset of the one engine
    /// whose event is lost in transit.
    Store {
        first: usize,
        count: usize,
        prompt: Vec<u32>,
        start: usize,
        dropped: Option<usize>,
    },
    /// The engine evicts some of its blocks, picked by index into its sorted held list.
    Evict {
        inst: usize,
        picks: Vec<usize>,
        dropped: bool,
    },
    Clear {
        inst: usize,
        dropped: bool,
    },
    /// A busy engine caches `prompt` and evicts it again, `rounds` times: the router's
    /// per-instance log fills with evicted entries and must compact.
    Churn {
        inst: usize,
        prompt: Vec<u32>,
        rounds: usize,
    },
    /// Up to `n` queued events of one engine reach the router.
    Deliver {
        inst: usize,
        n: usize,
        resync_now: bool,
    },
    DeliverAll {
        resync_now: bool,
    },
    /// An event already delivered arrives again.
    Duplicate {
        inst: usize,
        back: usize,
    },
    /// The router forgets the instance; with `restart` the engine also restarts (empty
    /// cache, ids from 0, nothing of the old process left in transit).
    RemoveInstance {
        inst: usize,
        restart: bool,
    },
    AddInstance {
        inst: usize,
    },
    /// The router fetches snapshots for every gap it was told about.
    ResyncPending,
    Query {
        prompt: Vec<u32>,
    },
}

/// Long shared documents: doc 1 shares doc 0's first 6 blocks, doc 2 its first 13, doc 3
/// nothing. Prompts cut from them share deep prefixes, deeper than the index looks up in
/// one batch.
fn docs() -> [Vec<u32>; 4] {
    let mut state = 7u32;
    let mut draw = move |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 16) % 3
            })
            .collect()
    };
    let doc0 = draw(DOC_LEN);
    let doc1 = [&doc0[..6], &draw(DOC_LEN - 6)[..]].concat();
    let doc2 = [&doc0[..13], &draw(DOC_LEN - 13)[..]].concat();
    let doc3 = draw(DOC_LEN);
    [doc0, doc1, doc2, doc3]
}

const DOC_LEN: usize = 24;

/// Most recent queried prompts asked again after every step.
const RECHECKED_PROMPTS: usize = 8;

/// Short random prompts (block size 1, 3 tokens: they collide often) or a document's
/// beginning followed by a short random tail.
fn prompt() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        prop::collection::vec(0u32..3, 1..=7),
        (0..4usize, 1..=DOC_LEN, prop::collection::vec(0u32..3, 0..3)).prop_map(
            |(doc, cut, tail)| {
                let mut prompt = docs()[doc][..cut].to_vec();
                prompt.extend(tail);
                prompt
            }
        ),
    ]
}

/// Most single-instance operations go to a few busy instances, so that their caches churn
/// long enough to exercise log compaction; the rest spread over all of them.
fn instance() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![3 => 0..BUSY, 1 => 0..INSTANCES]
}

fn op() -> impl Strategy<Value = Op> {
    let inst = instance();
    prop_oneof![
        6 => (inst.clone(), prop_oneof![3 => Just(1usize), 1 => 1..INSTANCES], prompt(), 0usize..4,
              prop::option::weighted(0.15, 0usize..INSTANCES))
            .prop_map(|(first, count, prompt, start, dropped)| Op::Store {
                first, count, prompt, start, dropped,
            }),
        3 => (inst.clone(), prop::collection::vec(any::<usize>(), 1..4), prop::bool::weighted(0.1))
            .prop_map(|(inst, picks, dropped)| Op::Evict { inst, picks, dropped }),
        1 => (inst.clone(), prop::bool::weighted(0.1))
            .prop_map(|(inst, dropped)| Op::Clear { inst, dropped }),
        1 => (inst.clone(), prompt(), 1usize..8)
            .prop_map(|(inst, prompt, rounds)| Op::Churn { inst, prompt, rounds }),
        4 => (inst.clone(), 1usize..4, any::<bool>())
            .prop_map(|(inst, n, resync_now)| Op::Deliver { inst, n, resync_now }),
        2 => any::<bool>().prop_map(|resync_now| Op::DeliverAll { resync_now }),
        1 => (inst.clone(), 0usize..4).prop_map(|(inst, back)| Op::Duplicate { inst, back }),
        1 => (inst.clone(), any::<bool>())
            .prop_map(|(inst, restart)| Op::RemoveInstance { inst, restart }),
        1 => inst.prop_map(|inst| Op::AddInstance { inst }),
        1 => Just(Op::ResyncPending),
        3 => prompt().prop_map(|prompt| Op::Query { prompt }),
    ]
}

/// The engine side: what it really caches and what it has sent.
#[derive(Debug, Default)]
struct Engine {
    held: HashSet<u64>,
    next_id: u64,
    in_transit: VecDeque<KvEvent>,
    delivered: Vec<KvEvent>,
}

impl Engine {
    fn emit(&mut self, data: KvEventData, dropped: bool) {
        match &data {
            KvEventData::BlockStored { hashes, .. } => {
                self.held.extend(hashes.iter().copied());
            }
            KvEventData::BlockRemoved { hashes } => {
                for h in hashes {
                    self.held.remove(h);
                }
            }
            KvEventData::AllBlocksCleared => self.held.clear(),
        }
        let ev = KvEvent {
            id: self.next_id,
            data,
        };
        self.next_id += 1;
        if !dropped {
            self.in_transit.push_back(ev);
        }
    }
}

/// The router's view of one instance, kept the obvious way.
#[derive(Debug, Default, Clone)]
struct Mirror {
    held: HashSet<u64>,
    next_id: u64,
    needs_resync: bool,
}

struct World {
    index: KvIndex,
    engines: Vec<Engine>,
    mirrors: BTreeMap<InstanceId, Mirror>,
    /// Instances whose gap the router was told about and has not resynced yet.
    pending: BTreeSet<usize>,
    /// Prompts seen, queried again at the end.
    prompts: Vec<Vec<u32>>,
    /// How often an instance was checked against its engine's truth.
    truth_checks: usize,
}

impl World {
    fn new() -> Self {
        Self {
            index: KvIndex::new(),
            engines: (0..INSTANCES).map(|_| Engine::default()).collect(),
            mirrors: BTreeMap::new(),
            pending: BTreeSet::new(),
            prompts: Vec::new(),
            truth_checks: 0,
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Store {
                first,
                count,
                prompt,
                start,
                dropped,
            } => {
                let hashes = hashes_of(&prompt);
                self.prompts.push(prompt);
                if start >= hashes.len() {
                    return;
                }
                for inst in first..(first + count).min(INSTANCES) {
                    let data = KvEventData::BlockStored {
                        parent_hash: start.checked_sub(1).map(|p| hashes[p]),
                        hashes: hashes[start..].to_vec(),
                        tokens: Vec::new(),
                    };
                    self.engines[inst].emit(data, dropped == Some(inst - first));
                }
            }
            Op::Evict {
                inst,
                picks,
                dropped,
            } => {
                let engine = &mut self.engines[inst];
                let mut held: Vec<u64> = engine.held.iter().copied().collect();
                if held.is_empty() {
                    return;
                }
                held.sort_unstable();
                // Repeats are kept: the index must take a hash removed twice in one event.
                let hashes: Vec<u64> = picks.iter().map(|p| held[p % held.len()]).collect();
                engine.emit(KvEventData::BlockRemoved { hashes }, dropped);
            }
            Op::Clear { inst, dropped } => {
                self.engines[inst].emit(KvEventData::AllBlocksCleared, dropped)
            }
            Op::Churn {
                inst,
                prompt,
                rounds,
            } => {
                let hashes = hashes_of(&prompt);
                let engine = &mut self.engines[inst];
                for _ in 0..rounds {
                    let fresh: Vec<u64> = hashes
                        .iter()
                        .copied()
                        .filter(|h| !engine.held.contains(h))
                        .collect();
                    let data = KvEventData::BlockStored {
                        parent_hash: None,
                        hashes: fresh.clone(),
                        tokens: Vec::new(),
                    };
                    engine.emit(data, false);
                    engine.emit(KvEventData::BlockRemoved { hashes: fresh }, false);
                }
                self.prompts.push(prompt);
            }
            Op::Deliver {
                inst,
                n,
                resync_now,
            } => {
                for _ in 0..n {
                    let Some(ev) = self.engines[inst].in_transit.pop_front() else {
                        break;
                    };
                    self.deliver(inst, &ev, resync_now);
                    self.engines[inst].delivered.push(ev);
                }
            }
            Op::DeliverAll { resync_now } => {
                for inst in 0..INSTANCES {
                    while let Some(ev) = self.engines[inst].in_transit.pop_front() {
                        self.deliver(inst, &ev, resync_now);
                        self.engines[inst].delivered.push(ev);
                    }
                }
            }
            Op::Duplicate { inst, back } => {
                let delivered = &self.engines[inst].delivered;
                if let Some(ev) = delivered.iter().rev().nth(back).cloned() {
                    self.deliver(inst, &ev, true);
                }
            }
            Op::RemoveInstance { inst, restart } => {
                let id = instance_id(inst);
                self.index.remove_instance(id);
                self.mirrors.remove(&id);
                self.pending.remove(&inst);
                if restart {
                    self.engines[inst] = Engine::default();
                }
            }
            Op::AddInstance { inst } => {
                let id = instance_id(inst);
                self.index.add_instance(id);
                self.mirrors.entry(id).or_default();
            }
            Op::ResyncPending => {
                for inst in std::mem::take(&mut self.pending) {
                    self.resync(inst);
                }
            }
            Op::Query { prompt } => {
                self.check_overlaps(&prompt);
                self.prompts.push(prompt);
            }
        }
        self.check_against_mirrors();
        self.check_against_truth();
        // A long lookup follows links between blocks and skips blocks whose holders equal
        // the previous block's; both depend on the order of past stores, evictions and slab
        // reuse, so whole prompts are asked again after every step, not only at the end.
        for doc in docs() {
            self.check_overlaps(&doc);
        }
        for prompt in self.prompts.iter().rev().take(RECHECKED_PROMPTS) {
            self.check_overlaps(prompt);
        }
    }

    /// One event reaches the router: the index and the naive mirror must agree on whether
    /// it reveals a gap.
    fn deliver(&mut self, inst: usize, ev: &KvEvent, resync_now: bool) {
        let id = instance_id(inst);
        let got = self.index.apply(id, ev).err();

        let mirror = self.mirrors.entry(id).or_default();
        let mut want = None;
        if ev.id >= mirror.next_id {
            if ev.id > mirror.next_id {
                want = Some((mirror.next_id, ev.id));
                mirror.needs_resync = true;
            }
            mirror.next_id = ev.id + 1;
            match &ev.data {
                KvEventData::BlockStored { hashes, .. } => {
                    mirror.held.extend(hashes.iter().copied());
                }
                KvEventData::BlockRemoved { hashes } => {
                    for h in hashes {
                        mirror.held.remove(h);
                    }
                }
                KvEventData::AllBlocksCleared => mirror.held.clear(),
            }
        }
        assert_eq!(
            got.as_ref().map(|g| (g.instance, g.expected, g.got)),
            want.map(|(expected, got)| (id, expected, got)),
            "gap report for event {} of instance {id}",
            ev.id
        );
        if got.is_some() {
            if resync_now {
                self.resync(inst);
            } else {
                self.pending.insert(inst);
            }
        }
    }

    /// Snapshot of the engine as it is now, which may be ahead of what is in transit.
    fn resync(&mut self, inst: usize) {
        let id = instance_id(inst);
        let engine = &self.engines[inst];
        let hashes: Vec<u64> = engine.held.iter().copied().collect();
        let last = engine.next_id.checked_sub(1);
        self.index.resync(id, last, &hashes);
        self.mirrors.insert(
            id,
            Mirror {
                held: engine.held.clone(),
                next_id: engine.next_id,
                needs_resync: false,
            },
        );
        self.pending.remove(&inst);
    }

    fn check_against_mirrors(&self) {
        let ids: Vec<InstanceId> = self.mirrors.keys().copied().collect();
        assert_eq!(self.index.instances(), ids);
        let mut total = 0;
        for (&id, mirror) in &self.mirrors {
            assert_eq!(
                self.index.num_blocks(id),
                mirror.held.len(),
                "instance {id}"
            );
            assert_eq!(
                self.index.needs_resync(id),
                mirror.needs_resync,
                "instance {id}"
            );
            assert_eq!(
                self.index.next_event_id(id),
                Some(mirror.next_id),
                "instance {id}"
            );
            let held: HashSet<u64> = self.index.hashes(id).into_iter().collect();
            assert_eq!(held, mirror.held, "instance {id}");
            total += mirror.held.len();
        }
        assert_eq!(self.index.total_entries(), total);

        // Holder sets, block by block: a holder the per-instance view no longer knows of
        // (say, left behind by a clear) shows up here.
        let mut holders: BTreeMap<u64, Vec<(InstanceId, u32)>> = BTreeMap::new();
        for (&id, mirror) in &self.mirrors {
            for &h in &mirror.held {
                holders.entry(h).or_default().push((id, 1));
            }
        }
        assert_eq!(self.index.distinct_blocks(), holders.len());
        let mut got = Vec::new();
        for (h, want) in holders {
            self.index.overlaps(&[h], &mut got);
            got.sort_unstable();
            assert_eq!(got, want, "holders of {h:#x}");
        }
    }

    /// A mirror that has seen everything its engine sent, with no gap pending, is exact.
    fn check_against_truth(&mut self) {
        for (inst, engine) in self.engines.iter().enumerate() {
            let Some(mirror) = self.mirrors.get(&instance_id(inst)) else {
                continue;
            };
            if !mirror.needs_resync && mirror.next_id == engine.next_id {
                assert_eq!(
                    mirror.held, engine.held,
                    "instance {inst} diverged from its engine"
                );
                self.truth_checks += 1;
            }
        }
    }

    fn check_overlaps(&self, prompt: &[u32]) {
        let hashes = hashes_of(prompt);
        let mut got = Vec::new();
        self.index.overlaps(&hashes, &mut got);
        got.sort_unstable();
        let mut want: Vec<(InstanceId, u32)> = self
            .mirrors
            .iter()
            .map(|(&id, m)| {
                let n = hashes.iter().take_while(|h| m.held.contains(h)).count();
                (id, n as u32)
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        want.sort_unstable();
        assert_eq!(got, want, "overlaps of {prompt:?}");
    }

    /// Everything in transit arrives, every gap is resolved, and instances whose last
    /// events were lost (nothing later revealed it) are reconciled: then the index must
    /// equal the engines' caches exactly.
    fn settle(&mut self) {
        self.step(Op::DeliverAll { resync_now: true });
        self.step(Op::ResyncPending);
        for inst in 0..INSTANCES {
            let id = instance_id(inst);
            let behind = self
                .mirrors
                .get(&id)
                .is_some_and(|m| m.next_id != self.engines[inst].next_id);
            if behind {
                self.resync(inst);
            }
        }
        self.check_against_mirrors();
        for (inst, engine) in self.engines.iter().enumerate() {
            let id = instance_id(inst);
            if self.mirrors.contains_key(&id) {
                let held: HashSet<u64> = self.index.hashes(id).into_iter().collect();
                assert_eq!(held, engine.held, "instance {inst} after settling");
            }
        }
        for prompt in &self.prompts {
            self.check_overlaps(prompt);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn index_matches_naive_mirror_and_engine_truth(ops in prop::collection::vec(op(), 1..200)) {
        let mut world = World::new();
        for op in ops {
            world.step(op);
        }
        world.settle();
    }
}

/// A fixed scenario that exercises every path of the walk, so a regression shows up
/// without relying on what the generator happens to produce.
#[test]
fn wide_shared_prefix_with_drops_and_resync() {
    let mut world = World::new();
    let shared = vec![0, 1, 2, 0, 1];
    world.step(Op::Store {
        first: 0,
        count: INSTANCES,
        prompt: shared.clone(),
        start: 0,
        dropped: Some(3),
    });
    world.step(Op::DeliverAll { resync_now: false });
    // Instance 3 lost its only event: nothing revealed it yet.
    assert!(!world.index.needs_resync(instance_id(3)));
    world.step(Op::Evict {
        inst: 3,
        picks: vec![0],
        dropped: false,
    });
    world.step(Op::Deliver {
        inst: 3,
        n: 1,
        resync_now: false,
    });
    assert!(world.index.needs_resync(instance_id(3)));
    world.step(Op::ResyncPending);
    for inst in 10..INSTANCES {
        world.step(Op::Evict {
            inst,
            picks: vec![inst],
            dropped: false,
        });
    }
    world.step(Op::DeliverAll { resync_now: true });
    world.step(Op::Query {
        prompt: shared.clone(),
    });
    world.step(Op::Query {
        prompt: vec![0, 1, 2, 0, 1, 2],
    });
    world.settle();
    assert!(world.truth_checks > 0);
}
