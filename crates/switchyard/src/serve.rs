//! `switchyard serve`: the OpenAI-compatible HTTP server over one engine, on the CPU (the
//! default) or an NVIDIA GPU (`--device cuda`).
//!
//! Order of events: bind the port (so a bad address fails at once and `/health` can be
//! probed), load the model in the background (`/health` answers 503 until then), log one
//! ready line, serve until SIGTERM or SIGINT, then drain: refuse new work, let in-flight
//! requests finish for up to `--shutdown-timeout` seconds, abort what remains, exit 0.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use engine::backend::cpu::{kernels, CpuBackend};
use engine::backend::Backend;
use engine::core::HandleOptions;
use engine::model::{build_engine, EngineOptions};
use frontend::{Frontend, FrontendConfig, ModelService};
use tokio::sync::watch;

use crate::generate::{Device, DeviceArgs, LoadProgress};
use crate::models;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Hugging Face model directory (default: a small synthetic model, made once).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Address to listen on; use 0.0.0.0 to accept connections from other machines.
    #[arg(long, env = "SWITCHYARD_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the ready line shows which).
    #[arg(long, env = "SWITCHYARD_PORT", default_value_t = 8000)]
    port: u16,
    /// The model name clients send (default: the model directory's name).
    #[arg(long, env = "SWITCHYARD_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Requests admitted at once (running and waiting); beyond it requests get 429.
    #[arg(long, env = "SWITCHYARD_MAX_PENDING", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_pending: u32,
    /// Memory for the KV cache, in MiB (cpu; on cuda the cache is sized from
    /// --gpu-memory-utilization).
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    kv_cache_mb: u64,
    /// Compute threads (default: all cores).
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value_t = frontend::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
    /// --device, --cuda-device, --gpu-memory-utilization.
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    init_logging();
    if args.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    let util = args.device.gpu_memory_utilization;
    if !(util > 0.0 && util <= 1.0) {
        anyhow::bail!("--gpu-memory-utilization must be in (0, 1], got {util}");
    }
    if args.device.device == Device::Cuda {
        // A missing driver or library fails here, in one line, before the port is bound.
        engine::backend::cuda::probe_libraries()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-http")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args));
    // Connections still open after the drain bound must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut sig = watch_signals()?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr().context("reading the bound address")?;

    let fe = Frontend::new(FrontendConfig {
        max_body_bytes: args.max_body_bytes,
    });

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(frontend::serve(listener, fe.router(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    tracing::info!(
        "listening on http://{addr}; loading the model (GET /health answers 503 until ready)"
    );

    let load = tokio::task::spawn_blocking({
        let model = args.model.clone();
        let name = args.served_model_name.clone();
        let threads = args.threads;
        let device = args.device.clone();
        let opts = EngineOptions {
            kv_cache_bytes: usize::try_from(args.kv_cache_mb << 20).unwrap_or(usize::MAX),
            ..EngineOptions::default()
        };
        let handle_opts = HandleOptions {
            max_pending: args.max_pending as usize,
            ..HandleOptions::default()
        };
        move || load_model(model, name, threads, &device, &opts, handle_opts)
    });
    let model = tokio::select! {
        loaded = load => loaded.context("the model loader panicked")??,
        () = signals(&mut sig, 1) => {
            tracing::info!("stopped before the model finished loading");
            return Ok(());
        }
    };
    let name = model.name().to_string();
    fe.set_model(model);
    log_ready(addr, &name);

    signals(&mut sig, 1).await;
    tracing::info!(
        "shutting down: refusing new requests, waiting up to {}s for in-flight ones",
        args.shutdown_timeout
    );
    fe.start_draining();
    let _ = stop_tx.send(true);
    let drained = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(args.shutdown_timeout), server) => r.is_ok(),
        () = signals(&mut sig, 2) => false,
    };
    if !drained {
        tracing::warn!("in-flight requests did not finish in time; aborting them");
    }
    if let Some(m) = fe.model() {
        let engine = m.engine().clone();
        // Joining the engine thread blocks; it ends every remaining stream with an abort.
        tokio::task::spawn_blocking(move || engine.shutdown())
            .await
            .context("stopping the engine")?;
    }
    tracing::info!("stopped");
    Ok(())
}

fn load_model(
    model: Option<PathBuf>,
    name: Option<String>,
    threads: Option<usize>,
    device: &DeviceArgs,
    opts: &EngineOptions,
    handle_opts: HandleOptions,
) -> Result<ModelService> {
    if let Some(n) = threads {
        kernels::set_num_threads(n);
    }
    let dir = models::resolve(model)?;
    let tokenizer = tokens::Tokenizer::from_dir(&dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    let name = name.unwrap_or_else(|| dir_name(&dir));
    // Only the engine's construction depends on the device; the frontend sees a handle.
    match device.device {
        Device::Cpu => start_on(name, &dir, CpuBackend::new(), tokenizer, opts, handle_opts),
        Device::Cuda => {
            // A missing driver or library is one line of error here, before any loading.
            let backend = device.cuda_backend()?;
            tracing::info!("CUDA device {}: {}", device.cuda_device, backend.describe());
            start_on(name, &dir, backend, tokenizer, opts, handle_opts)
        }
    }
}

fn start_on<B: Backend>(
    name: String,
    dir: &std::path::Path,
    backend: B,
    tokenizer: tokens::Tokenizer,
    opts: &EngineOptions,
    handle_opts: HandleOptions,
) -> Result<ModelService> {
    let mut progress = LoadProgress::new();
    let eng = build_engine(dir, backend, opts, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("loading {}", dir.display()))?;
    progress.finish();
    Ok(ModelService::start(name, eng, tokenizer, handle_opts))
}

/// A model's default served name: its directory's name (vLLM names a model by its path;
/// the last component is what people type).
fn dir_name(dir: &std::path::Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "switchyard".to_string())
}

fn log_ready(addr: SocketAddr, model: &str) {
    let url = format!("http://{addr}");
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 32,
    });
    tracing::info!(
        "switchyard ready: serving {model:?} at {url} (try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}')"
    );
}

/// Counts SIGTERM/SIGINT deliveries: the first one drains, a second one stops at once.
/// The listeners are installed once, before the model loads, so no signal is missed.
fn watch_signals() -> Result<watch::Receiver<u32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}

/// Resolves once `n` signals have arrived.
async fn signals(rx: &mut watch::Receiver<u32>, n: u32) {
    // The sender lives as long as the runtime; if it is gone, nothing can signal us.
    if rx.wait_for(|count| *count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}
