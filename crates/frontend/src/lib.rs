//! The OpenAI-compatible HTTP frontend: `/v1/chat/completions`, `/v1/completions` and
//! `/v1/models` over an engine handle, with server-sent-event streaming, `/health`,
//! Prometheus `/metrics` and `/admin/stats`. It mirrors the serving layer of vLLM's and
//! TGI's routers: tokenize and render the chat template here, hand token ids to the
//! engine, detokenize and cut stop strings on the way back.
//!
//! The frontend knows no tensors: it talks to a [`router::Router`] only, which places each
//! request on one of the model's engine instances. A
//! [`Frontend`] starts without a model (generation routes and `/health` answer 503) and is
//! given one with [`Frontend::set_model`] once it has loaded, so the port can be bound and
//! probed while weights load.
//!
//! ```no_run
//! # async fn demo(model: frontend::ModelService) -> std::io::Result<()> {
//! let fe = frontend::Frontend::new(frontend::FrontendConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! fe.set_model(model);
//! frontend::serve(listener, fe.router(), std::future::pending()).await
//! # }
//! ```

mod error;
mod metrics;
mod openai;
mod pipeline;
mod routes;
mod sse;
mod state;

use std::future::Future;

use axum::serve::ListenerExt;
use axum::Router;

pub use error::ApiError;
pub use state::{engine_context_limit, FrontendConfig, ModelService, DEFAULT_MAX_BODY_BYTES};

/// An HTTP frontend: its state and the router over it. Cloning shares the state.
#[derive(Clone)]
pub struct Frontend {
    state: state::AppState,
}

impl Frontend {
    pub fn new(config: FrontendConfig) -> Self {
        Frontend {
            state: state::AppState::new(config),
        }
    }

    /// The routes, ready for [`serve`].
    pub fn router(&self) -> Router {
        routes::router(self.state.clone())
    }

    /// Installs the loaded model: generation routes open and `/health` turns 200. Returns
    /// false (and drops `model`) if one was installed already.
    pub fn set_model(&self, model: ModelService) -> bool {
        self.state.set_model(model)
    }

    /// The installed model, if any.
    pub fn model(&self) -> Option<&ModelService> {
        self.state.model_if_loaded().map(|m| &**m)
    }

    /// Stops taking new generation requests (they get 503, `/health` turns 503) while
    /// those in flight finish.
    pub fn start_draining(&self) {
        self.state.start_draining();
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and
/// waits for open connections (streams included) to finish; bound that wait from outside.
/// Accepted sockets get `TCP_NODELAY`: streamed tokens are small writes that must not wait
/// for Nagle's algorithm.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
