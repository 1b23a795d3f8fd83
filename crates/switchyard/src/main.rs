//! The `switchyard` command line: thin wiring over the library crates.

mod generate;
mod models;
mod placement;
mod serve;
mod sim;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Distributed LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Model utilities.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Engine throughput without HTTP: prefill and decode tokens/s.
    Engine(generate::BenchEngineArgs),
    /// Streamed OpenAI load against `switchyard serve`: latency percentiles, throughput and
    /// the server's CPU per request and per output token.
    Serve(generate::BenchServeArgs),
    /// Measure the engine's step times into a mock-engine profile (--mock-profile).
    Profile(generate::BenchProfileArgs),
    /// Routing on a simulated cluster of mock instances, in virtual time (no HTTP).
    Sim(sim::BenchSimArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a random-weight model in Hugging Face format.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ArchArg::Llama)]
    arch: ArchArg,
    #[arg(long, value_enum, default_value_t = SizeArg::Small)]
    size: SizeArg,
    #[arg(long, value_enum, default_value_t = DTypeArg::Bf16)]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

#[derive(Clone, Copy, ValueEnum)]
enum SizeArg {
    Tiny,
    Small,
    #[value(name = "1b")]
    OneB,
    #[value(name = "8b")]
    EightB,
    /// Llama-3-70B's shape: 141 GB in bf16, for tensor-parallel runs on several GPUs.
    #[value(name = "70b")]
    SeventyB,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    Bf16,
    F16,
    F32,
}

/// Errors print as one `error:` line with their causes (no backtrace: they are the user's
/// to act on, not ours to debug), and the exit code is 1.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model {
            command: ModelCommand::Synth(args),
        } => synth_model(args),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench {
            command: BenchCommand::Engine(args),
        } => generate::bench_engine(args),
        Command::Bench {
            command: BenchCommand::Profile(args),
        } => generate::bench_profile(args),
        Command::Bench {
            command: BenchCommand::Sim(args),
        } => sim::bench_sim(args),
        Command::Bench {
            command: BenchCommand::Serve(args),
        } => generate::bench_serve(args),
    }
}

fn synth_model(args: SynthArgs) -> Result<()> {
    let opts = synth::SynthOptions {
        out: args.out,
        arch: match args.arch {
            ArchArg::Llama => synth::Arch::Llama,
            ArchArg::Mistral => synth::Arch::Mistral,
            ArchArg::Qwen2 => synth::Arch::Qwen2,
            ArchArg::Qwen3 => synth::Arch::Qwen3,
        },
        size: match args.size {
            SizeArg::Tiny => synth::Size::Tiny,
            SizeArg::Small => synth::Size::Small,
            SizeArg::OneB => synth::Size::OneB,
            SizeArg::EightB => synth::Size::EightB,
            SizeArg::SeventyB => synth::Size::SeventyB,
        },
        dtype: match args.dtype {
            DTypeArg::Bf16 => synth::DType::Bf16,
            DTypeArg::F16 => synth::DType::F16,
            DTypeArg::F32 => synth::DType::F32,
        },
        seed: args.seed,
        progress: true,
    };
    synth::synthesize(&opts)?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}
