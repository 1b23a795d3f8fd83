//! One measurement cell: one index, one instance count, in a process of its own.
//!
//! Order: generate the workload and every query, read memory, build the index from the event
//! stream (events are made in chunks outside the timed region and consumed inside it), read
//! memory again, then time each lookup on its own.

use std::time::{Duration, Instant};

use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use dynamo_kv_router::RadixTree;
use protocol::{KvEvent, KvEventData};
use serde::{Deserialize, Serialize};

use crate::alloc::{live_bytes, rss_bytes};
use crate::switchyard_index::KvIndex;
use crate::workload::{Kind, Op, Workload};

/// Events made per batch: large enough that timer calls vanish, small enough that the
/// batch itself barely moves RSS.
const CHUNK: usize = 1024;
/// Untimed lookups first, so that one-off growth of buffers stays out of the percentiles.
const WARMUP: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexKind {
    /// Switchyard's `KvIndex` (runs of blocks with a depth per holder).
    Switchyard,
    /// dynamo-kv-router 1.6.1 `RadixTree` (single-threaded compressed radix tree).
    Dynamo,
    /// No index: Switchyard's events are built and dropped, lookups time an empty call.
    /// The harness's own cost, a floor under every index's figures.
    Floor,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub index: IndexKind,
    pub instances: usize,
    pub events: usize,
    pub blocks_in_events: u64,
    pub apply_secs: f64,
    pub events_per_sec: f64,
    pub blocks_per_sec: f64,
    /// Events the index rejected (expected 0: the stream has no gaps nor unknown parents).
    pub apply_errors: usize,
    /// (instance, block) pairs held after the stream.
    pub entries: usize,
    pub queries: usize,
    pub lookup_p50_ns: u64,
    pub lookup_p99_ns: u64,
    pub lookup_mean_ns: f64,
    /// Mean overlap over all (query, instance) results, and results per query.
    pub mean_overlap: f64,
    pub mean_results: f64,
    /// Order-independent digest of every lookup's result; equal across indexes when they
    /// answer identically.
    pub result_digest: u64,
    /// Live heap growth while building (counting allocator).
    pub heap_bytes: usize,
    /// Resident set growth while building.
    pub rss_bytes: usize,
    /// The index's own estimate (`KvIndex::memory_bytes`); the peer has none.
    pub estimated_bytes: Option<usize>,
}

/// What a cell needs from an index. Lookups time only the index's own call.
trait Subject {
    type Event;
    type Query: Clone;
    const KIND: IndexKind;

    fn event(w: &Workload, op: &Op) -> (u64, Self::Event);
    fn query(w: &Workload, q: &crate::workload::Query) -> Self::Query;
    fn apply(&mut self, instance: u64, ev: Self::Event) -> bool;
    /// Returns the lookup's duration and its results as (instance, overlap) pairs.
    fn lookup(&mut self, q: Self::Query, results: &mut Vec<(u64, u32)>) -> Duration;
    fn entries(&self) -> usize;
    fn estimated_bytes(&self) -> Option<usize>;
}

struct Switchyard {
    index: KvIndex,
    out: Vec<(u64, u32)>,
}

impl Subject for Switchyard {
    type Event = KvEvent;
    type Query = Vec<u64>;
    const KIND: IndexKind = IndexKind::Switchyard;

    fn event(w: &Workload, op: &Op) -> (u64, KvEvent) {
        let data = match op.kind {
            Kind::Store => KvEventData::BlockStored {
                parent_hash: w.parent(op).map(|b| b.seq),
                hashes: w.blocks(op).map(|b| b.seq).collect(),
                // The index ignores tokens; leaving them out keeps the event comparable to
                // the peer's, which has none.
                tokens: Vec::new(),
            },
            Kind::Remove => KvEventData::BlockRemoved {
                hashes: w.blocks(op).map(|b| b.seq).collect(),
            },
        };
        (u64::from(op.instance), KvEvent { id: op.id, data })
    }

    fn query(w: &Workload, q: &crate::workload::Query) -> Vec<u64> {
        w.query_blocks(q).map(|b| b.seq).collect()
    }

    fn apply(&mut self, instance: u64, ev: KvEvent) -> bool {
        self.index.apply(instance, &ev).is_ok()
    }

    fn lookup(&mut self, q: Vec<u64>, results: &mut Vec<(u64, u32)>) -> Duration {
        let start = Instant::now();
        self.index.overlaps(&q, &mut self.out);
        let took = start.elapsed();
        results.clear();
        results.extend_from_slice(&self.out);
        took
    }

    fn entries(&self) -> usize {
        self.index.total_entries()
    }

    fn estimated_bytes(&self) -> Option<usize> {
        Some(self.index.memory_bytes())
    }
}

struct Dynamo {
    tree: RadixTree,
}

impl Subject for Dynamo {
    type Event = RouterEvent;
    type Query = Vec<LocalBlockHash>;
    const KIND: IndexKind = IndexKind::Dynamo;

    fn event(w: &Workload, op: &Op) -> (u64, RouterEvent) {
        let data = match op.kind {
            Kind::Store => KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: w.parent(op).map(|b| ExternalSequenceBlockHash(b.seq)),
                start_position: Some(u32::from(op.from)),
                blocks: w
                    .blocks(op)
                    .map(|b| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(b.seq),
                        tokens_hash: LocalBlockHash(b.local),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
            Kind::Remove => KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: w
                    .blocks(op)
                    .map(|b| ExternalSequenceBlockHash(b.seq))
                    .collect(),
            }),
        };
        let worker = u64::from(op.instance);
        let event = KvCacheEvent {
            event_id: op.id,
            data,
            dp_rank: 0,
        };
        (worker, RouterEvent::new(worker, event))
    }

    fn query(w: &Workload, q: &crate::workload::Query) -> Vec<LocalBlockHash> {
        w.query_blocks(q).map(|b| LocalBlockHash(b.local)).collect()
    }

    fn apply(&mut self, _instance: u64, ev: RouterEvent) -> bool {
        self.tree.apply_event(ev).is_ok()
    }

    fn lookup(&mut self, q: Vec<LocalBlockHash>, results: &mut Vec<(u64, u32)>) -> Duration {
        // The tree takes the query by value: it was built before the clock starts. Freeing
        // the returned map happens after the clock stops.
        let start = Instant::now();
        let scores = self.tree.find_matches(q, false);
        let took = start.elapsed();
        results.clear();
        results.extend(scores.scores.iter().map(|(w, &s)| (w.worker_id, s)));
        took
    }

    fn entries(&self) -> usize {
        self.tree.current_size()
    }

    fn estimated_bytes(&self) -> Option<usize> {
        None
    }
}

/// The harness alone (`IndexKind::Floor`).
struct Floor;

impl Subject for Floor {
    type Event = KvEvent;
    type Query = Vec<u64>;
    const KIND: IndexKind = IndexKind::Floor;

    fn event(w: &Workload, op: &Op) -> (u64, KvEvent) {
        Switchyard::event(w, op)
    }

    fn query(w: &Workload, q: &crate::workload::Query) -> Vec<u64> {
        Switchyard::query(w, q)
    }

    fn apply(&mut self, _instance: u64, ev: KvEvent) -> bool {
        // Dropped here, inside the clock, as both indexes drop theirs.
        std::hint::black_box(ev);
        true
    }

    fn lookup(&mut self, q: Vec<u64>, results: &mut Vec<(u64, u32)>) -> Duration {
        let start = Instant::now();
        std::hint::black_box(&q);
        let took = start.elapsed();
        results.clear();
        took
    }

    fn entries(&self) -> usize {
        0
    }

    fn estimated_bytes(&self) -> Option<usize> {
        None
    }
}

/// `warm`: the query is read into the cache just before its timed lookup (as a router's
/// freshly hashed prompt is); the index's data is left as it is.
pub fn run(kind: IndexKind, w: &Workload, warm: bool) -> CellResult {
    match kind {
        IndexKind::Switchyard => measure(
            Switchyard {
                index: KvIndex::new(),
                out: Vec::new(),
            },
            w,
            warm,
        ),
        IndexKind::Dynamo => measure(
            Dynamo {
                tree: RadixTree::new(),
            },
            w,
            warm,
        ),
        IndexKind::Floor => measure(Floor, w, warm),
    }
}

fn measure<S: Subject>(mut subject: S, w: &Workload, warm: bool) -> CellResult {
    let warmup: Vec<S::Query> = w
        .queries
        .iter()
        .cycle()
        .take(WARMUP.min(w.queries.len()))
        .map(|q| S::query(w, q))
        .collect();
    let queries: Vec<S::Query> = w.queries.iter().map(|q| S::query(w, q)).collect();

    let heap_before = live_bytes();
    let rss_before = rss_bytes();
    let mut apply_time = Duration::ZERO;
    let mut apply_errors = 0;
    let mut batch = Vec::with_capacity(CHUNK);
    for ops in w.ops.chunks(CHUNK) {
        batch.extend(ops.iter().map(|op| S::event(w, op)));
        let start = Instant::now();
        for (instance, ev) in batch.drain(..) {
            if !subject.apply(instance, ev) {
                apply_errors += 1;
            }
        }
        apply_time += start.elapsed();
    }
    drop(batch);
    let heap_bytes = live_bytes().saturating_sub(heap_before);
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    let entries = subject.entries();
    let estimated_bytes = subject.estimated_bytes();

    let mut results = Vec::new();
    for q in warmup {
        subject.lookup(q, &mut results);
    }
    let mut latencies = Vec::with_capacity(queries.len());
    let mut digest = 0u64;
    let (mut overlap_sum, mut result_count) = (0u64, 0u64);
    for (i, q) in queries.into_iter().enumerate() {
        if warm {
            // Copying reads every line of the query: the timed lookup finds it in cache.
            drop(std::hint::black_box(q.clone()));
        }
        latencies.push(subject.lookup(q, &mut results).as_nanos() as u64);
        let mut d = 0u64;
        for &(instance, overlap) in &results {
            d = d.wrapping_add(mix(instance ^ (u64::from(overlap) << 40)));
            overlap_sum += u64::from(overlap);
        }
        result_count += results.len() as u64;
        digest = digest.wrapping_add(mix(d ^ i as u64));
    }

    let n = latencies.len().max(1);
    let mean = latencies.iter().sum::<u64>() as f64 / n as f64;
    latencies.sort_unstable();
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(n - 1))
            .copied()
    };
    let secs = apply_time.as_secs_f64();
    let blocks = w.blocks_in_events();
    CellResult {
        index: S::KIND,
        instances: w.params.instances,
        events: w.ops.len(),
        blocks_in_events: blocks,
        apply_secs: secs,
        events_per_sec: w.ops.len() as f64 / secs,
        blocks_per_sec: blocks as f64 / secs,
        apply_errors,
        entries,
        queries: w.queries.len(),
        lookup_p50_ns: pct(50).unwrap_or(0),
        lookup_p99_ns: pct(99).unwrap_or(0),
        lookup_mean_ns: mean,
        mean_overlap: overlap_sum as f64 / result_count.max(1) as f64,
        mean_results: result_count as f64 / n as f64,
        result_digest: digest,
        heap_bytes,
        rss_bytes: rss_growth,
        estimated_bytes,
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One result per cell from several runs of it: each timing is the median over the runs
/// (the rest is the same in every run, the workload being deterministic).
pub fn median(mut runs: Vec<CellResult>) -> CellResult {
    fn mid<T: Copy + PartialOrd>(runs: &[CellResult], f: impl Fn(&CellResult) -> T) -> T {
        let mut v: Vec<T> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    let apply_secs = mid(&runs, |r| r.apply_secs);
    let p50 = mid(&runs, |r| r.lookup_p50_ns);
    let p99 = mid(&runs, |r| r.lookup_p99_ns);
    let mean = mid(&runs, |r| r.lookup_mean_ns);
    let rss = mid(&runs, |r| r.rss_bytes);
    let mut out = runs.swap_remove(0);
    out.apply_secs = apply_secs;
    out.events_per_sec = out.events as f64 / apply_secs;
    out.blocks_per_sec = out.blocks_in_events as f64 / apply_secs;
    out.lookup_p50_ns = p50;
    out.lookup_p99_ns = p99;
    out.lookup_mean_ns = mean;
    out.rss_bytes = rss;
    out
}
