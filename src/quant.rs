//! The block-quantized element types of the packed format (`formats/flashpack-v1.md`,
//! section 9, rules R21-R24): how a row of f32 values becomes blocks of bytes and
//! back.
//!
//! A row of `cols` values (`cols` a multiple of [`BLOCK`]) is `cols / 32` blocks
//! back to back, each the quantization of 32 consecutive values:
//!
//! - `q8_0` (34 bytes): scale `d` (binary16), then 32 signed bytes `q`; a value is
//!   `d * q`.
//! - `q4_1` (20 bytes): scale `d` (binary16), minimum `m` (binary16), then 16
//!   bytes of 4-bit values `q` (byte `j` holds value `j` in its low nibble and value
//!   `j + 16` in its high one); a value is `d * q + m`.
//!
//! The byte layouts are GGML's `block_q8_0` and `block_q4_1`; the rounding is the
//! one the spec states (ties to even, an f32 division), so the bytes can differ
//! from llama.cpp's in the last step of a tie. Both products are exact in f32
//! (an 11-bit mantissa times at most 8 bits), so dequantizing is exact and the
//! same on every path.

use half::f16;

/// Values per block, for every block type.
pub const BLOCK: usize = 32;

/// A block-quantized element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum QuantType {
    /// 8-bit symmetric: one f16 scale per block, `q = round(x / d)`, `d = max|x| / 127`.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit with a minimum: f16 scale and minimum per block, `q = round((x - m) / d)`,
    /// `d = (max - m) / 15`. Chosen over the symmetric `q4_0` by measured error
    /// (formats/flashpack-v1.md, 9.1).
    #[serde(rename = "q4_1")]
    Q4_1,
}

/// Why a row could not be quantized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    /// A NaN or infinity, which no block can represent.
    #[error("value {value} at {index} is not finite")]
    NotFinite {
        /// Its index in the row.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Values so large that the block's scale or minimum overflows binary16
    /// (whose largest finite value is 65504): for `q8_0` a magnitude above
    /// about 65504 x 127.
    #[error("block {block} needs a scale or minimum beyond the binary16 range")]
    ScaleOverflow {
        /// The block's index in the row.
        block: usize,
    },
}

impl QuantType {
    /// Every block type, in the order the spec lists them.
    pub const ALL: [QuantType; 2] = [QuantType::Q8_0, QuantType::Q4_1];

    /// The name the manifest and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_1 => "q4_1",
        }
    }

    /// Bytes of one block of [`BLOCK`] values.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 2 + BLOCK,
            QuantType::Q4_1 => 2 + 2 + BLOCK / 2,
        }
    }

    /// Bytes of a row of `cols` values; `None` unless `cols` is a multiple of [`BLOCK`].
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(BLOCK)
            .then(|| cols / BLOCK * self.block_bytes())
    }

    /// Quantizes `x` (a multiple of [`BLOCK`] values) into `out`
    /// (`row_bytes(x.len())` bytes), exactly as section 9 of the spec says.
    pub fn quantize_row(self, x: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
        assert_eq!(
            Some(out.len()),
            self.row_bytes(x.len()),
            "quantize_row: sizes"
        );
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(QuantizeError::NotFinite {
                index,
                value: x[index],
            });
        }
        let bb = self.block_bytes();
        for (block, (v, o)) in x
            .chunks_exact(BLOCK)
            .zip(out.chunks_exact_mut(bb))
            .enumerate()
        {
            let overflow = QuantizeError::ScaleOverflow { block };
            match self {
                QuantType::Q8_0 => {
                    let amax = v.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
                    let d = f16::from_f32(amax / 127.0);
                    if !d.is_finite() {
                        return Err(overflow);
                    }
                    let dv = d.to_f32();
                    o[..2].copy_from_slice(&d.to_le_bytes());
                    for (q, &xi) in o[2..].iter_mut().zip(v) {
                        let r = if dv == 0.0 {
                            0.0
                        } else {
                            (xi / dv).round_ties_even().clamp(-127.0, 127.0)
                        };
                        *q = (r as i8) as u8;
                    }
                }
                QuantType::Q4_1 => {
                    let lo = v.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                    let hi = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let m = f16::from_f32(lo);
                    let mv = m.to_f32();
                    let d = f16::from_f32((hi - mv).max(0.0) / 15.0);
                    if !m.is_finite() || !d.is_finite() {
                        return Err(overflow);
                    }
                    let dv = d.to_f32();
                    o[..2].copy_from_slice(&d.to_le_bytes());
                    o[2..4].copy_from_slice(&m.to_le_bytes());
                    let q = |xi: f32| -> u8 {
                        if dv == 0.0 {
                            0
                        } else {
                            ((xi - mv) / dv).round_ties_even().clamp(0.0, 15.0) as u8
                        }
                    };
                    for j in 0..BLOCK / 2 {
                        o[4 + j] = q(v[j]) | (q(v[j + BLOCK / 2]) << 4);
                    }
                }
            }
        }
        Ok(())
    }

    /// Dequantizes the blocks of `bytes` into `out` (`BLOCK` values a block).
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        let bb = self.block_bytes();
        assert_eq!(bytes.len() / bb * BLOCK, out.len(), "dequantize_row: sizes");
        for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
            dequantize_block(self, b, o);
        }
    }

    /// The index of the first block whose scale or minimum is not finite (rule 24).
    pub fn first_bad_block(self, bytes: &[u8]) -> Option<usize> {
        let f = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).is_finite();
        bytes
            .chunks_exact(self.block_bytes())
            .position(|b| match self {
                QuantType::Q8_0 => !f(b, 0),
                QuantType::Q4_1 => !(f(b, 0) && f(b, 2)),
            })
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "q8_0" | "q8" => Ok(QuantType::Q8_0),
            "q4_1" | "q4" => Ok(QuantType::Q4_1),
            _ => Err(format!("unknown quantization {s:?} (q8, q4, q8_0 or q4_1)")),
        }
    }
}

/// The scale of a block (its first two bytes) as f32.
#[inline]
pub fn block_scale(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// One block of `qt` into its 32 values.
#[inline]
pub fn dequantize_block(qt: QuantType, b: &[u8], out: &mut [f32]) {
    let d = block_scale(b);
    match qt {
        QuantType::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&b[2..2 + BLOCK]) {
                *o = d * (q as i8) as f32;
            }
        }
        QuantType::Q4_1 => {
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            for j in 0..BLOCK / 2 {
                let byte = b[4 + j];
                out[j] = d * (byte & 0x0f) as f32 + m;
                out[j + BLOCK / 2] = d * (byte >> 4) as f32 + m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u32, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    /// Each dequantized value is within half a step of its source (the step being
    /// the block's scale), the bound round-to-nearest promises.
    #[test]
    fn error_is_within_half_a_step() {
        let x = row(7, 4 * BLOCK);
        for qt in QuantType::ALL {
            let mut bytes = vec![0u8; qt.row_bytes(x.len()).unwrap()];
            qt.quantize_row(&x, &mut bytes).unwrap();
            let mut y = vec![0.0; x.len()];
            qt.dequantize_row(&bytes, &mut y);
            for (b, (xs, ys)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
                let d = block_scale(&bytes[b * qt.block_bytes()..]);
                // The f16 minimum of q4_1 can be up to half an f16 ulp off the
                // block's minimum; allow that on top of half a step.
                let slack = 0.5 * d + xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 1024.0;
                for (a, b) in xs.iter().zip(ys) {
                    assert!((a - b).abs() <= slack, "{qt}: {a} vs {b}, scale {d}");
                }
            }
        }
    }

    /// Hand-computed bytes of one block each (an independent check of the layout
    /// and the rounding: 0.5-steps round to even).
    #[test]
    fn known_blocks() {
        // q8_0: max |x| = 127 * 0.5 gives scale 0.5; x = 0.75 is 1.5 steps: ties to 2.
        let mut x = vec![0.0f32; BLOCK];
        x[0] = 63.5;
        x[1] = 0.75;
        x[2] = -0.25; // -0.5 steps: ties to -0 = 0
        x[3] = -1.25; // -2.5 steps: ties to -2
        let mut b = vec![0u8; 34];
        QuantType::Q8_0.quantize_row(&x, &mut b).unwrap();
        assert_eq!(&b[..2], &f16::from_f32(0.5).to_le_bytes());
        assert_eq!(&b[2..6], &[127, 2, 0, (-2i8) as u8]);
        // q4_1: min 1.0, max 16.0: scale 1.0; 2.5 is 1.5 steps: ties to 2.
        let mut x = vec![1.0f32; BLOCK];
        x[16] = 16.0;
        x[1] = 2.5;
        let mut b = vec![0u8; 20];
        QuantType::Q4_1.quantize_row(&x, &mut b).unwrap();
        assert_eq!(&b[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(&b[2..4], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(
            b[4],
            15 << 4,
            "value 0 low nibble 0, value 16 high nibble 15"
        );
        assert_eq!(b[5], 2, "value 1 = 2.5 rounds to 2");
    }

    #[test]
    fn zero_block_and_bad_input() {
        for qt in QuantType::ALL {
            let x = vec![0.0f32; BLOCK];
            let mut b = vec![0xAAu8; qt.block_bytes()];
            qt.quantize_row(&x, &mut b).unwrap();
            let mut y = vec![1.0; BLOCK];
            qt.dequantize_row(&b, &mut y);
            assert!(y.iter().all(|v| *v == 0.0));
            let mut x = vec![0.0f32; BLOCK];
            x[5] = f32::NAN;
            assert!(matches!(
                qt.quantize_row(&x, &mut b),
                Err(QuantizeError::NotFinite { index: 5, .. })
            ));
            x[5] = 1e9;
            assert!(matches!(
                qt.quantize_row(&x, &mut b),
                Err(QuantizeError::ScaleOverflow { block: 0 })
            ));
        }
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert_eq!(QuantType::Q8_0.first_bad_block(&b), Some(0));
    }
}
