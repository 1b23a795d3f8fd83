//! The KV-aware router: which engine instance should serve a request.
//!
//! - [`index`]: a per-instance mirror of every instance's prefix cache, built from the KV
//!   events the instances publish (stored / removed / cleared), with gap detection and
//!   resynchronisation from a snapshot.
//! - [`policy`]: the cost of sending a request to each instance (prefill left after the
//!   cached overlap plus decode load) and the routing modes (kv, round-robin, random,
//!   least-loaded).
//! - [`active`]: what the router has sent each instance and not yet seen finish, so that
//!   load counts requests an instance has not reported yet.
//! - [`service`]: the live [`Router`] over the runtime planes (discovery, events,
//!   requests), with resynchronisation, health checks and failure handling.
//!
//! The crate knows nothing of HTTP or tensors: it sees block hashes, token counts and
//! instance ids. The same hash function as the engine (`tokens::block_hashes`) turns a
//! prompt into the hashes it looks up.

pub mod active;
pub mod index;
pub mod policy;
pub mod service;

pub use policy::{KvWeights, RouterMode};
pub use service::{InstanceStats, Router, RouterConfig, RouterStats};

/// An engine instance's id, unique within one router.
pub type InstanceId = u64;
