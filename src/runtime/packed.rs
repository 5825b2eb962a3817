//! A flashpack file as a [`TensorSource`] with everything in DRAM: the dense
//! section read chunk by chunk as tensors are asked for (so that loading holds
//! the model and one chunk, not the section beside the model), and each FFN
//! section read when its layer's matrices are asked for (one section in
//! memory at a time) and reassembled into them, in packed neuron order.
//!
//! Neuron order does not change what an FFN computes (its output is a sum over
//! neurons, and per-neuron biases are stored in the same order), so a model loaded
//! this way is the checkpoint's model; only the summation order of the down
//! projection follows the packed order.

use crate::error::{Error, Result};
use crate::format::layout::{BundlePart, FfnLayerEntry, DENSE_SECTION, TOKENIZER_SECTION};
use crate::format::reader::SectionReader;
use crate::format::PackedFile;
use crate::input::tensors::FfnNames;
use crate::input::TextTokenizer;
use crate::runtime::weights::{Storage, TensorSource};
use std::collections::HashMap;
use std::sync::Mutex;

/// The FFN section read last: its layer and raw bytes.
type LastSection = Mutex<Option<(usize, Vec<u8>)>>;

pub struct PackedWeights<'a> {
    file: &'a PackedFile,
    /// The dense section, read a chunk at a time as tensors are asked for:
    /// loading holds the model plus one chunk, not the section beside it.
    dense: Mutex<SectionReader<'a>>,
    /// `None` when only the dense part is loaded; else the FFN section read
    /// last (layer, raw bytes): a layer's three matrices are asked for in a
    /// row, so one section in memory beside the model suffices.
    ffn: Option<LastSection>,
    /// FFN weight name -> (index into `bundles`, part).
    ffn_parts: HashMap<String, (usize, BundlePart)>,
    /// Every stored set of bundles: the FFN layers', then the experts' (spec 4.1).
    bundles: Vec<FfnLayerEntry>,
    /// Block-quantized matrices and FFN layers (format section 9) are handed
    /// over in their blocks ([`TensorSource::matrix`], [`TensorSource::own_ffn`])
    /// instead of dequantized to f32.
    keep_quantized: bool,
}

impl<'a> PackedWeights<'a> {
    /// The dense section and every FFN section, each chunk's hash checked
    /// when it is read (as the model asks for its tensors).
    pub fn read_all(file: &'a PackedFile) -> Result<PackedWeights<'a>> {
        Self::with_ffn(file, Some(Mutex::new(None)))
    }

    /// As [`PackedWeights::read_all`], but block-quantized weights stay in
    /// their blocks: the model computes with the integer kernels
    /// (`runtime::quant`, [`crate::runtime::quant_ffn::QuantFfn`]) from about
    /// a quarter (`q4_1`) or half (`q8_0`) of the f16 bytes. What `run`,
    /// `eval`, `chat`, `serve` and `bench` load; `verify` and calibration use
    /// the dequantized model of [`PackedWeights::read_all`] (exactly the
    /// file's values).
    pub fn read_all_quantized(file: &'a PackedFile) -> Result<PackedWeights<'a>> {
        let mut w = Self::with_ffn(file, Some(Mutex::new(None)))?;
        w.keep_quantized = true;
        Ok(w)
    }

    /// Reads the dense section only (FFN biases included); asking for an FFN
    /// projection matrix is an error. The flash runtime reads bundles itself.
    pub fn read_dense(file: &'a PackedFile) -> Result<PackedWeights<'a>> {
        Self::with_ffn(file, None)
    }

    fn with_ffn(file: &'a PackedFile, ffn: Option<LastSection>) -> Result<PackedWeights<'a>> {
        let mut dense = SectionReader::new(file, DENSE_SECTION)?;
        // Rule 19, which needs the dense bytes that opening does not read.
        if let Some(e) = crate::format::integrity::neuron_order_errors(file, &mut dense)?
            .into_iter()
            .next()
        {
            return Err(Error::Format {
                path: file.path.clone(),
                source: e,
            });
        }
        // Each bundle set with the projection names it stores: an FFN layer's
        // under its layer's names, an expert's under its expert's.
        let m = &file.manifest;
        let mut bundles: Vec<FfnLayerEntry> = Vec::new();
        let mut ffn_parts = HashMap::new();
        let mut add = |entry: FfnLayerEntry, ffn: &FfnNames| {
            let (gate, up, down) = ffn.parts();
            let at = bundles.len();
            for (names, part) in [
                (gate, BundlePart::Gate),
                (Some(up), BundlePart::Up),
                (Some(down), BundlePart::Down),
            ] {
                if let Some(names) = names {
                    ffn_parts.insert(names.weight.clone(), (at, part));
                }
            }
            bundles.push(entry);
        };
        for entry in &m.ffn_layers {
            add(entry.clone(), &file.names.layers[entry.layer as usize].ffn);
        }
        for entry in &m.experts {
            let moe = file.names.layers[entry.layer as usize]
                .ffn
                .moe()
                .ok_or_else(|| Error::InvalidArgument("an expert of a dense layer".into()))?;
            add(entry.bundles(), &moe.experts[entry.expert as usize]);
        }
        Ok(PackedWeights {
            file,
            dense: Mutex::new(dense),
            ffn,
            ffn_parts,
            bundles,
            keep_quantized: false,
        })
    }

    /// The projection matrix `part` of bundle set `layer` (an FFN layer's or an
    /// expert's) in its checkpoint layout (`[neurons, hidden]` for gate and up,
    /// `[hidden, neurons]` for down), neurons in packed order.
    fn ffn_matrix(&self, layer: usize, part: BundlePart) -> Result<Storage> {
        let entry = &self.bundles[layer];
        let Some(dtype) = entry.dtype.weight() else {
            return self.quantized_ffn_matrix(layer, part);
        };
        let size = dtype.size_bytes();
        let (h, n, stride) = (
            entry.hidden as usize,
            entry.neurons as usize,
            entry.bundle_bytes as usize,
        );
        let k = entry
            .parts
            .iter()
            .position(|p| *p == part)
            .expect("checked at open: parts match the architecture");
        let bytes = self.with_section(layer, |bundles| {
            let part_of =
                |p: usize| &bundles[p * stride + k * h * size..p * stride + (k + 1) * h * size];
            let mut bytes = vec![0u8; n * h * size];
            match part {
                BundlePart::Gate | BundlePart::Up => {
                    for (p, row) in bytes.chunks_exact_mut(h * size).enumerate() {
                        row.copy_from_slice(part_of(p));
                    }
                }
                BundlePart::Down => {
                    // Bundle p holds column p; the matrix is stored row-major [hidden, neurons].
                    for p in 0..n {
                        let column = part_of(p);
                        for r in 0..h {
                            let at = (r * n + p) * size;
                            bytes[at..at + size].copy_from_slice(&column[r * size..(r + 1) * size]);
                        }
                    }
                }
            }
            bytes
        })?;
        Ok(Storage::from_le_bytes(dtype, &bytes))
    }
}

impl PackedWeights<'_> {
    /// The FFN section of bundle set `layer` (an index into `bundles`: an FFN
    /// layer's or an expert's), read unless it is the one read last.
    fn with_section<T>(&self, layer: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let entry = &self.bundles[layer];
        let mut last = self
            .ffn
            .as_ref()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "FFN weights of layer {layer} were not loaded (flash mode reads bundles from disk)"
                ))
            })?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.as_ref().map(|l| l.0) != Some(layer) {
            // Dropped before the next is read: one section at a time.
            *last = None;
            *last = Some((layer, self.file.read_section(&entry.section)?));
        }
        Ok(f(&last.as_ref().expect("set above").1))
    }

    /// A block-quantized bundle set's projection `part`, dequantized to f32 (format
    /// section 9), in the layout of [`PackedWeights::ffn_matrix`]. Checks rule 24
    /// on the way.
    fn quantized_ffn_matrix(&self, layer: usize, part: BundlePart) -> Result<Storage> {
        let entry = &self.bundles[layer];
        let q = entry.dtype.quant().expect("checked at open: a weight type");
        let (h, n, stride) = (
            entry.hidden as usize,
            entry.neurons as usize,
            entry.bundle_bytes as usize,
        );
        let part_bytes = q.row_bytes(h).expect("checked at open: rule 23");
        let k = entry
            .parts
            .iter()
            .position(|p| *p == part)
            .expect("checked at open: parts match the architecture");
        // Format 9.6: a down part's per-channel scale, checked (rule 26).
        let scale = match part {
            BundlePart::Down => self.down_scale(entry)?,
            _ => None,
        };
        let values = self.with_section(layer, |bundles| -> Result<Vec<f32>> {
            if let Some((at, what)) = crate::format::quant_policy::first_bad_bundle_byte(
                q,
                entry.parts.len(),
                h,
                stride,
                bundles,
            ) {
                return Err(Error::Format {
                    path: self.file.path.clone(),
                    source: crate::format::FormatError::QuantData {
                        what: format!("section {:?}", entry.section),
                        message: format!("raw byte {at}: {what}"),
                    },
                });
            }
            let mut out = vec![0.0f32; n * h];
            let mut column = vec![0.0f32; h];
            for p in 0..n {
                let bytes =
                    &bundles[p * stride + k * part_bytes..p * stride + (k + 1) * part_bytes];
                match part {
                    BundlePart::Gate | BundlePart::Up => {
                        q.dequantize_row(bytes, &mut out[p * h..(p + 1) * h])
                    }
                    BundlePart::Down => {
                        q.dequantize_row(bytes, &mut column);
                        if let Some(scale) = &scale {
                            for (v, s) in column.iter_mut().zip(scale) {
                                *v *= s;
                            }
                        }
                        for (r, v) in column.iter().enumerate() {
                            out[r * n + p] = *v;
                        }
                    }
                }
            }
            Ok(out)
        })??;
        Ok(Storage::F32(values))
    }
}

impl PackedWeights<'_> {
    /// The down scale (format 9.6) of an FFN layer's bundles, if the file has
    /// one, checked against rule 26. Experts have none.
    pub fn down_scale(&self, entry: &FfnLayerEntry) -> Result<Option<Vec<f32>>> {
        let name = crate::format::layout::down_scale_tensor_name(entry.layer as usize);
        let Some(t) = self
            .file
            .tensor_entry(&name)
            .filter(|_| self.file.manifest.ffn_layers.contains(entry))
        else {
            return Ok(None);
        };
        let bytes = self
            .dense
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bytes(t.offset, t.length)?;
        crate::format::integrity::down_scale_values(&name, &bytes)
            .map(Some)
            .map_err(|e| Error::Format {
                path: self.file.path.clone(),
                source: e,
            })
    }
}

/// Rule 24 on bytes just read: every block's scale (and minimum) is finite.
fn check_blocks(
    file: &PackedFile,
    what: &str,
    q: crate::quant::QuantType,
    bytes: &[u8],
) -> Result<()> {
    match q.first_bad_block(bytes) {
        Some(block) => Err(Error::Format {
            path: file.path.clone(),
            source: crate::format::FormatError::QuantData {
                what: what.to_string(),
                message: format!("block {block} has a scale or minimum that is not finite"),
            },
        }),
        None => Ok(()),
    }
}

impl PackedWeights<'_> {
    /// The raw blocks of dense tensor `name` when it is block-quantized with
    /// shape `[rows, cols]` (rule 24 checked), else `None`.
    fn quantized_blocks(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<crate::runtime::quant::QuantMatrix>> {
        let Some(entry) = self.file.tensor_entry(name) else {
            return Ok(None);
        };
        let Some(q) = entry.dtype.quant() else {
            return Ok(None);
        };
        if entry.shape != [rows as u64, cols as u64] {
            return Ok(None);
        }
        let bytes = self
            .dense
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bytes(entry.offset, entry.length)?;
        check_blocks(self.file, &format!("tensor {name:?}"), q, &bytes)?;
        Ok(crate::runtime::quant::QuantMatrix::new(
            rows, cols, q, bytes,
        ))
    }
}

impl TensorSource for PackedWeights<'_> {
    fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<crate::runtime::weights::Matrix> {
        if self.keep_quantized && !self.ffn_parts.contains_key(name) {
            if let Some(m) = self.quantized_blocks(name, rows, cols)? {
                return Ok(crate::runtime::weights::Matrix::quantized(m));
            }
        }
        crate::runtime::weights::Matrix::new(rows, cols, self.tensor(name, &[rows, cols])?)
    }

    fn own_ffn(
        &self,
        layer: usize,
        config: &crate::input::config::ModelConfig,
    ) -> Result<Option<Box<dyn crate::runtime::ffn::Ffn>>> {
        if !self.keep_quantized {
            return Ok(None);
        }
        // The FFN layer's bundle set (experts are never quantized).
        let Some(at) = self
            .bundles
            .iter()
            .position(|b| b.layer as usize == layer && self.file.manifest.ffn_layers.contains(b))
        else {
            return Ok(None);
        };
        let entry = &self.bundles[at];
        let Some(q) = entry.dtype.quant() else {
            return Ok(None);
        };
        let (h, n, stride) = (
            entry.hidden as usize,
            entry.neurons as usize,
            entry.bundle_bytes as usize,
        );
        let bundles = self.file.read_section(&entry.section)?;
        if let Some((at, what)) = crate::format::quant_policy::first_bad_bundle_byte(
            q,
            entry.parts.len(),
            h,
            stride,
            &bundles,
        ) {
            return Err(Error::Format {
                path: self.file.path.clone(),
                source: crate::format::FormatError::QuantData {
                    what: format!("section {:?}", entry.section),
                    message: format!("raw byte {at}: {what}"),
                },
            });
        }
        let (gate, up, down) = self.file.names.layers[layer].ffn.parts();
        let bias = |names: Option<&crate::input::tensors::LinearNames>, len: usize| {
            names
                .and_then(|l| l.bias.as_ref())
                .map(|b| self.tensor(b, &[len]).map(|s| s.to_f32()))
                .transpose()
        };
        let ffn =
            crate::runtime::quant_ffn::QuantFfn::new(crate::runtime::quant_ffn::QuantFfnParts {
                q,
                hidden: h,
                width: n,
                gated: gate.is_some(),
                stride,
                bundles,
                down_scale: self.down_scale(entry)?,
                gate_bias: bias(gate, n)?,
                up_bias: bias(Some(up), n)?,
                down_bias: bias(Some(down), h)?,
                activation: config.activation,
            })?;
        Ok(Some(Box::new(ffn)))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Storage> {
        if let Some(&(layer, part)) = self.ffn_parts.get(name) {
            return self.ffn_matrix(layer, part);
        }
        let entry = self
            .file
            .tensor_entry(name)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
            })?;
        let found: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
        if let Some(q) = entry.dtype.quant().filter(|_| found == shape) {
            // Format section 9: dequantized to f32 at load.
            let bytes = self
                .dense
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_bytes(entry.offset, entry.length)?;
            check_blocks(self.file, &format!("tensor {name:?}"), q, &bytes)?;
            let mut values = vec![0.0f32; found.iter().product()];
            q.dequantize_row(&bytes, &mut values);
            return Ok(Storage::F32(values));
        }
        let dtype = entry
            .dtype
            .weight()
            .filter(|_| found == shape)
            .ok_or_else(|| Error::TensorShape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found,
            })?;
        let mut dense = self.dense.lock().unwrap_or_else(|e| e.into_inner());
        storage_from_pieces(dtype, entry.length as usize, |sink| {
            dense.read_range(entry.offset, entry.length, sink)
        })
    }
}

/// A tensor of `length` bytes of `dtype`, decoded piece by piece as `read`
/// hands the pieces over (in order; an element may straddle two pieces, its
/// first bytes then wait in a carry).
fn storage_from_pieces(
    dtype: crate::dtype::DType,
    length: usize,
    read: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<()>,
) -> Result<Storage> {
    let size = dtype.size_bytes();
    let mut storage = Storage::with_capacity(dtype, length / size);
    let (mut carry, mut carried) = ([0u8; 4], 0usize);
    read(&mut |mut piece: &[u8]| {
        if carried > 0 {
            let take = (size - carried).min(piece.len());
            carry[carried..carried + take].copy_from_slice(&piece[..take]);
            carried += take;
            piece = &piece[take..];
            if carried < size {
                return;
            }
            storage.extend_from_le_bytes(&carry[..size]);
            carried = 0;
        }
        let whole = piece.len() / size * size;
        storage.extend_from_le_bytes(&piece[..whole]);
        let rest = &piece[whole..];
        carry[..rest.len()].copy_from_slice(rest);
        carried = rest.len();
    })?;
    Ok(storage)
}

/// The tokenizer a packed file carries.
pub fn packed_tokenizer(file: &PackedFile) -> Result<TextTokenizer> {
    let json = file.read_section(TOKENIZER_SECTION)?;
    let m = &file.manifest;
    TextTokenizer::from_parts(
        &file.path.join(TOKENIZER_SECTION),
        &json,
        m.tokenizer_config.as_ref(),
        m.generation_config.as_ref(),
        &file.config,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// Any split of the bytes into pieces decodes to the same elements.
    #[test]
    fn pieces_decode_like_the_whole() {
        let bytes: Vec<u8> = (0..64u32).map(|i| (i * 37 % 251) as u8).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let whole = Storage::from_le_bytes(dtype, &bytes);
            for cut in [1usize, 2, 3, 5, 7, 64] {
                let got = storage_from_pieces(dtype, bytes.len(), |sink| {
                    bytes.chunks(cut).for_each(&mut *sink);
                    Ok(())
                })
                .unwrap();
                let bits = |s: &Storage| s.to_f32().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&whole), "{dtype:?} in pieces of {cut}");
            }
        }
    }
}
