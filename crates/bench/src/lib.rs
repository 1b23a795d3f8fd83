//! Benchmarks that print a table and can write JSON: `switchyard bench engine` measures the
//! engine alone (no HTTP), prefill and decode throughput next to the memory-bandwidth bound;
//! `switchyard bench serve` loads the HTTP server with streamed OpenAI requests and charges
//! the server's CPU to the engine and the frontend; `switchyard bench sim` runs routing
//! experiments on a simulated cluster in virtual time. `workload` builds the request sets
//! (synthetic, multi-turn, Mooncake trace replay) independently of how they are sent.

pub mod engine_bench;
pub mod profile_bench;
pub mod serve_bench;
pub mod sim_bench;
pub mod workload;
