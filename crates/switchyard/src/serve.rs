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
use engine::core::{EngineConfig, EngineHandle, Executor, HandleOptions, LlmEngine};
use engine::model::{build_cpu_tp_engine, build_engine, build_tp_engine, EngineOptions};
use frontend::{Frontend, FrontendConfig, ModelService};
use router::{KvWeights, Router, RouterConfig, RouterMode};
use runtime::{Discovery, InstanceInfo, LocalClient, LocalDiscovery, LocalEventPlane, Role};
use std::sync::Arc;
use tokio::sync::watch;

use crate::generate::{Device, DeviceArgs, LoadProgress};
use crate::models;
use crate::placement::{self, CpuAffinity, CpuPlan, PinGuard};

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
    /// Tokens one engine step computes across its sequences; long prompts are prefilled
    /// in chunks of at most this, so smaller values keep decodes flowing (lower
    /// inter-token latency) at some cost in prefill throughput.
    #[arg(long, env = "SWITCHYARD_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(16..))]
    max_num_batched_tokens: u32,
    /// Compute threads (default: all cores).
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    /// Async worker threads for HTTP, tokenization, routing and streaming (default: one
    /// per 8 cores, 1 to 4). Engine loops have threads of their own. One worker streams
    /// about 100k tokens/s; more than the load needs only add wake-ups and context
    /// switches to every streamed token.
    #[arg(long, env = "SWITCHYARD_HTTP_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    http_threads: Option<u16>,
    /// auto: when the compute threads (--threads) and the HTTP workers fit on separate
    /// cores, pin each kind to its own (CPU engine only); none: leave placement to the
    /// kernel. auto splits the CPUs this process may use, so several servers on one
    /// machine should each get their own (taskset) or use none.
    #[arg(long, value_enum, env = "SWITCHYARD_CPU_AFFINITY", default_value_t = CpuAffinity::Auto)]
    cpu_affinity: CpuAffinity,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value_t = frontend::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
    /// --device, --cuda-device, --gpu-memory-utilization.
    #[command(flatten)]
    device: DeviceArgs,
    /// Engine instances behind the router, each with its own KV cache (--kv-cache-mb
    /// each) and KV event stream.
    #[arg(long, env = "SWITCHYARD_INSTANCES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    instances: u32,
    /// How the router picks an instance: kv (cached prefix against load), round-robin,
    /// random or least-loaded.
    #[arg(long, env = "SWITCHYARD_ROUTER_MODE", default_value = "kv",
          value_parser = parse_router_mode)]
    router_mode: RouterMode,
    /// KV routing: weight of a block of prefill against a block of decode load.
    #[arg(long, default_value_t = 8.0)]
    router_overlap_weight: f64,
    /// KV routing: 0 picks the cheapest instance; above 0, a softmax over costs.
    #[arg(long, default_value_t = 0.0)]
    router_temperature: f64,
    /// `model`: the real engine; `mock`: the simulated engine (same scheduler and block
    /// pool, no model math, step times from a cost model) with the model's tokenizer.
    #[arg(long, value_enum, env = "SWITCHYARD_ENGINE", default_value_t = EngineKind::Model)]
    engine: EngineKind,
    /// --engine mock: modelled step times are divided by this (2 runs twice as fast).
    #[arg(long, default_value_t = 1.0)]
    mock_speedup: f64,
    /// --engine mock: a measured profile (JSON) instead of the built-in cost model.
    #[arg(long, conflicts_with = "mock_reference_cost")]
    mock_profile: Option<PathBuf>,
    /// --engine mock: step times of the reference deployment (an 8B model on one H100)
    /// whatever model directory supplies the tokenizer, instead of times scaled to it.
    #[arg(long)]
    mock_reference_cost: bool,
    /// --engine mock: the longest sequence accepted (default: the model's context window).
    #[arg(long)]
    mock_max_model_len: Option<usize>,
    /// --engine mock: KV blocks per instance.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u64).range(1..))]
    mock_kv_blocks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Model,
    Mock,
}

fn parse_router_mode(s: &str) -> Result<RouterMode, String> {
    s.parse()
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
    for (name, v) in [
        ("--router-overlap-weight", args.router_overlap_weight),
        ("--router-temperature", args.router_temperature),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            anyhow::bail!("{name} must be a finite number >= 0, got {v}");
        }
    }
    if !(args.mock_speedup.is_finite() && args.mock_speedup > 0.0) {
        anyhow::bail!("--mock-speedup must be > 0, got {}", args.mock_speedup);
    }
    let ranks = args.device.ranks()?;
    if ranks > 1 && (args.engine == EngineKind::Mock || args.instances > 1) {
        anyhow::bail!("--tp above 1 needs --engine model and one instance (--instances 1)");
    }
    if args.device.device == Device::Cuda && args.instances > 1 && args.engine == EngineKind::Model
    {
        anyhow::bail!(
            "--instances above 1 with --device cuda is not supported yet (one instance per GPU: \
             start one server per --cuda-device)"
        );
    }
    if args.device.device == Device::Cuda && args.engine == EngineKind::Model {
        // A missing driver or library fails here, in one line, before the port is bound.
        engine::backend::cuda::probe_libraries()?;
    }
    let http_threads = args
        .http_threads
        .map_or_else(default_http_threads, usize::from);
    let cpu_plan = cpu_plan(&args, http_threads);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(http_threads)
        .enable_all()
        .thread_name("switchyard-http");
    if let Some(plan) = &cpu_plan {
        tracing::info!(
            "CPU placement: compute threads on CPU {}, HTTP workers on CPU {} \
             (--cpu-affinity none leaves it to the kernel)",
            placement::cpu_list(&plan.compute),
            placement::cpu_list(&plan.http)
        );
        let http = plan.http.clone();
        builder.on_thread_start(move || {
            if let Err(e) = placement::pin_current_thread(&http) {
                tracing::warn!("pinning an HTTP worker: {e}");
            }
        });
        // The thread that drives the top-level future too.
        if let Err(e) = placement::pin_current_thread(&plan.http) {
            tracing::warn!("pinning the main thread: {e}");
        }
    }
    let runtime = builder.build().context("starting the async runtime")?;
    let result = runtime.block_on(serve(args, cpu_plan));
    // Connections still open after the drain bound must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// One async worker per 8 cores, 1 to 4. Measured on 2 and 16 cores (docs/benchmarks.md,
/// Frontend): every extra idle worker adds wake-ups and work stealing to each streamed
/// token (16 cores: 10 µs per token with 1 worker, 12 with 2, 18 with 8).
fn default_http_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / 8).clamp(1, 4)
}

/// The core split `--cpu-affinity auto` asks for, where it applies: the CPU engine (the
/// mock's threads only sleep; a GPU engine's loop thread is not measured yet), with room
/// for both kinds of thread.
fn cpu_plan(args: &ServeArgs, http_threads: usize) -> Option<CpuPlan> {
    if args.cpu_affinity == CpuAffinity::None
        || args.engine != EngineKind::Model
        || args.device.device != Device::Cpu
    {
        return None;
    }
    let allowed = match placement::allowed_cpus() {
        Ok(cpus) => cpus,
        Err(e) => {
            tracing::debug!("not pinning threads: {e}");
            return None;
        }
    };
    let compute = args.threads.unwrap_or_else(kernels::num_threads);
    let plan = CpuPlan::split(&allowed, compute, http_threads);
    if plan.is_none() {
        tracing::debug!(
            "not pinning threads: {compute} compute + {http_threads} HTTP threads do not fit \
             on {} CPUs",
            allowed.len()
        );
    }
    plan
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

async fn serve(args: ServeArgs, cpu_plan: Option<CpuPlan>) -> Result<()> {
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
        let plan = LoadPlan {
            model: args.model.clone(),
            name: args.served_model_name.clone(),
            threads: args.threads,
            device: args.device.clone(),
            opts: EngineOptions {
                kv_cache_bytes: usize::try_from(args.kv_cache_mb << 20).unwrap_or(usize::MAX),
                max_batched_tokens: args.max_num_batched_tokens as usize,
                ..EngineOptions::default()
            },
            handle_opts: HandleOptions {
                max_pending: args.max_pending as usize,
                ..HandleOptions::default()
            },
            instances: args.instances as usize,
            tp: args.device.ranks()?,
            cpu_plan,
            engine: args.engine,
            mock_speedup: args.mock_speedup,
            mock_profile: args.mock_profile.clone(),
            mock_reference_cost: args.mock_reference_cost,
            mock_max_model_len: args.mock_max_model_len,
            mock_kv_blocks: args.mock_kv_blocks as usize,
            router: RouterConfig {
                mode: args.router_mode,
                weights: KvWeights {
                    overlap_weight: args.router_overlap_weight,
                    temperature: args.router_temperature,
                },
                ..RouterConfig::default()
            },
        };
        move || load_model(plan)
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
        // Each engine thread ends its remaining streams with an abort.
        m.router().shutdown_all().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Everything the background loader needs.
struct LoadPlan {
    model: Option<PathBuf>,
    name: Option<String>,
    threads: Option<usize>,
    device: DeviceArgs,
    opts: EngineOptions,
    handle_opts: HandleOptions,
    instances: usize,
    tp: usize,
    /// Cores for the engine threads (and back to the HTTP ones after starting them).
    cpu_plan: Option<CpuPlan>,
    engine: EngineKind,
    mock_speedup: f64,
    mock_profile: Option<PathBuf>,
    mock_reference_cost: bool,
    mock_max_model_len: Option<usize>,
    mock_kv_blocks: usize,
    router: RouterConfig,
}

/// Starts the instances, registers them with an embedded discovery and event plane, and
/// puts a router in front of them. Runs on a blocking thread inside the runtime (the
/// router's tasks are spawned on it).
fn load_model(plan: LoadPlan) -> Result<ModelService> {
    // Engine threads, and the kernel pool's threads made from them or from here while
    // packing weights, inherit this thread's cores.
    let _pin = plan
        .cpu_plan
        .as_ref()
        .map(|p| PinGuard::new(&p.compute, &p.http));
    if let Some(n) = plan.threads {
        kernels::set_num_threads(n);
    }
    let dir = models::resolve(plan.model.clone())?;
    let tokenizer = tokens::Tokenizer::from_dir(&dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    let name = plan.name.clone().unwrap_or_else(|| dir_name(&dir));
    let discovery = Arc::new(LocalDiscovery::new());
    let events = Arc::new(LocalEventPlane::new(4096));
    let mut context_limit = usize::MAX;
    for id in 0..plan.instances {
        let (handle, cfg, device) = start_instance(&plan, &dir, tokenizer.vocab_size())?;
        context_limit = context_limit.min(frontend::engine_context_limit(&cfg));
        let info = InstanceInfo {
            id: id as u64,
            model: name.clone(),
            role: Role::Both,
            block_size: cfg.scheduler.block_size,
            kv_blocks: cfg.scheduler.num_blocks,
            device,
            tensor_parallel: plan.tp,
        };
        events.forward(info.id, handle.subscribe_kv_events());
        discovery.register(info, Arc::new(LocalClient::new(handle)));
    }
    if plan.instances > 1 {
        tracing::info!(
            "{} instances behind the {} router",
            plan.instances,
            plan.router.mode.name()
        );
    }
    let router = Router::start(plan.router.clone(), discovery, events);
    Ok(ModelService::new(name, router, tokenizer, context_limit))
}

/// One engine instance on its own thread: its handle, configuration and device name.
fn start_instance(
    plan: &LoadPlan,
    dir: &std::path::Path,
    tokenizer_vocab: usize,
) -> Result<(EngineHandle, EngineConfig, String)> {
    match (plan.engine, plan.device.device) {
        (EngineKind::Mock, _) => start_mock(plan, dir, tokenizer_vocab),
        (EngineKind::Model, Device::Cpu) if plan.tp > 1 => {
            start_loaded(plan, format!("cpu (tp {})", plan.tp), |progress| {
                build_cpu_tp_engine(dir, plan.tp, &plan.opts, progress)
                    .with_context(|| format!("loading {} as {} shards", dir.display(), plan.tp))
            })
        }
        (EngineKind::Model, Device::Cpu) => start_loaded(plan, "cpu".into(), |progress| {
            build_engine(dir, CpuBackend::new(), &plan.opts, progress)
                .with_context(|| format!("loading {}", dir.display()))
        }),
        (EngineKind::Model, Device::Cuda) if plan.tp > 1 => {
            let devices = plan.device.cuda_devices()?;
            let backends = plan.device.cuda_tp_group()?;
            tracing::info!("tensor parallel over CUDA devices {devices:?} (NCCL)");
            let list: Vec<String> = devices.iter().map(usize::to_string).collect();
            let device = format!("cuda:{} (tp {})", list.join(","), plan.tp);
            start_loaded(plan, device, |progress| {
                build_tp_engine(dir, backends, &plan.opts, progress)
                    .with_context(|| format!("loading {} over devices {devices:?}", dir.display()))
            })
        }
        (EngineKind::Model, Device::Cuda) => {
            // A missing driver or library is one line of error here, before any loading.
            let backend = plan.device.cuda_backend()?;
            let ordinal = plan.device.cuda_devices()?[0];
            tracing::info!("CUDA device {ordinal}: {}", backend.describe());
            let device = format!("cuda:{ordinal}");
            start_loaded(plan, device, |progress| {
                build_engine(dir, backend, &plan.opts, progress)
                    .with_context(|| format!("loading {}", dir.display()))
            })
        }
    }
}

/// Loads an engine with a progress bar, then starts its loop thread.
fn start_loaded<E: Executor>(
    plan: &LoadPlan,
    device: String,
    load: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<LlmEngine<E>>,
) -> Result<(EngineHandle, EngineConfig, String)> {
    let mut progress = LoadProgress::new();
    let eng = load(&mut |d, t| progress.update(d, t))?;
    progress.finish();
    let cfg = eng.config().clone();
    Ok((
        EngineHandle::spawn(eng, plan.handle_opts.clone()),
        cfg,
        device,
    ))
}

/// A simulated instance shaped like the model in `dir` (vocabulary, EOS ids, context),
/// with no weights loaded: the tokenizer and chat template are the real ones.
fn start_mock(
    plan: &LoadPlan,
    dir: &std::path::Path,
    tok_vocab: usize,
) -> Result<(EngineHandle, EngineConfig, String)> {
    let cfg = engine::model::ModelConfig::from_dir(dir)
        .with_context(|| format!("reading the config of {}", dir.display()))?;
    let mut opts = mocker::MockOptions::from_model_config(&cfg);
    opts.timing = mocker::Timing::WallClock {
        speedup: plan.mock_speedup,
    };
    opts.scheduler.num_blocks = plan.mock_kv_blocks;
    opts.scheduler.max_batched_tokens = plan.opts.max_batched_tokens;
    if let Some(n) = plan.mock_max_model_len {
        opts.max_model_len = n;
    }
    if let Some(path) = &plan.mock_profile {
        opts.cost = mocker::StepCost::Profile(mocker::Profile::load(path)?);
    } else if plan.mock_reference_cost {
        opts.cost = mocker::StepCost::Model(mocker::CostModel::default());
    }
    // Keep generated ids inside the tokenizer's vocabulary, so every token has text.
    if tok_vocab < opts.vocab_size {
        opts.output_vocab = Some(opts.output_vocab.unwrap_or(tok_vocab).min(tok_vocab));
    }
    let eng = mocker::build_mock_engine(&opts).context("--engine mock")?;
    let cfg = eng.config().clone();
    Ok((
        EngineHandle::spawn(eng, plan.handle_opts.clone()),
        cfg,
        "mock".into(),
    ))
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
