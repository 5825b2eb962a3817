//! The low-precision selector of a gated SiLU layer (issue 12): int8 (one scale
//! per row) or int4 (blocks of 32 with an f16 scale) copies of the gate and up
//! projections, kept in DRAM, from which `|silu(g~) * u~|` is computed for every
//! neuron and compared with the layer's product threshold. Only the neurons it
//! selects are then computed exactly (in DRAM or from their bundles on flash):
//! selection errors can happen only near the threshold, and no training is
//! needed.

use crate::runtime::kernels::silu;
use crate::runtime::weights::Matrix;

/// Values per int4 block (one f16 scale each).
pub const INT4_BLOCK: usize = 32;

/// How a low-precision copy stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LowBits {
    /// One signed byte per weight, one f32 scale per row (8 bits and 32 per row).
    Int8,
    /// Two weights per byte, one f16 scale per 32 (4.5 bits per weight).
    Int4,
}

/// A quantized `[rows, cols]` matrix.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: LowBits,
    /// Int8: `rows * cols` bytes (i8). Int4: `rows * ceil(cols / 2)` bytes, low
    /// nibble first, each nibble `q + 8` for `q` in `-8..=7`.
    pub data: Vec<u8>,
    /// Int8: one per row. Int4: one per block of 32 of a row (f16 values, held
    /// widened).
    pub scales: Vec<f32>,
}

impl QuantMatrix {
    /// Symmetric round-to-nearest quantization of `m`.
    pub fn quantize(m: &Matrix, bits: LowBits) -> QuantMatrix {
        let (rows, cols) = (m.rows, m.cols);
        let w = m.data.to_f32();
        let mut data = Vec::new();
        let mut scales = Vec::new();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            match bits {
                LowBits::Int8 => {
                    let max = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    scales.push(scale);
                    data.extend(
                        row.iter()
                            .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
                LowBits::Int4 => {
                    let mut nibbles = Vec::with_capacity(cols);
                    for block in row.chunks(INT4_BLOCK) {
                        let max = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        // The scale is stored as f16: quantize against the
                        // rounded value, so that dequantization matches.
                        let scale =
                            half::f16::from_f32(if max > 0.0 { max / 7.0 } else { 1.0 }).to_f32();
                        let scale = if scale > 0.0 { scale } else { 1.0 };
                        scales.push(scale);
                        nibbles.extend(
                            block
                                .iter()
                                .map(|v| ((v / scale).round().clamp(-8.0, 7.0) as i8 + 8) as u8),
                        );
                    }
                    for pair in nibbles.chunks(2) {
                        data.push(pair[0] | pair.get(1).map_or(0, |h| h << 4));
                    }
                }
            }
        }
        QuantMatrix {
            rows,
            cols,
            bits,
            data,
            scales,
        }
    }

    /// Bytes this copy holds in DRAM as stored (scales at their stored width:
    /// f32 per int8 row, f16 per int4 block).
    pub fn stored_bytes(&self) -> usize {
        self.data.len()
            + self.scales.len()
                * match self.bits {
                    LowBits::Int8 => 4,
                    LowBits::Int4 => 2,
                }
    }

    /// `out[r] = row r . x`, dequantized.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        match self.bits {
            LowBits::Int8 => {
                for (r, o) in out.iter_mut().enumerate() {
                    let q = &self.data[r * self.cols..(r + 1) * self.cols];
                    *o = self.scales[r] * dot_i8(q, x);
                }
            }
            LowBits::Int4 => {
                let row_bytes = self.cols.div_ceil(2);
                let blocks = self.cols.div_ceil(INT4_BLOCK);
                let mut buf = [0.0f32; INT4_BLOCK];
                for (r, o) in out.iter_mut().enumerate() {
                    let q = &self.data[r * row_bytes..(r + 1) * row_bytes];
                    let mut sum = 0.0f32;
                    for b in 0..blocks {
                        let start = b * INT4_BLOCK;
                        let len = INT4_BLOCK.min(self.cols - start);
                        for (k, v) in buf[..len].iter_mut().enumerate() {
                            let i = start + k;
                            let byte = q[i / 2];
                            let nib = if i.is_multiple_of(2) {
                                byte & 15
                            } else {
                                byte >> 4
                            };
                            *v = nib as f32 - 8.0;
                        }
                        sum += self.scales[r * blocks + b]
                            * dot_f32(&buf[..len], &x[start..start + len]);
                    }
                    *o = sum;
                }
            }
        }
    }
}

/// Eight independent sums, so that the compiler vectorizes.
fn dot_i8(q: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (qc, xc) = (q.chunks_exact(8), x.chunks_exact(8));
    let (qr, xr) = (qc.remainder(), xc.remainder());
    for (a, b) in qc.zip(xc) {
        for k in 0..8 {
            acc[k] += (a[k] as i8) as f32 * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in qr.iter().zip(xr) {
        s += (*a as i8) as f32 * b;
    }
    s
}

fn dot_f32(a: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, xc) = (a.chunks_exact(8), x.chunks_exact(8));
    let (ar, xr) = (ac.remainder(), xc.remainder());
    for (a, b) in ac.zip(xc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in ar.iter().zip(xr) {
        s += a * b;
    }
    s
}

/// One layer's selector: low-precision gate and up, biases, the threshold.
#[derive(Debug, Clone)]
pub struct LowBitSelector {
    pub gate: QuantMatrix,
    pub up: QuantMatrix,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    /// Neurons with `|silu(g~) * u~|` above this are selected.
    pub threshold: f32,
}

impl LowBitSelector {
    /// Bytes the selector holds in DRAM (what counts against a budget).
    pub fn stored_bytes(&self) -> usize {
        self.gate.stored_bytes()
            + self.up.stored_bytes()
            + 4 * (self.gate_bias.as_ref().map_or(0, Vec::len)
                + self.up_bias.as_ref().map_or(0, Vec::len))
    }

    /// The approximate neuron values `silu(g~) * u~` for one token (`scratch`
    /// is resized; `values` gets `width` entries).
    pub fn values(&self, x: &[f32], scratch: &mut Vec<f32>, values: &mut Vec<f32>) {
        let width = self.gate.rows;
        scratch.resize(width, 0.0);
        values.resize(width, 0.0);
        self.gate.matvec(x, scratch);
        self.up.matvec(x, values);
        for (j, (v, g)) in values.iter_mut().zip(scratch.iter()).enumerate() {
            let g = g + self.gate_bias.as_ref().map_or(0.0, |b| b[j]);
            let u = *v + self.up_bias.as_ref().map_or(0.0, |b| b[j]);
            *v = silu(g) * u;
        }
    }

    /// The selected neurons of one token, ascending.
    pub fn select(
        &self,
        x: &[f32],
        scratch: &mut Vec<f32>,
        values: &mut Vec<f32>,
        active: &mut Vec<u32>,
    ) {
        self.values(x, scratch, values);
        active.clear();
        active.extend(
            values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.abs() > self.threshold)
                .map(|(j, _)| j as u32),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::weights::Storage;

    fn matrix(rows: usize, cols: usize) -> Matrix {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        Matrix::new(rows, cols, Storage::F32(data)).unwrap()
    }

    #[test]
    fn dequantized_products_are_within_half_a_step_per_weight() {
        let (rows, cols) = (5, 70);
        let m = matrix(rows, cols);
        let w = m.data.to_f32();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        for bits in [LowBits::Int8, LowBits::Int4] {
            let q = QuantMatrix::quantize(&m, bits);
            let mut out = vec![0.0; rows];
            q.matvec(&x, &mut out);
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|k| w[r * cols + k] as f64 * x[k] as f64)
                    .sum();
                // |error| <= sum_k (scale_k / 2) |x_k|.
                let bound: f64 = (0..cols)
                    .map(|k| {
                        let s = match bits {
                            LowBits::Int8 => q.scales[r],
                            LowBits::Int4 => {
                                q.scales[r * cols.div_ceil(INT4_BLOCK) + k / INT4_BLOCK]
                            }
                        };
                        0.5 * s as f64 * x[k].abs() as f64
                    })
                    .sum();
                let err = (out[r] as f64 - exact).abs();
                assert!(
                    err <= bound * 1.0001 + 1e-5,
                    "{bits:?} row {r}: {err} > {bound}"
                );
            }
        }
        let q8 = QuantMatrix::quantize(&m, LowBits::Int8);
        let q4 = QuantMatrix::quantize(&m, LowBits::Int4);
        assert_eq!(q8.stored_bytes(), rows * cols + 4 * rows);
        // 70 columns: 35 bytes and 3 f16 scales per row.
        assert_eq!(q4.stored_bytes(), rows * (35 + 3 * 2));
    }
}
