//! `switchyard generate` (one prompt, streamed to stdout), `switchyard bench engine` and
//! `switchyard bench serve`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engine::backend::cpu::{kernels, CpuBackend};
use engine::backend::cuda::{CudaBackend, CudaOptions};
use engine::core::{
    EngineHandle, Executor, GenerateRequest, HandleOptions, LlmEngine, SamplingParams,
};
use engine::model::{
    build_cpu_tp_engine, build_engine, build_tp_engine, cpu_tp_backends, EngineOptions, ModelError,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    /// An NVIDIA GPU (needs a binary built with `--features cuda`).
    Cuda,
}

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    #[arg(long, value_enum, default_value_t = Device::Cpu, env = "SWITCHYARD_DEVICE")]
    pub device: Device,
    /// CUDA device ordinal (the first rank's with --tp above 1: the ranks take it and the
    /// ordinals after it).
    #[arg(long, default_value_t = 0, env = "SWITCHYARD_CUDA_DEVICE")]
    pub cuda_device: usize,
    /// CUDA device ordinals of the ranks, comma separated (e.g. 2,3): one per rank, in
    /// rank order. Sets --tp to their count.
    #[arg(
        long,
        env = "SWITCHYARD_CUDA_DEVICES",
        value_delimiter = ',',
        conflicts_with = "cuda_device"
    )]
    pub cuda_devices: Option<Vec<usize>>,
    /// Tensor-parallel ranks: with --device cuda, one GPU each joined by NCCL; on the CPU,
    /// an emulation that runs the same sharded math with no speed-up.
    #[arg(long, env = "SWITCHYARD_TP", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tp: u16,
    /// Fraction of GPU memory for weights, KV cache and activations (cuda only).
    #[arg(long, default_value_t = 0.9, env = "SWITCHYARD_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f32,
}

impl DeviceArgs {
    /// Opens the GPU; a missing driver or library is one line of error.
    pub fn cuda_backend(&self) -> Result<CudaBackend> {
        Ok(CudaBackend::new(CudaOptions {
            device: self.cuda_devices()?[0],
            gpu_memory_utilization: self.gpu_memory_utilization,
        })?)
    }

    /// The number of tensor-parallel ranks, checked against --cuda-devices.
    pub fn ranks(&self) -> Result<usize> {
        let tp = usize::from(self.tp);
        match &self.cuda_devices {
            None => Ok(tp),
            Some(_) if self.device != Device::Cuda => {
                anyhow::bail!("--cuda-devices needs --device cuda")
            }
            Some(list) if list.is_empty() => anyhow::bail!("--cuda-devices is empty"),
            Some(list) if tp > 1 && tp != list.len() => anyhow::bail!(
                "--tp {tp} does not match --cuda-devices, which lists {} GPUs",
                list.len()
            ),
            Some(list) => {
                let mut seen = list.clone();
                seen.sort_unstable();
                if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                    anyhow::bail!("--cuda-devices lists GPU {} twice", w[0]);
                }
                Ok(list.len())
            }
        }
    }

    /// The CUDA ordinal of every rank, in rank order.
    pub fn cuda_devices(&self) -> Result<Vec<usize>> {
        let ranks = self.ranks()?;
        Ok(match &self.cuda_devices {
            Some(list) => list.clone(),
            None => (self.cuda_device..self.cuda_device + ranks).collect(),
        })
    }

    /// One CUDA backend per rank, their all-reduce joined (NCCL).
    pub fn cuda_tp_group(&self) -> Result<Vec<CudaBackend>> {
        let devices = self.cuda_devices()?;
        Ok(CudaBackend::tp_group(
            CudaOptions {
                device: devices[0],
                gpu_memory_utilization: self.gpu_memory_utilization,
            },
            &devices,
        )?)
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (default: a small synthetic model).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep going past the model's end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object with the prompt and output token ids instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Compute threads (default: all cores).
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(clap::Args)]
pub struct BenchEngineArgs {
    /// Hugging Face model directory (default: the small synthetic model).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 8)]
    prefill_prompts: usize,
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Device memory bandwidth for the batch-1 bound (default: measured on the host for
    /// cpu; for cuda, the H100 copy rate measured in shared/GPU.md).
    #[arg(long)]
    memory_bandwidth_gbs: Option<f64>,
}

#[derive(clap::Args)]
pub struct BenchProfileArgs {
    /// Hugging Face model directory (default: the small synthetic model).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Where to write the profile (JSON, the format `--mock-profile` reads).
    #[arg(long)]
    out: PathBuf,
    /// Prompt lengths of the prefill points, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048,4096")]
    prefill_tokens: Vec<usize>,
    /// Batch sizes of the decode points.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    batch: Vec<usize>,
    /// Context lengths (per sequence) of the decode points.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    context: Vec<usize>,
    /// Timed steps per point; the median is kept.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// KV cache to allocate, in tokens; decode points needing more are skipped.
    #[arg(long, default_value_t = 262_144)]
    kv_tokens: usize,
    #[arg(long, env = "SWITCHYARD_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchEndpoint {
    Chat,
    Completions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchWorkload {
    /// Random prompts of --prompt-tokens, optionally in --prefix-groups.
    Synthetic,
    /// --conversations chats of --turns turns, each turn's prompt extending the previous.
    MultiTurn,
    /// Replay of a Mooncake trace (--trace), its prefix blocks as shared token blocks.
    Mooncake,
}

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// Server to load (127.0.0.1 only); ignored with --spawn.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Start `switchyard serve` on a free port (with --serve-args) and stop it at the end;
    /// its CPU is measured.
    #[arg(long)]
    spawn: bool,
    /// Arguments for the spawned server, e.g. "--model DIR --threads 1".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    serve_args: String,
    /// PID of the server at --url, to measure its CPU.
    #[arg(long, conflicts_with = "spawn")]
    server_pid: Option<u32>,
    /// Served model name (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// `completions` sends prompts as token ids (exact lengths); `chat` sends text.
    #[arg(long, value_enum, default_value_t = BenchEndpoint::Completions)]
    endpoint: BenchEndpoint,
    /// What to send.
    #[arg(long, value_enum, default_value_t = BenchWorkload::Synthetic)]
    workload: BenchWorkload,
    /// Requests to send in all (synthetic) [default: 64].
    #[arg(long)]
    requests: Option<usize>,
    /// Requests in flight at once, or conversations with --workload multi-turn (closed
    /// loop; the default, 16, unless --rate is given or a trace is replayed).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Mean arrivals per second (open loop, Poisson arrivals; with multi-turn, of
    /// conversations). A trace is replayed at its own times unless this or --concurrency
    /// is given.
    #[arg(long)]
    rate: Option<f64>,
    /// Prompt length (synthetic) [default: 128].
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Output tokens per request or turn (sent with ignore_eos, so counts are exact)
    /// [default: 128].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Requests are spread over this many groups sharing a prompt prefix (synthetic; 0: none).
    #[arg(long)]
    prefix_groups: Option<usize>,
    /// Length of each group's shared prefix, within --prompt-tokens.
    #[arg(long)]
    prefix_tokens: Option<usize>,
    /// Conversations (multi-turn) [default: 8].
    #[arg(long)]
    conversations: Option<usize>,
    /// Turns per conversation (multi-turn) [default: 4].
    #[arg(long)]
    turns: Option<usize>,
    /// Tokens of each new user message (multi-turn) [default: 64].
    #[arg(long)]
    user_tokens: Option<usize>,
    /// Tokens standing in for each previous answer in the next turn's prompt: fixed,
    /// seeded tokens rather than the model's output, so runs are reproducible
    /// (multi-turn) [default: --max-tokens].
    #[arg(long)]
    answer_tokens: Option<usize>,
    /// Mooncake trace to replay (JSON lines of timestamp, input_length, output_length,
    /// hash_ids).
    #[arg(long, required_if_eq("workload", "mooncake"))]
    trace: Option<PathBuf>,
    /// Replay the trace this many times faster (mooncake) [default: 1].
    #[arg(long)]
    speedup: Option<f64>,
    /// Tokens per trace block; prompts scale by this / 512, keeping the sharing structure
    /// (mooncake; a multiple of the server's KV block size, 16, to line up with its
    /// cache) [default: 512].
    #[arg(long)]
    trace_block_tokens: Option<usize>,
    /// Replay only the trace's first N requests (mooncake).
    #[arg(long)]
    max_requests: Option<usize>,
    /// Cap on each trace request's output length (mooncake).
    #[arg(long)]
    max_output_tokens: Option<u32>,
    /// Goodput counts requests whose time to first token is at most this.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// Goodput counts requests whose longest gap between streamed token chunks is at most
    /// this (the per-request maximum, not the mean).
    #[arg(long)]
    slo_itl_ms: Option<f64>,
    /// Prompt token ids are drawn from [0, VOCAB); keep it within the model's ordinary
    /// tokens (the synthetic models put their special tokens at the top, from 507 up in
    /// the tiny one).
    #[arg(long, default_value_t = 500)]
    vocab: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds each request may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Device-to-device copy rate measured on the H100 (bytes read + written), shared/GPU.md.
const H100_COPY_GBS: f64 = 3019.0;

/// A progress bar that appears only if loading takes more than a moment.
pub struct LoadProgress {
    start: Instant,
    bar: Option<ProgressBar>,
}

impl LoadProgress {
    pub fn new() -> Self {
        LoadProgress {
            start: Instant::now(),
            bar: None,
        }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        if self.bar.is_none() && self.start.elapsed() > Duration::from_millis(300) && done < total {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "loading weights {bar:40} {bytes}/{total_bytes} {eta}",
                )
                .expect("valid template"),
            );
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Loads `dir` with a progress bar.
fn load_with<E: Executor>(
    dir: &Path,
    load: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<LlmEngine<E>, ModelError>,
) -> Result<LlmEngine<E>> {
    let mut progress = LoadProgress::new();
    let eng = load(&mut |d, t| progress.update(d, t))
        .with_context(|| format!("loading {}", dir.display()))?;
    progress.finish();
    Ok(eng)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if let Some(n) = args.threads {
        kernels::set_num_threads(n);
    }
    let dir = models::resolve(args.model.clone())?;
    let opts = EngineOptions::default();
    let ranks = args.device.ranks()?;
    match (args.device.device, ranks) {
        (Device::Cpu, 1) => {
            let eng = load_with(&dir, |p| build_engine(&dir, CpuBackend::new(), &opts, p))?;
            generate_on(args, eng, &dir)
        }
        (Device::Cpu, n) => {
            let eng = load_with(&dir, |p| build_cpu_tp_engine(&dir, n, &opts, p))?;
            generate_on(args, eng, &dir)
        }
        (Device::Cuda, 1) => {
            let backend = args.device.cuda_backend()?;
            let eng = load_with(&dir, |p| build_engine(&dir, backend, &opts, p))?;
            generate_on(args, eng, &dir)
        }
        (Device::Cuda, _) => {
            let backends = args.device.cuda_tp_group()?;
            let eng = load_with(&dir, |p| build_tp_engine(&dir, backends, &opts, p))?;
            generate_on(args, eng, &dir)
        }
    }
}

fn generate_on<E: Executor>(args: GenerateArgs, eng: LlmEngine<E>, dir: &Path) -> Result<()> {
    let tokenizer = tokens::Tokenizer::from_dir(dir)?;
    let prompt_ids = tokenizer.encode(&args.prompt, true)?;
    let handle = EngineHandle::spawn(eng, HandleOptions::default());
    let req = GenerateRequest {
        prompt: prompt_ids.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: args.ignore_eos,
    };
    let mut stream = match handle.submit(req) {
        Ok(s) => s,
        Err(e) => {
            handle.shutdown();
            anyhow::bail!("{e}");
        }
    };
    // The prompt's last tokens give the first generated token its context (leading space).
    let mut detok = tokens::IncrementalDetokenizer::with_prompt(&tokenizer, &prompt_ids, true);
    let mut out_ids = Vec::new();
    let mut finish = None;
    let stdout = std::io::stdout();
    while let Some(ev) = stream.blocking_next() {
        if let Some(t) = ev.token {
            out_ids.push(t);
            let text = detok.push(t)?;
            if !args.json && !text.is_empty() {
                let mut lock = stdout.lock();
                lock.write_all(text.as_bytes())?;
                lock.flush()?;
            }
        }
        if ev.finish_reason.is_some() {
            finish = ev.finish_reason;
        }
    }
    let tail = detok.finish()?;
    if args.json {
        let text = tokenizer.decode(&out_ids, true)?;
        let v = serde_json::json!({
            "prompt": args.prompt,
            "prompt_ids": prompt_ids,
            "output_ids": out_ids,
            "text": text,
            "finish_reason": finish,
        });
        println!("{v}");
    } else {
        println!("{tail}");
    }
    handle.shutdown();
    Ok(())
}

pub fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    if args.batch.contains(&0) {
        anyhow::bail!("--batch: every batch size must be at least 1");
    }
    for (name, v) in [
        ("--prompt-len", args.prompt_len),
        ("--decode-tokens", args.decode_tokens),
        ("--prefill-prompts", args.prefill_prompts),
        ("--prefill-len", args.prefill_len),
    ] {
        if v == 0 {
            anyhow::bail!("{name} must be at least 1");
        }
    }
    let model = models::resolve(args.model)?;
    let opts = bench::engine_bench::EngineBenchOptions {
        model,
        batch_sizes: args.batch,
        prompt_len: args.prompt_len,
        decode_tokens: args.decode_tokens,
        prefill_prompts: args.prefill_prompts,
        prefill_len: args.prefill_len,
        threads: args.threads,
    };
    let ranks = args.device.ranks()?;
    let report = match args.device.device {
        Device::Cpu => {
            if let Some(n) = opts.threads {
                kernels::set_num_threads(n);
            }
            let bw = match args.memory_bandwidth_gbs {
                Some(bw) => bw,
                None => kernels::measure_read_bandwidth_gbs(),
            };
            if ranks == 1 {
                bench::engine_bench::run_on(&opts, CpuBackend::new(), bw)?
            } else {
                bench::engine_bench::run_tp_on(&opts, cpu_tp_backends(ranks), bw)?
            }
        }
        Device::Cuda if ranks == 1 => {
            let backend = args.device.cuda_backend()?;
            let bw = args.memory_bandwidth_gbs.unwrap_or(H100_COPY_GBS);
            bench::engine_bench::run_on(&opts, backend, bw)?
        }
        Device::Cuda => {
            let backends = args.device.cuda_tp_group()?;
            // Each rank reads its shard from its own GPU's memory.
            let bw = args
                .memory_bandwidth_gbs
                .unwrap_or(H100_COPY_GBS * ranks as f64);
            bench::engine_bench::run_tp_on(&opts, backends, bw)?
        }
    };
    bench::engine_bench::print_table(&report);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The workload of `bench serve`, refusing flags that belong to another workload.
fn bench_workload(args: &BenchServeArgs) -> Result<bench::workload::Workload> {
    use bench::workload::{MooncakeOptions, MultiTurnOptions, SyntheticOptions, Workload};
    let given = |flag: &'static str, set: bool| set.then_some(flag);
    let synthetic_only = [
        given("--requests", args.requests.is_some()),
        given("--prompt-tokens", args.prompt_tokens.is_some()),
        given("--prefix-groups", args.prefix_groups.is_some()),
        given("--prefix-tokens", args.prefix_tokens.is_some()),
    ];
    let multi_turn_only = [
        given("--conversations", args.conversations.is_some()),
        given("--turns", args.turns.is_some()),
        given("--user-tokens", args.user_tokens.is_some()),
        given("--answer-tokens", args.answer_tokens.is_some()),
    ];
    let mooncake_only = [
        given("--trace", args.trace.is_some()),
        given("--speedup", args.speedup.is_some()),
        given("--trace-block-tokens", args.trace_block_tokens.is_some()),
        given("--max-requests", args.max_requests.is_some()),
        given("--max-output-tokens", args.max_output_tokens.is_some()),
    ];
    let (name, foreign): (&str, Vec<Option<&str>>) = match args.workload {
        BenchWorkload::Synthetic => ("synthetic", [&multi_turn_only[..], &mooncake_only].concat()),
        BenchWorkload::MultiTurn => ("multi-turn", [&synthetic_only[..], &mooncake_only].concat()),
        BenchWorkload::Mooncake => (
            "mooncake",
            [
                &synthetic_only[..],
                &multi_turn_only,
                // The trace sets output lengths; --max-output-tokens caps them.
                &[given("--max-tokens", args.max_tokens.is_some())],
            ]
            .concat(),
        ),
    };
    if let Some(flag) = foreign.into_iter().flatten().next() {
        let hint = match flag {
            "--max-tokens" => " (the trace sets output lengths; --max-output-tokens caps them)",
            "--requests" if name == "mooncake" => " (use --max-requests)",
            "--requests" => " (requests are --conversations x --turns)",
            _ => "",
        };
        anyhow::bail!("{flag} does not apply to --workload {name}{hint}");
    }
    let max_tokens = args.max_tokens.unwrap_or(128);
    Ok(match args.workload {
        BenchWorkload::Synthetic => Workload::Synthetic(SyntheticOptions {
            requests: args.requests.unwrap_or(64),
            prompt_tokens: args.prompt_tokens.unwrap_or(128),
            max_tokens,
            prefix_groups: args.prefix_groups.unwrap_or(0),
            prefix_tokens: args.prefix_tokens.unwrap_or(0),
        }),
        BenchWorkload::MultiTurn => Workload::MultiTurn(MultiTurnOptions {
            conversations: args.conversations.unwrap_or(8),
            turns: args.turns.unwrap_or(4),
            user_tokens: args.user_tokens.unwrap_or(64),
            answer_tokens: args.answer_tokens.unwrap_or(max_tokens as usize),
            max_tokens,
        }),
        BenchWorkload::Mooncake => Workload::Mooncake {
            trace: args.trace.clone().context("--trace is required")?,
            options: MooncakeOptions {
                block_tokens: args
                    .trace_block_tokens
                    .unwrap_or(bench::workload::MOONCAKE_BLOCK_TOKENS),
                speedup: args.speedup.unwrap_or(1.0),
                max_requests: args.max_requests,
                max_output_tokens: args.max_output_tokens,
            },
        },
    })
}

pub fn bench_serve(args: BenchServeArgs) -> Result<()> {
    use bench::serve_bench as sb;
    use bench::workload::Arrivals;
    let workload = bench_workload(&args)?;
    let load = match (args.rate, args.concurrency) {
        (Some(r), _) => Arrivals::Rate(r),
        (None, Some(c)) => Arrivals::Concurrency(c),
        (None, None) => workload.default_arrivals(),
    };
    let target = if args.spawn {
        sb::Target::Spawn {
            bin: std::env::current_exe().context("locating the switchyard binary")?,
            args: args
                .serve_args
                .split_whitespace()
                .map(String::from)
                .collect(),
        }
    } else {
        sb::Target::Url {
            url: args.url,
            pid: args.server_pid,
        }
    };
    let opts = sb::ServeBenchOptions {
        target,
        model: args.model,
        endpoint: match args.endpoint {
            BenchEndpoint::Chat => sb::Endpoint::Chat,
            BenchEndpoint::Completions => sb::Endpoint::Completions,
        },
        workload,
        load,
        vocab: args.vocab,
        seed: args.seed,
        slo: sb::Slo {
            ttft_ms: args.slo_ttft_ms,
            itl_ms: args.slo_itl_ms,
        },
        timeout: Duration::from_secs(args.timeout),
    };
    let report = sb::run(&opts)?;
    sb::print_table(&report);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.failed > 0 {
        anyhow::bail!("{} of {} requests failed", report.failed, report.requests);
    }
    Ok(())
}

pub fn bench_profile(args: BenchProfileArgs) -> Result<()> {
    for (name, list) in [
        ("--prefill-tokens", &args.prefill_tokens),
        ("--batch", &args.batch),
        ("--context", &args.context),
    ] {
        if list.is_empty() || list.contains(&0) {
            anyhow::bail!("{name}: give at least one value, each at least 1");
        }
    }
    if args.repeats == 0 || args.kv_tokens == 0 {
        anyhow::bail!("--repeats and --kv-tokens must be at least 1");
    }
    if args.device.ranks()? > 1 {
        anyhow::bail!("--tp above 1 is not supported by bench profile (profile one rank's GPU)");
    }
    let opts = bench::profile_bench::ProfileBenchOptions {
        model: models::resolve(args.model)?,
        prefill_tokens: args.prefill_tokens,
        batch_sizes: args.batch,
        contexts: args.context,
        repeats: args.repeats,
        kv_tokens: args.kv_tokens,
    };
    let mut progress = |line: &str| eprintln!("{line}");
    let points = match args.device.device {
        Device::Cpu => {
            if let Some(n) = args.threads {
                kernels::set_num_threads(n);
            }
            bench::profile_bench::run_on(&opts, CpuBackend::new(), &mut progress)?
        }
        Device::Cuda => {
            let backend = args.device.cuda_backend()?;
            bench::profile_bench::run_on(&opts, backend, &mut progress)?
        }
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&points)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} prefill and {} decode points to {}",
        points.prefill.len(),
        points.decode.len(),
        args.out.display()
    );
    Ok(())
}
