//! Neuron bundles: for packed neuron p (checkpoint neuron `order[p]`), its gate row,
//! up row and down column side by side, so one read brings everything that neuron
//! needs. The element conversions between stored dtypes are [`crate::dtype`]'s.

use rayon::prelude::*;

use crate::dtype::{get_element, put_element, DType};
use crate::input::TensorRef;

/// Copies elements `range` of `src` into `out` (which holds exactly that many
/// elements of `dst`), converting the dtype if it differs.
pub fn convert_range(src: &TensorRef<'_>, start: usize, count: usize, dst: DType, out: &mut [u8]) {
    if src.dtype == dst {
        let s = src.dtype.size_bytes();
        out.copy_from_slice(&src.bytes[start * s..(start + count) * s]);
    } else {
        for j in 0..count {
            put_element(out, dst, j, get_element(src.bytes, src.dtype, start + j));
        }
    }
}

/// The FFN matrices of one layer as the checkpoint stores them.
pub struct LayerFfn<'a> {
    /// `[neurons, hidden]`, gated FFNs only.
    pub gate: Option<TensorRef<'a>>,
    /// `[neurons, hidden]`.
    pub up: TensorRef<'a>,
    /// `[hidden, neurons]`.
    pub down: TensorRef<'a>,
    pub neurons: usize,
    pub hidden: usize,
}

/// Bundles built per parallel task: the down projection is read row by row across
/// a block, so each row segment is read while in cache instead of one strided
/// element per bundle.
const BLOCK: usize = 64;

/// All bundles of a layer in packed order, `order.len() * bundle_bytes` bytes.
pub fn build_layer_bundles(ffn: &LayerFfn<'_>, order: &[u32], dtype: DType) -> Vec<u8> {
    let h = ffn.hidden;
    let size = dtype.size_bytes();
    let part_bytes = h * size;
    let parts = if ffn.gate.is_some() { 3 } else { 2 };
    let stride = parts * part_bytes;
    let mut out = vec![0u8; order.len() * stride];
    out.par_chunks_mut(stride * BLOCK)
        .zip(order.par_chunks(BLOCK))
        .for_each(|(block, neurons)| {
            for (bundle, &neuron) in block.chunks_exact_mut(stride).zip(neurons) {
                let neuron = neuron as usize;
                let mut at = 0;
                if let Some(gate) = &ffn.gate {
                    convert_range(gate, neuron * h, h, dtype, &mut bundle[..part_bytes]);
                    at = part_bytes;
                }
                convert_range(
                    &ffn.up,
                    neuron * h,
                    h,
                    dtype,
                    &mut bundle[at..at + part_bytes],
                );
            }
            // Column `neuron` of down is element (r, neuron) for each output row r.
            let down_at = (parts - 1) * part_bytes;
            let same = ffn.down.dtype == dtype;
            for r in 0..h {
                let row = r * ffn.neurons;
                for (bundle, &neuron) in block.chunks_exact_mut(stride).zip(neurons) {
                    let column = &mut bundle[down_at..];
                    let src = row + neuron as usize;
                    if same {
                        column[r * size..(r + 1) * size]
                            .copy_from_slice(&ffn.down.bytes[src * size..(src + 1) * size]);
                    } else {
                        put_element(
                            column,
                            dtype,
                            r,
                            get_element(ffn.down.bytes, ffn.down.dtype, src),
                        );
                    }
                }
            }
        });
    out
}
