//! Safetensors checkpoints, single-file or sharded, memory-mapped: tensors are looked up by
//! name and handed to the backend as borrowed bytes with their dtype and shape, so loading
//! copies each weight once, straight into the backend's own storage.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::ModelError;

/// Element types the backends accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
}

/// A tensor as it sits in the checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts to f32 on the host (norm weights, biases: small tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::Bf16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        }
    }

    /// Raw 16-bit values (bf16/f16 bit patterns).
    pub fn to_u16(&self) -> Vec<u16> {
        self.bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint directory.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".to_string()]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                msg: format!("invalid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    msg: "missing \"weight_map\"".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };

        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the checkpoint is treated as read-only for the engine's lifetime; a
            // concurrent writer truncating it is outside what we support.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Config {
                path: path.clone(),
                msg: format!("invalid safetensors: {e}"),
            })?;
            let base = mmap.as_ptr() as usize;
            for (tname, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => DType::F32,
                    Dtype::BF16 => DType::Bf16,
                    Dtype::F16 => DType::F16,
                    other => {
                        return Err(ModelError::Weight {
                            path: path.clone(),
                            tensor: tname,
                            msg: format!("dtype {other:?} is not supported (f32, bf16, f16)"),
                        })
                    }
                };
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                entries.insert(
                    tname,
                    Entry {
                        file: i,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    /// The tensor `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>, ModelError> {
        let (key, e) =
            self.entries
                .get_key_value(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    dir: self.dir(),
                    tensor: name.to_string(),
                })?;
        if e.shape != shape {
            return Err(ModelError::Weight {
                path: self.files[e.file].0.clone(),
                tensor: name.to_string(),
                msg: format!("shape {:?}, expected {:?}", e.shape, shape),
            });
        }
        Ok(HostTensor {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.files[e.file].1[e.start..e.end],
        })
    }

    fn dir(&self) -> PathBuf {
        self.files
            .first()
            .and_then(|(p, _)| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}
