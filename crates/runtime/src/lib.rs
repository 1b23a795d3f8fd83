//! The three planes that connect a frontend and its router to engine instances. Each is a
//! trait with an embedded implementation for one process; a distributed backend (etcd for
//! discovery, NATS for events, a framed TCP stream for requests) implements the same trait,
//! and nothing above it changes.
//!
//! - [`discovery`]: which instances exist, what they are (model, role, KV geometry), and
//!   when they come and go.
//! - [`events`]: the KV events each instance publishes, tagged with the instance's id.
//! - [`requests`]: how a request reaches an instance and its tokens come back, with
//!   cancellation when the stream is dropped.

pub mod discovery;
pub mod events;
pub mod requests;

pub use discovery::{Discovery, DiscoveryEvent, InstanceInfo, LocalDiscovery, Role};
pub use events::{EventPlane, InstanceEvents, LocalEventPlane};
pub use requests::{InstanceClient, LocalClient, TokenStream};

/// An engine instance's id, unique within one deployment.
pub type InstanceId = u64;
