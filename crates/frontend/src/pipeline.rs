//! From an HTTP body to engine sequences and back: parse and validate the request
//! (every 400 names its parameter), render the chat template and tokenize, submit one
//! engine sequence per choice, then turn each sequence's token events into text with an
//! incremental detokenizer (never splitting a UTF-8 character) and a stop-string matcher
//! (matching across token boundaries; the stop string is not returned, and the sequence is
//! aborted as soon as it matches so its KV blocks go back to the pool).
//!
//! [`Generation`] owns the engine's [`RequestStream`]s. Whoever drops it — a finished
//! handler, or hyper dropping a response body because the client went away — aborts every
//! sequence still running.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use engine::core::sampler::MAX_LOGPROBS;
use engine::core::{FinishReason, GenerateRequest, SamplingParams, TokenEvent};
use futures_util::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use tokens::{
    ChatMessage, ChatOptions, ChatTemplateError, IncrementalDetokenizer, StopMatcher, Tokenizer,
};

use crate::error::ApiError;
use crate::metrics::{Metrics, RequestTimer};
use crate::openai::{
    ChatRequest, CommonParams, CompletionRequest, InMessage, MessageContent, PromptField, Usage,
};
use crate::state::ModelService;

/// Most choices one request may ask for (`n` times the number of prompts): each is a
/// sequence in the engine, and the admission cap is shared by all clients.
pub const MAX_CHOICES: usize = 128;

/// Most stop strings per request; each is searched for at every token.
pub const MAX_STOPS: usize = 16;

/// Prompts shorter than this are tokenized on the async worker: moving them to the blocking
/// pool would cost more than encoding them.
const INLINE_TOKENIZE_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

/// Parses `body` as `T`, answering 400 with the path of the offending field.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::InvalidRequest {
                message: format!("the body is not valid JSON: {inner}"),
                param: None,
            };
        }
        let message = inner.to_string();
        let param = if path == "." {
            // Root-level errors: the only one naming a field is a missing one.
            message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string)
        } else {
            Some(path)
        };
        match &param {
            Some(p) => ApiError::invalid(p.clone(), format!("invalid `{p}`: {message}")),
            // Serde names our struct here ("expected struct CommonParams"), which means
            // nothing to a client.
            None if message.contains("expected struct") => ApiError::InvalidRequest {
                message: "the request body must be a JSON object".into(),
                param: None,
            },
            None => ApiError::InvalidRequest {
                message: format!("invalid request body: {message}"),
                param: None,
            },
        }
    })?;
    de.end().map_err(|e| ApiError::InvalidRequest {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
    })?;
    Ok(value)
}

/// A validated request, ready to submit: one engine sequence per prompt and choice.
pub(crate) struct Plan {
    pub endpoint: Endpoint,
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// Everything but the prompt; `max_tokens` is the requested cap, if any.
    base: GenerateRequest,
    requested_max_tokens: Option<u32>,
    max_tokens_param: &'static str,
    stops: Vec<String>,
    pub logprobs: bool,
    pub stream: bool,
    pub include_usage: bool,
}

/// Checks the fields both endpoints share and builds the sampling parameters.
fn common_plan(
    c: CommonParams,
    endpoint: Endpoint,
    logprobs: Option<u32>,
) -> Result<Plan, ApiError> {
    let n = c.n.unwrap_or(1) as usize;
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
        ));
    }
    if let Some(b) = c.best_of {
        if b as usize != n {
            return Err(ApiError::invalid(
                "best_of",
                "best_of is not supported (only best_of = n)",
            ));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let stops = c.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOPS} stop strings are supported, got {}",
                stops.len()
            ),
        ));
    }
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(defaults.temperature),
        top_k,
        top_p: c.top_p.unwrap_or(defaults.top_p),
        min_p: c.min_p.unwrap_or(defaults.min_p),
        presence_penalty: c.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: c.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        repetition_penalty: c.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        // OpenAI seeds are signed; any 64 bits make an equally good seed.
        seed: c.seed.map(|s| s as u64),
        logprobs,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.field(), e.to_string()))?;
    let stream = c.stream.unwrap_or(false);
    let include_usage = stream
        && c.stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    Ok(Plan {
        endpoint,
        prompts: Vec::new(),
        n,
        base: GenerateRequest {
            prompt: Vec::new(),
            sampling,
            max_tokens: 0,
            stop_token_ids: c.stop_token_ids.unwrap_or_default(),
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
        requested_max_tokens: c.max_tokens,
        max_tokens_param: "max_tokens",
        stops,
        logprobs: logprobs.is_some(),
        stream,
        include_usage,
    })
}

/// Validates a chat request, renders its messages and tokenizes them.
pub(crate) async fn chat_plan(
    svc: &Arc<ModelService>,
    common: CommonParams,
    chat: ChatRequest,
) -> Result<Plan, ApiError> {
    if chat.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if let Some(f) = &chat.response_format {
        if f.kind != "text" {
            return Err(ApiError::invalid(
                "response_format",
                format!(
                    "response_format {:?} is not supported (only \"text\")",
                    f.kind
                ),
            ));
        }
    }
    let logprobs = match (chat.logprobs.unwrap_or(false), chat.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        (true, Some(k)) if k > MAX_LOGPROBS => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_LOGPROBS}, got {k}"),
            ))
        }
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
    };
    let mut plan = common_plan(common, Endpoint::Chat, logprobs)?;
    if let Some(m) = chat.max_completion_tokens {
        plan.requested_max_tokens = Some(m);
        plan.max_tokens_param = "max_completion_tokens";
    }
    if chat.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = chat
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message_text(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let options = ChatOptions {
        add_generation_prompt: true,
        extra: chat.chat_template_kwargs.unwrap_or_default(),
    };
    let size: usize = messages.iter().map(|m| m.content.len()).sum();
    let svc2 = Arc::clone(svc);
    let render = move || -> Result<Vec<u32>, ApiError> {
        let template = svc2.chat_template.as_ref().map_err(|e| match e {
            ChatTemplateError::Missing => ApiError::invalid(
                "messages",
                "this model has no chat template; use /v1/completions",
            ),
            e => ApiError::Internal(e.to_string()),
        })?;
        let text = template.render(&messages, &options).map_err(|e| match e {
            ChatTemplateError::Syntax(_) => ApiError::Internal(e.to_string()),
            e => ApiError::invalid("messages", e.to_string()),
        })?;
        // The template writes the special tokens (BOS) itself, as transformers assumes.
        svc2.tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))
    };
    plan.prompts = vec![run_tokenizer(size, render).await?];
    Ok(plan)
}

fn message_text(i: usize, m: InMessage) -> Result<ChatMessage, ApiError> {
    let content = match m.content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t,
        Some(MessageContent::Parts(parts)) => {
            let mut text = Vec::with_capacity(parts.len());
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}]"),
                            format!("content parts of type {kind:?} are not supported (only text)"),
                        ))
                    }
                }
            }
            text.join("\n")
        }
    };
    Ok(ChatMessage::new(m.role, content))
}

/// Validates a completion request and tokenizes its prompt(s).
pub(crate) async fn completion_plan(
    svc: &Arc<ModelService>,
    common: CommonParams,
    req: CompletionRequest,
) -> Result<Plan, ApiError> {
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let mut plan = common_plan(common, Endpoint::Completion, req.logprobs)?;
    // OpenAI's default for the legacy endpoint.
    plan.requested_max_tokens.get_or_insert(16);
    let prompts = match req.prompt {
        PromptField::Tokens(ids) => vec![ids],
        PromptField::TokenBatch(batch) => batch,
        PromptField::Text(t) => {
            let svc2 = Arc::clone(svc);
            let size = t.len();
            vec![run_tokenizer(size, move || encode(&svc2.tokenizer, &t)).await?]
        }
        PromptField::Texts(texts) => {
            let svc2 = Arc::clone(svc);
            let size = texts.iter().map(String::len).sum();
            run_tokenizer(size, move || {
                texts.iter().map(|t| encode(&svc2.tokenizer, t)).collect()
            })
            .await?
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt list is empty"));
    }
    if prompts.len() * plan.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("prompts times n must be at most {MAX_CHOICES}"),
        ));
    }
    plan.prompts = prompts;
    Ok(plan)
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))
}

async fn run_tokenizer<T: Send + 'static>(
    size: usize,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if size < INLINE_TOKENIZE_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
}

type EventStream = BoxStream<'static, TokenEvent>;

/// The in-flight sequences of one request and their text state.
pub(crate) struct Generation {
    /// `None` once a sequence has ended or was cut by a stop string (dropping the stream
    /// aborts the sequence).
    streams: Vec<Option<EventStream>>,
    choices: Vec<Choice>,
    tokenizer: Arc<Tokenizer>,
    /// Choices of one prompt share its prompt tokens in the usage.
    n: usize,
    prompt_tokens: Vec<u32>,
    cached_tokens: Vec<u32>,
    completion_tokens: u32,
    /// Where the round-robin poll starts, so one fast choice cannot starve the others.
    next_poll: usize,
    timer: RequestTimer,
    metrics: Arc<Metrics>,
}

struct Choice {
    detok: IncrementalDetokenizer<Arc<Tokenizer>>,
    stop: Option<StopMatcher>,
    finish: Option<&'static str>,
    logprobs: bool,
    /// Characters of text emitted so far (completions' `text_offset`).
    emitted_chars: usize,
    saw_first_event: bool,
}

/// What one engine event produced for one choice.
pub(crate) struct Update {
    pub choice: usize,
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<&'static str>,
}

/// The sampled token's logprob and the top alternatives, with the text offset
/// (in characters) where its text starts.
pub(crate) struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    pub text_offset: usize,
}

impl Generation {
    /// Submits every sequence of `plan`. If one is refused, those already submitted are
    /// dropped (and so aborted) and the refusal is returned.
    pub async fn submit(
        svc: &ModelService,
        plan: &Plan,
        metrics: Arc<Metrics>,
        start: Instant,
    ) -> Result<Self, ApiError> {
        if plan.requested_max_tokens == Some(0) {
            return Err(ApiError::invalid(
                plan.max_tokens_param,
                format!("{} must be at least 1", plan.max_tokens_param),
            ));
        }
        let total = plan.prompts.len() * plan.n;
        let mut streams = Vec::with_capacity(total);
        let mut choices = Vec::with_capacity(total);
        for prompt in &plan.prompts {
            let room = svc.context_limit.saturating_sub(prompt.len()).max(1);
            let max_tokens = plan
                .requested_max_tokens
                .map_or(room, |m| (m as usize).min(room)) as u32;
            let reqs: Vec<GenerateRequest> = (0..plan.n)
                .map(|j| {
                    let mut req = plan.base.clone();
                    req.prompt.clone_from(prompt);
                    req.max_tokens = max_tokens;
                    // Choices of one seeded request differ but stay reproducible.
                    if let Some(seed) = req.sampling.seed.as_mut() {
                        *seed = seed.wrapping_add(j as u64);
                    }
                    req
                })
                .collect();
            // The choices of one prompt go to one instance, which shares their prefix.
            let placed = svc.router.submit_many(reqs).await.map_err(|e| {
                let e = ApiError::from(e).rename_param("max_tokens", plan.max_tokens_param);
                match plan.endpoint {
                    Endpoint::Chat => e.rename_param("prompt", "messages"),
                    Endpoint::Completion => e,
                }
            })?;
            for s in placed {
                streams.push(Some(s));
                choices.push(Choice {
                    detok: IncrementalDetokenizer::with_prompt(
                        Arc::clone(&svc.tokenizer),
                        prompt,
                        true,
                    ),
                    stop: (!plan.stops.is_empty())
                        .then(|| StopMatcher::new(plan.stops.iter().cloned())),
                    finish: None,
                    logprobs: plan.logprobs,
                    emitted_chars: 0,
                    saw_first_event: false,
                });
            }
        }
        let prompt_tokens = plan.prompts.iter().map(|p| p.len() as u32).collect();
        Ok(Generation {
            streams,
            choices,
            tokenizer: Arc::clone(&svc.tokenizer),
            n: plan.n,
            prompt_tokens,
            cached_tokens: vec![0; plan.prompts.len()],
            completion_tokens: 0,
            next_poll: 0,
            timer: RequestTimer::new(Arc::clone(&metrics), start, total),
            metrics,
        })
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The next update, `None` when every choice has finished. An error (the engine
    /// aborted the sequence, or detokenization failed) ends the request.
    pub async fn next(&mut self) -> Option<Result<Update, ApiError>> {
        loop {
            let (i, ev) = poll_fn(|cx| self.poll_event(cx)).await?;
            if let Some(update) = self.apply(i, ev) {
                return Some(update);
            }
        }
    }

    /// Call after the last update was delivered: the request counts as complete.
    pub fn complete(&mut self) {
        self.timer.complete();
    }

    pub fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens.iter().sum(),
            self.completion_tokens,
            self.cached_tokens.iter().sum(),
        )
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, TokenEvent)>> {
        let k = self.streams.len();
        let mut live = false;
        for step in 0..k {
            let i = (self.next_poll + step) % k;
            let Some(s) = self.streams[i].as_mut() else {
                continue;
            };
            match s.poll_next_unpin(cx) {
                Poll::Ready(Some(ev)) => {
                    self.next_poll = (i + 1) % k;
                    return Poll::Ready(Some((i, ev)));
                }
                Poll::Ready(None) => self.streams[i] = None,
                Poll::Pending => live = true,
            }
        }
        if live {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    fn apply(&mut self, i: usize, ev: TokenEvent) -> Option<Result<Update, ApiError>> {
        let choice = &mut self.choices[i];
        if choice.finish.is_some() {
            return None;
        }
        if !choice.saw_first_event {
            choice.saw_first_event = true;
            let (prompt, sample) = (i / self.n, i % self.n);
            if sample == 0 {
                self.cached_tokens[prompt] = ev.cached_prompt_tokens;
                self.metrics
                    .prompt_tokens
                    .inc_by(u64::from(ev.prompt_tokens));
                self.metrics
                    .cached_prompt_tokens
                    .inc_by(u64::from(ev.cached_prompt_tokens));
            }
        }
        let mut text = String::new();
        let mut logprob = None;
        if let Some(token) = ev.token {
            self.completion_tokens += 1;
            self.metrics.generation_tokens.inc();
            if let Some(sent) = ev.sent_at {
                self.metrics
                    .token_delivery
                    .observe(sent.elapsed().as_secs_f64());
            }
            self.timer.token(i);
            let piece = match choice.detok.push(token) {
                Ok(p) => p,
                Err(e) => return Some(Err(ApiError::Internal(e.to_string()))),
            };
            if choice.logprobs {
                logprob = Some(TokenLogprob {
                    token,
                    logprob: ev.logprob.unwrap_or(f32::NAN),
                    top: ev.top_logprobs,
                    text_offset: choice.emitted_chars,
                });
            }
            text = match choice.stop.as_mut() {
                None => piece,
                Some(m) => {
                    let out = m.push(&piece);
                    if out.stopped.is_some() {
                        choice.finish = Some("stop");
                    }
                    out.text
                }
            };
        }
        if choice.finish.is_none() {
            if let Some(reason) = ev.finish_reason {
                let reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Abort => {
                        choice.finish = Some("abort");
                        return Some(Err(ApiError::ShuttingDown));
                    }
                };
                let tail = match choice.detok.finish() {
                    Ok(t) => t,
                    Err(e) => return Some(Err(ApiError::Internal(e.to_string()))),
                };
                match choice.stop.as_mut() {
                    None => text.push_str(&tail),
                    Some(m) => {
                        let out = m.push(&tail);
                        text.push_str(&out.text);
                        if out.stopped.is_some() {
                            choice.finish = Some("stop");
                        } else {
                            text.push_str(&m.finish());
                        }
                    }
                }
                choice.finish.get_or_insert(reason);
            }
        }
        if choice.finish.is_some() {
            // Ends the sequence now if a stop string cut it (a no-op if the engine had
            // already finished it): its blocks go back to the pool.
            self.streams[i] = None;
        }
        if choice.logprobs {
            choice.emitted_chars += text.chars().count();
        }
        if text.is_empty() && logprob.is_none() && choice.finish.is_none() {
            return None;
        }
        Some(Ok(Update {
            choice: i,
            text,
            logprob,
            finish: choice.finish,
        }))
    }
}

/// A token's text for logprobs, special tokens included.
pub(crate) fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatRequest;

    #[test]
    fn body_errors_name_the_field() {
        let e = parse_body::<CommonParams>(br#"{"temperature": "hot"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == "temperature"),
            "{e:?}"
        );
        let e = parse_body::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == "messages"),
            "{e:?}"
        );
        let e = parse_body::<ChatRequest>(br#"{"messages": [{"role": 1}]}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == "messages[0].role"),
            "{e:?}"
        );
        let e = parse_body::<CommonParams>(b"{not json").unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: None, .. }),
            "{e:?}"
        );
        let e = parse_body::<CommonParams>(b"{} trailing").unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: None, .. }),
            "{e:?}"
        );
        let e = parse_body::<CommonParams>(b"[]").unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
        let e = parse_body::<CommonParams>(br#"{"max_tokens": -1}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == "max_tokens"),
            "{e:?}"
        );
    }

    #[test]
    fn common_fields_are_validated() {
        let plan = |json: &str| {
            let c: CommonParams = parse_body(json.as_bytes()).unwrap();
            common_plan(c, Endpoint::Completion, None)
        };
        let param = |r: Result<Plan, ApiError>| match r {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            Err(e) => panic!("{e:?}"),
            Ok(_) => None,
        };
        assert_eq!(param(plan(r#"{"n": 0}"#)).as_deref(), Some("n"));
        assert_eq!(param(plan(r#"{"top_p": 0}"#)).as_deref(), Some("top_p"));
        assert_eq!(
            param(plan(r#"{"temperature": -1}"#)).as_deref(),
            Some("temperature")
        );
        assert_eq!(param(plan(r#"{"top_k": -2}"#)).as_deref(), Some("top_k"));
        assert_eq!(
            param(plan(r#"{"logit_bias": {"1": 5}}"#)).as_deref(),
            Some("logit_bias")
        );
        assert_eq!(
            param(plan(
                r#"{"stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}"#
            ))
            .as_deref(),
            Some("stop")
        );
        let p = plan(r#"{"stop": "x", "top_k": -1, "seed": -5, "stream": true, "stream_options": {"include_usage": true}}"#).unwrap();
        assert_eq!(p.stops, vec!["x".to_string()]);
        assert_eq!(p.base.sampling.top_k, 0);
        assert_eq!(p.base.sampling.seed, Some((-5i64) as u64));
        assert!(p.stream && p.include_usage);
    }
}
