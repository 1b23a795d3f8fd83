//! `switchyard generate` (one prompt, streamed to stdout) and `switchyard bench engine`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engine::backend::cpu::{kernels, CpuBackend};
use engine::core::{EngineHandle, GenerateRequest, HandleOptions, SamplingParams};
use engine::model::{build_engine, EngineOptions, ModelExecutor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;

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
}

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

fn load_cpu_engine(
    dir: &Path,
    opts: &EngineOptions,
) -> Result<engine::core::LlmEngine<ModelExecutor<CpuBackend>>> {
    let mut progress = LoadProgress::new();
    let eng = build_engine(dir, CpuBackend::new(), opts, &mut |d, t| {
        progress.update(d, t)
    })
    .with_context(|| format!("loading {}", dir.display()))?;
    progress.finish();
    Ok(eng)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if let Some(n) = args.threads {
        kernels::set_num_threads(n);
    }
    let dir = models::resolve(args.model)?;
    let tokenizer = tokens::Tokenizer::from_dir(&dir)?;
    let prompt_ids = tokenizer.encode(&args.prompt, true)?;
    let eng = load_cpu_engine(&dir, &EngineOptions::default())?;
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
    let mut detok = tokens::IncrementalDetokenizer::new(tokenizer.clone(), true);
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
    let report = bench::engine_bench::run(&opts)?;
    bench::engine_bench::print_table(&report);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
