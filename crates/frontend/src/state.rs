//! What every handler shares: the configuration, the metrics, and the model service, which
//! appears once the model has loaded (until then generation routes and `/health` answer
//! 503, so a load balancer never sends traffic to a server that cannot answer it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use engine::core::{EngineConfig, EngineHandle, Executor, HandleOptions, LlmEngine};
use router::{Router, RouterConfig};
use runtime::{Discovery, InstanceInfo, LocalClient, LocalDiscovery, LocalEventPlane, Role};
use tokens::{ChatTemplate, ChatTemplateError, Tokenizer};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Largest request body accepted by default.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Frontend settings that do not depend on the model.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Bodies above this many bytes are answered 413.
    pub max_body_bytes: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// A served model as the frontend uses it: the router in front of its engine instances,
/// the tokenizer and the compiled chat template.
pub struct ModelService {
    /// The name clients put in `model`; requests naming anything else get 404.
    pub(crate) name: String,
    pub(crate) router: Router,
    pub(crate) tokenizer: Arc<Tokenizer>,
    /// A model without a usable template still serves `/v1/completions`.
    pub(crate) chat_template: Result<ChatTemplate, ChatTemplateError>,
    /// Longest sequence (prompt + output) an instance can hold: the context window, or
    /// the whole KV cache if that is smaller.
    pub(crate) context_limit: usize,
}

impl ModelService {
    /// Serves `name` through `router` (whose instances all run this model).
    pub fn new(
        name: impl Into<String>,
        router: Router,
        tokenizer: Tokenizer,
        context_limit: usize,
    ) -> Self {
        let chat_template = tokenizer.chat_template_renderer();
        if let Err(e) = &chat_template {
            tracing::warn!("/v1/chat/completions is unavailable: {e}");
        }
        ModelService {
            name: name.into(),
            router,
            tokenizer: Arc::new(tokenizer),
            chat_template,
            context_limit,
        }
    }

    /// One in-process engine behind an embedded router: starts `engine` on its own
    /// thread and registers it as instance 0. Call from within a Tokio runtime.
    pub fn start<E: Executor>(
        name: impl Into<String>,
        engine: LlmEngine<E>,
        tokenizer: Tokenizer,
        opts: HandleOptions,
    ) -> Self {
        let name = name.into();
        let cfg = engine.config();
        let context_limit = engine_context_limit(cfg);
        let info = InstanceInfo {
            id: 0,
            model: name.clone(),
            role: Role::Both,
            block_size: cfg.scheduler.block_size,
            kv_blocks: cfg.scheduler.num_blocks,
            device: "local".into(),
            tensor_parallel: 1,
        };
        let discovery = Arc::new(LocalDiscovery::new());
        let events = Arc::new(LocalEventPlane::new(1024));
        let handle = EngineHandle::spawn(engine, opts);
        events.forward(0, handle.subscribe_kv_events());
        discovery.register(info, Arc::new(LocalClient::new(handle)));
        let router = Router::start(RouterConfig::default(), discovery, events);
        ModelService::new(name, router, tokenizer, context_limit)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn context_limit(&self) -> usize {
        self.context_limit
    }
}

/// The longest sequence an engine with `cfg` holds: its context window or its whole KV
/// cache, whichever is smaller.
pub fn engine_context_limit(cfg: &EngineConfig) -> usize {
    cfg.max_model_len
        .min(cfg.scheduler.num_blocks * cfg.scheduler.block_size)
}

/// Shared state behind every handler; cloning is one reference count.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

pub(crate) struct Inner {
    pub config: FrontendConfig,
    pub metrics: Arc<Metrics>,
    model: OnceLock<Arc<ModelService>>,
    draining: AtomicBool,
    /// Model creation time reported by `/v1/models`: when this server started.
    pub created: u64,
    /// Request ids: a per-process prefix plus a counter, unique without coordination.
    id_prefix: u64,
    next_id: AtomicU64,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: FrontendConfig) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        AppState(Arc::new(Inner {
            config,
            metrics: Arc::new(Metrics::new()),
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            created: now.as_secs(),
            id_prefix: now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32),
            next_id: AtomicU64::new(0),
        }))
    }

    /// Installs the model; false if one was already installed.
    pub fn set_model(&self, model: ModelService) -> bool {
        self.model.set(Arc::new(model)).is_ok()
    }

    pub fn model_if_loaded(&self) -> Option<&Arc<ModelService>> {
        self.model.get()
    }

    /// The model for a generation request: 503 while loading or draining.
    pub fn model(&self) -> Result<Arc<ModelService>, ApiError> {
        if self.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        self.model.get().cloned().ok_or(ApiError::NotReady)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_ready(&self) -> bool {
        self.model.get().is_some() && !self.is_draining()
    }

    /// A fresh response id such as `chatcmpl-1a2b...`.
    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{n:08x}", self.id_prefix)
    }

    /// Unix seconds, for `created`.
    pub fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(self.created)
    }
}
