//! Streaming safetensors writer for random weights. The header is computed up front from the
//! tensor list (so nothing has to be held in memory), tensors are cut into fixed-size chunks
//! whose values depend only on (seed, tensor name, chunk index), chunks are generated in
//! parallel and written in order through [`crate::pipeline`]. Checkpoints above
//! [`SHARD_LIMIT_BYTES`] are split the way `save_pretrained` does it:
//! `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::rng::Rng;
use crate::spec::{Init, TensorSpec};
use crate::{DType, SynthError};

/// Largest shard; a checkpoint this size or smaller is one `model.safetensors`.
pub const SHARD_LIMIT_BYTES: u64 = 4 << 30;

/// Elements per generated chunk. Part of the output definition: changing it changes every
/// tensor larger than one chunk.
pub const CHUNK_ELEMS: usize = 1 << 20;

/// Chunks allowed in flight per worker thread; with 4 MiB chunks (f32) and 16 threads this
/// caps buffered data at 256 MiB.
const WINDOW_PER_THREAD: usize = 4;

/// One output file.
#[derive(Debug)]
struct Shard {
    file_name: String,
    /// Length prefix plus padded JSON header.
    header: Vec<u8>,
    tensors: Vec<usize>,
}

/// A piece of work: `len` elements of tensor `tensor`, starting at chunk `chunk`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    shard: usize,
    tensor: usize,
    chunk: usize,
    len: usize,
}

/// Writes every tensor of `tensors` into `dir`, sharding when needed. Returns the names of
/// the files written.
pub fn write_weights(
    dir: &Path,
    tensors: &[TensorSpec],
    dtype: DType,
    seed: u64,
    progress: bool,
) -> Result<Vec<String>, SynthError> {
    write_weights_sharded(dir, tensors, dtype, seed, progress, SHARD_LIMIT_BYTES)
}

fn write_weights_sharded(
    dir: &Path,
    tensors: &[TensorSpec],
    dtype: DType,
    seed: u64,
    progress: bool,
    shard_limit: u64,
) -> Result<Vec<String>, SynthError> {
    let shards = plan_shards(tensors, dtype, shard_limit)?;
    let chunks: Vec<Chunk> = shards
        .iter()
        .enumerate()
        .flat_map(|(s, shard)| shard.tensors.iter().map(move |&t| (s, t)))
        .flat_map(|(shard, tensor)| {
            let numel = tensors[tensor].numel();
            (0..numel.div_ceil(CHUNK_ELEMS)).map(move |chunk| Chunk {
                shard,
                tensor,
                chunk,
                len: CHUNK_ELEMS.min(numel - chunk * CHUNK_ELEMS),
            })
        })
        .collect();

    let total_bytes: u64 = tensors.iter().map(|t| byte_len(t, dtype)).sum();
    let bar = if progress {
        let bar = ProgressBar::new(total_bytes);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} weights [{elapsed_precise}] [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
             ({binary_bytes_per_sec}, eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut current: Option<(usize, File, PathBuf)> = None;
    let mut write_chunk = |_: usize, (c, bytes): (Chunk, Vec<u8>)| -> Result<(), SynthError> {
        if current.as_ref().map(|(s, _, _)| *s) != Some(c.shard) {
            let shard = &shards[c.shard];
            let path = dir.join(&shard.file_name);
            let mut f = File::create(&path).map_err(|e| SynthError::io(&path, e))?;
            f.write_all(&shard.header)
                .map_err(|e| SynthError::io(&path, e))?;
            current = Some((c.shard, f, path));
        }
        if let Some((_, f, path)) = current.as_mut() {
            f.write_all(&bytes).map_err(|e| SynthError::io(path, e))?;
        }
        bar.inc(bytes.len() as u64);
        Ok(())
    };
    crate::pipeline::run_ordered(
        chunks.len(),
        threads,
        threads * WINDOW_PER_THREAD,
        |i| {
            let c = chunks[i];
            (
                c,
                generate_chunk(&tensors[c.tensor], c.chunk, c.len, dtype, seed),
            )
        },
        &mut write_chunk,
    )?;
    bar.finish_and_clear();

    if shards.len() > 1 {
        let index = index_json(&shards, tensors, total_bytes);
        crate::write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(shards.into_iter().map(|s| s.file_name).collect())
}

fn byte_len(t: &TensorSpec, dtype: DType) -> u64 {
    t.numel() as u64 * dtype.size_bytes() as u64
}

/// Greedy, in file order: a new shard starts when the next tensor would overflow the limit.
fn plan_shards(tensors: &[TensorSpec], dtype: DType, limit: u64) -> Result<Vec<Shard>, SynthError> {
    let total: u64 = tensors.iter().map(|t| byte_len(t, dtype)).sum();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    if total <= limit {
        groups.push((0..tensors.len()).collect());
    } else {
        let mut size = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            let n = byte_len(t, dtype);
            match groups.last_mut() {
                Some(g) if size + n <= limit => {
                    g.push(i);
                    size += n;
                }
                _ => {
                    groups.push(vec![i]);
                    size = n;
                }
            }
        }
    }
    let count = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, group)| {
            let file_name = if count == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", k + 1)
            };
            Ok(Shard {
                header: safetensors_header(tensors, &group, dtype)?,
                file_name,
                tensors: group,
            })
        })
        .collect()
}

/// The 8-byte little-endian length, then the JSON header padded with spaces so the data
/// section starts 8-byte aligned (as the safetensors spec recommends).
fn safetensors_header(
    tensors: &[TensorSpec],
    group: &[usize],
    dtype: DType,
) -> Result<Vec<u8>, SynthError> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for &i in group {
        let t = &tensors[i];
        let end = offset + byte_len(t, dtype);
        header.insert(
            t.name.clone(),
            json!({
                "dtype": dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(header))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    Ok(out)
}

fn index_json(shards: &[Shard], tensors: &[TensorSpec], total_bytes: u64) -> Value {
    let weight_map: Map<String, Value> = shards
        .iter()
        .flat_map(|s| {
            s.tensors
                .iter()
                .map(move |&i| (tensors[i].name.clone(), json!(s.file_name)))
        })
        .collect();
    json!({
        "metadata": { "total_size": total_bytes },
        "weight_map": weight_map,
    })
}

/// Values of chunk `chunk` of tensor `t`, encoded little-endian in `dtype`.
pub fn generate_chunk(
    t: &TensorSpec,
    chunk: usize,
    len: usize,
    dtype: DType,
    seed: u64,
) -> Vec<u8> {
    let mut rng = Rng::for_stream(seed, &t.name, chunk as u64);
    let (scale, offset) = match t.init {
        Init::Normal { std } => (std, 0.0),
        Init::NearOne => (0.1, 1.0),
    };
    let mut value = move || offset + scale * rng.normalish();
    let mut out = vec![0u8; len * dtype.size_bytes()];
    match dtype {
        DType::F32 => out
            .chunks_exact_mut(4)
            .for_each(|d| d.copy_from_slice(&value().to_le_bytes())),
        DType::Bf16 => out
            .chunks_exact_mut(2)
            .for_each(|d| d.copy_from_slice(&bf16::from_f32(value()).to_le_bytes())),
        DType::F16 => out
            .chunks_exact_mut(2)
            .for_each(|d| d.copy_from_slice(&f16::from_f32(value()).to_le_bytes())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init: Init::Normal { std: 1.0 },
        }
    }

    #[test]
    fn header_is_aligned_and_parses() {
        let tensors = [t("a", &[3, 5]), t("bb", &[7])];
        let h = safetensors_header(&tensors, &[0, 1], DType::Bf16).unwrap();
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        assert_eq!(h.len() % 8, 0);
        let v: Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(v["bb"]["data_offsets"], json!([30, 44]));
        assert_eq!(v["a"]["dtype"], "BF16");
    }

    #[test]
    fn shards_split_on_the_limit_and_keep_order() {
        // 3 tensors of 1.5 GiB in f32: two shards, the third tensor starting the second.
        let big = (3usize << 30) / 8;
        let tensors = [t("x", &[big]), t("y", &[big]), t("z", &[big])];
        let shards = plan_shards(&tensors, DType::F32, SHARD_LIMIT_BYTES).unwrap();
        let groups: Vec<_> = shards.iter().map(|s| s.tensors.clone()).collect();
        assert_eq!(groups, vec![vec![0, 1], vec![2]]);
        assert_eq!(shards[1].file_name, "model-00002-of-00002.safetensors");
        let single = plan_shards(&tensors[..1], DType::F32, SHARD_LIMIT_BYTES).unwrap();
        assert_eq!(single[0].file_name, "model.safetensors");
    }

    #[test]
    fn sharded_checkpoint_reads_back() {
        use safetensors::SafeTensors;
        let dir = tempfile::tempdir().unwrap();
        // The middle tensor spans several generation chunks.
        let tensors = [t("a", &[3, 1000]), t("b", &[CHUNK_ELEMS + 5]), t("c", &[7])];
        let limit = (CHUNK_ELEMS as u64 + 5) * 2;
        let files =
            write_weights_sharded(dir.path(), &tensors, DType::Bf16, 9, false, limit).unwrap();
        assert_eq!(
            files,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        let index: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let total = (3000 + CHUNK_ELEMS + 5 + 7) * 2;
        assert_eq!(index["metadata"]["total_size"], json!(total));
        for t in &tensors {
            let file = index["weight_map"][&t.name].as_str().unwrap();
            let bytes = std::fs::read(dir.path().join(file)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.shape(), t.shape.as_slice());
            assert_eq!(view.dtype(), safetensors::Dtype::BF16);
            // Bytes equal what the chunk generator makes, chunk by chunk.
            let mut expected = Vec::new();
            for (k, start) in (0..t.numel()).step_by(CHUNK_ELEMS).enumerate() {
                let len = CHUNK_ELEMS.min(t.numel() - start);
                expected.extend(generate_chunk(t, k, len, DType::Bf16, 9));
            }
            assert_eq!(view.data(), expected.as_slice(), "{}", t.name);
        }
    }

    #[test]
    fn chunk_values_follow_init_and_dtype() {
        let norm = TensorSpec {
            name: "n".into(),
            shape: vec![1000],
            init: Init::NearOne,
        };
        let bytes = generate_chunk(&norm, 0, 1000, DType::F32, 3);
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert!(vals.iter().all(|v| (0.6..1.4).contains(v)));
        let mean = vals.iter().sum::<f32>() / 1000.0;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");

        let bf = generate_chunk(&norm, 0, 1000, DType::Bf16, 3);
        let first = bf16::from_le_bytes([bf[0], bf[1]]);
        assert_eq!(first, bf16::from_f32(vals[0]));
    }
}
