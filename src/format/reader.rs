//! Opening a flashpack file: the preamble, the manifest, and every structural rule
//! of `formats/flashpack-v1.md` checked before anything is trusted. Integrity (the
//! hashes) is checked by `integrity.rs`, and by [`PackedFile::read_section`] for
//! whatever it reads.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::error::FormatError;
use crate::format::layout::*;
use crate::input::config::{ModelConfig, RawConfig};
use crate::input::tensors::{FfnNames, ModelNames};

/// Raw chunk sizes above this are not what this format writes, and a reader would
/// have to allocate them whole to decompress one chunk.
pub const MAX_CHUNK_RAW_BYTES: u64 = 64 << 20;
/// A zstd section may expand at most this much: weights compress by a few percent
/// and text by a few times, so a larger claim is a file built to make a reader
/// allocate far more than the file's size.
pub const MAX_COMPRESSION_RATIO: u64 = 1024;

/// An opened flashpack file whose structure has been validated.
pub struct PackedFile {
    pub path: PathBuf,
    file: File,
    pub file_length: u64,
    pub preamble: Preamble,
    pub manifest: Manifest,
    pub config: ModelConfig,
    pub names: ModelNames,
    section_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

fn rule(e: FormatError, path: &Path) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        source: e,
    }
}

impl PackedFile {
    /// Opens `path` and checks rules 1-10, 13 and 16-18 (everything that needs only
    /// the preamble and the manifest).
    pub fn open(path: &Path) -> Result<PackedFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_length = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut pre = [0u8; PREAMBLE_BYTES as usize];
        if file_length < PREAMBLE_BYTES {
            let mut head = vec![0u8; file_length as usize];
            file.read_exact_at(&mut head, 0)
                .map_err(|e| Error::io(path, e))?;
            return Err(rule(FormatError::BadMagic { found: head }, path));
        }
        file.read_exact_at(&mut pre, 0)
            .map_err(|e| Error::io(path, e))?;
        let preamble = Preamble::from_bytes(&pre);
        if preamble.magic != MAGIC {
            return Err(rule(
                FormatError::BadMagic {
                    found: preamble.magic.to_vec(),
                },
                path,
            ));
        }
        if preamble.version != FORMAT_VERSION {
            return Err(rule(
                FormatError::UnsupportedVersion {
                    found: preamble.version,
                    supported: FORMAT_VERSION,
                },
                path,
            ));
        }
        if preamble.flags != 0 {
            return Err(rule(
                FormatError::ReservedFlags {
                    found: preamble.flags,
                },
                path,
            ));
        }
        let placement = FormatError::ManifestPlacement {
            offset: preamble.manifest_offset,
            length: preamble.manifest_length,
            file_length,
            cap: MAX_MANIFEST_BYTES,
        };
        let ends_at_eof = preamble
            .manifest_offset
            .checked_add(preamble.manifest_length)
            == Some(file_length);
        if !ends_at_eof
            || preamble.manifest_offset < PREAMBLE_BYTES
            || preamble.manifest_length > MAX_MANIFEST_BYTES
        {
            return Err(rule(placement, path));
        }
        let mut manifest_bytes = vec![0u8; preamble.manifest_length as usize];
        file.read_exact_at(&mut manifest_bytes, preamble.manifest_offset)
            .map_err(|e| Error::io(path, e))?;
        if Sha256::digest(&manifest_bytes).as_slice() != preamble.manifest_sha256 {
            return Err(rule(FormatError::ManifestHash, path));
        }
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            rule(
                FormatError::ManifestSchema {
                    message: e.to_string(),
                },
                path,
            )
        })?;
        if manifest.format_version != preamble.version {
            return Err(rule(
                FormatError::ManifestSchema {
                    message: format!(
                        "format_version {} differs from the preamble's {}",
                        manifest.format_version, preamble.version
                    ),
                },
                path,
            ));
        }
        check_schema(&manifest)
            .map_err(|message| rule(FormatError::ManifestSchema { message }, path))?;
        let checked = Checker {
            manifest: &manifest,
            manifest_offset: preamble.manifest_offset,
        }
        .check()
        .map_err(|e| rule(e, path))?;
        Ok(PackedFile {
            path: path.to_path_buf(),
            file,
            file_length,
            preamble,
            config: checked.config,
            names: checked.names,
            section_index: checked.section_index,
            tensor_index: checked.tensor_index,
            manifest,
        })
    }

    pub fn section(&self, name: &str) -> Option<&SectionEntry> {
        self.section_index
            .get(name)
            .map(|&i| &self.manifest.sections[i])
    }

    pub fn tensor_entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.manifest.tensors[i])
    }

    /// Reads `length` bytes at absolute `offset` (positioned read, thread-safe).
    pub fn read_at(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; length as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Layer `layer`'s neuron order: `order[p]` is the checkpoint index of
    /// packed neuron `p` (read from the dense section; not checked to be a
    /// permutation here, see rule 19).
    pub fn neuron_order(&self, layer: usize) -> Result<Vec<u32>> {
        let entry = self
            .manifest
            .ffn_layers
            .get(layer)
            .and_then(|l| self.tensor_entry(&l.order_tensor))
            .ok_or_else(|| Error::InvalidArgument(format!("no order tensor for layer {layer}")))?;
        let bytes =
            SectionReader::new(self, DENSE_SECTION)?.read_bytes(entry.offset, entry.length)?;
        Ok(crate::format::layout::decode_order(&bytes))
    }

    /// Reads a whole section, checking every chunk's hash (rule 14) and
    /// decompressing it (rule 15); returns the raw bytes. One stored chunk is
    /// in memory at a time beside the result.
    pub fn read_section(&self, name: &str) -> Result<Vec<u8>> {
        let mut reader = SectionReader::new(self, name)?;
        let length = reader.section.raw_length;
        reader.read_bytes(0, length)
    }
}

/// Random access to one section's raw bytes with one chunk in memory: a chunk
/// is read, hash-checked (rule 14) and decompressed (rule 15) when a range
/// first needs it, and kept until a range needs another. Loading a model
/// tensor by tensor through it holds the model plus one chunk, never the
/// whole section beside the model.
pub struct SectionReader<'a> {
    file: &'a PackedFile,
    section: &'a SectionEntry,
    /// File offset of each stored chunk.
    chunk_offsets: Vec<u64>,
    /// The chunk decoded last: its index and raw bytes.
    current: Option<(usize, Vec<u8>)>,
}

impl<'a> SectionReader<'a> {
    pub fn new(file: &'a PackedFile, name: &str) -> Result<SectionReader<'a>> {
        let section = file.section(name).ok_or_else(|| {
            rule(
                FormatError::SectionTable {
                    message: format!("no section {name:?}"),
                },
                &file.path,
            )
        })?;
        let mut at = section.offset;
        let chunk_offsets = section
            .chunks
            .iter()
            .map(|c| {
                let here = at;
                at += c.length;
                here
            })
            .collect();
        Ok(SectionReader {
            file,
            section,
            chunk_offsets,
            current: None,
        })
    }

    /// Hands the raw bytes `start .. start + length` of the section to `sink`
    /// in order, in pieces that end at chunk boundaries.
    pub fn read_range(
        &mut self,
        start: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let end = start
            .checked_add(length)
            .filter(|&e| e <= self.section.raw_length)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "bytes {start}+{length} are outside section {:?} ({} raw bytes)",
                    self.section.name, self.section.raw_length
                ))
            })?;
        let per_chunk = self.section.chunk_raw_bytes.max(1);
        let mut at = start;
        while at < end {
            let i = (at / per_chunk) as usize;
            let chunk = self.chunk(i)?;
            let from = (at - i as u64 * per_chunk) as usize;
            let to = ((end - i as u64 * per_chunk) as usize).min(chunk.len());
            sink(&chunk[from..to]);
            at += (to - from) as u64;
        }
        Ok(())
    }

    /// The raw bytes `start .. start + length` of the section, in one vector.
    pub fn read_bytes(&mut self, start: u64, length: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(length.min(self.section.raw_length) as usize);
        self.read_range(start, length, &mut |piece| bytes.extend_from_slice(piece))?;
        Ok(bytes)
    }

    /// Chunk `i`'s raw bytes, decoded now unless it is the current one.
    fn chunk(&mut self, i: usize) -> Result<&[u8]> {
        if self.current.as_ref().map(|c| c.0) != Some(i) {
            let (section, path) = (self.section, &self.file.path);
            let entry = section.chunks.get(i).ok_or_else(|| {
                rule(
                    FormatError::ChunkTable {
                        section: section.name.clone(),
                        message: format!("no chunk {i}"),
                    },
                    path,
                )
            })?;
            let offset = self.chunk_offsets[i];
            let stored = self.file.read_at(offset, entry.length)?;
            if hex_sha256(&stored) != entry.sha256 {
                return Err(rule(
                    FormatError::ChunkHash {
                        section: section.name.clone(),
                        chunk: i,
                        offset,
                    },
                    path,
                ));
            }
            let mut raw = match self.current.take() {
                Some((_, mut buf)) => {
                    buf.clear();
                    buf
                }
                None => Vec::new(),
            };
            decode_chunk(section, i, &stored, chunk_raw_length(section, i), &mut raw)
                .map_err(|e| rule(e, path))?;
            self.current = Some((i, raw));
        }
        Ok(&self.current.as_ref().expect("set above").1)
    }
}

/// Raw length of chunk `i`: `chunk_raw_bytes`, except a shorter last chunk.
pub fn chunk_raw_length(section: &SectionEntry, i: usize) -> u64 {
    let start = section.chunk_raw_bytes * i as u64;
    (section.raw_length - start).min(section.chunk_raw_bytes)
}

/// Appends the raw bytes of a stored chunk to `out`, checking its raw length.
pub fn decode_chunk(
    section: &SectionEntry,
    index: usize,
    stored: &[u8],
    raw_length: u64,
    out: &mut Vec<u8>,
) -> std::result::Result<(), FormatError> {
    let fail = |message: String| FormatError::Decompress {
        section: section.name.clone(),
        chunk: index,
        raw_length,
        message,
    };
    match section.compression {
        Compression::None => {
            out.extend_from_slice(stored);
            Ok(())
        }
        Compression::Zstd => {
            let before = out.len();
            // Decode into a buffer of exactly the promised size: a chunk that
            // would expand beyond it is an error, not an allocation.
            out.resize(before + raw_length as usize, 0);
            let n = zstd::bulk::decompress_to_buffer(stored, &mut out[before..])
                .map_err(|e| fail(e.to_string()))?;
            if n as u64 != raw_length {
                return Err(fail(format!("got {n} bytes")));
            }
            Ok(())
        }
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` is a SHA-256 digest as the format writes it: 64 lowercase hex
/// digits. Hashes are compared as strings, so an uppercase digest could never
/// match: it is refused when the manifest is read, not reported as damage.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Rule 6, the types serde cannot express: `config` is an object,
/// `generation_config` and `tokenizer_config` objects or null, and the
/// digests of the provenance and calibration files 64 lowercase hex digits.
fn check_schema(m: &Manifest) -> std::result::Result<(), String> {
    if !m.config.is_object() {
        return Err("`config` is not an object".into());
    }
    for (key, value) in [
        ("generation_config", &m.generation_config),
        ("tokenizer_config", &m.tokenizer_config),
    ] {
        if value.as_ref().is_some_and(|v| !v.is_object()) {
            return Err(format!("`{key}` is neither an object nor null"));
        }
    }
    let files = m
        .provenance
        .source_files
        .iter()
        .map(|f| ("provenance.source_files", f))
        .chain(
            m.calibration
                .iter()
                .flat_map(|c| c.files.iter().map(|f| ("calibration.files", f))),
        )
        .chain(
            m.routing
                .iter()
                .flat_map(|r| r.files.iter().map(|f| ("routing.files", f))),
        );
    for (list, f) in files {
        if !is_sha256_hex(&f.sha256) {
            return Err(format!(
                "{list}: sha256 of {:?} is not 64 lowercase hex digits",
                f.name
            ));
        }
    }
    Ok(())
}

struct Checked {
    config: ModelConfig,
    names: ModelNames,
    section_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

struct Checker<'a> {
    manifest: &'a Manifest,
    manifest_offset: u64,
}

impl Checker<'_> {
    fn check(&self) -> std::result::Result<Checked, FormatError> {
        let m = self.manifest;
        if !(m.alignment.is_power_of_two()
            && (MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&m.alignment))
        {
            return Err(FormatError::Alignment {
                found: m.alignment,
                min: MIN_ALIGNMENT,
                max: MAX_ALIGNMENT,
            });
        }
        let section_index = self.check_section_placement()?;
        for s in &m.sections {
            check_chunks(s)?;
        }
        let tensor_index = self.check_tensors(&section_index)?;
        let (config, names) = self.check_model(&section_index, &tensor_index)?;
        Ok(Checked {
            config,
            names,
            section_index,
            tensor_index,
        })
    }

    /// Rules 8, 9, 10 and 16: sections in file order, aligned, no overlaps, no holes,
    /// unique names, the required ones present, FFN sections uncompressed.
    fn check_section_placement(&self) -> std::result::Result<HashMap<String, usize>, FormatError> {
        let m = self.manifest;
        let mut index = HashMap::new();
        let mut previous_end = PREAMBLE_BYTES;
        for (i, s) in m.sections.iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(FormatError::SectionTable {
                    message: format!("section {:?} appears twice", s.name),
                });
            }
            if s.kind == SectionKind::Ffn && s.compression != Compression::None {
                return Err(FormatError::SectionTable {
                    message: format!("FFN section {:?} is compressed", s.name),
                });
            }
            if s.offset % m.alignment != 0 {
                return Err(FormatError::SectionMisaligned {
                    section: s.name.clone(),
                    offset: s.offset,
                    alignment: m.alignment,
                });
            }
            if s.offset < previous_end {
                return Err(FormatError::SectionOverlap {
                    section: s.name.clone(),
                    offset: s.offset,
                    previous_end,
                });
            }
            let expected = align_up(previous_end, m.alignment).unwrap_or(u64::MAX);
            if s.offset != expected {
                return Err(FormatError::Hole {
                    what: format!("section {:?}", s.name),
                    offset: s.offset,
                    expected,
                });
            }
            previous_end =
                s.offset
                    .checked_add(s.length)
                    .ok_or_else(|| FormatError::SectionOverlap {
                        section: s.name.clone(),
                        offset: s.offset,
                        previous_end,
                    })?;
        }
        if previous_end > self.manifest_offset {
            return Err(FormatError::SectionOverlap {
                section: "manifest".into(),
                offset: self.manifest_offset,
                previous_end,
            });
        }
        if previous_end != self.manifest_offset {
            return Err(FormatError::Hole {
                what: "the manifest".into(),
                offset: self.manifest_offset,
                expected: previous_end,
            });
        }
        // The kind matters, not only the name: the runtime trusts `dense` to hold
        // the tensors, `tokenizer.json` to be the carried file and `predictors`
        // (optional) the predictors.
        for (required, kind, optional) in [
            (DENSE_SECTION, SectionKind::Dense, false),
            (TOKENIZER_SECTION, SectionKind::File, false),
            (PREDICTOR_SECTION, SectionKind::Predictor, true),
        ] {
            let Some(&i) = index.get(required) else {
                if optional {
                    continue;
                }
                return Err(FormatError::SectionTable {
                    message: format!("required section {required:?} is missing"),
                });
            };
            if m.sections[i].kind != kind {
                return Err(FormatError::SectionTable {
                    message: format!(
                        "section {required:?} is of kind {}, must be {}",
                        kind_name(m.sections[i].kind),
                        kind_name(kind)
                    ),
                });
            }
        }
        Ok(index)
    }

    /// Rule 17: every tensor lies inside a dense section, has the byte length its
    /// shape and dtype imply, and overlaps no other tensor.
    fn check_tensors(
        &self,
        sections: &HashMap<String, usize>,
    ) -> std::result::Result<HashMap<String, usize>, FormatError> {
        let m = self.manifest;
        let mut index = HashMap::new();
        let mut extents: Vec<(&str, u64, u64)> = Vec::new();
        for (i, t) in m.tensors.iter().enumerate() {
            let bad = |message: String| FormatError::TensorTable {
                tensor: t.name.clone(),
                message,
            };
            if index.insert(t.name.clone(), i).is_some() {
                return Err(bad("appears twice".into()));
            }
            let section = sections
                .get(&t.section)
                .map(|&s| &m.sections[s])
                .filter(|s| {
                    matches!(
                        s.kind,
                        SectionKind::Dense | SectionKind::Predictor | SectionKind::Selector
                    )
                })
                .ok_or_else(|| {
                    bad(format!(
                        "section {:?} is not a dense, predictor or selector section",
                        t.section
                    ))
                })?;
            if let Some(q) = t.dtype.quant() {
                // Rule 23: rows of whole blocks. (That a block type is 2-D
                // follows from rule 22 and the shapes rule 18 checks.)
                let bytes = t.dtype.tensor_bytes(&t.shape);
                if bytes != Some(t.length) {
                    return Err(FormatError::QuantLayout {
                        what: format!("tensor {:?}", t.name),
                        message: format!(
                            "{q} of shape {:?} needs a last dimension that is a multiple of {} and {} bytes, not {}",
                            t.shape,
                            crate::quant::BLOCK,
                            bytes.map_or("an overflowing number of".to_string(), |b| b.to_string()),
                            t.length
                        ),
                    });
                }
            }
            let bytes = t.dtype.tensor_bytes(&t.shape);
            if bytes != Some(t.length) {
                return Err(bad(format!(
                    "length {} does not match shape {:?} of {:?}",
                    t.length, t.shape, t.dtype
                )));
            }
            match t.offset.checked_add(t.length) {
                // A tensor of no bytes overlaps nothing.
                Some(_) if t.length == 0 && t.offset <= section.raw_length => {}
                Some(end) if end <= section.raw_length => extents.push((&t.section, t.offset, end)),
                _ => {
                    return Err(bad(format!(
                        "extends past the end of section {:?}",
                        t.section
                    )))
                }
            }
        }
        extents.sort();
        for pair in extents.windows(2) {
            if pair[0].0 == pair[1].0 && pair[1].1 < pair[0].2 {
                let name = m
                    .tensors
                    .iter()
                    .find(|t| t.section == pair[1].0 && t.offset == pair[1].1)
                    .map(|t| t.name.clone());
                return Err(FormatError::TensorTable {
                    tensor: name.unwrap_or_default(),
                    message: "overlaps another tensor".into(),
                });
            }
        }
        Ok(index)
    }

    /// Rule 18: the config validates, and the tensor table and FFN layers are
    /// exactly what it implies.
    fn check_model(
        &self,
        sections: &HashMap<String, usize>,
        tensors: &HashMap<String, usize>,
    ) -> std::result::Result<(ModelConfig, ModelNames), FormatError> {
        let m = self.manifest;
        let model = |message: String| FormatError::Model { message };
        let raw: RawConfig =
            serde_json::from_value(m.config.clone()).map_err(|e| model(format!("config: {e}")))?;
        let config = ModelConfig::from_raw(&raw, Path::new("manifest config"))
            .map_err(|e| model(e.to_string()))?;
        let names = ModelNames::for_config(&config);
        let ffn_weights: HashSet<String> = names
            .layers
            .iter()
            .flat_map(|l| l.ffn.projections().into_iter().map(|p| p.weight.clone()))
            .collect();
        for spec in names
            .specs()
            .iter()
            .filter(|s| !ffn_weights.contains(&s.name))
        {
            let entry = tensors
                .get(&spec.name)
                .map(|&i| &m.tensors[i])
                .ok_or_else(|| model(format!("tensor {:?} is missing", spec.name)))?;
            // The runtime reads the architecture's tensors from the dense section
            // (formats/flashpack-v1.md, 3); one placed in the predictor section
            // would be read from the wrong bytes.
            if entry.section != DENSE_SECTION {
                return Err(model(format!(
                    "tensor {:?} is in section {:?}, not {DENSE_SECTION:?}",
                    spec.name, entry.section
                )));
            }
            let shape: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
            if shape != spec.shape || !entry.dtype.is_weight() {
                return Err(model(format!(
                    "tensor {:?} has shape {:?} ({:?}), the config implies {:?}",
                    spec.name, entry.shape, entry.dtype, spec.shape
                )));
            }
        }
        // The layers with a dense FFN (all of them but a mixture-of-experts
        // model's sparse layers), each with one entry, in layer order.
        let sparse = |i: usize| config.moe.as_ref().is_some_and(|moe| moe.sparse_layers[i]);
        let dense_layers: Vec<usize> = (0..config.num_layers).filter(|&i| !sparse(i)).collect();
        let listed: Vec<u64> = m.ffn_layers.iter().map(|l| l.layer).collect();
        let want: Vec<u64> = dense_layers.iter().map(|&i| i as u64).collect();
        if listed != want {
            let message = format!("entries for layers {listed:?}, expected {want:?}");
            return Err(if config.moe.is_some() {
                FormatError::MoeFfnLayers { message }
            } else if m.ffn_layers.len() != config.num_layers {
                model(format!(
                    "{} FFN layers for a {}-layer model",
                    m.ffn_layers.len(),
                    config.num_layers
                ))
            } else {
                model(message)
            });
        }
        // Each layer and expert has its own bundles and order: a section or
        // order tensor named twice would give both the same weights and leave
        // another section unread, which no writer does.
        let mut used: HashMap<&str, String> = HashMap::new();
        for layer in &m.ffn_layers {
            for name in [&layer.section, &layer.order_tensor] {
                if let Some(other) = used.insert(name.as_str(), layer.layer.to_string()) {
                    return Err(model(format!(
                        "FFN layers {other} and {} both name {name:?}",
                        layer.layer
                    )));
                }
            }
        }
        for expert in &m.experts {
            for name in [&expert.section, &expert.order_tensor] {
                let who = format!("expert {} of layer {}", expert.expert, expert.layer);
                if let Some(other) = used.insert(name.as_str(), who.clone()) {
                    let other = if other.starts_with("expert") {
                        other
                    } else {
                        format!("FFN layer {other}")
                    };
                    return Err(FormatError::Experts {
                        message: format!("{other} and {who} both name {name:?}"),
                    });
                }
            }
        }
        for layer in &m.ffn_layers {
            let i = layer.layer as usize;
            let bad = |message: String| model(format!("FFN layer {i}: {message}"));
            let parts: &[BundlePart] = match names.layers[i].ffn {
                FfnNames::Plain { .. } => &[BundlePart::Up, BundlePart::Down],
                FfnNames::Gated { .. } | FfnNames::Moe(_) => {
                    &[BundlePart::Gate, BundlePart::Up, BundlePart::Down]
                }
            };
            self.check_bundles(
                &format!("FFN layer {i}"),
                layer,
                parts,
                (config.ffn_width as u64, config.hidden_size as u64),
                sections,
                tensors,
            )?
            .map_err(bad)?;
        }
        self.check_experts(&config, sections, tensors)?;
        check_routing(m, &config)?;
        self.check_predictors(&config, tensors)?;
        check_quantization(m, &config, &names)?;
        check_selectors(m, &config, sections, tensors)?;
        Ok((config, names))
    }

    /// Rule 18 (4) for one FFN layer's or expert's bundles: parts, widths,
    /// dtype, stride, section and order tensor. A broken chunk table is a rule
    /// 13 error; the rest comes back as the message of the caller's rule.
    /// A quantized stride that is not 9.3's is a rule 23 error (`what` names
    /// the layer or expert).
    fn check_bundles(
        &self,
        what: &str,
        layer: &FfnLayerEntry,
        parts: &[BundlePart],
        (neurons, hidden): (u64, u64),
        sections: &HashMap<String, usize>,
        tensors: &HashMap<String, usize>,
    ) -> std::result::Result<std::result::Result<(), String>, FormatError> {
        let m = self.manifest;
        if layer.parts != parts {
            return Ok(Err(format!("parts {:?}, expected {parts:?}", layer.parts)));
        }
        if layer.neurons != neurons || layer.hidden != hidden {
            return Ok(Err(format!(
                "{} neurons of width {}, expected {neurons} of width {hidden}",
                layer.neurons, layer.hidden
            )));
        }
        if !layer.dtype.is_weight() {
            return Ok(Err("bundles must be f32, f16, bf16, q8_0 or q4_1".into()));
        }
        let stride = match layer.dtype.quant() {
            Some(q) => crate::format::quant_policy::quantized_bundle_bytes(
                q,
                parts.len() as u64,
                layer.hidden,
                m.alignment,
            ),
            None => layer
                .dtype
                .row_bytes(layer.hidden)
                .and_then(|r| r.checked_mul(parts.len() as u64)),
        };
        let Some(stride) = stride else {
            return Err(FormatError::QuantLayout {
                what: what.into(),
                message: format!(
                    "{} bundles need a hidden size that is a multiple of {}, not {}",
                    layer.dtype.name(),
                    crate::quant::BLOCK,
                    layer.hidden
                ),
            });
        };
        if layer.bundle_bytes != stride && layer.dtype.quant().is_some() {
            return Err(FormatError::QuantLayout {
                what: what.into(),
                message: format!(
                    "bundle_bytes {} should be {stride}: {} parts of {} {} blocks, padded as 9.3 says",
                    layer.bundle_bytes,
                    parts.len(),
                    layer.hidden / crate::quant::BLOCK as u64,
                    layer.dtype.name()
                ),
            });
        }
        if layer.bundle_bytes != stride {
            return Ok(Err(format!(
                "bundle_bytes {} should be {stride}",
                layer.bundle_bytes
            )));
        }
        let Some(section) = sections
            .get(&layer.section)
            .map(|&s| &m.sections[s])
            .filter(|s| s.kind == SectionKind::Ffn)
        else {
            return Ok(Err(format!(
                "section {:?} is not an FFN section",
                layer.section
            )));
        };
        if section.raw_length != layer.neurons * stride {
            return Ok(Err(format!(
                "section holds {} bytes, {} bundles of {stride} need {}",
                section.raw_length,
                layer.neurons,
                layer.neurons * stride
            )));
        }
        let max_chunk = FFN_CHUNK_TARGET_BYTES.max(stride);
        if section.chunk_raw_bytes % stride != 0 || section.chunk_raw_bytes > max_chunk {
            return Err(FormatError::ChunkTable {
                section: section.name.clone(),
                message: format!(
                    "chunks of {} bytes must be whole bundles of {stride} and at most {max_chunk}",
                    section.chunk_raw_bytes
                ),
            });
        }
        let order = tensors.get(&layer.order_tensor).map(|&t| &m.tensors[t]);
        if !order.is_some_and(|o| {
            o.dtype == TableDType::U32 && o.shape == [layer.neurons] && o.section == DENSE_SECTION
        }) {
            return Ok(Err(format!(
                "order tensor {:?} must be u32 of shape [{}] in section {DENSE_SECTION:?}",
                layer.order_tensor, layer.neurons
            )));
        }
        Ok(Ok(()))
    }

    /// Rule 31: a mixture-of-experts model has one expert entry per expert of
    /// each sparse layer, by layer then expert, each stored as 4.1 says; any
    /// other model has none.
    fn check_experts(
        &self,
        config: &ModelConfig,
        sections: &HashMap<String, usize>,
        tensors: &HashMap<String, usize>,
    ) -> std::result::Result<(), FormatError> {
        let m = self.manifest;
        let bad = |message: String| FormatError::Experts { message };
        let Some(moe) = &config.moe else {
            if !m.experts.is_empty() {
                return Err(bad(format!(
                    "{} expert entries in a model without experts",
                    m.experts.len()
                )));
            }
            return Ok(());
        };
        let want: Vec<(u64, u64)> = (0..config.num_layers)
            .filter(|&l| moe.sparse_layers[l])
            .flat_map(|l| (0..moe.num_experts).map(move |e| (l as u64, e as u64)))
            .collect();
        if m.experts.len() != want.len() {
            return Err(bad(format!(
                "{} entries, expected {} ({} experts in each of {} sparse layers)",
                m.experts.len(),
                want.len(),
                moe.num_experts,
                want.len() / moe.num_experts.max(1)
            )));
        }
        for (entry, &(layer, expert)) in m.experts.iter().zip(&want) {
            let at = |message: String| bad(format!("expert {expert} of layer {layer}: {message}"));
            if (entry.layer, entry.expert) != (layer, expert) {
                return Err(at(format!(
                    "found the entry of expert {} of layer {} in its place",
                    entry.expert, entry.layer
                )));
            }
            // Block types (section 9) are not defined for experts in this
            // version: no writer makes them and `verify --against` could not
            // compare them with the source.
            if entry.dtype.quant().is_some() {
                return Err(at(format!(
                    "dtype {}: experts are floating point",
                    entry.dtype.name()
                )));
            }
            self.check_bundles(
                &format!("expert {expert} of layer {layer}"),
                &entry.bundles(),
                &[BundlePart::Gate, BundlePart::Up, BundlePart::Down],
                (moe.expert_width as u64, config.hidden_size as u64),
                sections,
                tensors,
            )?
            .map_err(at)?;
        }
        Ok(())
    }

    /// Rule 18, predictors and calibration: at most one predictor per layer, its
    /// tensors floating point with the shapes its rank implies.
    fn check_predictors(
        &self,
        config: &ModelConfig,
        tensors: &HashMap<String, usize>,
    ) -> std::result::Result<(), FormatError> {
        let m = self.manifest;
        let model = |message: String| FormatError::Model { message };
        if let Some(cal) = &m.calibration {
            if cal.layers.len() != config.num_layers
                || cal.layers.iter().any(|l| l.window_max.len() != 4)
            {
                return Err(model(
                    "calibration must list one entry with 4 window maxima per layer".into(),
                ));
            }
            // The oracle modes zero a SiLU neuron at or below its layer's
            // threshold: an infinite one (a number beyond the f32 range) would
            // zero every neuron, a negative one none.
            for (i, l) in cal.layers.iter().enumerate() {
                if let Some(t) = l.silu_threshold.filter(|t| !(t.is_finite() && *t >= 0.0)) {
                    return Err(model(format!(
                        "calibration of layer {i}: silu_threshold {t} is not a finite number >= 0"
                    )));
                }
            }
        }
        let mut seen = HashSet::new();
        for p in &m.predictors {
            let bad = |message: String| model(format!("predictor of layer {}: {message}", p.layer));
            if p.layer >= config.num_layers as u64 || !seen.insert(p.layer) {
                return Err(bad("layer out of range or listed twice".into()));
            }
            if p.rank == 0
                || p.rank > config.hidden_size.max(config.ffn_width) as u64
                || !p.threshold.is_finite()
            {
                return Err(bad(format!(
                    "rank {} or threshold {} is invalid",
                    p.rank, p.threshold
                )));
            }
            let (h, r, n) = (config.hidden_size as u64, p.rank, config.ffn_width as u64);
            for (name, shape) in [
                (&p.a_tensor, vec![h, r]),
                (&p.b_tensor, vec![r, n]),
                (&p.bias_tensor, vec![n]),
            ] {
                // The runtime reads predictor tensors from the predictor section.
                let ok = tensors.get(name).map(|&i| &m.tensors[i]).is_some_and(|t| {
                    t.shape == shape && t.dtype.weight().is_some() && t.section == PREDICTOR_SECTION
                });
                if !ok {
                    return Err(bad(format!(
                        "tensor {name:?} must be floating point of shape {shape:?} in section {PREDICTOR_SECTION:?}"
                    )));
                }
            }
        }
        check_product_thresholds(m)?;
        Ok(())
    }
}

/// Rule 20: the product criterion's thresholds are given for every layer or for
/// none, finite and not negative, never beside a gate threshold; a layer's
/// sparsity is a fraction.
fn check_product_thresholds(m: &Manifest) -> std::result::Result<(), FormatError> {
    let Some(cal) = &m.calibration else {
        return Ok(());
    };
    let with = cal
        .layers
        .iter()
        .filter(|l| l.product_threshold.is_some())
        .count();
    for (i, l) in cal.layers.iter().enumerate() {
        let bad = |message: String| FormatError::ProductThreshold {
            layer: i as u64,
            message,
        };
        match l.product_threshold {
            None if with > 0 => {
                return Err(bad(format!(
                    "no product_threshold, while {with} other layers have one"
                )))
            }
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(bad(format!(
                    "product_threshold {t} is not a finite number >= 0"
                )))
            }
            Some(_) if l.silu_threshold.is_some() => {
                return Err(bad(
                    "both product_threshold and silu_threshold are given".into()
                ))
            }
            _ => {}
        }
        if let Some(s) = l.layer_sparsity.filter(|s| !(0.0..=1.0).contains(s)) {
            return Err(bad(format!("layer_sparsity {s} is not in [0, 1]")));
        }
    }
    Ok(())
}

/// Rules 21 and 22: block types only on the weight matrices section 9 lists,
/// and exactly where the manifest's `quantization` policy says.
fn check_quantization(
    m: &Manifest,
    config: &ModelConfig,
    names: &ModelNames,
) -> std::result::Result<(), FormatError> {
    use crate::format::quant_policy::{part_of_tensor, QuantPart};
    let parts = part_of_tensor(config, names);
    // Rule 22 first: a block type on a tensor that may not have one is wrong
    // whatever the policy says.
    for t in &m.tensors {
        if t.dtype.quant().is_some() && !parts.contains_key(t.name.as_str()) {
            return Err(FormatError::QuantNotAllowed {
                tensor: t.name.clone(),
                dtype: t.dtype.name().into(),
            });
        }
    }
    let policy = m.quantization.unwrap_or_default();
    let bad = |message: String| FormatError::QuantPolicy { message };
    if config.tie_word_embeddings && policy.head.is_some() {
        return Err(bad(
            "`head` must be null: the embeddings are tied, the output projection is the embedding"
                .into(),
        ));
    }
    let expect = |part: QuantPart| crate::format::quant_policy::policy_type(&policy, part);
    let describe = |q: Option<crate::quant::QuantType>| {
        q.map_or("a floating-point type".to_string(), |q| {
            q.name().to_string()
        })
    };
    for t in &m.tensors {
        let Some(&part) = parts.get(t.name.as_str()) else {
            continue;
        };
        if t.dtype.quant() != expect(part) {
            return Err(bad(format!(
                "tensor {:?} is {}, the policy's `{}` says {}",
                t.name,
                t.dtype.name(),
                part.key(),
                describe(expect(part))
            )));
        }
    }
    for l in &m.ffn_layers {
        if l.dtype.quant() != policy.ffn {
            return Err(bad(format!(
                "FFN layer {} is {}, the policy's `ffn` says {}",
                l.layer,
                l.dtype.name(),
                describe(policy.ffn)
            )));
        }
    }
    check_down_scales(m)?;
    for e in &m.experts {
        if e.dtype.quant() != policy.ffn {
            return Err(bad(format!(
                "expert {} of layer {} is {}, the policy's `ffn` says {}",
                e.expert,
                e.layer,
                e.dtype.name(),
                describe(policy.ffn)
            )));
        }
    }
    Ok(())
}

/// Rule 25: a down scale (spec 9.6) belongs to an FFN layer of a block type
/// and is `f32` of shape `[hidden]` in the dense section.
fn check_down_scales(m: &Manifest) -> std::result::Result<(), FormatError> {
    for t in &m.tensors {
        let Some(layer) = crate::format::layout::down_scale_layer(&t.name) else {
            continue;
        };
        let bad = |message: String| FormatError::DownScale {
            tensor: t.name.clone(),
            message,
        };
        let entry = m
            .ffn_layers
            .iter()
            .find(|l| l.layer.to_string() == layer)
            .ok_or_else(|| bad("names no FFN layer".into()))?;
        if entry.dtype.quant().is_none() {
            return Err(bad(format!(
                "FFN layer {} is {}, not a block type",
                entry.layer,
                entry.dtype.name()
            )));
        }
        if t.dtype.weight() != Some(crate::dtype::DType::F32)
            || t.shape != [entry.hidden]
            || t.section != DENSE_SECTION
        {
            return Err(bad(format!(
                "is {} of shape {:?} in section {:?}, not f32 of shape [{}] in \"dense\"",
                t.dtype.name(),
                t.shape,
                t.section,
                entry.hidden
            )));
        }
    }
    Ok(())
}

/// Rules 27 and 28 (section 10): the selector copies, one per FFN layer of a
/// gated model or none, each with its four tensors in the `selector` section
/// at the dtypes and shapes 10.1 gives; `u8` nowhere else. Their bytes (R29)
/// are checked where they are read.
fn check_selectors(
    m: &Manifest,
    config: &ModelConfig,
    sections: &HashMap<String, usize>,
    tensors: &HashMap<String, usize>,
) -> std::result::Result<(), FormatError> {
    let layers = |message: String| FormatError::SelectorLayers { message };
    let mut named: HashMap<&str, u64> = HashMap::new();
    if !m.selectors.is_empty() {
        if config.moe.is_some() {
            return Err(layers(
                "a mixture-of-experts model has none (its experts are not covered)".into(),
            ));
        }
        let listed: Vec<u64> = m.selectors.iter().map(|s| s.layer).collect();
        let want: Vec<u64> = m.ffn_layers.iter().map(|l| l.layer).collect();
        if listed != want {
            return Err(layers(format!(
                "entries for layers {listed:?}, expected one per FFN layer: {want:?}"
            )));
        }
        let kind = m.selectors[0].kind;
        if let Some(other) = m.selectors.iter().find(|s| s.kind != kind) {
            return Err(layers(format!(
                "layer {} is {}, layer {} is {}: one type for the file",
                m.selectors[0].layer,
                kind.name(),
                other.layer,
                other.kind.name()
            )));
        }
        for (sel, layer) in m.selectors.iter().zip(&m.ffn_layers) {
            if layer.parts != [BundlePart::Gate, BundlePart::Up, BundlePart::Down] {
                return Err(layers(format!(
                    "layer {} has parts {:?}: only gated FFN layers have selector copies",
                    layer.layer, layer.parts
                )));
            }
            for name in sel.tensor_names() {
                if let Some(other) = named.insert(name, sel.layer) {
                    return Err(layers(format!(
                        "layers {other} and {} both name tensor {name:?}",
                        sel.layer
                    )));
                }
            }
        }
    }
    for (sel, layer) in m.selectors.iter().zip(&m.ffn_layers) {
        let bad = |message: String| FormatError::SelectorLayout {
            layer: sel.layer,
            message,
        };
        let shapes = sel
            .kind
            .shapes(layer.neurons, layer.hidden)
            .ok_or_else(|| bad(format!("hidden size {} overflows", layer.hidden)))?;
        let names = sel.tensor_names();
        for (k, name) in names.iter().enumerate() {
            let (dtype, shape) = &shapes[k % 2];
            let t = tensors
                .get(*name)
                .map(|&i| &m.tensors[i])
                .ok_or_else(|| bad(format!("tensor {name:?} is missing")))?;
            let in_selector_section = t.section == SELECTOR_SECTION
                && sections
                    .get(SELECTOR_SECTION)
                    .is_some_and(|&i| m.sections[i].kind == SectionKind::Selector);
            if !in_selector_section {
                return Err(bad(format!(
                    "tensor {name:?} is in section {:?}, must be in {SELECTOR_SECTION:?} of kind selector",
                    t.section
                )));
            }
            if t.dtype != *dtype || t.shape != *shape {
                return Err(bad(format!(
                    "tensor {name:?} is {} of shape {:?}; a {} copy of {} neurons of width {} is {} of shape {shape:?}",
                    t.dtype.name(),
                    t.shape,
                    sel.kind.name(),
                    layer.neurons,
                    layer.hidden,
                    dtype.name()
                )));
            }
        }
    }
    if let Some(t) = m
        .tensors
        .iter()
        .find(|t| t.dtype == TableDType::U8 && !named.contains_key(t.name.as_str()))
    {
        return Err(FormatError::SelectorLayout {
            layer: 0,
            message: format!(
                "tensor {:?} is u8, a type only the values of a selector copy have",
                t.name
            ),
        });
    }
    Ok(())
}

/// A section kind as the manifest spells it.
fn kind_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Dense => "dense",
        SectionKind::Ffn => "ffn",
        SectionKind::File => "file",
        SectionKind::Predictor => "predictor",
        SectionKind::Selector => "selector",
    }
}

/// Rule 13: the chunks cover the section exactly, without gaps, in raw pieces of
/// `chunk_raw_bytes`.
fn check_chunks(s: &SectionEntry) -> std::result::Result<(), FormatError> {
    let bad = |message: String| FormatError::ChunkTable {
        section: s.name.clone(),
        message,
    };
    if s.chunk_raw_bytes == 0 || s.chunk_raw_bytes > MAX_CHUNK_RAW_BYTES {
        return Err(bad(format!(
            "chunk_raw_bytes {} is 0 or above the cap {MAX_CHUNK_RAW_BYTES}",
            s.chunk_raw_bytes
        )));
    }
    if s.compression == Compression::Zstd && s.raw_length / MAX_COMPRESSION_RATIO > s.length {
        return Err(bad(format!(
            "{} raw bytes from {} stored exceeds the compression ratio cap {MAX_COMPRESSION_RATIO}",
            s.raw_length, s.length
        )));
    }
    if !is_sha256_hex(&s.sha256) {
        return Err(bad("section sha256 is not 64 lowercase hex digits".into()));
    }
    let expected_chunks = s.raw_length.div_ceil(s.chunk_raw_bytes);
    if s.chunks.len() as u64 != expected_chunks {
        return Err(bad(format!(
            "{} chunks, {} raw bytes need {expected_chunks}",
            s.chunks.len(),
            s.raw_length
        )));
    }
    let mut total = 0u64;
    for (i, c) in s.chunks.iter().enumerate() {
        if s.compression == Compression::None && c.length != chunk_raw_length(s, i) {
            return Err(bad(format!(
                "uncompressed chunk {i} is {} bytes, expected {}",
                c.length,
                chunk_raw_length(s, i)
            )));
        }
        if !is_sha256_hex(&c.sha256) {
            return Err(bad(format!(
                "chunk {i} sha256 is not 64 lowercase hex digits"
            )));
        }
        total = total
            .checked_add(c.length)
            .ok_or_else(|| bad("chunk lengths overflow".into()))?;
    }
    if total != s.length {
        return Err(bad(format!(
            "chunks hold {total} bytes, the section {}",
            s.length
        )));
    }
    if s.compression == Compression::None && s.raw_length != s.length {
        return Err(bad(format!(
            "uncompressed section with raw_length {} != length {}",
            s.raw_length, s.length
        )));
    }
    Ok(())
}

/// Rule 34: routing statistics only for a mixture-of-experts model, one entry
/// per sparse layer in layer order, one count per expert, each at most
/// `tokens`, summing to `tokens * top_k` (each token chose `top_k` experts).
fn check_routing(m: &Manifest, config: &ModelConfig) -> std::result::Result<(), FormatError> {
    let Some(routing) = &m.routing else {
        return Ok(());
    };
    let bad = |message: String| FormatError::Routing { message };
    let Some(moe) = &config.moe else {
        return Err(bad("present in a model without experts".into()));
    };
    let sparse: Vec<u64> = (0..config.num_layers as u64)
        .filter(|&l| moe.sparse_layers[l as usize])
        .collect();
    let listed: Vec<u64> = routing.layers.iter().map(|l| l.layer).collect();
    if listed != sparse {
        return Err(bad(format!(
            "layers {listed:?} listed; the sparse layers are {sparse:?}"
        )));
    }
    for l in &routing.layers {
        if l.counts.len() != moe.num_experts {
            return Err(bad(format!(
                "layer {}: {} counts for {} experts",
                l.layer,
                l.counts.len(),
                moe.num_experts
            )));
        }
        if let Some((e, c)) = l
            .counts
            .iter()
            .enumerate()
            .find(|(_, &c)| c > routing.tokens)
        {
            return Err(bad(format!(
                "layer {}: expert {e} chosen {c} times in {} tokens",
                l.layer, routing.tokens
            )));
        }
        let sum: u128 = l.counts.iter().map(|&c| c as u128).sum();
        let want = routing.tokens as u128 * moe.top_k as u128;
        if sum != want {
            return Err(bad(format!(
                "layer {}: counts sum to {sum}, not tokens x top_k = {want}",
                l.layer
            )));
        }
    }
    Ok(())
}
