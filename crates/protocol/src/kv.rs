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
