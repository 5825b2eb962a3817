//! Logits written for users to compare with their own reference: a NumPy
//! `.npy` file (format version 1.0) holding a little-endian f32 matrix, which
//! `numpy.load` reads as an array of shape `[rows, cols]`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::pack::output::AtomicOutput;

/// The `.npy` bytes of a row-major `rows x cols` f32 matrix.
pub fn f32_matrix_bytes(data: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    if data.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "a {rows} x {cols} matrix needs {} values, not {}",
            rows * cols,
            data.len()
        )));
    }
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces
    // and ended by a newline so that the data starts on a multiple of 64 bytes.
    let unpadded = 10 + dict.len() + 1;
    let header_len = dict.len() + 1 + (64 - unpadded % 64) % 64;
    let mut out = Vec::with_capacity(10 + header_len + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(10 + header_len - 1, b' ');
    out.push(b'\n');
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Writes the matrix to `path` atomically (a temporary file renamed into place).
pub fn write_f32_matrix(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    let bytes = f32_matrix_bytes(data, rows, cols)?;
    let mut out = AtomicOutput::create(path)?;
    out.write_all(&bytes)?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_to_64_and_the_data_follows_in_order() {
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let bytes = f32_matrix_bytes(&data, 2, 3).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        let values: Vec<f32> = bytes[10 + header_len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, data);
        assert!(f32_matrix_bytes(&data, 4, 3).is_err());
    }
}
