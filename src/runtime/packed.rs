//! A flashpack file as a [`TensorSource`] with everything in DRAM: the dense
//! section read whole, and every FFN section read whole and reassembled into the
//! projection matrices, in packed neuron order.
//!
//! Neuron order does not change what an FFN computes (its output is a sum over
//! neurons, and per-neuron biases are stored in the same order), so a model loaded
//! this way is the checkpoint's model; only the summation order of the down
//! projection follows the packed order.

use crate::error::{Error, Result};
use crate::format::layout::{BundlePart, DENSE_SECTION, TOKENIZER_SECTION};
use crate::format::PackedFile;
use crate::input::tensors::FfnNames;
use crate::input::TextTokenizer;
use crate::runtime::weights::{Storage, TensorSource};
use std::collections::HashMap;

pub struct PackedWeights<'a> {
    file: &'a PackedFile,
    dense: Vec<u8>,
    /// Raw bytes of each layer's FFN section.
    ffn: Vec<Vec<u8>>,
    /// FFN weight name -> (layer, part).
    ffn_parts: HashMap<String, (usize, BundlePart)>,
}

impl<'a> PackedWeights<'a> {
    /// Reads the dense section and every FFN section, checking each chunk's hash.
    pub fn read_all(file: &'a PackedFile) -> Result<PackedWeights<'a>> {
        let ffn = file
            .manifest
            .ffn_layers
            .iter()
            .map(|l| file.read_section(&l.section))
            .collect::<Result<Vec<_>>>()?;
        Self::with_ffn(file, ffn)
    }

    /// Reads the dense section only (FFN biases included); asking for an FFN
    /// projection matrix is an error. The flash runtime reads bundles itself.
    pub fn read_dense(file: &'a PackedFile) -> Result<PackedWeights<'a>> {
        Self::with_ffn(file, Vec::new())
    }

    fn with_ffn(file: &'a PackedFile, ffn: Vec<Vec<u8>>) -> Result<PackedWeights<'a>> {
        let dense = file.read_section(DENSE_SECTION)?;
        // Rule 19, which needs the dense bytes that opening does not read.
        if let Some(e) = crate::format::integrity::neuron_order_errors(file, &dense)
            .into_iter()
            .next()
        {
            return Err(Error::Format {
                path: file.path.clone(),
                source: e,
            });
        }
        let mut ffn_parts = HashMap::new();
        for (i, layer) in file.names.layers.iter().enumerate() {
            let parts = match &layer.ffn {
                FfnNames::Plain { up, down } => {
                    vec![(up, BundlePart::Up), (down, BundlePart::Down)]
                }
                FfnNames::Gated { gate, up, down } => {
                    vec![
                        (gate, BundlePart::Gate),
                        (up, BundlePart::Up),
                        (down, BundlePart::Down),
                    ]
                }
            };
            for (names, part) in parts {
                ffn_parts.insert(names.weight.clone(), (i, part));
            }
        }
        Ok(PackedWeights {
            file,
            dense,
            ffn,
            ffn_parts,
        })
    }

    /// The projection matrix `part` of `layer` in its checkpoint layout (`[neurons,
    /// hidden]` for gate and up, `[hidden, neurons]` for down), neurons in packed order.
    fn ffn_matrix(&self, layer: usize, part: BundlePart) -> Result<Storage> {
        let entry = &self.file.manifest.ffn_layers[layer];
        let dtype = entry
            .dtype
            .weight()
            .expect("checked at open: bundles are floating point");
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
        let bundles = self.ffn.get(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "FFN weights of layer {layer} were not loaded (flash mode reads bundles from disk)"
            ))
        })?;
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
        Ok(Storage::from_le_bytes(dtype, &bytes))
    }
}

impl TensorSource for PackedWeights<'_> {
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
        let dtype = entry
            .dtype
            .weight()
            .filter(|_| found == shape)
            .ok_or_else(|| Error::TensorShape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found,
            })?;
        let bytes = &self.dense[entry.offset as usize..(entry.offset + entry.length) as usize];
        Ok(Storage::from_le_bytes(dtype, bytes))
    }
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
