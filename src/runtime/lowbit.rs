//! The low-precision selector of a gated SiLU (or GeGLU) layer (issue 12): int8
//! (one scale per row) or int4 (blocks of 32 with an f16 scale) copies of the
//! gate and up projections, kept in DRAM, from which `|silu(g~) * u~|` (GeGLU:
//! `|gelu(g~) * u~|`) is computed for every neuron and compared with the
//! layer's product threshold. Only the neurons it
//! selects are then computed exactly (in DRAM or from their bundles on flash):
//! selection errors can happen only near the threshold, and no training is
//! needed.
//!
//! The token's activation is quantized too (int8, one scale per vector), so
//! that every product is an integer dot product: exact in `i32`, so the AVX2
//! kernel (`maddubs`/`madd`, chosen at run time) and the portable one return
//! the same integers, and the few float operations after them (scales, int4's
//! block lanes) are the same sequence in both. The int4 kernel reads a
//! neuron's gate and up rows together, two blocks (32 bytes) of each at a
//! time, multiplying the stored nibbles (`w + 8`, unsigned) by the token's
//! values laid out once per token to match and subtracting `8 * sum x` per
//! lane after (no sign tricks per block). Selections are therefore
//! identical on every CPU path and for any thread count (rows are split across
//! threads, never a sum).

use rayon::prelude::*;

use crate::input::config::Activation;
use crate::runtime::ffn::neuron_value;
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
                dot_i4(w, &self.scales[r * blocks..(r + 1) * blocks], x, path) * x.scale
            }
        }
    }

    /// Row `r` of `self` and row `r` of `other` (same shape, both int4) with
    /// `x`: the two results of [`QuantMatrix::row_dot`], bit for bit, with
    /// `x` loaded once for both (a selector's gate and up).
    #[inline]
    pub fn row_dot_pair(
        &self,
        other: &QuantMatrix,
        r: usize,
        x: &QuantActivation,
        path: Path,
    ) -> (f32, f32) {
        debug_assert_eq!(x.q.len(), self.padded_cols);
        if self.bits != LowBits::Int4
            || other.bits != LowBits::Int4
            || other.padded_cols != self.padded_cols
        {
            return (self.row_dot(r, x, path), other.row_dot(r, x, path));
        }
        let rb = self.row_bytes();
        let blocks = self.padded_cols / INT4_BLOCK;
        let (a, b) = dot_i4_pair(
            (
                &self.data[r * rb..(r + 1) * rb],
                &self.scales[r * blocks..(r + 1) * blocks],
            ),
            (
                &other.data[r * rb..(r + 1) * rb],
                &other.scales[r * blocks..(r + 1) * blocks],
            ),
            x,
            path,
        );
        (a * x.scale, b * x.scale)
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
/// nearest), padded with zeros; with the same values laid out for the int4
/// kernel (see [`QuantActivation::pairs`]).
#[derive(Debug, Clone, Default)]
pub struct QuantActivation {
    pub q: Vec<i8>,
    pub scale: f32,
    /// `q` per pair of int4 blocks `(2p, 2p + 1)`, in the order the SIMD
    /// kernel unpacks 32 bytes of weights (two blocks) in: values 0..16 of
    /// both blocks, then values 16..32 of both; a last unpaired block has a
    /// zero block as its partner.
    pub pairs: Vec<i8>,
    /// `8 * (sum of q over values 4k..4k + 4 of a block)` for each block and
    /// lane `k`, in the lane order of `pairs`' products: the kernel multiplies
    /// the stored nibbles (`w + 8`, unsigned) and subtracts this, which
    /// leaves `sum w * q` exactly.
    pub corr: Vec<i32>,
}

impl QuantActivation {
    /// Quantizes `x` into `padded` values (`padded >= x.len()`, a multiple
    /// of 32), reusing the buffers.
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
        self.lay_out();
    }

    /// An activation of these int8 values (a multiple of 32 of them) and
    /// scale.
    pub fn from_values(q: Vec<i8>, scale: f32) -> QuantActivation {
        assert!(q.len().is_multiple_of(PAD), "from_values: unpadded");
        let mut a = QuantActivation {
            q,
            scale,
            pairs: Vec::new(),
            corr: Vec::new(),
        };
        a.lay_out();
        a
    }

    /// Fills `pairs` and `corr` from `q`.
    fn lay_out(&mut self) {
        let blocks = self.q.len() / INT4_BLOCK;
        let pairs = blocks.div_ceil(2);
        self.pairs.clear();
        self.pairs.resize(pairs * 2 * INT4_BLOCK, 0);
        self.corr.clear();
        self.corr.resize(pairs * 16, 0);
        for b in 0..blocks {
            let (p, odd) = (b / 2, b % 2);
            let xb = &self.q[b * INT4_BLOCK..(b + 1) * INT4_BLOCK];
            let base = p * 2 * INT4_BLOCK;
            for j in 0..16 {
                self.pairs[base + 16 * odd + j] = xb[j];
                self.pairs[base + 32 + 16 * odd + j] = xb[j + 16];
            }
            for k in 0..8 {
                let sum: i32 = xb[4 * k..4 * k + 4].iter().map(|&v| v as i32).sum();
                // Lanes 0..4 of a block come from its values 0..16 (the first
                // eight i32 of the pair), 4..8 from 16..32 (the next eight).
                let slot = p * 16
                    + if k < 4 {
                        4 * odd + k
                    } else {
                        8 + 4 * odd + k - 4
                    };
                self.corr[slot] = 8 * sum;
            }
        }
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
/// `4k..4k + 4`) are scaled (multiply, then add: no fused multiply-add) into
/// one of two sets of eight f32 lanes, even blocks into the first and odd
/// blocks into the second, in block order; then the two sets are added lane
/// by lane and the lanes summed pairwise (`k + 4`, `k + 2`, `k + 1`). The
/// order is what the 256-bit kernel computes on two blocks at a time, and the
/// portable path follows it.
#[inline]
pub fn dot_i4(w: &[u8], scales: &[f32], x: &QuantActivation, path: Path) -> f32 {
    check_i4(w, scales, x);
    match path {
        Path::Portable => dot_i4_portable(w, scales, &x.q),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::Avx2` is only chosen when the CPU has AVX2; lengths
        // checked above.
        Path::Avx2 => unsafe { x86::dot_i4_pair((w, scales), (w, scales), x).0 },
    }
}

/// [`dot_i4`] of two rows with the same `x`, each result bit-identical to
/// its own `dot_i4`: `x` is loaded once for both.
#[inline]
pub fn dot_i4_pair(
    a: (&[u8], &[f32]),
    b: (&[u8], &[f32]),
    x: &QuantActivation,
    path: Path,
) -> (f32, f32) {
    check_i4(a.0, a.1, x);
    check_i4(b.0, b.1, x);
    match path {
        Path::Portable => (
            dot_i4_portable(a.0, a.1, &x.q),
            dot_i4_portable(b.0, b.1, &x.q),
        ),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_i4`.
        Path::Avx2 => unsafe { x86::dot_i4_pair(a, b, x) },
    }
}

#[inline]
fn check_i4(w: &[u8], scales: &[f32], x: &QuantActivation) {
    assert_eq!(w.len() * 2, x.q.len(), "dot_i4: length mismatch");
    assert_eq!(scales.len() * INT4_BLOCK, x.q.len(), "dot_i4: scales");
    assert_eq!(x.pairs.len(), x.q.len().div_ceil(64) * 64, "dot_i4: layout");
    assert_eq!(x.corr.len() * 4, x.pairs.len(), "dot_i4: layout");
}

fn dot_i4_portable(w: &[u8], scales: &[f32], x: &[i8]) -> f32 {
    let mut acc = [[0.0f32; 8]; 2];
    for (b, &scale) in scales.iter().enumerate() {
        let bytes = &w[b * 16..(b + 1) * 16];
        let xb = &x[b * INT4_BLOCK..(b + 1) * INT4_BLOCK];
        let mut lanes = [0i32; 8];
        for (j, &byte) in bytes.iter().enumerate() {
            lanes[j / 4] += ((byte & 15) as i32 - 8) * xb[j] as i32;
            lanes[(j + 16) / 4] += ((byte >> 4) as i32 - 8) * xb[j + 16] as i32;
        }
        for (a, l) in acc[b % 2].iter_mut().zip(lanes) {
            *a += l as f32 * scale;
        }
    }
    let mut t = acc[0];
    for (t, o) in t.iter_mut().zip(acc[1]) {
        *t += o;
    }
    reduce8(t)
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

    /// The integer lanes of one row's two blocks (32 bytes `v`), as f32:
    /// `(n - 8) * x` summed over four values each, where the stored nibble
    /// `n` multiplies `x` unsigned and the correction `8 * sum x` is taken
    /// off after (both exact in i32).
    #[inline(always)]
    unsafe fn lanes(
        v: __m256i,
        xlo: __m256i,
        xhi: __m256i,
        clo: __m256i,
        chi: __m256i,
    ) -> (__m256, __m256) {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let lo = _mm256_and_si256(v, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        (
            _mm256_cvtepi32_ps(_mm256_sub_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xlo), ones),
                clo,
            )),
            _mm256_cvtepi32_ps(_mm256_sub_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xhi), ones),
                chi,
            )),
        )
    }

    /// Eight f32 lanes `[E0..E3 | O0..O3]` and `[E4..E7 | O4..O7]` (even and
    /// odd blocks' lanes) summed as `dot_i4_portable` sums them.
    #[inline(always)]
    unsafe fn reduce_eo(lo: __m256, hi: __m256) -> f32 {
        // t[k] = E[k] + O[k]: t0..t3, then t4..t7.
        let t_lo = _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
        let t_hi = _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
        // a[k] = t[k] + t[k + 4], then a[k] + a[k + 2], then a0 + a1.
        let a = _mm_add_ps(t_lo, t_hi);
        let a = _mm_add_ps(a, _mm_movehl_ps(a, a));
        _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)))
    }

    /// # Safety
    /// The CPU has AVX2; each row has `x.q.len() / 2` bytes and
    /// `x.q.len() / 32` scales; `x`'s layout is filled (checked by the caller).
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i4_pair(
        a: (&[u8], &[f32]),
        b: (&[u8], &[f32]),
        x: &super::QuantActivation,
    ) -> (f32, f32) {
        let blocks = a.1.len();
        // [s0 x4 | s1 x4] from two consecutive scales.
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let (xp, cp) = (x.pairs.as_ptr(), x.corr.as_ptr());
        let (wa, wb) = (a.0.as_ptr(), b.0.as_ptr());
        let (sa, sb) = (a.1.as_ptr(), b.1.as_ptr());
        let zero = _mm256_setzero_ps();
        let (mut alo, mut ahi, mut blo, mut bhi) = (zero, zero, zero, zero);
        let pairs = blocks / 2;
        for p in 0..pairs {
            let xlo = _mm256_loadu_si256(xp.add(64 * p) as *const __m256i);
            let xhi = _mm256_loadu_si256(xp.add(64 * p + 32) as *const __m256i);
            let clo = _mm256_loadu_si256(cp.add(16 * p) as *const __m256i);
            let chi = _mm256_loadu_si256(cp.add(16 * p + 8) as *const __m256i);
            let (la, ha) = lanes(
                _mm256_loadu_si256(wa.add(32 * p) as *const __m256i),
                xlo,
                xhi,
                clo,
                chi,
            );
            let (lb, hb) = lanes(
                _mm256_loadu_si256(wb.add(32 * p) as *const __m256i),
                xlo,
                xhi,
                clo,
                chi,
            );
            let s_a = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(sa.add(2 * p) as *const f64))),
                spread,
            );
            let s_b = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(sb.add(2 * p) as *const f64))),
                spread,
            );
            // Multiply, then add (no fused multiply-add): the portable order.
            alo = _mm256_add_ps(alo, _mm256_mul_ps(la, s_a));
            ahi = _mm256_add_ps(ahi, _mm256_mul_ps(ha, s_a));
            blo = _mm256_add_ps(blo, _mm256_mul_ps(lb, s_b));
            bhi = _mm256_add_ps(bhi, _mm256_mul_ps(hb, s_b));
        }
        if blocks % 2 == 1 {
            // The last block with a zero partner: its odd lanes add 0 * 0,
            // which leaves them as they are (they are never -0).
            let p = pairs;
            let xlo = _mm256_loadu_si256(xp.add(64 * p) as *const __m256i);
            let xhi = _mm256_loadu_si256(xp.add(64 * p + 32) as *const __m256i);
            let clo = _mm256_loadu_si256(cp.add(16 * p) as *const __m256i);
            let chi = _mm256_loadu_si256(cp.add(16 * p + 8) as *const __m256i);
            let va = _mm_loadu_si128(wa.add(32 * p) as *const __m128i);
            let vb = _mm_loadu_si128(wb.add(32 * p) as *const __m128i);
            let (la, ha) = lanes(
                _mm256_set_m128i(_mm_setzero_si128(), va),
                xlo,
                xhi,
                clo,
                chi,
            );
            let (lb, hb) = lanes(
                _mm256_set_m128i(_mm_setzero_si128(), vb),
                xlo,
                xhi,
                clo,
                chi,
            );
            let s_a = _mm256_set_m128(_mm_setzero_ps(), _mm_set1_ps(*sa.add(2 * p)));
            let s_b = _mm256_set_m128(_mm_setzero_ps(), _mm_set1_ps(*sb.add(2 * p)));
            alo = _mm256_add_ps(alo, _mm256_mul_ps(la, s_a));
            ahi = _mm256_add_ps(ahi, _mm256_mul_ps(ha, s_a));
            blo = _mm256_add_ps(blo, _mm256_mul_ps(lb, s_b));
            bhi = _mm256_add_ps(bhi, _mm256_mul_ps(hb, s_b));
        }
        (reduce_eo(alo, ahi), reduce_eo(blo, bhi))
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
        self.values_as(Activation::Silu, x, scratch, path)
    }

    /// The approximate neuron values `act(g~) * u~` of a gated layer with
    /// `activation` (SiLU, or GELU for GeGLU) into `scratch.values`.
    pub fn values_as(
        &self,
        activation: Activation,
        x: &[f32],
        scratch: &mut SelectScratch,
        path: Path,
    ) {
        let width = self.gate.rows;
        scratch.x.quantize(x, self.gate.padded_cols);
        scratch.values.resize(width, 0.0);
        let q = &scratch.x;
        let fill = |j0: usize, chunk: &mut [f32]| {
            for (k, v) in chunk.iter_mut().enumerate() {
                let j = j0 + k;
                // Gate and up of a neuron together: the token's values are
                // loaded once for both rows.
                let (mut g, mut u) = self.gate.row_dot_pair(&self.up, j, q, path);
                if let Some(b) = &self.gate_bias {
                    g += b[j];
                }
                if let Some(b) = &self.up_bias {
                    u += b[j];
                }
                *v = neuron_value(activation, Some(g), u);
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

    /// The selected neurons of one token of a SiLU layer, ascending.
    pub fn select(&self, x: &[f32], scratch: &mut SelectScratch, active: &mut Vec<u32>) {
        self.select_as(Activation::Silu, x, scratch, active)
    }

    /// The selected neurons of one token of a gated layer with `activation`,
    /// ascending.
    pub fn select_as(
        &self,
        activation: Activation,
        x: &[f32],
        scratch: &mut SelectScratch,
        active: &mut Vec<u32>,
    ) {
        self.values_as(activation, x, scratch, Path::best());
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
        for n in [32usize, 64, 96, 160, 576] {
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
            let xa = QuantActivation::from_values(x.clone(), 1.0);
            let results: Vec<f32> = paths()
                .into_iter()
                .map(|p| dot_i4(&w4, &scales, &xa, p))
                .collect();
            // Two rows at once: each result is its own row's, bit for bit.
            let w4b: Vec<u8> = w4.iter().rev().copied().collect();
            let scales_b: Vec<f32> = scales.iter().map(|s| s * 1.7).collect();
            for p in paths() {
                let (a, b) = dot_i4_pair((&w4, &scales), (&w4b, &scales_b), &xa, p);
                assert_eq!(
                    a.to_bits(),
                    results[0].to_bits(),
                    "pair, first row, {p:?} n {n}"
                );
                let alone = dot_i4(&w4b, &scales_b, &xa, Path::Portable);
                assert_eq!(
                    b.to_bits(),
                    alone.to_bits(),
                    "pair, second row, {p:?} n {n}"
                );
            }
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
