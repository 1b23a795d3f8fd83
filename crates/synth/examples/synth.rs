//! `cargo run --release -p switchyard-synth --example synth -- --out DIR --arch llama
//! --size tiny --dtype f32 --seed 7`: the `switchyard model synth` command without building
//! the rest of the workspace, for the golden-fixture script and quick timing runs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use synth::{Arch, DType, Size, SynthOptions};

fn main() -> Result<()> {
    let mut opts = SynthOptions {
        out: PathBuf::new(),
        arch: Arch::Llama,
        size: Size::Tiny,
        dtype: DType::Bf16,
        seed: 0,
        progress: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--out" => opts.out = value.into(),
            "--arch" => opts.arch = value.parse()?,
            "--size" => opts.size = value.parse()?,
            "--dtype" => opts.dtype = value.parse()?,
            "--seed" => opts.seed = value.parse().context("--seed")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if opts.out.as_os_str().is_empty() {
        bail!("--out is required");
    }
    let start = Instant::now();
    synth::synthesize(&opts)?;
    eprintln!(
        "wrote {} in {:.2}s",
        opts.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
