//! The inference engine: a scheduler with a paged KV cache and prefix caching (`core`), one
//! model definition (`model`) over a `Backend` trait, and the backends themselves.
//!
//! The core knows no device types and no HTTP; callers drive it through `core::engine`.

pub mod backend;
pub mod core;
pub mod model;
