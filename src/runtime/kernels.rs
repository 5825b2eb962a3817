//! Deterministic numeric kernels: dot products, matrix-vector and matrix-matrix
//! products, norms and activations.
//!
//! Determinism rule: work is split across threads only over output elements,
//! never over a reduction. Every output element is reduced by one thread in a
//! fixed order that depends only on the shapes, so results are bit-identical for
//! any thread count.

use rayon::prelude::*;

use crate::runtime::weights::{Linear, Matrix, NormWeights, Storage};

/// Independent accumulators in a dot product: enough to hide FMA latency and
/// fill four 8-wide vector registers; the lane a product goes to depends only on
/// its index, so the summation order is fixed.
const LANES: usize = 32;

/// Sums the lanes in a fixed pairwise order.
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

/// Portable dot product of `w` (widened element by element) with `x`.
#[inline]
fn dot_portable(w: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let main = x.len() - x.len() % LANES;
    for c in (0..main).step_by(LANES) {
        for l in 0..LANES {
            acc[l] += w(c + l) * x[c + l];
        }
    }
    for i in main..x.len() {
        acc[i % LANES] += w(i) * x[i];
    }
    reduce_lanes(&acc)
}

/// AVX2 + FMA + F16C kernels, chosen at run time. Each output is still one
/// fixed-order reduction (lane `i % 32`, then [`reduce_lanes`]); only the
/// rounding of fused multiply-adds differs from the portable path, and one
/// machine always takes the same path, so results do not depend on threads.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{reduce_lanes, LANES};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Loads 8 weights at `i` as f32.
    trait Load {
        unsafe fn load8(&self, i: usize) -> __m256;
        fn get(&self, i: usize) -> f32;
        fn len(&self) -> usize;
    }

    impl Load for &[f32] {
        #[inline(always)]
        unsafe fn load8(&self, i: usize) -> __m256 {
            _mm256_loadu_ps(self.as_ptr().add(i))
        }
        #[inline(always)]
        fn get(&self, i: usize) -> f32 {
            self[i]
        }
        #[inline(always)]
        fn len(&self) -> usize {
            <[f32]>::len(self)
        }
    }

    impl Load for &[half::f16] {
        #[inline(always)]
        unsafe fn load8(&self, i: usize) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(self.as_ptr().add(i) as *const __m128i))
        }
        #[inline(always)]
        fn get(&self, i: usize) -> f32 {
            self[i].to_f32()
        }
        #[inline(always)]
        fn len(&self) -> usize {
            <[half::f16]>::len(self)
        }
    }

    impl Load for &[half::bf16] {
        #[inline(always)]
        unsafe fn load8(&self, i: usize) -> __m256 {
            // bf16 is the top half of an f32: widen to 32 bits and shift.
            let h = _mm_loadu_si128(self.as_ptr().add(i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        #[inline(always)]
        fn get(&self, i: usize) -> f32 {
            self[i].to_f32()
        }
        #[inline(always)]
        fn len(&self) -> usize {
            <[half::bf16]>::len(self)
        }
    }

    #[inline(always)]
    unsafe fn dot_impl<W: Load>(w: W, x: &[f32]) -> f32 {
        let n = w.len();
        debug_assert_eq!(n, x.len());
        let main = n - n % LANES;
        let xp = x.as_ptr();
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < main {
            a0 = _mm256_fmadd_ps(w.load8(i), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(w.load8(i + 8), _mm256_loadu_ps(xp.add(i + 8)), a1);
            a2 = _mm256_fmadd_ps(w.load8(i + 16), _mm256_loadu_ps(xp.add(i + 16)), a2);
            a3 = _mm256_fmadd_ps(w.load8(i + 24), _mm256_loadu_ps(xp.add(i + 24)), a3);
            i += LANES;
        }
        let mut acc = [0.0f32; LANES];
        _mm256_storeu_ps(acc.as_mut_ptr(), a0);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), a1);
        _mm256_storeu_ps(acc.as_mut_ptr().add(16), a2);
        _mm256_storeu_ps(acc.as_mut_ptr().add(24), a3);
        for j in main..n {
            acc[j % LANES] += w.get(j) * x[j];
        }
        reduce_lanes(&acc)
    }

    /// # Safety
    /// [`available`] must be true; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        dot_impl(w, x)
    }

    /// # Safety
    /// As [`dot_f32`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
        dot_impl(w, x)
    }

    /// # Safety
    /// As [`dot_f32`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_bf16(w: &[half::bf16], x: &[f32]) -> f32 {
        dot_impl(w, x)
    }

    /// [`dot_impl`] of one row with `K` vectors at once: the row is loaded
    /// once per 8 weights for all of them, and each vector's products go
    /// through exactly the operations [`dot_impl`] does for it alone (the same
    /// lanes, fused multiply-adds, tail and reduction), so each result is
    /// bit-identical to its single dot product.
    #[inline(always)]
    unsafe fn dot_many_impl<W: Load, const K: usize>(w: W, xs: [&[f32]; K]) -> [f32; K] {
        let n = w.len();
        let main = n - n % LANES;
        let mut acc = [[_mm256_setzero_ps(); 4]; K];
        let mut i = 0;
        while i < main {
            for q in 0..4 {
                let wv = w.load8(i + 8 * q);
                for (a, x) in acc.iter_mut().zip(&xs) {
                    a[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i + 8 * q)), a[q]);
                }
            }
            i += LANES;
        }
        let mut out = [0.0f32; K];
        for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
            let mut lanes = [0.0f32; LANES];
            for (q, v) in a.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * q), *v);
            }
            for j in main..n {
                lanes[j % LANES] += w.get(j) * x[j];
            }
            *o = reduce_lanes(&lanes);
        }
        out
    }

    /// # Safety
    /// [`available`] must be true; every `xs[k].len() == w.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2_f32(w: &[f32], xs: [&[f32]; 2]) -> [f32; 2] {
        dot_many_impl(w, xs)
    }

    /// # Safety
    /// As [`dot2_f32`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2_f16(w: &[half::f16], xs: [&[f32]; 2]) -> [f32; 2] {
        dot_many_impl(w, xs)
    }

    /// # Safety
    /// As [`dot2_f32`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2_bf16(w: &[half::bf16], xs: [&[f32]; 2]) -> [f32; 2] {
        dot_many_impl(w, xs)
    }
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(x86::available)
}

/// f32 dot product with a fixed summation order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has the features; lengths are equal.
        return unsafe { x86::dot_f32(a, b) };
    }
    dot_portable(|i| a[i], b)
}

/// A run of weights in their stored dtype, borrowed from a [`Matrix`] or from
/// bundle bytes read from flash.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl<'a> Weights<'a> {
    /// Row `r` of `m`.
    #[inline]
    pub fn row(m: &'a Matrix, r: usize) -> Weights<'a> {
        Weights::of(&m.data).range(r * m.cols, (r + 1) * m.cols)
    }

    /// All of `s`.
    #[inline]
    pub fn of(s: &'a Storage) -> Weights<'a> {
        match s {
            Storage::F32(v) => Weights::F32(v),
            Storage::F16(v) => Weights::F16(v),
            Storage::BF16(v) => Weights::BF16(v),
        }
    }

    /// Little-endian `bytes` of `dtype` seen as weights, without copying; `None`
    /// when `bytes` is not aligned to the element size or not a whole number of
    /// elements (bundle buffers always are: sections start aligned and every part
    /// is a whole number of elements).
    pub fn from_le_bytes(dtype: crate::dtype::DType, bytes: &'a [u8]) -> Option<Weights<'a>> {
        use crate::dtype::DType;
        if cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: f32, f16 and bf16 accept any bit pattern; align_to only yields a
        // middle slice of correctly aligned elements, and we require no remainder.
        unsafe {
            match dtype {
                DType::F32 => match bytes.align_to::<f32>() {
                    ([], v, []) => Some(Weights::F32(v)),
                    _ => None,
                },
                DType::F16 => match bytes.align_to::<half::f16>() {
                    ([], v, []) => Some(Weights::F16(v)),
                    _ => None,
                },
                DType::BF16 => match bytes.align_to::<half::bf16>() {
                    ([], v, []) => Some(Weights::BF16(v)),
                    _ => None,
                },
            }
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::F16(v) => v.len(),
            Weights::BF16(v) => v.len(),
        }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn range(self, start: usize, end: usize) -> Weights<'a> {
        match self {
            Weights::F32(v) => Weights::F32(&v[start..end]),
            Weights::F16(v) => Weights::F16(&v[start..end]),
            Weights::BF16(v) => Weights::BF16(&v[start..end]),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Weights::F32(v) => v[i],
            Weights::F16(v) => v[i].to_f32(),
            Weights::BF16(v) => v[i].to_f32(),
        }
    }

    /// Widens elements `start..start + out.len()` into `out`.
    #[inline]
    fn widen_into(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let end = start + out.len();
        match self {
            Weights::F32(v) => out.copy_from_slice(&v[start..end]),
            Weights::F16(v) => v[start..end].convert_to_f32_slice(out),
            Weights::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }
}

/// Asks the CPU to bring elements `start..start + len` of `w` into its caches
/// ahead of use (a hint only: results are unaffected). The sparse modes read
/// the rows and columns of chosen neurons, scattered through the matrices,
/// whose starts the hardware prefetcher cannot guess.
#[inline]
pub fn prefetch(w: Weights<'_>, start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = (start + len).min(w.len());
        if start >= end {
            return;
        }
        let (base, size) = match w {
            Weights::F32(v) => (v.as_ptr() as *const i8, 4),
            Weights::F16(v) => (v.as_ptr() as *const i8, 2),
            Weights::BF16(v) => (v.as_ptr() as *const i8, 2),
        };
        let (first, last) = (start * size, end * size);
        let mut offset = first;
        while offset < last {
            // SAFETY: SSE is part of x86_64; a prefetch never faults, and the
            // address is inside `w`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, start, len);
}

/// [`dot_weights`] of `w` with two vectors, each result bit-identical to its
/// own `dot_weights`; the row is read once for both (batches that share
/// neurons: flash prefill).
#[inline]
pub fn dot_weights2(w: Weights<'_>, xs: [&[f32]; 2]) -> [f32; 2] {
    assert!(
        xs.iter().all(|x| x.len() == w.len()),
        "dot2: length mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has the features; lengths are equal (asserted).
        return unsafe {
            match w {
                Weights::F32(v) => x86::dot2_f32(v, xs),
                Weights::F16(v) => x86::dot2_f16(v, xs),
                Weights::BF16(v) => x86::dot2_bf16(v, xs),
            }
        };
    }
    [dot_weights(w, xs[0]), dot_weights(w, xs[1])]
}

/// Dot product of stored weights `w` with `x`, widening as they are read.
#[inline]
pub fn dot_weights(w: Weights<'_>, x: &[f32]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot: length mismatch");
    match w {
        Weights::F32(v) => dot(v, x),
        Weights::F16(w) => {
            #[cfg(target_arch = "x86_64")]
            if simd() {
                // SAFETY: the CPU has the features; lengths are equal.
                return unsafe { x86::dot_f16(w, x) };
            }
            dot_portable(|i| w[i].to_f32(), x)
        }
        Weights::BF16(w) => {
            #[cfg(target_arch = "x86_64")]
            if simd() {
                // SAFETY: as above.
                return unsafe { x86::dot_bf16(w, x) };
            }
            dot_portable(|i| w[i].to_f32(), x)
        }
    }
}

/// Dot product of row `r` of `m` with `x`, widening the weights as they are
/// read (decode is memory-bound: the weights stream once, in their dtype).
#[inline]
pub fn row_dot(m: &Matrix, r: usize, x: &[f32]) -> f32 {
    assert_eq!(x.len(), m.cols, "row_dot: length mismatch");
    if m.quant.is_some() {
        // A single row of a block-quantized matrix (rare: the linear layers go
        // through `runtime::quant`): its dequantized values.
        let mut row = vec![0.0f32; m.cols];
        m.row_into(r, &mut row);
        return dot(&row, x);
    }
    dot_weights(Weights::row(m, r), x)
}

/// `out = W x (+ b)` (`n` vectors) for a block-quantized `W`, through the
/// integer kernels of `runtime::quant`; false when `W` is not quantized.
fn quantized_linear(lin: &Linear, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    let Some(q) = &lin.weight.quant else {
        return false;
    };
    if n > SMALL_BATCH {
        // Prefill: the rows dequantized block by block into the f32 GEMM.
        return false;
    }
    let path = crate::runtime::quant::Path::detect();
    if n == 1 {
        crate::runtime::quant::matvec(q, x, out, path);
    } else {
        crate::runtime::quant::matmat(q, x, n, out, path);
    }
    if let Some(b) = &lin.bias {
        for row in out.chunks_exact_mut(q.rows) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
    true
}

/// `out = W h` for a `[dim, neurons]` matrix given column by column, for the
/// neurons with non-zero `h` only, in ascending neuron order.
///
/// The arithmetic is exactly that of [`matvec`] (one [`row_dot`] per output):
/// neuron `i` goes to lane `i % LANES` of each output, fused multiply-add where
/// the SIMD dot fuses (the neurons below the last whole block of `LANES`),
/// plain multiply and add elsewhere, then `reduce_lanes` and the bias. A
/// neuron left out contributes an exact zero in [`matvec`] (`acc + w * 0 ==
/// acc`; the accumulators start at +0 and never become -0), so the sparse sum is
/// bit-identical to the dense one, whichever memory (DRAM matrix or bundles read
/// from flash) the columns come from.
#[derive(Debug, Clone)]
pub struct ColumnAccumulator {
    dim: usize,
    /// Neurons below this index are fused on the SIMD path.
    fused_below: usize,
    fused: bool,
    /// `LANES` accumulators of `dim` values, lane-major.
    acc: Vec<f32>,
}

/// Columns are widened through a stack buffer of this many values.
const WIDEN_CHUNK: usize = 256;

impl ColumnAccumulator {
    /// For outputs of `dim` values and a matrix of `neurons` columns.
    pub fn new(dim: usize, neurons: usize) -> ColumnAccumulator {
        #[cfg(target_arch = "x86_64")]
        let fused = simd();
        #[cfg(not(target_arch = "x86_64"))]
        let fused = false;
        ColumnAccumulator {
            dim,
            fused_below: neurons - neurons % LANES,
            fused,
            acc: vec![0.0; LANES * dim],
        }
    }

    /// Starts a new sum.
    pub fn clear(&mut self) {
        self.acc.fill(0.0);
    }

    /// Adds `h * column` for neuron `neuron`; element `r` of the column is
    /// `w[start + r * stride]`. Neurons must come in ascending order.
    #[inline]
    pub fn add(&mut self, neuron: usize, h: f32, w: Weights<'_>, start: usize, stride: usize) {
        let dim = self.dim;
        let lane = neuron % LANES;
        let acc = &mut self.acc[lane * dim..(lane + 1) * dim];
        let fused = self.fused && neuron < self.fused_below;
        // f32 columns stored contiguously (bundles, the sparse modes' column
        // copy) need no widening: the same sums, without the copy.
        if let (Weights::F32(v), 1) = (w, stride) {
            let col = &v[start..start + dim];
            if fused {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `fused` is only set when the CPU has the features.
                unsafe {
                    fma_axpy(acc, h, col)
                };
            } else {
                for (a, c) in acc.iter_mut().zip(col) {
                    *a += *c * h;
                }
            }
            return;
        }
        let mut buf = [0.0f32; WIDEN_CHUNK];
        let mut r0 = 0;
        while r0 < dim {
            let len = WIDEN_CHUNK.min(dim - r0);
            let col = &mut buf[..len];
            if stride == 1 {
                w.widen_into(start + r0, col);
            } else {
                for (k, c) in col.iter_mut().enumerate() {
                    *c = w.get(start + (r0 + k) * stride);
                }
            }
            let a = &mut acc[r0..r0 + len];
            if fused {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `fused` is only set when the CPU has the features.
                unsafe {
                    fma_axpy(a, h, col)
                };
            } else {
                for (a, c) in a.iter_mut().zip(col.iter()) {
                    *a += *c * h;
                }
            }
            r0 += len;
        }
    }

    /// Writes the sum (plus `bias`) to `out` and leaves the accumulator spent
    /// (call [`ColumnAccumulator::clear`] before the next sum).
    pub fn finish(&mut self, bias: Option<&[f32]>, out: &mut [f32]) {
        let dim = self.dim;
        let mut width = LANES / 2;
        while width > 0 {
            let (low, high) = self.acc.split_at_mut(width * dim);
            for (a, b) in low.iter_mut().zip(&high[..width * dim]) {
                *a += *b;
            }
            width /= 2;
        }
        out.copy_from_slice(&self.acc[..dim]);
        if let Some(b) = bias {
            for (o, b) in out.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
}

/// `a[r] = fma(c[r], h, a[r])`, as the SIMD dot's `_mm256_fmadd_ps(w, x, acc)`.
///
/// # Safety
/// The CPU must have FMA (and AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_axpy(a: &mut [f32], h: f32, c: &[f32]) {
    for (a, c) in a.iter_mut().zip(c) {
        *a = c.mul_add(h, *a);
    }
}

/// Rows handled by one rayon task in a matvec: enough bytes per task (~256 KiB)
/// that scheduling overhead stays small.
fn rows_per_task(m: &Matrix) -> usize {
    let row_bytes = (m.cols * m.dtype().size_bytes()).max(1);
    (262_144 / row_bytes).clamp(1, 4096)
}

/// `out = W x (+ b)` for one input vector, rows in parallel.
pub fn matvec(lin: &Linear, x: &[f32], out: &mut [f32]) {
    if quantized_linear(lin, x, 1, out) {
        return;
    }
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

/// Up to this many vectors, [`linear`] streams each weight row once and dots it
/// with every vector (memory-bound, like decode); beyond it a GEMM on widened
/// row blocks is faster.
const SMALL_BATCH: usize = 16;

/// `out[t] = W x[t] (+ b)` for a few vectors: each weight row is read once (it
/// stays in L1 across the vectors) and every output is the same fixed-order
/// [`row_dot`] that [`matvec`] computes.
fn matvec_batch(lin: &Linear, x: &[f32], n: usize, out: &mut [f32]) {
    let m = &lin.weight;
    let (k, rows) = (m.cols, m.rows);
    let per = rows_per_task(m);
    // Outputs computed row-major per task ([row][token]), scattered afterwards.
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|b| {
            let r0 = b * per;
            let br = per.min(rows - r0);
            let mut c = vec![0.0f32; br * n];
            for i in 0..br {
                for t in 0..n {
                    c[i * n + t] = row_dot(m, r0 + i, &x[t * k..(t + 1) * k]);
                }
            }
            (r0, c)
        })
        .collect();
    for (r0, c) in blocks {
        for (i, vals) in c.chunks_exact(n).enumerate() {
            for (t, v) in vals.iter().enumerate() {
                out[t * rows + r0 + i] = *v;
            }
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
    if quantized_linear(lin, x, n, out) {
        return;
    }
    if n == 1 {
        matvec(lin, x, out);
        return;
    }
    if n <= SMALL_BATCH {
        matvec_batch(lin, x, n, out);
        return;
    }
    let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(GEMM_ROWS))
        .into_par_iter()
        .map(|b| {
            let r0 = b * GEMM_ROWS;
            let br = GEMM_ROWS.min(rows - r0);
            let widened;
            let w: &[f32] = match &m.data {
                _ if m.quant.is_some() => {
                    let mut buf = vec![0.0f32; br * k];
                    for (i, row) in buf.chunks_exact_mut(k).enumerate() {
                        m.row_into(r0 + i, row);
                    }
                    widened = buf;
                    &widened
                }
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

    /// Two vectors at once give each vector's own dot product, bit for bit,
    /// for every dtype and for lengths with and without a tail past the lanes.
    #[test]
    fn dot2_is_two_dots_bit_for_bit() {
        for cols in [1, 31, 32, 64, 300, 576, 1000] {
            let x0: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let x1: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.91).cos() - 0.2).collect();
            let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.11).cos() * 1e-2).collect();
            let f16s: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let bf16s: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            for ws in [Weights::F32(&w), Weights::F16(&f16s), Weights::BF16(&bf16s)] {
                let [a, b] = dot_weights2(ws, [&x0, &x1]);
                assert_eq!(a.to_bits(), dot_weights(ws, &x0).to_bits(), "{cols}");
                assert_eq!(b.to_bits(), dot_weights(ws, &x1).to_bits(), "{cols}");
            }
        }
    }

    #[test]
    fn portable_and_simd_paths_agree() {
        // The portable path is what CPUs without AVX2/FMA/F16C run; only the
        // rounding of fused multiply-adds may differ from the SIMD path.
        let cols = 1000;
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let f16s: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let bf16s: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
        let m = Matrix::new(1, cols, Storage::F16(f16s.clone())).unwrap();
        assert!(close(
            row_dot(&m, 0, &x),
            dot_portable(|i| f16s[i].to_f32(), &x)
        ));
        let m = Matrix::new(1, cols, Storage::BF16(bf16s.clone())).unwrap();
        assert!(close(
            row_dot(&m, 0, &x),
            dot_portable(|i| bf16s[i].to_f32(), &x)
        ));
        assert!(close(dot(&w, &x), dot_portable(|i| w[i], &x)));
        let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(close(dot(&w, &x), exact as f32));
    }

    #[test]
    fn gemm_matches_matvec_closely() {
        for n in [2, 5, 20] {
            check_batch(n);
        }
    }

    fn check_batch(n: usize) {
        let (rows, k) = (130, 70);
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
