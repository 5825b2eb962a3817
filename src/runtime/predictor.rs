//! The low-rank sparsity predictor as the runtime uses it: which FFN neurons a
//! token needs, from the FFN input. Training it is [`crate::predictor::train`]'s
//! job; the runtime only evaluates it, so the type lives here and the training
//! module depends on the runtime, not the other way round.

/// `logits = (x · A) · B + bias`; neuron `j` is predicted active when
/// `logits[j] >= threshold` (sigmoid(logit) >= sigmoid(threshold)).
///
/// Layouts, all row-major f32 holding f16-representable values: `a` is `d x rank`
/// (`a[i * rank + k]`), `b` is `rank x ffn` (`b[k * ffn + j]`), `bias` has `ffn`
/// entries. The input is the raw FFN input (no normalisation to apply).
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankPredictor {
    pub d: usize,
    pub rank: usize,
    pub ffn: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub bias: Vec<f32>,
    /// On the logit: `logit >= threshold` means active. `f32::MAX` when the
    /// held-out data had no firing at all (predict nothing).
    pub threshold: f32,
}

impl LowRankPredictor {
    /// The logits of one token: `x` has `d` values, `out` `ffn`. `scratch` is
    /// resized to `rank` (no allocation once it has the capacity).
    pub fn logits(&self, x: &[f32], scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (d, r, ffn) = (self.d, self.rank, self.ffn);
        scratch.clear();
        scratch.resize(r, 0.0);
        for (&xi, a_row) in x[..d].iter().zip(self.a.chunks_exact(r)) {
            for (h, &a) in scratch.iter_mut().zip(a_row) {
                *h += xi * a;
            }
        }
        let out = &mut out[..ffn];
        out.copy_from_slice(&self.bias);
        for (&h, b_row) in scratch.iter().zip(self.b.chunks_exact(ffn)) {
            for (o, &b) in out.iter_mut().zip(b_row) {
                *o += h * b;
            }
        }
    }

    /// Ascending indices of the neurons predicted active for one token. `logits` is
    /// resized to `ffn`; nothing allocates once the buffers have the capacity.
    pub fn predict(
        &self,
        x: &[f32],
        scratch: &mut Vec<f32>,
        logits: &mut Vec<f32>,
        active: &mut Vec<u32>,
    ) {
        logits.clear();
        logits.resize(self.ffn, 0.0);
        self.logits(x, scratch, logits);
        active.clear();
        let t = self.threshold;
        active.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &z)| z >= t)
                .map(|(j, _)| j as u32),
        );
    }

    /// Bytes of `a`, `b` and `bias` stored as f16.
    pub fn size_bytes_f16(&self) -> usize {
        (self.d * self.rank + self.rank * self.ffn + self.ffn) * 2
    }
}
