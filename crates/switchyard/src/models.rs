//! Where models come from when the user names none: a small synthetic model written once
//! into the cache directory.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The cache root: `$SWITCHYARD_CACHE`, else `$XDG_CACHE_HOME/switchyard`, else
/// `~/.cache/switchyard`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWITCHYARD_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("switchyard");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("switchyard")
}

/// The model to use: `given`, or the default synthetic model (created on first use).
pub fn resolve(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.join("config.json").exists() {
            anyhow::bail!("--model {}: no config.json there", p.display());
        }
        return Ok(p);
    }
    let dir = cache_dir().join("models").join("llama-small-bf16-seed0");
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().expect("has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    remove_abandoned_temp_dirs(parent);
    // Write beside the target and rename, so an interrupted run leaves no half model.
    let tmp = parent.join(format!(".tmp-{}", std::process::id()));
    eprintln!(
        "no --model given: synthesizing the default small model into {}",
        dir.display()
    );
    synth::synthesize(&synth::SynthOptions {
        out: tmp.clone(),
        arch: synth::Arch::Llama,
        size: synth::Size::Small,
        dtype: synth::DType::Bf16,
        seed: 0,
        progress: true,
    })?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another process won the race; use its copy.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).with_context(|| format!("moving model into {}", dir.display())),
    }
    Ok(dir)
}

/// Removes `.tmp-<pid>` directories left by runs that were stopped mid-synthesis (their
/// process no longer exists).
fn remove_abandoned_temp_dirs(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let alive = std::path::Path::new("/proc").join(pid).exists();
        if !alive && pid.parse::<u32>().is_ok() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
