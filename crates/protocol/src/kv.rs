//! KV cache events an engine publishes so that routers can mirror its prefix cache.
//!
//! Every event carries a per-engine id that increases by exactly one from one event to the
//! next, so a consumer that sees a jump knows it missed events and must resynchronise.

use serde::{Deserialize, Serialize};

/// Hash of one full KV block, chained over its parent (see `tokens::hash`).
pub type BlockHash = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Consecutive blocks of one sequence became reusable: `hashes[0]` follows
    /// `parent_hash` (`None` when it starts the sequence), each later block the one before.
    ///
    /// Flat, one buffer each, rather than a record per block: an engine commits a dozen
    /// blocks in one event, and a router applies it by reading one array.
    BlockStored {
        parent_hash: Option<BlockHash>,
        hashes: Vec<BlockHash>,
        /// The blocks' token ids, concatenated (a block's worth each, in order); empty when
        /// the publisher leaves them out. Routers key on the hashes; tokens are for consumers
        /// that hash differently. Snapshots carry hashes only.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tokens: Vec<u32>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_event_json_is_flat_and_leaves_out_empty_tokens() {
        let ev = KvEvent {
            id: 7,
            data: KvEventData::BlockStored {
                parent_hash: Some(1),
                hashes: vec![2, 3],
                tokens: Vec::new(),
            },
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 7, "type": "block_stored", "parent_hash": 1, "hashes": [2, 3]})
        );
        assert_eq!(serde_json::from_value::<KvEvent>(json).unwrap(), ev);

        let with_tokens = KvEvent {
            id: 8,
            data: KvEventData::BlockStored {
                parent_hash: None,
                hashes: vec![4],
                tokens: vec![10, 11],
            },
        };
        let text = serde_json::to_string(&with_tokens).unwrap();
        assert!(text.contains(r#""tokens":[10,11]"#), "{text}");
        assert_eq!(serde_json::from_str::<KvEvent>(&text).unwrap(), with_tokens);
    }
}
