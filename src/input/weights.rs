//! The weight files of a checkpoint: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, memory-mapped and indexed by tensor name.
//!
//! Headers are parsed and validated by the `safetensors` crate (offsets in bounds,
//! no holes, the whole file accounted for). On top of that this module checks that
//! the index and the shards agree exactly: every name the index maps is in that
//! shard, every tensor of a shard is mapped to it, and no name appears twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Checkpoints are sharded into files of a few GiB; a list of more than this many
/// shards is not a checkpoint we could have written for, and each shard costs a map.
pub const MAX_SHARDS: usize = 65_536;

/// One memory-mapped weight file.
struct Shard {
    file_name: String,
    map: Mmap,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
struct TensorEntry {
    shard: usize,
    /// `Err(name)` for a dtype flashpack does not read: an error only if the tensor
    /// is one the model needs.
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    /// Absolute byte range within the shard's map.
    start: usize,
    end: usize,
}

/// A tensor's metadata and bytes, borrowed from the memory map.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Little-endian element data, `numel * dtype.size_bytes()` long.
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        crate::dtype::widen(self.dtype, self.bytes)
    }
}

/// All weight files of a checkpoint, indexed by tensor name.
pub struct WeightFiles {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    /// Sum of the weight files' sizes.
    pub bytes_on_disk: u64,
    /// `Some(index path)` when the checkpoint is sharded.
    pub index: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightFiles {
    /// Opens `model.safetensors.index.json` and its shards if the index exists,
    /// else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let index_path = dir.join(INDEX_FILE);
        if crate::input::file_present(&index_path)? {
            return WeightFiles::open_sharded(dir, &index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if !crate::input::file_present(&single)? {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "model.safetensors or model.safetensors.index.json \
                       (flashpack reads safetensors checkpoints, not pytorch_model.bin)",
            });
        }
        let mut files = WeightFiles {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            bytes_on_disk: 0,
            index: None,
        };
        files.add_shard(dir, SINGLE_FILE)?;
        Ok(files)
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<WeightFiles> {
        let index: RawIndex = crate::input::read_json(index_path, INDEX_FILE)?;
        let shard_names: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        if shard_names.is_empty() {
            return Err(Error::InvalidConfig {
                path: index_path.to_path_buf(),
                message: "weight_map is empty".into(),
            });
        }
        if shard_names.len() > MAX_SHARDS {
            return Err(Error::InvalidConfig {
                path: index_path.to_path_buf(),
                message: format!("{} shards exceed the cap {MAX_SHARDS}", shard_names.len()),
            });
        }
        let mut files = WeightFiles {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            bytes_on_disk: 0,
            index: Some(index_path.to_path_buf()),
        };
        for name in &shard_names {
            if !is_plain_file_name(name) {
                return Err(Error::BadShardName {
                    index: index_path.to_path_buf(),
                    file: name.to_string(),
                });
            }
            files.add_shard(dir, name)?;
        }
        // The index and the shards must agree exactly, in both directions.
        for (tensor, file) in &index.weight_map {
            let in_that_shard = files
                .tensors
                .get(tensor)
                .is_some_and(|e| files.shards[e.shard].file_name == *file);
            if !in_that_shard {
                return Err(Error::IndexTensorNotInShard {
                    index: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    file: file.clone(),
                });
            }
        }
        for (tensor, entry) in &files.tensors {
            if !index.weight_map.contains_key(tensor) {
                return Err(Error::ShardTensorNotInIndex {
                    index: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    file: files.shards[entry.shard].file_name.clone(),
                });
            }
        }
        Ok(files)
    }

    fn add_shard(&mut self, dir: &Path, file_name: &str) -> Result<()> {
        let path = dir.join(file_name);
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            return Err(Error::WrongKind {
                path,
                found: if meta.is_dir() {
                    "is a directory"
                } else {
                    "is not a regular file"
                },
                expected: "a safetensors file",
            });
        }
        let len = meta.len();
        let bad = |message: String| Error::Safetensors {
            path: path.clone(),
            message,
        };
        if len < 8 {
            return Err(bad(format!(
                "file is {len} bytes, shorter than the 8-byte header length"
            )));
        }
        // SAFETY: the map is read-only. Another process truncating or rewriting the
        // file while we run could change what we read (or fault); that is the contract
        // of every memory-mapped reader, including safetensors' own loaders.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header_len;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let entry = TensorEntry {
                shard,
                dtype: DType::from_safetensors(info.dtype)
                    .ok_or_else(|| format!("{:?}", info.dtype)),
                shape: info.shape.clone(),
                // read_metadata checked these against the buffer, without overflow.
                start: data_start + start,
                end: data_start + end,
            };
            if let Some(previous) = self.tensors.insert(name.clone(), entry) {
                return Err(Error::DuplicateTensor {
                    tensor: name,
                    first: self.shards[previous.shard].file_name.clone(),
                    second: file_name.to_string(),
                });
            }
        }
        self.bytes_on_disk += len;
        self.shards.push(Shard {
            file_name: file_name.to_string(),
            map,
        });
        Ok(())
    }

    /// A tensor by name, with a readable dtype.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, entry) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| Error::MissingTensor {
                    tensor: name.to_string(),
                })?;
        let dtype = entry
            .dtype
            .clone()
            .map_err(|dtype| Error::UnsupportedDtype {
                tensor: name.to_string(),
                dtype,
            })?;
        Ok(TensorRef {
            name: key,
            dtype,
            shape: &entry.shape,
            bytes: &self.shards[entry.shard].map[entry.start..entry.end],
        })
    }

    /// A tensor that must have `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let tensor = self.get(name)?;
        if tensor.shape != shape {
            return Err(Error::TensorShape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: tensor.shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Makes the row blocks of a fused `[sum of rows, in_dim]` tensor readable
    /// under their own names (Phi-3's `qkv_proj` as q, k and v; `gate_up_proj`
    /// as gate and up): each block is a contiguous byte range of the fused one.
    pub fn add_row_split(&mut self, fused: &crate::input::tensors::FusedTensor) -> Result<()> {
        let rows: usize = fused.parts.iter().map(|(_, r)| r).sum();
        let dtype = self.get_shaped(&fused.name, &[rows, fused.in_dim])?.dtype;
        let entry = self.tensors[&fused.name].clone();
        let row_bytes = fused.in_dim * dtype.size_bytes();
        let mut start = entry.start;
        for (name, r) in &fused.parts {
            if self.tensors.contains_key(name) {
                return Err(Error::InvalidArgument(format!(
                    "tensor {name} is stored both alone and inside the fused {}",
                    fused.name
                )));
            }
            let end = start + r * row_bytes;
            self.tensors.insert(
                name.clone(),
                TensorEntry {
                    shape: vec![*r, fused.in_dim],
                    start,
                    end,
                    ..entry.clone()
                },
            );
            start = end;
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The weight files, in the order they were opened.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().map(|s| s.file_name.as_str())
    }
}

/// A shard name must stay inside the checkpoint directory.
fn is_plain_file_name(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        )
}
