//! Benchmarks that print a table and can write JSON: `switchyard bench engine` measures the
//! engine alone (no HTTP), prefill and decode throughput next to the memory-bandwidth bound.

pub mod engine_bench;
