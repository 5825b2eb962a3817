//! Checking every byte of an opened flashpack file against the manifest: section
//! and chunk hashes (rules 12, 14), decompression (15), zero padding (11) and the
//! neuron orders (19). Sections are checked in parallel; every failure is
//! reported, located to its section and chunk.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::format::error::FormatError;
use crate::format::layout::is_permutation;
use crate::format::layout::*;
use crate::format::reader::{chunk_raw_length, decode_chunk, PackedFile, SectionReader};

/// What a full integrity check found.
#[derive(Debug, Default)]
pub struct IntegrityReport {
    pub sections_checked: usize,
    pub chunks_checked: usize,
    pub bytes_hashed: u64,
    /// Every rule broken, in file order.
    pub failures: Vec<FormatError>,
}

/// Reads stored bytes in pieces of this size while hashing, so memory stays small
/// whatever the section size.
const READ_BLOCK: u64 = 8 << 20;

/// Checks every hash, the padding, decompression and the neuron orders.
/// I/O errors abort; rule failures are collected in the report.
pub fn check_integrity(file: &PackedFile) -> Result<IntegrityReport> {
    let sections = &file.manifest.sections;
    let results: Vec<Result<(usize, u64, Vec<FormatError>)>> = sections
        .par_iter()
        .map(|s| check_section(file, s))
        .collect();
    let mut report = IntegrityReport::default();
    for r in results {
        let (chunks, bytes, failures) = r?;
        report.sections_checked += 1;
        report.chunks_checked += chunks;
        report.bytes_hashed += bytes;
        report.failures.extend(failures);
    }
    report.failures.extend(check_padding(file)?);
    if report.failures.is_empty() {
        report.failures.extend(check_orders(file)?);
    }
    if report.failures.is_empty() {
        report.failures.extend(quant_data_errors(file)?);
    }
    if report.failures.is_empty() {
        report.failures.extend(selector_data_errors(file)?);
    }
    Ok(report)
}

/// Rule 29: each layer's selector copies (format section 10) are readable
/// (finite scales above zero, int8 values not -128, zero padding) and equal
/// the gate and up parts of the layer's bundles quantized as 10.1 says, row
/// `p` from bundle `p`. One error per layer, naming the first difference.
pub fn selector_data_errors(file: &PackedFile) -> Result<Vec<FormatError>> {
    use crate::runtime::lowbit::{copies_from_bundles, LowBits, QuantMatrix};
    let m = &file.manifest;
    if m.selectors.is_empty() {
        return Ok(Vec::new());
    }
    let mut failures = Vec::new();
    let raw = file.read_section(SELECTOR_SECTION)?;
    let bytes = |name: &str| -> &[u8] {
        let t = file
            .tensor_entry(name)
            .expect("checked at open: selector tensors exist (rule 27)");
        &raw[t.offset as usize..(t.offset + t.length) as usize]
    };
    for (sel, layer) in m.selectors.iter().zip(&m.ffn_layers) {
        let bad = |message: String| FormatError::SelectorData {
            layer: sel.layer,
            message,
        };
        let bits = LowBits::from(sel.kind);
        let (neurons, hidden) = (layer.neurons as usize, layer.hidden as usize);
        let read = |values: &str, scales: &str| {
            QuantMatrix::from_stored(neurons, hidden, bits, bytes(values).to_vec(), bytes(scales))
                .map_err(|e| format!("{values:?}: {e}"))
        };
        let stored = match (
            read(&sel.gate_tensor, &sel.gate_scale_tensor),
            read(&sel.up_tensor, &sel.up_scale_tensor),
        ) {
            (Ok(g), Ok(u)) => (g, u),
            (Err(e), _) | (_, Err(e)) => {
                failures.push(bad(e));
                continue;
            }
        };
        let bundles = file.read_section(&layer.section)?;
        let expected = match copies_from_bundles(
            &bundles,
            neurons,
            hidden,
            layer.dtype,
            layer.bundle_bytes as usize,
            bits,
        ) {
            Ok(c) => c,
            Err(e) => {
                failures.push(bad(format!("the bundles cannot be quantized: {e}")));
                continue;
            }
        };
        for ((name, got), want) in [(&sel.gate_tensor, &stored.0), (&sel.up_tensor, &stored.1)]
            .into_iter()
            .zip([&expected.0, &expected.1])
        {
            let row_bytes = got.data.len() / neurons.max(1);
            let blocks = got.scales.len() / neurons.max(1);
            let differs = (0..neurons).find(|&r| {
                got.data[r * row_bytes..(r + 1) * row_bytes]
                    != want.data[r * row_bytes..(r + 1) * row_bytes]
                    || got.scales[r * blocks..(r + 1) * blocks]
                        .iter()
                        .zip(&want.scales[r * blocks..(r + 1) * blocks])
                        .any(|(a, b)| a.to_bits() != b.to_bits())
            });
            if let Some(r) = differs {
                failures.push(bad(format!(
                    "{name:?} row {r} is not bundle {r} of {:?} quantized as section 10.1 says",
                    layer.section
                )));
                break;
            }
        }
    }
    Ok(failures)
}

/// Rule 24: every block of every block-typed tensor and FFN section has a
/// finite scale and minimum, and quantized bundles are zero-padded. One error
/// per tensor or section, naming the first bad byte.
pub fn quant_data_errors(file: &PackedFile) -> Result<Vec<FormatError>> {
    let mut failures = Vec::new();
    let mut dense = SectionReader::new(file, DENSE_SECTION)?;
    for t in &file.manifest.tensors {
        let Some(q) = t.dtype.quant() else { continue };
        let bytes = if t.section == DENSE_SECTION {
            dense.read_bytes(t.offset, t.length)?
        } else {
            SectionReader::new(file, &t.section)?.read_bytes(t.offset, t.length)?
        };
        if let Some(block) = q.first_bad_block(&bytes) {
            failures.push(FormatError::QuantData {
                what: format!("tensor {:?}", t.name),
                message: format!("block {block} has a scale or minimum that is not finite"),
            });
        }
    }
    // Rule 26: every down scale (spec 9.6; rule 25 put them in the dense
    // section as f32) finite and positive.
    for t in &file.manifest.tensors {
        if crate::format::layout::down_scale_layer(&t.name).is_none() {
            continue;
        }
        let bytes = dense.read_bytes(t.offset, t.length)?;
        if let Some(e) = down_scale_error(&t.name, &bytes) {
            failures.push(e);
        }
    }
    // FFN layers and experts alike (spec 4.1: an expert is stored as a layer).
    let experts = file.manifest.experts.iter().map(|e| e.bundles());
    for layer in file.manifest.ffn_layers.iter().cloned().chain(experts) {
        let Some(q) = layer.dtype.quant() else {
            continue;
        };
        let bytes = file.read_section(&layer.section)?;
        if let Some((at, what)) = crate::format::quant_policy::first_bad_bundle_byte(
            q,
            layer.parts.len(),
            layer.hidden as usize,
            layer.bundle_bytes as usize,
            &bytes,
        ) {
            failures.push(FormatError::QuantData {
                what: format!("section {:?}", layer.section),
                message: format!("raw byte {at}: {what}"),
            });
        }
    }
    Ok(failures)
}

/// Rule 26 on the bytes of down scale `name`: the values, or the error
/// naming the first that is not finite and positive.
pub fn down_scale_values(name: &str, bytes: &[u8]) -> std::result::Result<Vec<f32>, FormatError> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    match crate::format::quant_policy::first_bad_scale(&values) {
        Some(i) => Err(FormatError::DownScaleData {
            tensor: name.to_string(),
            message: format!("value {i} is {}, not finite and positive", values[i]),
        }),
        None => Ok(values),
    }
}

fn down_scale_error(name: &str, bytes: &[u8]) -> Option<FormatError> {
    down_scale_values(name, bytes).err()
}

fn check_section(file: &PackedFile, s: &SectionEntry) -> Result<(usize, u64, Vec<FormatError>)> {
    let mut failures = Vec::new();
    let mut section_hash = Sha256::new();
    let mut at = 0u64;
    let mut scratch = Vec::new();
    for (i, chunk) in s.chunks.iter().enumerate() {
        let mut chunk_hash = Sha256::new();
        let mut stored = Vec::with_capacity(if s.compression == Compression::Zstd {
            chunk.length as usize
        } else {
            0
        });
        let mut left = chunk.length;
        let mut pos = s.offset + at;
        while left > 0 {
            let n = left.min(READ_BLOCK);
            let block = file.read_at(pos, n)?;
            section_hash.update(&block);
            chunk_hash.update(&block);
            if s.compression == Compression::Zstd {
                stored.extend_from_slice(&block);
            }
            pos += n;
            left -= n;
        }
        if hex::encode(chunk_hash.finalize()) != chunk.sha256 {
            failures.push(FormatError::ChunkHash {
                section: s.name.clone(),
                chunk: i,
                offset: s.offset + at,
            });
        } else if s.compression == Compression::Zstd {
            scratch.clear();
            if let Err(e) = decode_chunk(s, i, &stored, chunk_raw_length(s, i), &mut scratch) {
                failures.push(e);
            }
        }
        at += chunk.length;
    }
    if hex::encode(section_hash.finalize()) != s.sha256 {
        failures.push(FormatError::SectionHash {
            section: s.name.clone(),
        });
    }
    Ok((s.chunks.len(), s.length, failures))
}

/// Rule 11: the bytes between regions (after the preamble, between sections) are zero.
fn check_padding(file: &PackedFile) -> Result<Vec<FormatError>> {
    let mut failures = Vec::new();
    let mut previous_end = PREAMBLE_BYTES;
    for s in &file.manifest.sections {
        let gap = file.read_at(previous_end, s.offset - previous_end)?;
        if let Some(i) = gap.iter().position(|&b| b != 0) {
            failures.push(FormatError::NonZeroPadding {
                offset: previous_end + i as u64,
            });
        }
        previous_end = s.offset + s.length;
    }
    Ok(failures)
}

/// Rule 19: each layer's order tensor is a permutation of its neurons.
fn check_orders(file: &PackedFile) -> Result<Vec<FormatError>> {
    neuron_order_errors(file, &mut SectionReader::new(file, DENSE_SECTION)?)
}

/// Rules 19 and 33 through a reader of the dense section: one error per layer
/// or expert whose order tensor is not a permutation of its neurons. Readers that load the
/// dense part check it here, as `verify` does.
pub fn neuron_order_errors(
    file: &PackedFile,
    dense: &mut SectionReader<'_>,
) -> Result<Vec<FormatError>> {
    let mut failures = Vec::new();
    for layer in &file.manifest.ffn_layers {
        let Some(entry) = file.tensor_entry(&layer.order_tensor) else {
            continue;
        };
        let bytes = dense.read_bytes(entry.offset, entry.length)?;
        if !is_permutation(&bytes, layer.neurons) {
            failures.push(FormatError::NeuronOrder {
                layer: layer.layer,
                neurons: layer.neurons,
            });
        }
    }
    // Rule 33: the same of each expert's order.
    for expert in &file.manifest.experts {
        let Some(entry) = file.tensor_entry(&expert.order_tensor) else {
            continue;
        };
        let bytes = dense.read_bytes(entry.offset, entry.length)?;
        if !is_permutation(&bytes, expert.neurons) {
            failures.push(FormatError::ExpertNeuronOrder {
                layer: expert.layer,
                expert: expert.expert,
                neurons: expert.neurons,
            });
        }
    }
    Ok(failures)
}
