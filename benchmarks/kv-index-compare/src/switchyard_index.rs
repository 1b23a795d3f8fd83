//! Switchyard's KV index, compiled from its source file in crates/router.
//!
//! The `switchyard-router` package cannot share a dependency graph with the peer (tokio
//! ^1.54 against the peer's =1.52.4), and the index itself needs neither tokio nor anything
//! else of the router: only `protocol` and `thiserror`, plus the crate-root `InstanceId`
//! that main.rs defines. Compiling the same file keeps the benchmark on the real code.

// The benchmark drives only part of the API.
#[allow(dead_code)]
#[path = "../../../crates/router/src/index.rs"]
mod index;

pub use index::KvIndex;
