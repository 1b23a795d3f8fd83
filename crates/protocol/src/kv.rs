//! KV cache events an engine publishes so that routers can mirror its prefix cache.
//!
//! Every event carries a per-engine id that increases by exactly one from one event to the
//! next, so a consumer that sees a jump knows it missed events and must resynchronise.

use serde::{Deserialize, Serialize};

/// Hash of one full KV block, chained over its parent (see `tokens::hash`).
pub type BlockHash = u64;

/// One block that entered the prefix cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub hash: BlockHash,
    /// The block's token ids (exactly one block's worth).
    pub tokens: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Consecutive blocks of one sequence became reusable. `parent_hash` is the hash of the
    /// block just before `blocks[0]`, `None` when the first block starts the sequence.
    BlockStored {
        parent_hash: Option<BlockHash>,
        blocks: Vec<StoredBlock>,
    },
    /// Blocks were evicted and can no longer be reused.
    BlockRemoved { hashes: Vec<BlockHash> },
    /// The whole prefix cache was dropped (reset, sleep, weight update).
    AllBlocksCleared,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    /// Per-engine, starts at 0 and increases by one per event.
    pub id: u64,
    #[serde(flatten)]
    pub data: KvEventData,
}

/// What an engine's prefix cache holds at one point of its event stream: every hash
/// present after event `last_event_id` (`None`: before any event). A consumer that missed
/// events replaces its mirror with this and then ignores events with ids up to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    pub last_event_id: Option<u64>,
    pub hashes: Vec<BlockHash>,
}
