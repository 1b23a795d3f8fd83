//! A simulated engine for routing and scale experiments: the real scheduler and block pool
//! (`engine::core`) over an executor that does no model math.
//!
//! - [`MockExecutor`] picks tokens by hashing (last token, position) and charges each step
//!   a modelled time ([`CostModel`] or a measured [`Profile`]), slept on the wall clock or
//!   only recorded on virtual time ([`Timing`]).
//! - [`build_mock_engine`] builds an `LlmEngine<MockExecutor>` from [`MockOptions`]; behind
//!   an `EngineHandle` it serves like a real instance, KV events included.
//! - [`sim`] drives many such engines on virtual time with a discrete-event loop and a
//!   caller-supplied router, with no threads and no HTTP, and reports latencies.
//!
//! It mirrors the role of Dynamo's mocker: same scheduling and caching decisions as the
//! real engine, so prefix hits, preemptions and KV events are the ones a router would see.

mod cost;
mod executor;
mod options;
mod profile;
pub mod sim;

pub use cost::{CostModel, StepCost};
pub use executor::{MockExecutor, Timing};
pub use options::{build_mock_engine, MockOptions};
pub use profile::{DecodePoint, PrefillPoint, Profile, ProfileError, ProfilePoints};

/// Bad mock configuration.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// `field` names the option, e.g. `scheduler.block_size`.
    #[error("invalid mock option `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

impl MockError {
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        MockError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}
