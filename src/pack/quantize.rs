//! Writing block-quantized weights (`convert --quant`, format section 9): a
//! dense matrix row by row, and an FFN layer's bundles with each part (gate row,
//! up row, down column) quantized as one row of `hidden` values.
//!
//! Values are quantized from the checkpoint's own values (widened to f32), never
//! from a `--dtype` rounding of them. Work is split over rows or bundles and each
//! output byte depends only on its own row, so the bytes do not depend on the
//! thread count.

use rayon::prelude::*;

use crate::dtype::get_element;
use crate::error::{Error, Result};
use crate::input::TensorRef;
use crate::pack::bundle::LayerFfn;
use crate::quant::QuantType;

/// Rows quantized per piece written: bounded memory whatever the tensor size.
const PIECE_VALUES: usize = 1 << 20;

fn quant_error(tensor: &str, e: crate::quant::QuantizeError) -> Error {
    Error::InvalidArgument(format!("cannot quantize {tensor}: {e}"))
}

/// The bytes of `t` (`[rows, cols]`) quantized to `q`, handed to `sink` a
/// bounded piece of rows at a time.
pub fn quantize_matrix(
    t: &TensorRef<'_>,
    q: QuantType,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let [rows, cols] = *t.shape else {
        return Err(Error::InvalidArgument(format!(
            "cannot quantize {}: shape {:?} is not a matrix",
            t.name, t.shape
        )));
    };
    let row_bytes = q.row_bytes(cols).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot quantize {}: rows of {cols} values are not a multiple of {}",
            t.name,
            crate::quant::BLOCK
        ))
    })?;
    let rows_per_piece = (PIECE_VALUES / cols.max(1)).max(1);
    let mut start = 0;
    let mut buf = Vec::new();
    while start < rows {
        let n = rows_per_piece.min(rows - start);
        buf.resize(n * row_bytes, 0);
        buf.par_chunks_mut(row_bytes)
            .enumerate()
            .try_for_each(|(i, out)| {
                let r = start + i;
                let x: Vec<f32> = (0..cols)
                    .map(|c| get_element(t.bytes, t.dtype, r * cols + c))
                    .collect();
                q.quantize_row(&x, out)
                    .map_err(|e| quant_error(&format!("{} row {r}", t.name), e))
            })?;
        sink(&buf)?;
        start += n;
    }
    Ok(())
}

/// Format 9.6: the per-output-channel scale of a down projection
/// (`[hidden, neurons]`): each row's largest magnitude, 1 for a row of zeros.
/// A value that is not finite cannot be quantized (9.1).
pub fn down_scale(down: &TensorRef<'_>, hidden: usize, neurons: usize) -> Result<Vec<f32>> {
    (0..hidden)
        .into_par_iter()
        .map(|r| {
            let mut m = 0.0f32;
            for i in 0..neurons {
                let v = get_element(down.bytes, down.dtype, r * neurons + i);
                if !v.is_finite() {
                    return Err(Error::InvalidArgument(format!(
                        "cannot quantize {} row {r}: a value that is not finite",
                        down.name
                    )));
                }
                m = m.max(v.abs());
            }
            Ok(if m == 0.0 { 1.0 } else { m })
        })
        .collect()
}

/// All bundles of a layer in packed order, each part quantized to `q`, each
/// bundle `stride` bytes (format 9.3: the parts, then zero padding). With
/// `down_scale` (9.6), element `r` of each down column is divided by
/// `down_scale[r]` before it is quantized.
pub fn build_quantized_bundles(
    ffn: &LayerFfn<'_>,
    order: &[u32],
    q: QuantType,
    stride: usize,
    down_scale: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let h = ffn.hidden;
    let parts = if ffn.gate.is_some() { 3 } else { 2 };
    let part_bytes = q.row_bytes(h).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot quantize the FFN bundles: hidden size {h} is not a multiple of {}",
            crate::quant::BLOCK
        ))
    })?;
    assert!(
        stride >= parts * part_bytes,
        "bundle stride below its parts"
    );
    let mut out = vec![0u8; order.len() * stride];
    out.par_chunks_mut(stride)
        .zip(order.par_iter())
        .try_for_each(|(bundle, &neuron)| {
            let neuron = neuron as usize;
            let mut x = vec![0.0f32; h];
            let mut at = 0;
            let mut rows: Vec<(&TensorRef<'_>, bool)> = Vec::with_capacity(3);
            if let Some(g) = &ffn.gate {
                rows.push((g, false));
            }
            rows.push((&ffn.up, false));
            rows.push((&ffn.down, true));
            for (t, is_column) in rows {
                for (r, v) in x.iter_mut().enumerate() {
                    // Gate and up: row `neuron` of [neurons, hidden]; down: column
                    // `neuron` of [hidden, neurons].
                    let i = if is_column {
                        r * ffn.neurons + neuron
                    } else {
                        neuron * h + r
                    };
                    *v = get_element(t.bytes, t.dtype, i);
                }
                if let (true, Some(scale)) = (is_column, down_scale) {
                    for (v, s) in x.iter_mut().zip(scale) {
                        *v /= s;
                    }
                }
                q.quantize_row(&x, &mut bundle[at..at + part_bytes])
                    .map_err(|e| quant_error(&format!("{} neuron {neuron}", t.name), e))?;
                at += part_bytes;
            }
            Ok::<(), Error>(())
        })?;
    Ok(out)
}

/// The quantization error of one packed tensor (or one part of an FFN layer's
/// bundles) against the checkpoint it was made from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorQuantError {
    /// The checkpoint tensor's name.
    pub tensor: String,
    /// The block type it is stored in (`q8_0`, `q4_1`).
    pub dtype: &'static str,
    /// `sum (x - x')^2 / sum x^2` over the tensor, in f64.
    pub nmse: f64,
    /// Blocks whose bytes differ from the source quantized as the format says
    /// (section 9.1): 0 for a file `convert` wrote.
    pub blocks_differing: u64,
    /// A down projection with a per-channel scale (9.6): the scale's values
    /// that differ from the scale computed from the source (0 for a file
    /// `convert` wrote); absent without a scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scales_differing: Option<u64>,
}

/// Stated limits `verify --against` holds a quantized file to: per-tensor NMSE,
/// final-position logit NMSE over its prompts, and the held-out perplexity
/// increase with `--text` (a fraction), for the coarsest type the file uses.
/// Set from measurements (formats/flashpack-v1.md 9.4, BENCHMARKS.md) with
/// room for models that quantize worse than those: per-tensor NMSE measured
/// 2-4e-5 (q8_0) and 5-8e-3 (q4_1); logit NMSE up to 4.6e-4 (q8_0) and, for
/// q4_1, 2e-3 to 1.1e-2 on the trained fixtures but 0.12-0.26 on the untrained
/// tiny ones (near-flat logits); perplexity within 0.01% (q8_0) and 2% (q4_1).
/// A quantizer that is wrong (values in the wrong place, a wrong scale) gives
/// NMSEs near 1 or above; the exact check is that every block's bytes are the
/// source quantized as the format says.
pub fn limits(q: QuantType) -> (f64, f64, f64) {
    match q {
        QuantType::Q8_0 => (1e-3, 2e-2, 0.02),
        QuantType::Q4_1 => (5e-2, 0.5, 0.15),
    }
}

/// NMSE accumulator in f64.
#[derive(Default)]
struct Nmse {
    err: f64,
    sum: f64,
}

impl Nmse {
    fn add(&mut self, source: &[f32], packed: &[f32]) {
        for (&x, &y) in source.iter().zip(packed) {
            self.err += (x as f64 - y as f64).powi(2);
            self.sum += (x as f64).powi(2);
        }
    }
    fn value(&self) -> f64 {
        if self.sum == 0.0 {
            if self.err == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            self.err / self.sum
        }
    }
}

/// Compares the quantized row `packed` (blocks of `q`) with the source values
/// `source` of the same row: (block bytes differing, NMSE terms). With a down
/// scale (9.6) `(expected, stored)`, the blocks must be the source divided by
/// `expected` (the scale computed from the source) and the values compared are
/// the blocks' values times `stored` (the file's scale).
fn compare_row(
    q: QuantType,
    source: &[f32],
    packed: &[u8],
    scale: Option<(&[f32], &[f32])>,
    nmse: &mut Nmse,
) -> u64 {
    let mut scaled = source.to_vec();
    if let Some((expected, _)) = scale {
        for (v, s) in scaled.iter_mut().zip(expected) {
            *v /= s;
        }
    }
    let mut expected = vec![0u8; packed.len()];
    let differing = match q.quantize_row(&scaled, &mut expected) {
        Ok(()) => expected
            .chunks(q.block_bytes())
            .zip(packed.chunks(q.block_bytes()))
            .filter(|(a, b)| a != b)
            .count() as u64,
        Err(_) => (packed.len() / q.block_bytes()) as u64,
    };
    let mut values = vec![0.0f32; source.len()];
    q.dequantize_row(packed, &mut values);
    if let Some((_, stored)) = scale {
        for (v, s) in values.iter_mut().zip(stored) {
            *v *= s;
        }
    }
    nmse.add(source, &values);
    differing
}

/// The quantization error of every block-typed tensor and FFN part of `file`
/// against `ckpt` (`dense`: the raw dense section; `orders`: each FFN layer
/// entry's neuron order, in `ffn_layers` order). Experts are not compared here:
/// this version does not write quantized experts (`convert --quant` refuses a
/// mixture of experts) and `verify --against` reports one as a failure.
pub fn quantization_errors(
    file: &crate::format::PackedFile,
    ckpt: &crate::input::Checkpoint,
    dense: &[u8],
    orders: &[Vec<usize>],
) -> Result<Vec<TensorQuantError>> {
    use crate::format::layout::BundlePart;
    let mut out = Vec::new();
    for t in &file.manifest.tensors {
        let Some(q) = t.dtype.quant() else { continue };
        if t.section != crate::format::layout::DENSE_SECTION {
            continue;
        }
        let src = ckpt.tensor(&t.name)?;
        let bytes = &dense[t.offset as usize..(t.offset + t.length) as usize];
        let cols = *src.shape.last().unwrap_or(&1);
        let row_bytes = q.row_bytes(cols).expect("checked at open: rule 23");
        let mut nmse = Nmse::default();
        let mut differing = 0;
        let mut x = vec![0.0f32; cols];
        for (r, row) in bytes.chunks(row_bytes).enumerate() {
            for (c, v) in x.iter_mut().enumerate() {
                *v = get_element(src.bytes, src.dtype, r * cols + c);
            }
            differing += compare_row(q, &x, row, None, &mut nmse);
        }
        out.push(TensorQuantError {
            tensor: t.name.clone(),
            dtype: q.name(),
            nmse: nmse.value(),
            blocks_differing: differing,
            scales_differing: None,
        });
    }
    for (i, layer) in file.manifest.ffn_layers.iter().enumerate() {
        let Some(q) = layer.dtype.quant() else {
            continue;
        };
        let section = file.read_section(&layer.section)?;
        let (h, n) = (layer.hidden as usize, layer.neurons as usize);
        let row_bytes = q.row_bytes(h).expect("checked at open: rule 23");
        let (gate, up, down) = ckpt.names.layers[layer.layer as usize].ffn.parts();
        for (k, part) in layer.parts.iter().enumerate() {
            let names = match part {
                BundlePart::Gate => gate.expect("parts match the architecture"),
                BundlePart::Up => up,
                BundlePart::Down => down,
            };
            let src = ckpt.tensor(&names.weight)?;
            // Format 9.6: the down part's per-channel scale, as stored and as
            // computed from the source.
            let scale_name = crate::format::layout::down_scale_tensor_name(layer.layer as usize);
            let scale = match (part, file.tensor_entry(&scale_name)) {
                (BundlePart::Down, Some(t)) => {
                    let bytes = &dense[t.offset as usize..(t.offset + t.length) as usize];
                    let stored: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    Some((down_scale(&src, h, n)?, stored))
                }
                _ => None,
            };
            let scales_differing = scale.as_ref().map(|(expected, stored)| {
                expected
                    .iter()
                    .zip(stored)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count() as u64
            });
            let mut nmse = Nmse::default();
            let mut differing = 0;
            let mut x = vec![0.0f32; h];
            for (p, &neuron) in orders[i].iter().enumerate() {
                for (r, v) in x.iter_mut().enumerate() {
                    let at = match part {
                        BundlePart::Down => r * n + neuron,
                        _ => neuron * h + r,
                    };
                    *v = get_element(src.bytes, src.dtype, at);
                }
                let start = p * layer.bundle_bytes as usize + k * row_bytes;
                differing += compare_row(
                    q,
                    &x,
                    &section[start..start + row_bytes],
                    scale.as_ref().map(|(e, s)| (&e[..], &s[..])),
                    &mut nmse,
                );
            }
            out.push(TensorQuantError {
                tensor: names.weight.clone(),
                dtype: q.name(),
                nmse: nmse.value(),
                blocks_differing: differing,
                scales_differing,
            });
        }
    }
    Ok(out)
}
