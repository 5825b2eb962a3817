//! Kernels over block-quantized weights (format section 9): matrix-vector
//! (decode) and matrix-matrix (prefill) products of `q8_0` / `q4_1` rows with
//! activations quantized on the fly to 8 bits, a scalar path and an AVX2 path
//! chosen at run time.
//!
//! The activations `x` are quantized per block of 32 as `q8_0` is, but with an
//! f32 scale: `s = max|x| / 127`, `p = clamp(rne(x / s), -127, 127)`. A block
//! of weights and one of activations then meet in an exact integer dot product
//! `Σ q p` (and, for `q4_1`, `Σ p`), and the row's result is
//!
//! ```text
//! acc = 0; for each block b in order:  acc += (d_b * s_b) * Σqp      (q8_0)
//!                                       acc += (d_b * s_b) * Σqp + (m_b * s_b) * Σp   (q4_1)
//! ```
//!
//! with the integer sum of each block split into 8 lanes (lane `k` the exact
//! `Σ q p` over the block's values `4k .. 4k + 3`, what AVX2's `maddubs` +
//! `madd` leave in its 8 lanes), each lane accumulated in binary32:
//!
//! ```text
//! lane[k] = lane[k] + (d_b * s_b) * Σ_k qp          (every block b, in order)
//! min     = min + (m_b * s_b) * Σp                  (q4_1 only)
//! row     = pairwise sum of the 8 lanes (0+4, 1+5, ..; then 0+2, 1+3; then 0+1) + min
//! ```
//!
//! multiply and add unfused. The integer sums are exact on every path and the
//! float steps are the same operations on every path, so the SIMD path equals
//! the scalar one bit for bit, and work is split over output rows only, so
//! results do not depend on the thread count. (AVX-512 VNNI would need
//! intrinsics newer than the crate's rust-version.)

use rayon::prelude::*;

use crate::quant::{block_scale, QuantType, BLOCK};

/// Activations quantized per block of 32 values.
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    /// One f32 scale per block.
    pub scales: Vec<f32>,
    /// The 8-bit values, `BLOCK` per block.
    pub values: Vec<i8>,
    /// `Σ p` per block (the `q4_1` minimum's term).
    pub sums: Vec<i32>,
}

impl QuantizedActivations {
    /// Quantizes `x` (a multiple of 32 values).
    pub fn new(x: &[f32]) -> QuantizedActivations {
        let mut q = QuantizedActivations::default();
        q.fill(x);
        q
    }

    /// Quantizes `x` into `self`, reusing its buffers.
    pub fn fill(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(BLOCK), "activations: whole blocks");
        let blocks = x.len() / BLOCK;
        self.scales.clear();
        self.sums.clear();
        self.values.clear();
        self.values.reserve(x.len());
        for b in x.chunks_exact(BLOCK) {
            let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let s = amax / 127.0;
            let mut sum = 0i32;
            for &v in b {
                let p = if s == 0.0 {
                    0
                } else {
                    (v / s).round_ties_even().clamp(-127.0, 127.0) as i8
                };
                sum += p as i32;
                self.values.push(p);
            }
            self.scales.push(s);
            self.sums.push(sum);
        }
        debug_assert_eq!(self.scales.len(), blocks);
    }

    pub fn blocks(&self) -> usize {
        self.scales.len()
    }
}

/// Lanes of the integer sums (see the module doc).
const LANES: usize = 8;

/// Exact integer dot products of one weight block with one activation block,
/// in lanes of 4 values.
mod scalar {
    use super::{BLOCK, LANES};

    #[inline]
    pub fn lanes_q8(w: &[u8], p: &[i8]) -> [i32; LANES] {
        let mut l = [0i32; LANES];
        for (j, (&q, &p)) in w[..BLOCK].iter().zip(&p[..BLOCK]).enumerate() {
            l[j / 4] += (q as i8) as i32 * p as i32;
        }
        l
    }

    #[inline]
    pub fn lanes_q4(w: &[u8], p: &[i8]) -> [i32; LANES] {
        let mut l = [0i32; LANES];
        for j in 0..BLOCK / 2 {
            l[j / 4] += (w[j] & 0x0f) as i32 * p[j] as i32;
            l[(j + BLOCK / 2) / 4] += (w[j] >> 4) as i32 * p[j + BLOCK / 2] as i32;
        }
        l
    }
}

/// The pairwise sum of the lanes (module doc).
#[inline(always)]
fn reduce_lanes(l: [f32; LANES]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::quant::{QuantType, BLOCK};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }

    /// The 8 lane sums of 32 signed weights `w` and 32 activations `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_q8(w: *const u8, p: *const i8) -> __m256i {
        let q = _mm256_loadu_si256(w as *const __m256i);
        let a = _mm256_loadu_si256(p as *const __m256i);
        // maddubs multiplies unsigned by signed: |q| times p with q's sign.
        let aq = _mm256_sign_epi8(q, q);
        let sp = _mm256_sign_epi8(a, q);
        let pairs = _mm256_maddubs_epi16(aq, sp);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// The 8 lane sums of 32 four-bit weights packed in 16 bytes at `w` (low
    /// nibbles: values 0-15, high: 16-31) and 32 activations `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_q4(w: *const u8, p: *const i8) -> __m256i {
        let packed = _mm_loadu_si128(w as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        let q = _mm256_set_m128i(hi, lo);
        let a = _mm256_loadu_si256(p as *const __m256i);
        let pairs = _mm256_maddubs_epi16(q, a);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// The binary16 at `at`, widened (exact, as `half` does).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_at(at: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*at, *at.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// [`super::dot_row`] on the AVX2 path: the operations of the scalar path
    /// (module doc), 8 lanes at a time.
    ///
    /// # Safety
    /// AVX2 and F16C present; `bytes` whole blocks, as many as `x` has.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn dot_row(q: QuantType, bytes: &[u8], x: &super::QuantizedActivations) -> f32 {
        let bb = q.block_bytes();
        let blocks = bytes.len() / bb;
        let mut acc = _mm256_setzero_ps();
        let mut min = 0.0f32;
        let w0 = bytes.as_ptr();
        let p0 = x.values.as_ptr();
        for b in 0..blocks {
            let w = w0.add(b * bb);
            let p = p0.add(b * BLOCK);
            let s = *x.scales.get_unchecked(b);
            let c = f16_at(w) * s;
            let lanes = match q {
                QuantType::Q8_0 => lanes_q8(w.add(2), p),
                QuantType::Q4_1 => {
                    min += (f16_at(w.add(2)) * s) * *x.sums.get_unchecked(b) as f32;
                    lanes_q4(w.add(4), p)
                }
            };
            acc = _mm256_add_ps(
                acc,
                _mm256_mul_ps(_mm256_set1_ps(c), _mm256_cvtepi32_ps(lanes)),
            );
        }
        let mut l = [0.0f32; super::LANES];
        _mm256_storeu_ps(l.as_mut_ptr(), acc);
        super::reduce_lanes(l) + min
    }
}

/// Which integer kernel: SIMD where the CPU has it, unless forced scalar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Path {
    /// The fastest path this CPU runs.
    pub fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if *AVX2.get_or_init(x86::available) {
                return Path::Avx2;
            }
        }
        Path::Scalar
    }
}

/// One row of blocks of `q` (`bytes`) dotted with quantized activations.
#[inline]
pub fn dot_row(q: QuantType, bytes: &[u8], x: &QuantizedActivations, path: Path) -> f32 {
    let bb = q.block_bytes();
    assert_eq!(bytes.len(), x.blocks() * bb, "dot_row: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 {
        // SAFETY: the path is only chosen when AVX2 and F16C are present; the
        // lengths were checked above (whole blocks of weights and activations).
        return unsafe { x86::dot_row(q, bytes, x) };
    }
    let _ = path;
    let mut acc = [0.0f32; LANES];
    let mut min = 0.0f32;
    for (b, w) in bytes.chunks_exact(bb).enumerate() {
        let p = &x.values[b * BLOCK..(b + 1) * BLOCK];
        let s = x.scales[b];
        let c = block_scale(w) * s;
        let lanes = match q {
            QuantType::Q8_0 => scalar::lanes_q8(&w[2..], p),
            QuantType::Q4_1 => {
                let m = half::f16::from_le_bytes([w[2], w[3]]).to_f32();
                min += (m * s) * x.sums[b] as f32;
                scalar::lanes_q4(&w[4..], p)
            }
        };
        for (a, l) in acc.iter_mut().zip(lanes) {
            *a += c * l as f32;
        }
    }
    reduce_lanes(acc) + min
}

/// A `[rows, cols]` matrix of rows of blocks, as a packed file stores it.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    pub q: QuantType,
    pub data: Vec<u8>,
}

impl QuantMatrix {
    pub fn new(rows: usize, cols: usize, q: QuantType, data: Vec<u8>) -> Option<QuantMatrix> {
        let row = q.row_bytes(cols)?;
        (rows.checked_mul(row) == Some(data.len())).then_some(QuantMatrix {
            rows,
            cols,
            q,
            data,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Rows per parallel task: about 64 KiB of weights.
fn rows_per_task(m: &QuantMatrix) -> usize {
    ((64 << 10) / m.row_bytes().max(1)).max(1)
}

/// `out = W x` with `x` quantized on the fly (decode).
pub fn matvec(m: &QuantMatrix, x: &[f32], out: &mut [f32], path: Path) {
    assert_eq!((x.len(), out.len()), (m.cols, m.rows), "matvec: shapes");
    let xq = QuantizedActivations::new(x);
    let per = rows_per_task(m);
    out.par_chunks_mut(per).enumerate().for_each(|(t, chunk)| {
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = dot_row(m.q, m.row(t * per + i), &xq, path);
        }
    });
}

/// `out[t] = W x[t]` for `n` tokens (`x`: `n * cols`, `out`: `n * rows`),
/// each token's activations quantized once; every weight row is read once per
/// task for all tokens (prefill).
pub fn matmat(m: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32], path: Path) {
    assert_eq!(
        (x.len(), out.len()),
        (n * m.cols, n * m.rows),
        "matmat: shapes"
    );
    let xq: Vec<QuantizedActivations> = x
        .par_chunks(m.cols)
        .map(QuantizedActivations::new)
        .collect();
    let per = rows_per_task(m);
    let tasks = m.rows.div_ceil(per);
    let results: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let rows = t * per..((t + 1) * per).min(m.rows);
            let mut r = Vec::with_capacity(rows.len() * n);
            for row in rows {
                let w = m.row(row);
                r.extend(xq.iter().map(|a| dot_row(m.q, w, a, path)));
            }
            r
        })
        .collect();
    for (t, r) in results.iter().enumerate() {
        for (i, chunk) in r.chunks(n).enumerate() {
            let row = t * per + i;
            for (tok, v) in chunk.iter().enumerate() {
                out[tok * m.rows + row] = *v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // A few outliers, as real activations have.
                if i % 97 == 5 {
                    u * scale * 40.0
                } else {
                    u * scale
                }
            })
            .collect()
    }

    fn matrix(q: QuantType, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
        let w = values(seed, rows * cols, 0.1);
        let mut data = vec![0u8; rows * q.row_bytes(cols).unwrap()];
        for (r, out) in data.chunks_mut(q.row_bytes(cols).unwrap()).enumerate() {
            q.quantize_row(&w[r * cols..(r + 1) * cols], out).unwrap();
        }
        QuantMatrix::new(rows, cols, q, data).unwrap()
    }

    /// The f64 reference: dequantized weights times dequantized activations,
    /// summed in f64 (what the kernel computes before its f32 rounding).
    fn reference(m: &QuantMatrix, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let xq = QuantizedActivations::new(x);
        let xd: Vec<f64> = xq
            .values
            .iter()
            .enumerate()
            .map(|(i, &p)| p as f64 * xq.scales[i / BLOCK] as f64)
            .collect();
        let mut row = vec![0.0f32; m.cols];
        let mut exact = Vec::new();
        let mut magnitude = Vec::new();
        for r in 0..m.rows {
            m.q.dequantize_row(m.row(r), &mut row);
            exact.push(row.iter().zip(&xd).map(|(&w, &a)| w as f64 * a).sum());
            magnitude.push(
                row.iter()
                    .zip(&xd)
                    .map(|(&w, &a)| (w as f64 * a).abs())
                    .sum(),
            );
        }
        (exact, magnitude)
    }

    #[test]
    fn matvec_equals_the_f64_reference_of_the_dequantized_operands() {
        for q in QuantType::ALL {
            let m = matrix(q, 37, 576, 3);
            let x = values(11, 576, 2.0);
            let (exact, magnitude) = reference(&m, &x);
            for path in [Path::Scalar, Path::detect()] {
                let mut out = vec![0.0; m.rows];
                matvec(&m, &x, &mut out, path);
                for r in 0..m.rows {
                    // f32 rounding of 18 block products and sums: far below 1e-5
                    // of the terms' magnitude.
                    let err = (out[r] as f64 - exact[r]).abs();
                    assert!(
                        err <= 1e-5 * magnitude[r],
                        "{q} {path:?} row {r}: {} vs {}",
                        out[r],
                        exact[r]
                    );
                }
            }
        }
    }

    /// Against the unquantized activations: the error of quantizing them is at
    /// most half a step per value, Σ |w| s / 2 per row.
    #[test]
    fn activation_quantization_error_is_bounded() {
        for q in QuantType::ALL {
            let m = matrix(q, 16, 256, 5);
            let x = values(13, 256, 1.0);
            let xq = QuantizedActivations::new(&x);
            let mut out = vec![0.0; m.rows];
            matvec(&m, &x, &mut out, Path::detect());
            let mut row = vec![0.0f32; m.cols];
            for (r, &got) in out.iter().enumerate() {
                m.q.dequantize_row(m.row(r), &mut row);
                let exact: f64 = row.iter().zip(&x).map(|(&w, &a)| w as f64 * a as f64).sum();
                let bound: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| w.abs() as f64 * xq.scales[i / BLOCK] as f64 / 2.0)
                    .sum();
                let err = (got as f64 - exact).abs();
                assert!(err <= bound * 1.001 + 1e-6, "{q} row {r}: {err} > {bound}");
            }
        }
    }

    #[test]
    fn simd_equals_scalar_bit_for_bit() {
        if Path::detect() == Path::Scalar {
            return; // nothing to compare on this CPU
        }
        for q in QuantType::ALL {
            for cols in [32, 64, 576, 1536] {
                let m = matrix(q, 9, cols, cols as u64);
                let x = values(cols as u64 + 1, cols, 3.0);
                let (mut a, mut b) = (vec![0.0; 9], vec![0.0; 9]);
                matvec(&m, &x, &mut a, Path::Scalar);
                matvec(&m, &x, &mut b, Path::detect());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{q} cols {cols}");
            }
        }
        // Extreme values: weights of -128 (which a reader accepts) and full-range
        // activations, where the 16-bit pair sums are largest.
        let mut data = vec![0u8; 34];
        data[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
        data[2..].fill(0x80);
        let m = QuantMatrix::new(1, 32, QuantType::Q8_0, data).unwrap();
        let x = vec![-1.0f32; 32];
        let (mut a, mut b) = (vec![0.0], vec![0.0]);
        matvec(&m, &x, &mut a, Path::Scalar);
        matvec(&m, &x, &mut b, Path::detect());
        assert!((a[0] - 4096.0).abs() < 1e-2, "{}", a[0]);
        assert_eq!(a[0].to_bits(), b[0].to_bits());
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let run = |threads: usize, q: QuantType| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let m = matrix(q, 300, 256, 21);
            let x = values(22, 256 * 5, 1.5);
            pool.install(|| {
                let mut one = vec![0.0; 300];
                matvec(&m, &x[..256], &mut one, Path::detect());
                let mut many = vec![0.0; 300 * 5];
                matmat(&m, &x, 5, &mut many, Path::detect());
                (one, many)
            })
        };
        for q in QuantType::ALL {
            let (a1, a5) = run(1, q);
            let (b1, b5) = run(3, q);
            assert_eq!(a1, b1);
            assert_eq!(a5, b5);
            // Prefill's first token equals decode's.
            assert_eq!(&a5[..300], &a1[..]);
        }
    }
}
