//! Wire types shared by every plane: KV events today; the OpenAI API types, the internal
//! generate request and instance specs join as the serving and orchestration layers land.
//! No logic lives here beyond constructors and serde derives.

pub mod kv;

pub use kv::{KvEvent, KvEventData, KvSnapshot};
