//! What callers hand the engine and what it streams back.

use serde::{Deserialize, Serialize};

use super::sampler::SamplingParams;

/// Engine-assigned request id, unique per engine.
pub type RequestId = u64;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: u32,
    /// Extra token ids that end the sequence (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating through EOS (benchmarks, tests).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn greedy(prompt: Vec<u32>, max_tokens: u32) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop token.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// Aborted by the caller (or its client went away).
    Abort,
}

/// One streamed item: a new token, the end of the sequence, or both.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token: Option<u32>,
    /// Log-probability of `token` under the model (before penalties and temperature).
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_prompt_tokens: u32,
    /// When the engine loop handed the event to the request's channel (this process's
    /// clock), so the serving path can measure how long a token waited for it.
    pub sent_at: Option<std::time::Instant>,
}

/// Why a request was refused before it started. Each maps to an HTTP status upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Bad parameters (HTTP 400); `param` names the field.
    #[error("{message}")]
    Invalid { param: String, message: String },
    /// The admission queue is full (HTTP 429/503).
    #[error("the engine's queue is full ({0} requests in flight); retry later")]
    QueueFull(usize),
    /// The engine is stopping or has stopped (HTTP 503).
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// No instance can take the request right now (HTTP 503): none is up, or those that
    /// were failed while it was being placed.
    #[error("{0}")]
    Unavailable(String),
}

impl SubmitError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        SubmitError::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }
}
