//! Device-independent engine core: block pool and prefix cache, scheduler, sampler, the
//! engine loop and its async handle.

pub mod block_pool;
pub mod engine;
pub mod handle;
pub mod request;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod step_times;

pub use engine::{EngineConfig, EngineStats, Executor, LlmEngine};
pub use handle::{EngineHandle, HandleOptions, RequestStream};
pub use request::{FinishReason, GenerateRequest, RequestId, SubmitError, TokenEvent};
pub use sampler::SamplingParams;
pub use scheduler::SchedulerConfig;
pub use step_times::StepTimes;
