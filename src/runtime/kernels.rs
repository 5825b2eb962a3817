//! Deterministic numeric kernels: dot products, matrix-vector and matrix-matrix
//! products, norms and activations.
//!
//! Determinism rule: work is split across threads only over output elements,
//! never over a reduction. Every output element is reduced by one thread in a
//! fixed order that depends only on the shapes, so results are bit-identical for
//! any thread count.

use rayon::prelude::*;

use crate::runtime::weights::{Linear, Matrix, NormWeights, Storage};

/// Independent accumulators in [`dot`]: enough to hide FMA latency and let the
/// compiler vectorise; the lane a product goes to depends only on its index.
const LANES: usize = 16;
/// Elements widened at a time into a stack buffer before the multiply-add loop.
const CHUNK: usize = 256;

/// Sums 16 lanes in a fixed pairwise order.
#[inline]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let mut a = *acc;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            a[i] += a[i + width];
        }
        width /= 2;
    }
    a[0]
}

/// Accumulates `w[i] * x[i]` into lane `i % LANES` of `acc` (`len % LANES == 0`).
#[inline(always)]
fn fma_lanes(acc: &mut [f32; LANES], w: &[f32], x: &[f32]) {
    for (wc, xc) in w.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += wc[l] * xc[l];
        }
    }
}

/// f32 dot product with a fixed summation order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let main = a.len() - a.len() % LANES;
    fma_lanes(&mut acc, &a[..main], &b[..main]);
    for i in main..a.len() {
        acc[i % LANES] += a[i] * b[i];
    }
    reduce_lanes(&acc)
}

/// Dot product of row `r` of `m` with `x`, widening the row chunk by chunk.
#[inline]
pub fn row_dot(m: &Matrix, r: usize, x: &[f32]) -> f32 {
    let cols = m.cols;
    let base = r * cols;
    if let Storage::F32(v) = &m.data {
        return dot(&v[base..base + cols], x);
    }
    let mut acc = [0.0f32; LANES];
    let mut buf = [0.0f32; CHUNK];
    let mut c = 0;
    while c < cols {
        let n = CHUNK.min(cols - c);
        let w = &mut buf[..n];
        m.data.widen_range(base + c, w);
        let main = n - n % LANES;
        fma_lanes(&mut acc, &w[..main], &x[c..c + main]);
        for i in main..n {
            // Same lane assignment as `dot`: lane of the global column index.
            acc[(c + i) % LANES] += w[i] * x[c + i];
        }
        c += n;
    }
    reduce_lanes(&acc)
}

/// Rows handled by one rayon task in a matvec: enough bytes per task (~64 KiB)
/// that scheduling overhead stays small.
fn rows_per_task(m: &Matrix) -> usize {
    let row_bytes = (m.cols * m.dtype().size_bytes()).max(1);
    (65536 / row_bytes).clamp(1, 4096)
}

/// `out = W x (+ b)` for one input vector, rows in parallel.
pub fn matvec(lin: &Linear, x: &[f32], out: &mut [f32]) {
    let m = &lin.weight;
    debug_assert_eq!(x.len(), m.cols);
    debug_assert_eq!(out.len(), m.rows);
    let per = rows_per_task(m);
    out.par_chunks_mut(per).enumerate().for_each(|(t, chunk)| {
        let r0 = t * per;
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = row_dot(m, r0 + i, x);
        }
    });
    if let Some(b) = &lin.bias {
        for (o, b) in out.iter_mut().zip(b) {
            *o += b;
        }
    }
}

/// Output rows per GEMM task: the widened block stays cache-sized and the
/// block boundaries (hence results) do not depend on the thread count.
const GEMM_ROWS: usize = 64;

/// `out[t] = W x[t] (+ b)` for `n` input vectors stored row-major in `x`
/// (`n x in`), giving `out` as `n x out_dim`. One vector goes through [`matvec`].
pub fn linear(lin: &Linear, x: &[f32], n: usize, out: &mut [f32]) {
    let m = &lin.weight;
    let (k, rows) = (m.cols, m.rows);
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(out.len(), n * rows);
    if n == 1 {
        matvec(lin, x, out);
        return;
    }
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(GEMM_ROWS))
        .into_par_iter()
        .map(|b| {
            let r0 = b * GEMM_ROWS;
            let br = GEMM_ROWS.min(rows - r0);
            let widened;
            let w: &[f32] = match &m.data {
                Storage::F32(v) => &v[r0 * k..(r0 + br) * k],
                other => {
                    let mut buf = vec![0.0f32; br * k];
                    other.widen_range(r0 * k, &mut buf);
                    widened = buf;
                    &widened
                }
            };
            let mut c = vec![0.0f32; n * br];
            // SAFETY: a is n x k (row stride k), b = w^T is k x br (w is br x k
            // row-major, so row stride 1, column stride k), c is n x br; all
            // three slices have exactly those lengths.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    k,
                    br,
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    c.as_mut_ptr(),
                    br as isize,
                    1,
                );
            }
            (r0, c)
        })
        .collect();
    for (r0, c) in blocks {
        let br = c.len() / n;
        for t in 0..n {
            out[t * rows + r0..t * rows + r0 + br].copy_from_slice(&c[t * br..(t + 1) * br]);
        }
    }
    if let Some(b) = &lin.bias {
        for row in out.chunks_exact_mut(rows) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
}

/// PyTorch's LayerNorm over each `dim`-wide row of `x`: biased variance,
/// `(x - mean) / sqrt(var + eps) * w + b`. Statistics are taken in f64, which is
/// closer to PyTorch's own (blocked) reduction than a naive f32 sum.
pub fn layer_norm(x: &mut [f32], dim: usize, norm: &NormWeights, eps: f64) {
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / dim as f64;
        let inv = (1.0 / (var + eps).sqrt()) as f32;
        let mean = mean as f32;
        for (i, v) in row.iter_mut().enumerate() {
            let mut y = (*v - mean) * inv;
            if let Some(w) = &norm.weight {
                y *= w[i];
            }
            if let Some(b) = &norm.bias {
                y += b[i];
            }
            *v = y;
        }
    }
}

/// transformers' Llama RMSNorm over each row: `w * (x * rsqrt(mean(x^2) + eps))`.
pub fn rms_norm(x: &mut [f32], dim: usize, norm: &NormWeights, eps: f64) {
    for row in x.chunks_exact_mut(dim) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let inv = (1.0 / (ms as f32 as f64 + eps).sqrt()) as f32;
        for (i, v) in row.iter_mut().enumerate() {
            let y = *v * inv;
            *v = match &norm.weight {
                Some(w) => w[i] * y,
                None => y,
            };
        }
    }
}

#[inline]
pub fn relu(v: f32) -> f32 {
    // max(0, v) keeps -0.0 and NaN handling irrelevant: exactly 0 for v <= 0,
    // which is what "a neuron did not fire" means.
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// In-place softmax with max subtraction; sums in a fixed order.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `y += a * x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_row_dot_for_all_dtypes() {
        let cols = 300;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let f16s: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let back: Vec<f32> = f16s.iter().map(|v| v.to_f32()).collect();
        let m = Matrix::new(1, cols, Storage::F16(f16s)).unwrap();
        assert_eq!(row_dot(&m, 0, &x), dot(&back, &x));
    }

    #[test]
    fn gemm_matches_matvec_closely() {
        let (rows, k, n) = (130, 70, 5);
        let w: Vec<f32> = (0..rows * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let lin = Linear {
            weight: Matrix::new(rows, k, Storage::F32(w)).unwrap(),
            bias: Some((0..rows).map(|i| i as f32).collect()),
        };
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        let mut batch = vec![0.0; n * rows];
        linear(&lin, &x, n, &mut batch);
        for t in 0..n {
            let mut one = vec![0.0; rows];
            matvec(&lin, &x[t * k..(t + 1) * k], &mut one);
            // Small integers: both orders are exact.
            assert_eq!(&batch[t * rows..(t + 1) * rows], &one[..]);
        }
    }
}
