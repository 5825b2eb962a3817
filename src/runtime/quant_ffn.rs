//! The FFN of a layer whose bundles are block-quantized (format section 9),
//! computed from the bundles as the file stores them, in DRAM: no
//! dequantized copy.
//!
//! Each neuron's gate and up rows are dotted with the input quantized to 8
//! bits per block (`runtime::quant::dot_row`, integer sums, AVX2 or scalar).
//! The down projection is a sum of the neurons' down columns (bundle parts,
//! blocks along the hidden dimension), each block dequantized and scaled by
//! the neuron's value in f32; the neurons are summed in fixed chunks of
//! [`NEURON_CHUNK`] in ascending order, and the chunks' partial sums are
//! added in chunk order, so the result depends on neither the thread count
//! nor the SIMD path. With a down scale (format 9.6) each output channel is
//! multiplied by its scale after the sum, then the bias is added.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::input::config::Activation;
use crate::quant::{block_scale, QuantType, BLOCK};
use crate::runtime::ffn::{neuron_value, ActiveSet, Criterion, Ffn, Fired};
use crate::runtime::quant::{dot_row, Path, QuantizedActivations};

/// Neurons summed into one partial output of the down projection. Fixed (not
/// derived from the thread count), so the summation order is too.
pub const NEURON_CHUNK: usize = 64;

/// Tokens whose partial sums are held at once in the down projection (bounds
/// the scratch memory of a long prefill).
const TOKEN_GROUP: usize = 16;

/// One layer's quantized bundles and what goes with them.
pub struct QuantFfn {
    q: QuantType,
    hidden: usize,
    width: usize,
    gated: bool,
    /// Bytes from one bundle to the next.
    stride: usize,
    /// Bytes of one part (`hidden / 32` blocks).
    part_bytes: usize,
    /// The layer's bundles, packed order, as the FFN section stores them.
    bundles: Vec<u8>,
    /// Format 9.6: per-output-channel scale of the down projection.
    down_scale: Option<Vec<f32>>,
    gate_bias: Option<Vec<f32>>,
    up_bias: Option<Vec<f32>>,
    down_bias: Option<Vec<f32>>,
    activation: Activation,
    path: Path,
}

/// What [`QuantFfn::new`] is built from.
pub struct QuantFfnParts {
    pub q: QuantType,
    pub hidden: usize,
    pub width: usize,
    pub gated: bool,
    pub stride: usize,
    pub bundles: Vec<u8>,
    pub down_scale: Option<Vec<f32>>,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
    pub activation: Activation,
}

impl QuantFfn {
    pub fn new(p: QuantFfnParts) -> Result<QuantFfn> {
        let part_bytes = p.q.row_bytes(p.hidden).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "quantized FFN: hidden size {} is not a multiple of {BLOCK}",
                p.hidden
            ))
        })?;
        let parts = if p.gated { 3 } else { 2 };
        if p.stride < parts * part_bytes || p.bundles.len() != p.width * p.stride {
            return Err(Error::InvalidArgument(format!(
                "quantized FFN: {} bytes of bundles for {} neurons of {} bytes",
                p.bundles.len(),
                p.width,
                p.stride
            )));
        }
        Ok(QuantFfn {
            q: p.q,
            hidden: p.hidden,
            width: p.width,
            gated: p.gated,
            stride: p.stride,
            part_bytes,
            bundles: p.bundles,
            down_scale: p.down_scale,
            gate_bias: p.gate_bias,
            up_bias: p.up_bias,
            down_bias: p.down_bias,
            activation: p.activation,
            path: Path::detect(),
        })
    }

    /// The same FFN computing on the scalar path (tests: SIMD == scalar).
    pub fn with_path(mut self, path: Path) -> QuantFfn {
        self.path = path;
        self
    }

    /// Part `k` (0: gate or up, ...) of neuron `p`.
    #[inline]
    fn part(&self, p: usize, k: usize) -> &[u8] {
        let at = p * self.stride + k * self.part_bytes;
        &self.bundles[at..at + self.part_bytes]
    }

    /// Neuron `p`'s (gate, up) pre-activations for quantized input `x`.
    #[inline]
    fn pre_activations(&self, p: usize, x: &QuantizedActivations) -> (Option<f32>, f32) {
        let (gate, up) = if self.gated {
            let mut g = dot_row(self.q, self.part(p, 0), x, self.path);
            if let Some(b) = &self.gate_bias {
                g += b[p];
            }
            (Some(g), 1)
        } else {
            (None, 0)
        };
        let mut u = dot_row(self.q, self.part(p, up), x, self.path);
        if let Some(b) = &self.up_bias {
            u += b[p];
        }
        (gate, u)
    }

    fn quantize_inputs(&self, x: &[f32], n: usize) -> Vec<QuantizedActivations> {
        debug_assert_eq!(x.len(), n * self.hidden);
        x.par_chunks(self.hidden)
            .map(QuantizedActivations::new)
            .collect()
    }

    /// `n x width` values of `f(gate, up)` for every neuron, or (with
    /// `mask`, `n x width`) for the marked ones only (0 elsewhere).
    fn per_neuron(
        &self,
        xq: &[QuantizedActivations],
        mask: Option<&[bool]>,
        f: impl Fn(Option<f32>, f32) -> f32 + Sync,
    ) -> Vec<f32> {
        let (n, width) = (xq.len(), self.width);
        // Neuron-major within a chunk (each neuron's rows read once for all
        // tokens), scattered to token-major afterwards.
        let chunks: Vec<Vec<f32>> = (0..width.div_ceil(NEURON_CHUNK))
            .into_par_iter()
            .map(|c| {
                let range = c * NEURON_CHUNK..((c + 1) * NEURON_CHUNK).min(width);
                let mut v = vec![0.0f32; range.len() * n];
                for (i, p) in range.enumerate() {
                    for (t, x) in xq.iter().enumerate() {
                        if mask.is_none_or(|m| m[t * width + p]) {
                            let (g, u) = self.pre_activations(p, x);
                            v[i * n + t] = f(g, u);
                        }
                    }
                }
                v
            })
            .collect();
        let mut out = vec![0.0f32; n * width];
        for (c, v) in chunks.iter().enumerate() {
            for (i, toks) in v.chunks_exact(n).enumerate() {
                for (t, val) in toks.iter().enumerate() {
                    out[t * width + c * NEURON_CHUNK + i] = *val;
                }
            }
        }
        out
    }

    fn neuron_values(&self, xq: &[QuantizedActivations], mask: Option<&[bool]>) -> Vec<f32> {
        let act = self.activation;
        self.per_neuron(xq, mask, |g, u| neuron_value(act, g, u))
    }

    /// Prefill (more than [`GEMM_TOKENS`] tokens, every neuron): each chunk
    /// of neurons' rows and columns dequantized to f32 (format 9.1) and
    /// multiplied by the f32 activations in a GEMM, the chunks' partial
    /// outputs added in chunk order. (The decode path quantizes the
    /// activations instead; the two differ by rounding, as the f16 model's
    /// GEMM and matvec do.)
    fn forward_gemm(&self, x: &[f32], n: usize, out: &mut [f32]) -> Vec<f32> {
        let (hidden, width) = (self.hidden, self.width);
        let parts = if self.gated { 3 } else { 2 };
        let results: Vec<(Vec<f32>, Vec<f32>)> = (0..width.div_ceil(NEURON_CHUNK))
            .into_par_iter()
            .map(|c| {
                let p0 = c * NEURON_CHUNK;
                let cn = NEURON_CHUNK.min(width - p0);
                // w[k]: part k of the chunk's neurons, cn x hidden.
                let mut w = vec![vec![0.0f32; cn * hidden]; parts];
                for (k, wk) in w.iter_mut().enumerate() {
                    for (i, row) in wk.chunks_exact_mut(hidden).enumerate() {
                        self.q.dequantize_row(self.part(p0 + i, k), row);
                    }
                }
                let mut pre = vec![vec![0.0f32; n * cn]; parts - 1];
                for (k, pk) in pre.iter_mut().enumerate() {
                    sgemm_nt(x, &w[k], n, hidden, cn, pk);
                }
                let mut h = vec![0.0f32; n * cn];
                for t in 0..n {
                    for i in 0..cn {
                        let p = p0 + i;
                        let (g, u) = if self.gated {
                            (Some(pre[0][t * cn + i]), pre[1][t * cn + i])
                        } else {
                            (None, pre[0][t * cn + i])
                        };
                        let g = g.map(|g| g + self.gate_bias.as_ref().map_or(0.0, |b| b[p]));
                        let u = u + self.up_bias.as_ref().map_or(0.0, |b| b[p]);
                        h[t * cn + i] = neuron_value(self.activation, g, u);
                    }
                }
                // partial = h (n x cn) times the down columns (cn x hidden).
                let mut partial = vec![0.0f32; n * hidden];
                sgemm_nn(&h, &w[parts - 1], n, cn, hidden, &mut partial);
                (h, partial)
            })
            .collect();
        out.fill(0.0);
        let mut h_all = vec![0.0f32; n * width];
        for (c, (h, partial)) in results.iter().enumerate() {
            let cn = h.len() / n;
            for t in 0..n {
                h_all[t * width + c * NEURON_CHUNK..t * width + c * NEURON_CHUNK + cn]
                    .copy_from_slice(&h[t * cn..(t + 1) * cn]);
            }
            for (o, v) in out.iter_mut().zip(partial) {
                *o += v;
            }
        }
        self.finish_rows(out);
        h_all
    }

    /// The down scale and bias on each output row.
    fn finish_rows(&self, out: &mut [f32]) {
        for row in out.chunks_exact_mut(self.hidden) {
            if let Some(s) = &self.down_scale {
                for (o, s) in row.iter_mut().zip(s) {
                    *o *= s;
                }
            }
            if let Some(b) = &self.down_bias {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }

    /// `out = down h (* scale) + bias` for `n` tokens (`h`: `n x width`).
    fn down(&self, h: &[f32], n: usize, out: &mut [f32]) {
        let (hidden, width) = (self.hidden, self.width);
        let k = if self.gated { 2 } else { 1 };
        for t0 in (0..n).step_by(TOKEN_GROUP) {
            let tn = TOKEN_GROUP.min(n - t0);
            // One partial sum (tn x hidden) per chunk of neurons.
            let partials: Vec<Vec<f32>> = (0..width.div_ceil(NEURON_CHUNK))
                .into_par_iter()
                .map(|c| {
                    let mut acc = vec![0.0f32; tn * hidden];
                    for p in c * NEURON_CHUNK..((c + 1) * NEURON_CHUNK).min(width) {
                        let column = self.part(p, k);
                        for t in 0..tn {
                            let v = h[(t0 + t) * width + p];
                            if v != 0.0 {
                                add_column(
                                    self.q,
                                    self.path,
                                    column,
                                    v,
                                    &mut acc[t * hidden..(t + 1) * hidden],
                                );
                            }
                        }
                    }
                    acc
                })
                .collect();
            let out = &mut out[t0 * hidden..(t0 + tn) * hidden];
            out.fill(0.0);
            for part in &partials {
                for (o, v) in out.iter_mut().zip(part) {
                    *o += v;
                }
            }
            self.finish_rows(out);
        }
    }
}

/// `c = a b^T` for `a` (`m x k`), `b` (`n x k`), `c` (`m x n`), row-major.
fn sgemm_nt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, c: &mut [f32]) {
    assert!(a.len() == m * k && b.len() == n * k && c.len() == m * n);
    // SAFETY: the lengths above match the strides given.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c = a b` for `a` (`m x k`), `b` (`k x n`), `c` (`m x n`), row-major.
fn sgemm_nn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, c: &mut [f32]) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    // SAFETY: the lengths above match the strides given.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Beyond this many tokens (every neuron computed) the FFN runs as GEMMs on
/// dequantized chunks (`QuantFfn::forward_gemm`); as the f16 model's
/// `kernels::linear` does.
pub const GEMM_TOKENS: usize = 16;

/// `acc += v * column` for a down column of blocks of `q`, each block's
/// values formed as `(v * d) * q (+ v * m)` in f32, multiply and add unfused.
#[inline]
fn add_column(q: QuantType, path: Path, column: &[u8], v: f32, acc: &mut [f32]) {
    match path {
        Path::Scalar => add_column_body(q, column, v, acc),
        // SAFETY: the AVX2 path is chosen only when the CPU has AVX2.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { add_column_avx2(q, column, v, acc) },
    }
}

/// The same operations as [`add_column_body`], compiled for AVX2 (the
/// compiler vectorizes the element-wise loops; no operation is fused or
/// reordered, so the result equals the scalar one bit for bit).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_column_avx2(q: QuantType, column: &[u8], v: f32, acc: &mut [f32]) {
    add_column_body(q, column, v, acc)
}

#[inline(always)]
fn add_column_body(q: QuantType, column: &[u8], v: f32, acc: &mut [f32]) {
    let bb = q.block_bytes();
    for (w, a) in column.chunks_exact(bb).zip(acc.chunks_exact_mut(BLOCK)) {
        let c = v * block_scale(w);
        match q {
            QuantType::Q8_0 => {
                let qs = &w[2..2 + BLOCK];
                for (a, &qv) in a.iter_mut().zip(qs) {
                    *a += c * (qv as i8) as f32;
                }
            }
            QuantType::Q4_1 => {
                let m = v * half::f16::from_le_bytes([w[2], w[3]]).to_f32();
                let nib = &w[4..4 + BLOCK / 2];
                let (lo, hi) = a.split_at_mut(BLOCK / 2);
                for (a, &b) in lo.iter_mut().zip(nib) {
                    *a += c * (b & 0x0f) as f32 + m;
                }
                for (a, &b) in hi.iter_mut().zip(nib) {
                    *a += c * (b >> 4) as f32 + m;
                }
            }
        }
    }
}

impl Ffn for QuantFfn {
    fn hidden_size(&self) -> usize {
        self.hidden
    }

    fn width(&self) -> usize {
        self.width
    }

    fn weight_bytes(&self) -> usize {
        self.bundles.len() + self.down_scale.as_ref().map_or(0, |s| s.len() * 4)
    }

    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        let xq = self.quantize_inputs(x, n);
        let act = self.activation;
        self.per_neuron(&xq, None, |g, u| match g {
            Some(g) => neuron_value(act, None, g),
            None => neuron_value(act, None, u),
        })
    }

    fn selection_scores(&self, x: &[f32], n: usize, criterion: Criterion) -> Result<Vec<f32>> {
        Ok(match criterion {
            Criterion::Gate => self.firing_activations(x, n),
            Criterion::Product => self.neuron_values(&self.quantize_inputs(x, n), None),
        })
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        let width = self.width;
        if n > GEMM_TOKENS && matches!(active, ActiveSet::All) {
            let h = self.forward_gemm(x, n, out);
            if let Some(fired) = fired {
                fired.width = width;
                fired.per_token = firing(&h, width);
            }
            return Ok(());
        }
        let xq = self.quantize_inputs(x, n);
        let h = match active {
            ActiveSet::All => self.neuron_values(&xq, None),
            ActiveSet::PerToken(sets) => {
                if sets.len() != n {
                    return Err(Error::InvalidArgument(format!(
                        "active sets for {} tokens given for a batch of {n}",
                        sets.len()
                    )));
                }
                let mut mask = vec![false; n * width];
                for (t, set) in sets.iter().enumerate() {
                    for &i in set {
                        let i = i as usize;
                        if i >= width {
                            return Err(Error::InvalidArgument(format!(
                                "active neuron {i} is outside the FFN width {width}"
                            )));
                        }
                        mask[t * width + i] = true;
                    }
                }
                self.neuron_values(&xq, Some(&mask))
            }
        };
        if let Some(fired) = fired {
            fired.width = width;
            fired.per_token = firing(&h, width);
        }
        self.down(&h, n, out);
        Ok(())
    }
}

/// The neurons with a non-zero value, per token.
fn firing(h: &[f32], width: usize) -> Vec<Vec<u32>> {
    h.chunks_exact(width)
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v != 0.0)
                .map(|(i, _)| i as u32)
                .collect()
        })
        .collect()
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
                if i % 89 == 7 {
                    u * scale * 30.0
                } else {
                    u * scale
                }
            })
            .collect()
    }

    const HIDDEN: usize = 96;
    const WIDTH: usize = 150; // not a multiple of NEURON_CHUNK

    /// A gated SiLU FFN of random bundles of `q` (3 parts, 4 padding bytes),
    /// with a down scale and biases, and its dequantized weights
    /// (gate, up: `[width][hidden]`; down columns: `[width][hidden]`, scaled).
    /// Dequantized rows (or down columns), one per neuron.
    type Rows = Vec<Vec<f32>>;

    fn ffn(q: QuantType) -> (QuantFfn, Rows, Rows, Rows) {
        let part = q.row_bytes(HIDDEN).unwrap();
        let stride = 3 * part + 4;
        let mut bundles = vec![0u8; WIDTH * stride];
        let scale: Vec<f32> = (0..HIDDEN).map(|r| 0.5 + (r % 7) as f32).collect();
        let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..WIDTH {
            for (k, store) in [&mut gate, &mut up, &mut down].into_iter().enumerate() {
                let x = values((p * 3 + k) as u64, HIDDEN, 0.2);
                let out = &mut bundles[p * stride + k * part..p * stride + (k + 1) * part];
                q.quantize_row(&x, out).unwrap();
                let mut v = vec![0.0f32; HIDDEN];
                q.dequantize_row(out, &mut v);
                if k == 2 {
                    for (v, s) in v.iter_mut().zip(&scale) {
                        *v *= s;
                    }
                }
                store.push(v);
            }
        }
        let f = QuantFfn::new(QuantFfnParts {
            q,
            hidden: HIDDEN,
            width: WIDTH,
            gated: true,
            stride,
            bundles,
            down_scale: Some(scale),
            gate_bias: Some(values(90, WIDTH, 0.1)),
            up_bias: Some(values(91, WIDTH, 0.1)),
            down_bias: Some(values(92, HIDDEN, 0.1)),
            activation: Activation::Silu,
        })
        .unwrap();
        (f, gate, up, down)
    }

    /// The FFN in f64 from the dequantized weights and the 8-bit activations
    /// (what the kernels compute before their f32 rounding).
    fn reference(
        f: &QuantFfn,
        gate: &[Vec<f32>],
        up: &[Vec<f32>],
        down: &[Vec<f32>],
        x: &[f32],
        quantized_activations: bool,
    ) -> Vec<f64> {
        let xq = QuantizedActivations::new(x);
        let xd: Vec<f64> = (0..HIDDEN)
            .map(|i| match quantized_activations {
                true => xq.values[i] as f64 * xq.scales[i / BLOCK] as f64,
                false => x[i] as f64,
            })
            .collect();
        let dot = |w: &[f32]| -> f64 { w.iter().zip(&xd).map(|(&w, &a)| w as f64 * a).sum() };
        let mut out: Vec<f64> = f
            .down_bias
            .as_ref()
            .unwrap()
            .iter()
            .map(|&b| b as f64)
            .collect();
        for p in 0..WIDTH {
            let g = dot(&gate[p]) + f.gate_bias.as_ref().unwrap()[p] as f64;
            let u = dot(&up[p]) + f.up_bias.as_ref().unwrap()[p] as f64;
            let h = g / (1.0 + (-g).exp()) * u;
            for (o, &w) in out.iter_mut().zip(&down[p]) {
                *o += h * w as f64;
            }
        }
        out
    }

    #[test]
    fn forward_equals_the_f64_reference_of_the_dequantized_weights() {
        for q in QuantType::ALL {
            let (f, gate, up, down) = ffn(q);
            // Decode (integer kernels, 8-bit activations) and a prefill of
            // 20 tokens (GEMM on dequantized weights, f32 activations).
            let n = 20;
            let x = values(7, n * HIDDEN, 1.0);
            for (batch, quantized) in [(1, true), (n, false)] {
                let mut out = vec![0.0f32; batch * HIDDEN];
                f.forward(&x[..batch * HIDDEN], batch, ActiveSet::All, &mut out, None)
                    .unwrap();
                for t in [0, batch - 1] {
                    let xt = &x[t * HIDDEN..(t + 1) * HIDDEN];
                    let want = reference(&f, &gate, &up, &down, xt, quantized);
                    let norm = want.iter().map(|v| v * v).sum::<f64>() / HIDDEN as f64;
                    for (r, (&o, &w)) in out[t * HIDDEN..].iter().zip(&want).enumerate() {
                        // f32 rounding of ~150 terms per output: far below
                        // 1e-4 of the outputs' RMS.
                        assert!(
                            (o as f64 - w).abs() <= 1e-4 * norm.sqrt(),
                            "{q} batch {batch} token {t} output {r}: {o} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_threads_batches_and_full_sets_give_the_same_bits() {
        for q in QuantType::ALL {
            let (f, ..) = ffn(q);
            let (scalar, ..) = ffn(q);
            let scalar = scalar.with_path(Path::Scalar);
            let run = |f: &QuantFfn, x: &[f32], n: usize, threads: usize| {
                crate::runtime::with_threads(Some(threads), || {
                    let mut out = vec![0.0f32; n * HIDDEN];
                    f.forward(x, n, ActiveSet::All, &mut out, None).unwrap();
                    out
                })
                .unwrap()
            };
            // Decode-sized batches (integer kernels) and a prefill (GEMM).
            for n in [5, 40] {
                let x = values(8 + n as u64, n * HIDDEN, 1.0);
                let base = run(&f, &x, n, 1);
                assert_eq!(base, run(&f, &x, n, 3), "{q} n={n}: 1 vs 3 threads");
                assert_eq!(base, run(&scalar, &x, n, 2), "{q} n={n}: SIMD vs scalar");
            }
            let n = 5;
            let x = values(13, n * HIDDEN, 1.0);
            let base = run(&f, &x, n, 2);
            // Token by token (decode) equals the batch.
            for t in [0, 4] {
                let one = run(&f, &x[t * HIDDEN..(t + 1) * HIDDEN], 1, 2);
                assert_eq!(one, base[t * HIDDEN..(t + 1) * HIDDEN], "{q}: token {t}");
            }
            // Every neuron listed equals the dense evaluation; a subset
            // computes only its neurons.
            let all: Vec<Vec<u32>> = vec![(0..WIDTH as u32).collect(); n];
            let mut out = vec![0.0f32; n * HIDDEN];
            f.forward(&x, n, ActiveSet::PerToken(&all), &mut out, None)
                .unwrap();
            assert_eq!(out, base, "{q}: all neurons listed");
            let some: Vec<Vec<u32>> = vec![vec![3, 70, 149]; n];
            let mut fired = Fired::default();
            f.forward(
                &x,
                n,
                ActiveSet::PerToken(&some),
                &mut out,
                Some(&mut fired),
            )
            .unwrap();
            assert!(fired
                .per_token
                .iter()
                .all(|s| s.iter().all(|i| [3, 70, 149].contains(i))));
            assert_ne!(out, base, "{q}: a subset differs");
        }
    }
}
