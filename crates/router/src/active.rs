//! Active-sequence tracking: the load the router has put on each instance.
//!
//! A sequence is added when it is routed (its prompt blocks and uncached prompt tokens
//! count at once, before the instance reports anything), its prefill is marked done at
//! the first token, and it is freed when it ends. So a burst of requests routed within
//! one event round trip still spreads instead of piling onto the instance that looked
//! idle.
//!
//! Two forms: [`InstanceLoad`] (atomic counters plus a guard per sequence, for the live
//! router where many tasks stream at once) and [`ActiveSequences`] (a map keyed by request
//! id, for single-threaded drivers such as the cluster simulator).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::policy::Load;
use crate::InstanceId;

/// One instance's live load counters.
#[derive(Debug, Default)]
pub struct InstanceLoad {
    seqs: AtomicUsize,
    blocks: AtomicUsize,
    prefill_tokens: AtomicUsize,
}

impl InstanceLoad {
    pub fn load(&self) -> Load {
        Load {
            active_seqs: self.seqs.load(Ordering::Relaxed),
            active_blocks: self.blocks.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens.load(Ordering::Relaxed),
        }
    }

    /// Counts a sequence of `blocks` prompt blocks with `prefill_tokens` left to compute.
    /// The returned guard marks the prefill done and frees the sequence.
    pub fn start(self: &Arc<Self>, blocks: usize, prefill_tokens: usize) -> ActiveGuard {
        self.seqs.fetch_add(1, Ordering::Relaxed);
        self.blocks.fetch_add(blocks, Ordering::Relaxed);
        self.prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        ActiveGuard {
            load: Arc::clone(self),
            blocks,
            prefill_tokens,
        }
    }
}

/// A routed sequence's share of its instance's load; dropping it frees the share.
#[derive(Debug)]
pub struct ActiveGuard {
    load: Arc<InstanceLoad>,
    blocks: usize,
    /// Still counted as queued prefill; 0 once the first token arrived.
    prefill_tokens: usize,
}

impl ActiveGuard {
    /// The first token arrived: the prompt is computed.
    pub fn prefill_done(&mut self) {
        let t = std::mem::take(&mut self.prefill_tokens);
        if t > 0 {
            self.load.prefill_tokens.fetch_sub(t, Ordering::Relaxed);
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.prefill_done();
        self.load.blocks.fetch_sub(self.blocks, Ordering::Relaxed);
        self.load.seqs.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Entry {
    instance: InstanceId,
    blocks: usize,
    prefill_tokens: usize,
}

/// Active sequences keyed by request id, for single-threaded drivers.
#[derive(Default)]
pub struct ActiveSequences {
    loads: HashMap<InstanceId, Load>,
    seqs: HashMap<u64, Entry>,
}

impl ActiveSequences {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, req: u64, instance: InstanceId, blocks: usize, prefill_tokens: usize) {
        if let Some(old) = self.seqs.insert(
            req,
            Entry {
                instance,
                blocks,
                prefill_tokens,
            },
        ) {
            self.release(&old);
        }
        let l = self.loads.entry(instance).or_default();
        l.active_seqs += 1;
        l.active_blocks += blocks;
        l.prefill_tokens += prefill_tokens;
    }

    pub fn prefill_done(&mut self, req: u64) {
        if let Some(e) = self.seqs.get_mut(&req) {
            let t = std::mem::take(&mut e.prefill_tokens);
            if let Some(l) = self.loads.get_mut(&e.instance) {
                l.prefill_tokens -= t;
            }
        }
    }

    pub fn finish(&mut self, req: u64) {
        if let Some(e) = self.seqs.remove(&req) {
            self.release(&e);
        }
    }

    /// Forgets an instance and every sequence on it.
    pub fn remove_instance(&mut self, instance: InstanceId) {
        self.seqs.retain(|_, e| e.instance != instance);
        self.loads.remove(&instance);
    }

    pub fn load(&self, instance: InstanceId) -> Load {
        self.loads.get(&instance).copied().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    fn release(&mut self, e: &Entry) {
        if let Some(l) = self.loads.get_mut(&e.instance) {
            l.active_seqs -= 1;
            l.active_blocks -= e.blocks;
            l.prefill_tokens -= e.prefill_tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_until_dropped() {
        let l = Arc::new(InstanceLoad::default());
        let mut a = l.start(4, 60);
        let b = l.start(2, 30);
        assert_eq!(
            l.load(),
            Load {
                active_seqs: 2,
                active_blocks: 6,
                prefill_tokens: 90
            }
        );
        a.prefill_done();
        a.prefill_done();
        assert_eq!(l.load().prefill_tokens, 30);
        drop(b);
        assert_eq!(
            l.load(),
            Load {
                active_seqs: 1,
                active_blocks: 4,
                prefill_tokens: 0
            }
        );
        drop(a);
        assert_eq!(l.load(), Load::default());
    }

    #[test]
    fn map_form_tracks_and_forgets() {
        let mut a = ActiveSequences::new();
        a.add(1, 10, 4, 64);
        a.add(2, 10, 2, 32);
        a.add(3, 11, 1, 16);
        a.prefill_done(1);
        assert_eq!(
            a.load(10),
            Load {
                active_seqs: 2,
                active_blocks: 6,
                prefill_tokens: 32
            }
        );
        a.finish(2);
        a.finish(2);
        assert_eq!(a.load(10).active_seqs, 1);
        a.remove_instance(10);
        assert_eq!(a.load(10), Load::default());
        assert_eq!(a.len(), 1);
        a.finish(3);
        assert!(a.is_empty());
        assert_eq!(a.load(11), Load::default());
    }
}
