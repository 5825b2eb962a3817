//! The floating-point storage types flashpack reads and keeps weights in.
//!
//! Weights stay in their stored type in memory and on disk; compute widens them to
//! f32. Every conversion between f32 and the stored little-endian bytes is here:
//! widening, and narrowing with round-to-nearest-even as torch's `.to(dtype)`.

use half::{bf16, f16};

/// A floating-point element type of stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16 (5-bit exponent: range about 6.5e4).
    F16,
    /// bfloat16 (f32's 8-bit exponent, 8 significant bits).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors and this project's JSON output use.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The type of a safetensors dtype; `None` for the types flashpack does
    /// not read (integers, f64, fp8).
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        match dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Widens little-endian values of `dtype` in `bytes` into `out` (same element count).
///
/// # Panics
/// If `bytes.len() != out.len() * dtype.size_bytes()`: callers size both from one
/// validated shape, so a mismatch is a bug, not bad input.
pub fn widen_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        out.len() * dtype.size_bytes(),
        "widen_into: length mismatch"
    );
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
}

/// Widens a whole little-endian buffer of `dtype` into a new f32 vector.
pub fn widen(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / dtype.size_bytes()];
    widen_into(dtype, &bytes[..out.len() * dtype.size_bytes()], &mut out);
    out
}

/// Reads element `i` of little-endian `bytes` of `dtype` as f32.
#[inline]
pub fn get_element(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]),
        DType::F16 => f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
    }
}

/// Writes `value` as element `i` of `out`, narrowing with round-to-nearest-even as
/// torch's `.to(dtype)` does.
#[inline]
pub fn put_element(out: &mut [u8], dtype: DType, i: usize, value: f32) {
    match dtype {
        DType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&value.to_le_bytes()),
        DType::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes()),
        DType::BF16 => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(value).to_le_bytes()),
    }
}

/// `values` narrowed to little-endian bytes of `dtype` (round-to-nearest-even).
pub fn narrow(dtype: DType, values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    let values = values.into_iter();
    let mut out = Vec::with_capacity(values.size_hint().0 * dtype.size_bytes());
    let mut element = [0u8; 4];
    for v in values {
        put_element(&mut element, dtype, 0, v);
        out.extend_from_slice(&element[..dtype.size_bytes()]);
    }
    out
}
