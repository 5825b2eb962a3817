//! The low-precision selector of a gated SiLU layer (issue 12): int8 (one scale
//! per row) or int4 (blocks of 32 with an f16 scale) copies of the gate and up
//! projections, kept in DRAM, from which `|silu(g~) * u~|` is computed for every
//! neuron and compared with the layer's product threshold. Only the neurons it
//! selects are then computed exactly (in DRAM or from their bundles on flash):
//! selection errors can happen only near the threshold, and no training is
//! needed.
//!
//! The token's activation is quantized too (int8, one scale per vector), so
//! that every product is an integer dot product: exact in `i32`, so the AVX2
//! kernel (`maddubs`/`madd`, chosen at run time) and the portable one return
//! the same integers, and the few float operations after them (scales, int4's
//! eight block lanes) are the same sequence in both. Selections are therefore
//! identical on every CPU path and for any thread count (rows are split across
//! threads, never a sum).

use rayon::prelude::*;

use crate::runtime::kernels::silu;
use crate::runtime::weights::Matrix;

/// Values per int4 block (one f16 scale each).
pub const INT4_BLOCK: usize = 32;

/// Rows and activations are padded with zeros to a multiple of this many
/// values, so that the kernels work on whole 32-byte vectors (int4: whole
/// blocks).
const PAD: usize = 32;

/// How a low-precision copy stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
    /// `cols` rounded up to a multiple of 32 (the padding holds zeros).
    pub padded_cols: usize,
    /// Int8: `rows * padded_cols` bytes (i8). Int4: `rows * padded_cols / 2`
    /// bytes, 16 per block of 32 values: byte `j` of a block holds value `j`
    /// in its low nibble and value `j + 16` in its high nibble, each as `q + 8`
    /// for `q` in `-8..=7` (the layout a 32-byte vector unpacks in two steps).
    pub data: Vec<u8>,
    /// Int8: one per row. Int4: one per block of 32 of a row (f16 values, held
    /// widened).
    pub scales: Vec<f32>,
}

impl QuantMatrix {
    /// Symmetric round-to-nearest quantization of `m`.
    pub fn quantize(m: &Matrix, bits: LowBits) -> QuantMatrix {
        Self::quantize_values(m.rows, m.cols, &m.data.to_f32(), bits)
    }

    /// As [`QuantMatrix::quantize`], refusing what the file format cannot hold
    /// (section 10.1): a value that is not finite, or an int4 block whose
    /// scale is beyond the f16 range.
    pub fn quantize_checked(
        rows: usize,
        cols: usize,
        w: &[f32],
        bits: LowBits,
    ) -> Result<QuantMatrix, String> {
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "value {} of row {} is not finite",
                i % cols.max(1),
                i / cols.max(1)
            ));
        }
        let q = Self::quantize_values(rows, cols, w, bits);
        if let Some(i) = q.scales.iter().position(|s| !s.is_finite()) {
            return Err(format!(
                "scale {i} is beyond the f16 range (a value above {} in magnitude)",
                7.0 * 65504.0
            ));
        }
        Ok(q)
    }

    /// Symmetric round-to-nearest quantization of `rows x cols` values, row
    /// after row (format section 10.1 says it for the file).
    pub fn quantize_values(rows: usize, cols: usize, w: &[f32], bits: LowBits) -> QuantMatrix {
        assert_eq!(w.len(), rows * cols, "quantize_values: shape");
        let padded_cols = cols.div_ceil(PAD) * PAD;
        let mut data = Vec::with_capacity(rows * padded_cols);
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
                    data.resize(data.len() + padded_cols - cols, 0);
                }
                LowBits::Int4 => {
                    for block in row.chunks(INT4_BLOCK) {
                        let max = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        // The scale is stored as f16: quantize against the
                        // rounded value, so that dequantization matches.
                        let scale =
                            half::f16::from_f32(if max > 0.0 { max / 7.0 } else { 1.0 }).to_f32();
                        let scale = if scale > 0.0 { scale } else { 1.0 };
                        scales.push(scale);
                        // `q + 8`; padding is q = 0.
                        let mut nibbles = [8u8; INT4_BLOCK];
                        for (n, v) in nibbles.iter_mut().zip(block) {
                            *n = ((v / scale).round().clamp(-8.0, 7.0) as i8 + 8) as u8;
                        }
                        let half = INT4_BLOCK / 2;
                        data.extend((0..half).map(|j| nibbles[j] | (nibbles[j + half] << 4)));
                    }
                }
            }
        }
        QuantMatrix {
            rows,
            cols,
            bits,
            padded_cols,
            data,
            scales,
        }
    }

    /// The scales as the file stores them: f32 per int8 row, f16 per int4
    /// block (little-endian; an int4 scale is an f16 value already).
    pub fn scale_bytes(&self) -> Vec<u8> {
        match self.bits {
            LowBits::Int8 => self.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            LowBits::Int4 => self
                .scales
                .iter()
                .flat_map(|&s| half::f16::from_f32(s).to_le_bytes())
                .collect(),
        }
    }

    /// A copy read back from the file's bytes (`data` as [`QuantMatrix::data`],
    /// `scale_bytes` as [`QuantMatrix::scale_bytes`] writes them), checking
    /// what rule 29 asks of the bytes alone: every scale finite and above
    /// zero, no int8 value -128 (the SIMD kernel's sign trick needs
    /// -127..127), the padding values zero. Lengths are the caller's (rule 27).
    pub fn from_stored(
        rows: usize,
        cols: usize,
        bits: LowBits,
        data: Vec<u8>,
        scale_bytes: &[u8],
    ) -> Result<QuantMatrix, String> {
        let padded_cols = cols.div_ceil(PAD) * PAD;
        let scales: Vec<f32> = match bits {
            LowBits::Int8 => scale_bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            LowBits::Int4 => scale_bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        let q = QuantMatrix {
            rows,
            cols,
            bits,
            padded_cols,
            data,
            scales,
        };
        let (want_data, want_scales) = match bits {
            LowBits::Int8 => (rows * padded_cols, rows),
            LowBits::Int4 => (rows * padded_cols / 2, rows * padded_cols / INT4_BLOCK),
        };
        if q.data.len() != want_data || q.scales.len() != want_scales {
            return Err(format!(
                "{} value bytes and {} scales, expected {want_data} and {want_scales}",
                q.data.len(),
                q.scales.len()
            ));
        }
        if let Some(i) = q.scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(format!(
                "scale {i} is {}, not a finite number above 0",
                q.scales[i]
            ));
        }
        let rb = q.row_bytes();
        for r in 0..rows {
            let row = &q.data[r * rb..(r + 1) * rb];
            for c in 0..padded_cols {
                let (value, padding_ok) = match bits {
                    LowBits::Int8 => (row[c] as i8 as i32, row[c] == 0),
                    LowBits::Int4 => {
                        let (b, j) = (c / INT4_BLOCK, c % INT4_BLOCK);
                        let byte = row[b * 16 + j % 16];
                        let nibble = if j < 16 { byte & 15 } else { byte >> 4 };
                        (nibble as i32 - 8, nibble == 8)
                    }
                };
                if bits == LowBits::Int8 && value == -128 {
                    return Err(format!("row {r}, value {c} is -128"));
                }
                if c >= cols && !padding_ok {
                    return Err(format!("row {r}, padding value {c} is not zero"));
                }
            }
        }
        Ok(q)
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

    fn row_bytes(&self) -> usize {
        match self.bits {
            LowBits::Int8 => self.padded_cols,
            LowBits::Int4 => self.padded_cols / 2,
        }
    }

    /// `row r . x` with `x` quantized: the integer dot product times the
    /// scales (int4: eight block lanes, see [`dot_i4`]).
    #[inline]
    pub fn row_dot(&self, r: usize, x: &QuantActivation, path: Path) -> f32 {
        debug_assert_eq!(x.q.len(), self.padded_cols);
        let rb = self.row_bytes();
        let w = &self.data[r * rb..(r + 1) * rb];
        match self.bits {
            LowBits::Int8 => dot_i8(w, &x.q, path) as f32 * self.scales[r] * x.scale,
            LowBits::Int4 => {
                let blocks = self.padded_cols / INT4_BLOCK;
                dot_i4(w, &self.scales[r * blocks..(r + 1) * blocks], &x.q, path) * x.scale
            }
        }
    }

    /// `out[r] = row r . x` for every row, `x` quantized first.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        let mut q = QuantActivation::default();
        q.quantize(x, self.padded_cols);
        let path = Path::best();
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.row_dot(r, &q, path);
        }
    }
}

impl From<crate::format::layout::SelectorType> for LowBits {
    fn from(t: crate::format::layout::SelectorType) -> LowBits {
        match t {
            crate::format::layout::SelectorType::Int8 => LowBits::Int8,
            crate::format::layout::SelectorType::Int4 => LowBits::Int4,
        }
    }
}

impl From<LowBits> for crate::format::layout::SelectorType {
    fn from(b: LowBits) -> crate::format::layout::SelectorType {
        match b {
            LowBits::Int8 => crate::format::layout::SelectorType::Int8,
            LowBits::Int4 => crate::format::layout::SelectorType::Int4,
        }
    }
}

/// The selector copies (gate, up) of one FFN layer as format section 10
/// defines them: the gate and up parts of each bundle of `bundles` (the
/// layer's section, `stride` bytes a bundle, parts gate, up, down of `hidden`
/// values in `dtype`) read as binary32 (a block type dequantized as 9.1 says),
/// quantized row by row. Bundle `p` gives row `p`: the copies are in packed
/// neuron order, as the bundles are. `convert` writes these; `verify` compares
/// the file's copies with them (rule 29).
pub fn copies_from_bundles(
    bundles: &[u8],
    neurons: usize,
    hidden: usize,
    dtype: crate::format::layout::TableDType,
    stride: usize,
    bits: LowBits,
) -> Result<(QuantMatrix, QuantMatrix), String> {
    let part_bytes = dtype
        .row_bytes(hidden as u64)
        .ok_or_else(|| format!("{} rows of {hidden} values have no size", dtype.name()))?
        as usize;
    if bundles.len() < neurons * stride || stride < 2 * part_bytes {
        return Err(format!(
            "{} bytes of bundles, expected {neurons} of {stride}",
            bundles.len()
        ));
    }
    let mut gate = vec![0.0f32; neurons * hidden];
    let mut up = vec![0.0f32; neurons * hidden];
    for p in 0..neurons {
        let bundle = &bundles[p * stride..(p + 1) * stride];
        for (k, out) in [&mut gate, &mut up].into_iter().enumerate() {
            let bytes = &bundle[k * part_bytes..(k + 1) * part_bytes];
            let out = &mut out[p * hidden..(p + 1) * hidden];
            match (dtype.weight(), dtype.quant()) {
                (Some(w), _) => crate::dtype::widen_into(w, bytes, out),
                (None, Some(q)) => q.dequantize_row(bytes, out),
                (None, None) => return Err(format!("{} is not a weight type", dtype.name())),
            }
        }
    }
    Ok((
        QuantMatrix::quantize_checked(neurons, hidden, &gate, bits)
            .map_err(|e| format!("gate: {e}"))?,
        QuantMatrix::quantize_checked(neurons, hidden, &up, bits)
            .map_err(|e| format!("up: {e}"))?,
    ))
}

/// One token's activation as int8 with one scale (symmetric, round to
/// nearest), padded with zeros.
#[derive(Debug, Clone, Default)]
pub struct QuantActivation {
    pub q: Vec<i8>,
    pub scale: f32,
}

impl QuantActivation {
    /// Quantizes `x` into `padded` values (`padded >= x.len()`), reusing the
    /// buffer.
    pub fn quantize(&mut self, x: &[f32], padded: usize) {
        let max = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        self.scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            1.0
        };
        self.q.clear();
        self.q.extend(
            x.iter()
                .map(|v| (v / self.scale).round().clamp(-127.0, 127.0) as i8),
        );
        self.q.resize(padded, 0);
    }
}

/// Which kernels compute the integer dot products. Both give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Path {
    /// The fastest path this CPU has.
    pub fn best() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if *AVX2.get_or_init(|| is_x86_feature_detected!("avx2")) {
                return Path::Avx2;
            }
        }
        Path::Portable
    }
}

/// `sum w[k] * x[k]` over signed bytes (`w` holds i8 as u8), exact.
#[inline]
pub fn dot_i8(w: &[u8], x: &[i8], path: Path) -> i32 {
    assert_eq!(w.len(), x.len(), "dot_i8: length mismatch");
    assert!(x.len().is_multiple_of(PAD), "dot_i8: unpadded");
    match path {
        Path::Portable => w.iter().zip(x).fold(0i32, |s, (&w, &x)| {
            s.wrapping_add(w as i8 as i32 * x as i32)
        }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::Avx2` is only chosen when the CPU has AVX2; lengths
        // are equal multiples of 32.
        Path::Avx2 => unsafe { x86::dot_i8(w, x) },
    }
}

/// An int4 row (`w`: 16 bytes per block, see [`QuantMatrix::data`]) with
/// `x`: for each block, eight integer partial sums (lane `k` over values
/// `4k..4k + 4`) are scaled and added to eight f32 lanes in block order, then
/// the lanes are summed pairwise (`k + 4`, `k + 2`, `k + 1`). The order is
/// what a 256-bit vector computes, and the portable path follows it.
#[inline]
pub fn dot_i4(w: &[u8], scales: &[f32], x: &[i8], path: Path) -> f32 {
    assert_eq!(w.len() * 2, x.len(), "dot_i4: length mismatch");
    assert_eq!(scales.len() * INT4_BLOCK, x.len(), "dot_i4: scales");
    match path {
        Path::Portable => {
            let mut acc = [0.0f32; 8];
            for (b, &scale) in scales.iter().enumerate() {
                let bytes = &w[b * 16..(b + 1) * 16];
                let xb = &x[b * INT4_BLOCK..(b + 1) * INT4_BLOCK];
                let mut lanes = [0i32; 8];
                for (j, &byte) in bytes.iter().enumerate() {
                    lanes[j / 4] += ((byte & 15) as i32 - 8) * xb[j] as i32;
                    lanes[(j + 16) / 4] += ((byte >> 4) as i32 - 8) * xb[j + 16] as i32;
                }
                for (a, l) in acc.iter_mut().zip(lanes) {
                    *a += l as f32 * scale;
                }
            }
            reduce8(acc)
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_i8`; lengths checked above.
        Path::Avx2 => unsafe { x86::dot_i4(w, scales, x) },
    }
}

/// Eight lanes summed pairwise: `k + 4`, then `k + 2`, then `k + 1`.
#[inline]
fn reduce8(mut a: [f32; 8]) -> f32 {
    for k in 0..4 {
        a[k] += a[k + 4];
    }
    for k in 0..2 {
        a[k] += a[k + 2];
    }
    a[0] + a[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sum of eight i32 lanes (integers: any order gives the same).
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// `maddubs` multiplies unsigned by signed bytes: `|x|` times `w` with
    /// `x`'s sign (neither is -128, so pairs fit in i16), then pairs of i16 are
    /// summed into i32 by `madd`.
    #[inline(always)]
    unsafe fn products(w: __m256i, x: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// # Safety
    /// The CPU has AVX2; `w.len() == x.len()`, a multiple of 32.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8(w: &[u8], x: &[i8]) -> i32 {
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let n = x.len();
        let mut i = 0;
        while i + 64 <= n {
            let w0 = _mm256_loadu_si256(wp.add(i) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(i) as *const __m256i);
            let w1 = _mm256_loadu_si256(wp.add(i + 32) as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add(i + 32) as *const __m256i);
            a0 = _mm256_add_epi32(a0, products(w0, x0));
            a1 = _mm256_add_epi32(a1, products(w1, x1));
            i += 64;
        }
        if i < n {
            let w0 = _mm256_loadu_si256(wp.add(i) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(i) as *const __m256i);
            a0 = _mm256_add_epi32(a0, products(w0, x0));
        }
        hsum_i32(_mm256_add_epi32(a0, a1))
    }

    /// # Safety
    /// The CPU has AVX2; `2 * w.len() == x.len() == 32 * scales.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i4(w: &[u8], scales: &[f32], x: &[i8]) -> f32 {
        let mask = _mm_set1_epi8(0x0F);
        let eight = _mm256_set1_epi8(8);
        let mut acc = _mm256_setzero_ps();
        for (b, &scale) in scales.iter().enumerate() {
            let bytes = _mm_loadu_si128(w.as_ptr().add(16 * b) as *const __m128i);
            let lo = _mm_and_si128(bytes, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            // Values 0..16 in the low half, 16..32 in the high half.
            let q = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);
            let xv = _mm256_loadu_si256(x.as_ptr().add(32 * b) as *const __m256i);
            // i32 lane k: values 4k..4k + 4 of the block.
            let lanes = _mm256_cvtepi32_ps(products(q, xv));
            // Multiply, then add (no fused multiply-add): the portable order.
            acc = _mm256_add_ps(acc, _mm256_mul_ps(lanes, _mm256_set1_ps(scale)));
        }
        let mut a = [0.0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        super::reduce8(a)
    }
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

/// Reused buffers of [`LowBitSelector::select`].
#[derive(Debug, Clone, Default)]
pub struct SelectScratch {
    pub x: QuantActivation,
    pub values: Vec<f32>,
}

/// Neurons per parallel task of the selector (a fixed split: results never
/// depend on it, as every neuron is computed whole by one task).
const SELECT_CHUNK: usize = 256;

impl LowBitSelector {
    /// Bytes the selector holds in DRAM (what counts against a budget).
    pub fn stored_bytes(&self) -> usize {
        self.gate.stored_bytes()
            + self.up.stored_bytes()
            + 4 * (self.gate_bias.as_ref().map_or(0, Vec::len)
                + self.up_bias.as_ref().map_or(0, Vec::len))
    }

    /// The approximate neuron values `silu(g~) * u~` for one token into
    /// `scratch.values` (`width` entries), on `path`.
    pub fn values_on(&self, x: &[f32], scratch: &mut SelectScratch, path: Path) {
        let width = self.gate.rows;
        scratch.x.quantize(x, self.gate.padded_cols);
        scratch.values.resize(width, 0.0);
        let q = &scratch.x;
        let fill = |j0: usize, chunk: &mut [f32]| {
            for (k, v) in chunk.iter_mut().enumerate() {
                let j = j0 + k;
                let g =
                    self.gate.row_dot(j, q, path) + self.gate_bias.as_ref().map_or(0.0, |b| b[j]);
                let u = self.up.row_dot(j, q, path) + self.up_bias.as_ref().map_or(0.0, |b| b[j]);
                *v = silu(g) * u;
            }
        };
        if rayon::current_num_threads() > 1 && width > SELECT_CHUNK {
            scratch
                .values
                .par_chunks_mut(SELECT_CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| fill(c * SELECT_CHUNK, chunk));
        } else {
            fill(0, &mut scratch.values);
        }
    }

    /// The selected neurons of one token, ascending.
    pub fn select(&self, x: &[f32], scratch: &mut SelectScratch, active: &mut Vec<u32>) {
        self.values_on(x, scratch, Path::best());
        active.clear();
        active.extend(
            scratch
                .values
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

    /// Every path this CPU can run.
    fn paths() -> Vec<Path> {
        // On a CPU with AVX2 the SIMD kernels are the ones compared.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert_eq!(Path::best(), Path::Avx2);
        }
        let mut p = vec![Path::Portable];
        if Path::best() != Path::Portable {
            p.push(Path::best());
        }
        p
    }

    #[test]
    fn quantized_products_are_within_the_quantization_bound() {
        // Against an f64 reference of the unquantized product: each weight
        // and each activation value is off by at most half its step.
        let (rows, cols) = (5, 70);
        let m = matrix(rows, cols);
        let w = m.data.to_f32();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let xmax = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
        let sx = xmax / 127.0;
        for bits in [LowBits::Int8, LowBits::Int4] {
            let q = QuantMatrix::quantize(&m, bits);
            let mut out = vec![0.0; rows];
            q.matvec(&x, &mut out);
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|k| w[r * cols + k] as f64 * x[k] as f64)
                    .sum();
                // |w x - w~ x~| <= |w - w~| |x| + |w~| |x - x~|
                //              <= (s_w / 2) (|x| + sx / 2) + |w| sx / 2 (+ rounding).
                let bound: f64 = (0..cols)
                    .map(|k| {
                        let s = match bits {
                            LowBits::Int8 => q.scales[r],
                            LowBits::Int4 => {
                                q.scales[r * q.padded_cols / INT4_BLOCK + k / INT4_BLOCK]
                            }
                        } as f64;
                        0.5 * s * (x[k].abs() as f64 + 0.5 * sx)
                            + (w[r * cols + k].abs() as f64) * 0.5 * sx
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
        // 70 columns padded to 96.
        assert_eq!(q8.stored_bytes(), rows * 96 + 4 * rows);
        // 3 blocks of 16 bytes and an f16 scale per row.
        assert_eq!(q4.stored_bytes(), rows * (48 + 3 * 2));
    }

    #[test]
    fn integer_kernels_equal_an_exact_reference_on_every_path() {
        // Values at the ends of the ranges (+-127, -8 and 7) and lengths of
        // one, two and three 32-byte vectors.
        for n in [32usize, 64, 96, 576] {
            let w: Vec<u8> = (0..n)
                .map(|i| match i % 5 {
                    0 => 127i8,
                    1 => -127,
                    _ => ((i * 37 % 255) as i32 - 127) as i8,
                } as u8)
                .collect();
            let x: Vec<i8> = (0..n)
                .map(|i| match i % 7 {
                    0 => -127,
                    1 => 127,
                    _ => ((i * 91 % 255) as i32 - 127) as i8,
                })
                .collect();
            let exact: i64 = w
                .iter()
                .zip(&x)
                .map(|(&a, &b)| a as i8 as i64 * b as i64)
                .sum();
            for path in paths() {
                assert_eq!(dot_i8(&w, &x, path) as i64, exact, "int8 {path:?} n {n}");
            }
            // Int4: nibbles 0..16 (q -8..7), scales that are not powers of two.
            let w4: Vec<u8> = (0..n / 2).map(|i| (i * 29 % 256) as u8).collect();
            let scales: Vec<f32> = (0..n / INT4_BLOCK)
                .map(|b| 0.013 + b as f32 * 0.0071)
                .collect();
            let reference: f64 = (0..n)
                .map(|k| {
                    let (b, j) = (k / INT4_BLOCK, k % INT4_BLOCK);
                    let byte = w4[b * 16 + j % 16];
                    let nib = if j < 16 { byte & 15 } else { byte >> 4 };
                    (nib as f64 - 8.0) * scales[b] as f64 * x[k] as f64
                })
                .sum();
            let results: Vec<f32> = paths()
                .into_iter()
                .map(|p| dot_i4(&w4, &scales, &x, p))
                .collect();
            for r in &results {
                assert_eq!(
                    r.to_bits(),
                    results[0].to_bits(),
                    "int4 paths differ at n {n}"
                );
                assert!(
                    (*r as f64 - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                    "int4 n {n}: {r} vs {reference}"
                );
            }
        }
    }

    #[test]
    fn selections_are_identical_on_every_path_and_thread_count() {
        let (rows, cols) = (600, 96);
        let gate = matrix(rows, cols);
        let up_data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let up = Matrix::new(rows, cols, Storage::F32(up_data)).unwrap();
        for bits in [LowBits::Int8, LowBits::Int4] {
            let sel = LowBitSelector {
                gate: QuantMatrix::quantize(&gate, bits),
                up: QuantMatrix::quantize(&up, bits),
                gate_bias: Some((0..rows).map(|j| j as f32 * 0.01).collect()),
                up_bias: None,
                threshold: 1.0,
            };
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.71).cos()).collect();
            let mut runs = Vec::new();
            for path in paths() {
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut s = SelectScratch::default();
                    pool.install(|| sel.values_on(&x, &mut s, path));
                    runs.push((path, threads, s.values));
                }
            }
            let first: Vec<u32> = runs[0].2.iter().map(|v| v.to_bits()).collect();
            for (path, threads, v) in &runs {
                let bits_v: Vec<u32> = v.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits_v, first, "{bits:?} {path:?} threads {threads}");
            }
            let mut active = Vec::new();
            sel.select(&x, &mut SelectScratch::default(), &mut active);
            let chosen = active.len();
            assert!(
                chosen > 0 && chosen < rows,
                "{bits:?}: a threshold that chooses some: {chosen}"
            );
        }
    }
}
