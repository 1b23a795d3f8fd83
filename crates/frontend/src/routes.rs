//! The HTTP routes: OpenAI endpoints, health, metrics and admin, plus JSON answers for
//! unknown routes and methods so that no client ever sees a bare text error.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, ChatRequest, CommonParams,
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, ModelCard, ModelList,
};
use crate::pipeline::{self, Endpoint, Generation, Plan};
use crate::sse::{self, ChunkWriter};
use crate::state::{AppState, ModelService};

pub(crate) fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/stats", get(admin_stats))
        .route("/admin/instances", get(admin_instances))
        .route("/admin/instances/{id}/stop", post(admin_stop_instance))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Counts every routed response by route template and status.
async fn count_requests(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let resp = next.run(req).await;
    app.metrics.count_request(&endpoint, resp.status().as_str());
    resp
}

async fn not_found(State(app): State<AppState>, method: Method, uri: Uri) -> ApiError {
    let e = ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    app.metrics.count_request("unmatched", e.status().as_str());
    e
}

async fn method_not_allowed(State(app): State<AppState>, method: Method, uri: Uri) -> ApiError {
    let e = ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    app.metrics.count_request("unmatched", e.status().as_str());
    e
}

/// The raw body, under the size limit. JSON is parsed by the handlers so that a bad body
/// gets an OpenAI-shaped 400 naming the field (axum's `Json` answers 422 in plain text)
/// and so that the `Content-Type` does not matter (`curl -d` sends a form type).
pub(crate) struct RawBody(Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: state.config.max_body_bytes,
                    }
                } else {
                    ApiError::InvalidRequest {
                        message: format!("cannot read the request body: {}", e.body_text()),
                        param: None,
                    }
                }
            })
    }
}

fn check_model(svc: &ModelService, common: &CommonParams) -> Result<(), ApiError> {
    match &common.model {
        Some(m) if *m != svc.name => Err(ApiError::ModelNotFound(m.clone())),
        _ => Ok(()),
    }
}

async fn chat_completions(
    State(app): State<AppState>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let svc = app.model()?;
    let common: CommonParams = pipeline::parse_body(&body)?;
    let chat: ChatRequest = pipeline::parse_body(&body)?;
    check_model(&svc, &common)?;
    let plan = pipeline::chat_plan(&svc, common, chat).await?;
    generate(app, &svc, plan, start).await
}

async fn completions(
    State(app): State<AppState>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let svc = app.model()?;
    let common: CommonParams = pipeline::parse_body(&body)?;
    let req: CompletionRequest = pipeline::parse_body(&body)?;
    check_model(&svc, &common)?;
    let plan = pipeline::completion_plan(&svc, common, req).await?;
    generate(app, &svc, plan, start).await
}

async fn generate(
    app: AppState,
    svc: &Arc<ModelService>,
    plan: Plan,
    start: Instant,
) -> Result<Response, ApiError> {
    let mut gen = Generation::submit(svc, &plan, Arc::clone(&app.metrics), start).await?;
    let (prefix, object) = match plan.endpoint {
        Endpoint::Chat => ("chatcmpl", "chat.completion"),
        Endpoint::Completion => ("cmpl", "text_completion"),
    };
    let id = app.next_id(prefix);
    let created = app.now();
    let model = svc.name.as_str();
    if plan.stream {
        let w = ChunkWriter::new(plan.endpoint, &id, created, model);
        return Ok(sse::response(gen, w, plan.include_usage));
    }

    let k = gen.num_choices();
    let mut texts = vec![String::new(); k];
    let mut finish = vec!["length"; k];
    let mut chat_lps: Vec<Option<ChatLogprobs>> = (0..k)
        .map(|_| plan.logprobs.then(ChatLogprobs::default))
        .collect();
    let mut cmpl_lps: Vec<Option<CompletionLogprobs>> = (0..k)
        .map(|_| plan.logprobs.then(CompletionLogprobs::default))
        .collect();
    while let Some(update) = gen.next().await {
        let u = update?;
        texts[u.choice].push_str(&u.text);
        if let Some(f) = u.finish {
            finish[u.choice] = f;
        }
        if let Some(lp) = &u.logprob {
            match plan.endpoint {
                Endpoint::Chat => {
                    if let Some(l) = chat_lps[u.choice].as_mut() {
                        l.content.push(sse::chat_logprob(&gen, lp));
                    }
                }
                Endpoint::Completion => {
                    if let Some(l) = cmpl_lps[u.choice].as_mut() {
                        sse::completion_logprob(&gen, lp, l);
                    }
                }
            }
        }
    }
    gen.complete();
    let usage = gen.usage();
    let body = match plan.endpoint {
        Endpoint::Chat => serde_json::to_vec(&ChatCompletion {
            id: &id,
            object,
            created,
            model,
            choices: texts
                .into_iter()
                .zip(chat_lps)
                .zip(finish)
                .enumerate()
                .map(|(i, ((content, logprobs), finish_reason))| ChatChoice {
                    index: i as u32,
                    message: AssistantMessage {
                        role: "assistant",
                        content,
                    },
                    logprobs,
                    finish_reason,
                })
                .collect(),
            usage,
        }),
        Endpoint::Completion => serde_json::to_vec(&Completion {
            id: &id,
            object,
            created,
            model,
            choices: texts
                .into_iter()
                .zip(cmpl_lps)
                .zip(finish)
                .enumerate()
                .map(|(i, ((text, logprobs), finish_reason))| CompletionChoice {
                    index: i as u32,
                    text,
                    logprobs,
                    finish_reason,
                })
                .collect(),
            usage,
        }),
    }
    .map_err(|e| ApiError::Internal(format!("serializing the response: {e}")))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn model_card<'a>(app: &AppState, svc: &'a ModelService) -> ModelCard<'a> {
    ModelCard {
        id: &svc.name,
        object: "model",
        created: app.created,
        owned_by: "switchyard",
        max_model_len: svc.context_limit,
    }
}

/// Lists the served model; empty while it loads.
async fn list_models(State(app): State<AppState>) -> Response {
    let data = app
        .model_if_loaded()
        .map(|svc| vec![model_card(&app, svc)])
        .unwrap_or_default();
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

async fn get_model(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match app.model_if_loaded() {
        Some(svc) if svc.name == id => Ok(Json(model_card(&app, svc)).into_response()),
        _ => Err(ApiError::ModelNotFound(id)),
    }
}

async fn health(State(app): State<AppState>) -> Response {
    let (status, state) = if app.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if app.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (status, Json(serde_json::json!({ "status": state }))).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    if let Some(svc) = app.model_if_loaded() {
        if let Some(stats) = svc.router().engine_stats().await {
            app.metrics.update_engine(&stats);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `EngineStats` as JSON (summed over instances), for operators and tests (e.g. "no
/// blocks left behind"), with the router's counters.
#[derive(Serialize)]
struct AdminStats {
    running: usize,
    waiting: usize,
    pending: usize,
    blocks_total: usize,
    blocks_used: usize,
    blocks_free: usize,
    kv_usage: f32,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    preemptions: u64,
    steps: u64,
    /// Step durations of every instance, as `[[upper_us, steps], ...]` (see
    /// `engine::core::StepTimes`).
    step_time_us: engine::core::StepTimes,
    router: router::RouterStats,
}

async fn admin_stats(State(app): State<AppState>) -> Result<Response, ApiError> {
    let svc = app.model_if_loaded().ok_or(ApiError::NotReady)?;
    let r = svc.router();
    let s = r.engine_stats().await.ok_or(ApiError::ShuttingDown)?;
    Ok(Json(AdminStats {
        running: s.running,
        waiting: s.waiting,
        pending: r.pending(),
        blocks_total: s.blocks_total,
        blocks_used: s.blocks_used,
        blocks_free: s.blocks_free,
        kv_usage: s.kv_usage,
        prefix_query_tokens: s.prefix_query_tokens,
        prefix_hit_tokens: s.prefix_hit_tokens,
        preemptions: s.preemptions,
        steps: s.steps,
        step_time_us: s.step_times,
        router: r.stats(),
    })
    .into_response())
}

/// Every instance behind the router: identity, routed count, load, engine counters.
async fn admin_instances(State(app): State<AppState>) -> Result<Response, ApiError> {
    let svc = app.model_if_loaded().ok_or(ApiError::NotReady)?;
    let instances = svc.router().instance_stats().await;
    Ok(Json(serde_json::json!({ "instances": instances })).into_response())
}

/// Stops one instance, as an operator draining it by force or a failure test would: its
/// requests without a first token move to other instances; the others end with an error.
async fn admin_stop_instance(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.model_if_loaded().ok_or(ApiError::NotReady)?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid("id", format!("{id:?} is not an instance id")))?;
    if !svc.router().stop_instance(id).await {
        return Err(ApiError::RouteNotFound {
            method: "POST".into(),
            path: format!("/admin/instances/{id}/stop (no instance {id})"),
        });
    }
    Ok(Json(serde_json::json!({ "stopped": id })).into_response())
}
