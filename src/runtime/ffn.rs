//! The feed-forward network of one layer, as a component behind the [`Ffn`]
//! trait.
//!
//! The dense model and the flash runtime differ only here: which neurons are
//! computed for a token (all of them, or a predicted active set) and where their
//! weights come from (DRAM, or bundles read from flash through a cache). The
//! model's forward pass calls [`Ffn::forward`] and never looks inside, so a
//! flash-backed implementation replaces [`DenseFfn`] without touching
//! `model.rs`.
//!
//! A neuron `i` of a plain FFN (OPT) outputs `act(up_i . x + b_i)`; of a gated FFN
//! (Llama family) `act(gate_i . x) * (up_i . x)`. It "fired" for a token when that
//! value is non-zero: only then does column `i` of the down projection contribute.

use crate::error::{Error, Result};
use crate::input::config::Activation;
use crate::runtime::kernels::{self, relu, silu};
use crate::runtime::weights::Linear;

/// Which neurons to compute for each token of a batch.
#[derive(Debug, Clone, Copy)]
pub enum ActiveSet<'a> {
    /// Every neuron (the dense reference).
    All,
    /// For token `t`, only the neurons listed in `sets[t]` (sorted or not; others
    /// count as not fired). `sets.len()` must equal the batch size.
    PerToken(&'a [Vec<u32>]),
}

/// What a gated neuron's magnitude threshold is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// `|act(gate . x)|`, the gate alone (as CATS does; what files calibrated
    /// before the product criterion record as `silu_threshold`).
    Gate,
    /// `|act(gate . x) * (up . x)|`: the neuron's value, the input of the down
    /// projection (as TEAL does), so what it contributes to the output.
    Product,
}

/// The neurons that fired, per token of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired {
    /// FFN width (number of neurons) of the layer.
    pub width: usize,
    /// Ascending neuron indices with non-zero output, one list per token.
    pub per_token: Vec<Vec<u32>>,
    /// A mixture-of-experts layer: each token's chosen experts, most probable
    /// first (empty for a dense FFN). Its neurons are then numbered
    /// `expert * expert_width + neuron`.
    pub routed: Vec<Vec<u32>>,
}

impl Fired {
    /// Fraction of neuron outputs that were exactly zero over the batch.
    pub fn zero_fraction(&self) -> f64 {
        let total = self.width * self.per_token.len();
        if total == 0 {
            return 0.0;
        }
        let fired: usize = self.per_token.iter().map(Vec::len).sum();
        1.0 - fired as f64 / total as f64
    }
}

/// One layer's FFN. Implementations must be deterministic for any thread count.
pub trait Ffn: Send + Sync {
    /// Input and output width (the model's hidden size).
    fn hidden_size(&self) -> usize;
    /// Number of neurons.
    fn width(&self) -> usize;
    /// Bytes of weights a dense evaluation of one token reads.
    fn weight_bytes(&self) -> usize;
    /// The activation that decides whether each neuron fires (`n x width`):
    /// `act(gate . x)` for a gated FFN, `act(up . x + b)` for a plain one. Oracle
    /// modes pick neurons from it.
    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32>;
    /// The magnitudes (`n x width`, signed) that a threshold under `criterion`
    /// is compared with: [`Ffn::firing_activations`] for [`Criterion::Gate`] and
    /// for plain FFNs, the neuron values for [`Criterion::Product`].
    /// The gate and up projections of a gated FFN held in DRAM (what a
    /// low-precision selector is made from); `None` otherwise.
    fn gated_projections(&self) -> Option<(&Linear, &Linear)> {
        None
    }
    /// This FFN as a [`DenseFfn`], when it is one (the sparse modes compute
    /// chosen neurons from its weights directly).
    fn as_dense(&self) -> Option<&DenseFfn> {
        None
    }
    fn selection_scores(&self, x: &[f32], n: usize, criterion: Criterion) -> Result<Vec<f32>> {
        match criterion {
            Criterion::Gate => Ok(self.firing_activations(x, n)),
            Criterion::Product => Err(Error::InvalidArgument(
                "this FFN cannot compute every neuron's value for the product criterion".into(),
            )),
        }
    }
    /// Computes `out = FFN(x)` for `n` row-major input vectors (`x`: `n x hidden`,
    /// `out`: `n x hidden`). When `fired` is given, it is filled with the neurons
    /// that fired for each token.
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()>;
}

/// The projections of an FFN, as stored in the checkpoint.
#[derive(Debug, Clone)]
pub enum FfnWeights {
    /// OPT: `down(act(up x + b))`.
    Plain { up: Linear, down: Linear },
    /// Llama family: `down(act(gate x) * (up x))`.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

/// The FFN with all weights in DRAM, every neuron computed (unless an active set
/// is given).
#[derive(Debug, Clone)]
pub struct DenseFfn {
    pub weights: FfnWeights,
    pub activation: Activation,
}

/// The value of one neuron from its pre-activations (biases included): plain
/// `act(up)`, gated `act(gate) * up` (dReLU: `relu(gate) * relu(up)`). Every
/// FFN implementation computes a neuron with this, so sparse paths agree bit
/// for bit.
#[inline]
pub fn neuron_value(activation: Activation, gate: Option<f32>, up: f32) -> f32 {
    match (gate, activation) {
        (None, _) => activate(activation, up),
        (Some(g), Activation::DRelu) => relu(g) * relu(up),
        (Some(g), _) => activate(activation, g) * up,
    }
}

/// The activation of the part that decides firing: the gate of a gated FFN
/// (ReLU for dReLU's gate), the up projection of a plain one.
#[inline]
pub fn activate(activation: Activation, v: f32) -> f32 {
    match activation {
        Activation::Relu | Activation::DRelu => relu(v),
        Activation::Silu => silu(v),
        Activation::GeluTanh => gelu_tanh(v),
        Activation::Gelu => gelu_erf(v),
        // ProSparse keeps `torch.ge(x, threshold)`: at the threshold, kept.
        Activation::FatRelu { threshold } => {
            if v >= threshold {
                v
            } else {
                0.0
            }
        }
    }
}

/// Exact GELU (`gelu`, PyTorch's `approximate="none"`), in f32 as PyTorch
/// computes it, `x * 0.5 * (1 + erf(x * sqrt(1/2)))`, with `erf` evaluated in
/// f64 and rounded (PyTorch's own f32 `erf` is within an ulp or two of it).
#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    let e = erf_f64((x * std::f32::consts::FRAC_1_SQRT_2) as f64) as f32;
    x * 0.5 * (1.0 + e)
}

/// The error function to about 1e-11 absolute, ample for f32: the Maclaurin
/// series below |z| = 4 (its terms peak near 1e5 at z = 4, leaving 11 of f64's
/// 16 digits), and +-1 beyond, where 1 - erf(z) < 1.6e-8 is below half an f32
/// ulp of 1.
fn erf_f64(z: f64) -> f64 {
    if z.abs() >= 4.0 {
        return z.signum();
    }
    // erf(z) = 2/sqrt(pi) * sum_n (-1)^n z^(2n+1) / (n! (2n+1))
    let z2 = z * z;
    let mut power = z; // (-1)^n z^(2n+1) / n!
    let mut sum = z;
    for n in 1..200 {
        power *= -z2 / n as f64;
        let term = power / (2 * n + 1) as f64;
        sum += term;
        if term.abs() < 1e-17 * sum.abs().max(1e-300) {
            break;
        }
    }
    sum * std::f64::consts::FRAC_2_SQRT_PI
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma's GeGLU gate),
/// in f32 as PyTorch computes it: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
    const KAPPA: f32 = 0.044715;
    let inner = BETA * (x + KAPPA * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

impl DenseFfn {
    fn act(&self, v: f32) -> f32 {
        activate(self.activation, v)
    }

    /// The down projection (`[hidden, width]`).
    pub fn down(&self) -> &Linear {
        match &self.weights {
            FfnWeights::Plain { down, .. } | FfnWeights::Gated { down, .. } => down,
        }
    }

    /// The up projection (OPT's `fc1`).
    pub fn up(&self) -> &Linear {
        match &self.weights {
            FfnWeights::Plain { up, .. } | FfnWeights::Gated { up, .. } => up,
        }
    }

    /// The neuron values `h` (`n x width`) for every neuron.
    pub fn neurons_all(&self, x: &[f32], n: usize) -> Vec<f32> {
        let width = self.width();
        let mut h = vec![0.0f32; n * width];
        match &self.weights {
            FfnWeights::Plain { up, .. } => {
                kernels::linear(up, x, n, &mut h);
                for v in &mut h {
                    *v = self.act(*v);
                }
            }
            FfnWeights::Gated { gate, up, .. } => {
                let mut u = vec![0.0f32; n * width];
                kernels::linear(gate, x, n, &mut h);
                kernels::linear(up, x, n, &mut u);
                for (g, u) in h.iter_mut().zip(&u) {
                    *g = neuron_value(self.activation, Some(*g), *u);
                }
            }
        }
        h
    }

    /// The neuron values for the listed neurons only (the others stay 0).
    fn neurons_sparse(&self, x: &[f32], n: usize, sets: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (width, hidden) = (self.width(), self.hidden_size());
        if sets.len() != n {
            return Err(Error::InvalidArgument(format!(
                "active sets for {} tokens given for a batch of {n}",
                sets.len()
            )));
        }
        let mut h = vec![0.0f32; n * width];
        for (t, set) in sets.iter().enumerate() {
            let xt = &x[t * hidden..(t + 1) * hidden];
            for &i in set {
                let i = i as usize;
                if i >= width {
                    return Err(Error::InvalidArgument(format!(
                        "active neuron {i} is outside the FFN width {width}"
                    )));
                }
                let up = self.up();
                let mut u = kernels::row_dot(&up.weight, i, xt);
                if let Some(b) = &up.bias {
                    u += b[i];
                }
                let g = match &self.weights {
                    FfnWeights::Plain { .. } => None,
                    FfnWeights::Gated { gate, .. } => {
                        let mut g = kernels::row_dot(&gate.weight, i, xt);
                        if let Some(b) = &gate.bias {
                            g += b[i];
                        }
                        Some(g)
                    }
                };
                h[t * width + i] = neuron_value(self.activation, g, u);
            }
        }
        Ok(h)
    }
}

impl Ffn for DenseFfn {
    fn hidden_size(&self) -> usize {
        self.up().in_dim()
    }

    fn width(&self) -> usize {
        self.up().out_dim()
    }

    fn weight_bytes(&self) -> usize {
        match &self.weights {
            FfnWeights::Plain { up, down } => up.size_bytes() + down.size_bytes(),
            FfnWeights::Gated { gate, up, down } => {
                gate.size_bytes() + up.size_bytes() + down.size_bytes()
            }
        }
    }

    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        match &self.weights {
            FfnWeights::Plain { .. } => self.neurons_all(x, n),
            FfnWeights::Gated { gate, .. } => {
                let mut g = vec![0.0f32; n * self.width()];
                kernels::linear(gate, x, n, &mut g);
                for v in &mut g {
                    *v = self.act(*v);
                }
                g
            }
        }
    }

    fn gated_projections(&self) -> Option<(&Linear, &Linear)> {
        match &self.weights {
            FfnWeights::Gated { gate, up, .. } => Some((gate, up)),
            FfnWeights::Plain { .. } => None,
        }
    }

    fn as_dense(&self) -> Option<&DenseFfn> {
        Some(self)
    }

    fn selection_scores(&self, x: &[f32], n: usize, criterion: Criterion) -> Result<Vec<f32>> {
        Ok(match criterion {
            Criterion::Gate => self.firing_activations(x, n),
            Criterion::Product => self.neurons_all(x, n),
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
        let width = self.width();
        let (h, sets) = match active {
            ActiveSet::All => (self.neurons_all(x, n), None),
            ActiveSet::PerToken(sets) => (self.neurons_sparse(x, n, sets)?, Some(sets)),
        };
        if let Some(fired) = fired {
            fired.width = width;
            fired.per_token = h
                .chunks_exact(width)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .filter(|(_, v)| **v != 0.0)
                        .map(|(i, _)| i as u32)
                        .collect()
                })
                .collect();
        }
        match sets {
            None => kernels::linear(self.down(), &h, n, out),
            Some(sets) => {
                // Only the chosen columns, in ascending neuron order: the same
                // sum as a dense matvec (see `ColumnAccumulator`) whatever the
                // batch size, and what the flash runtime computes from bundles.
                let down = self.down();
                let hidden = self.hidden_size();
                let columns = kernels::Weights::of(&down.weight.data);
                let mut acc = kernels::ColumnAccumulator::new(hidden, width);
                let mut sorted = Vec::new();
                for (t, set) in sets.iter().enumerate() {
                    let set = if set.windows(2).all(|w| w[0] < w[1]) {
                        set
                    } else {
                        sorted.clear();
                        sorted.extend_from_slice(set);
                        sorted.sort_unstable();
                        sorted.dedup();
                        &sorted
                    };
                    acc.clear();
                    for &i in set {
                        let v = h[t * width + i as usize];
                        if v != 0.0 {
                            acc.add(i as usize, v, columns, i as usize, width);
                        }
                    }
                    acc.finish(down.bias.as_deref(), &mut out[t * hidden..(t + 1) * hidden]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf against the C library's (glibc's `erf`, through Python's
    /// `math.erf`), across the series' range and past its cut at 4.
    #[test]
    fn erf_matches_tabulated_values() {
        for (z, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_6),
            (3.99, 0.999_999_983_260_788_6),
            (6.0, 1.0),
        ] {
            let got = erf_f64(z);
            assert!((got - want).abs() < 1e-11, "erf({z}) = {got}, want {want}");
            assert_eq!(erf_f64(-z), -got, "odd");
        }
    }

    /// What each activation makes of a neuron's gate and up values, at the
    /// edges that decide firing: FATReLU keeps a gate equal to its threshold
    /// (ProSparse's `torch.ge`), dReLU fires only where both are positive.
    #[test]
    fn neuron_values_of_the_relu_family() {
        let fat = Activation::FatRelu { threshold: 0.25 };
        assert_eq!(neuron_value(fat, Some(0.25), 2.0), 0.5);
        assert_eq!(neuron_value(fat, Some(0.2499), 2.0), 0.0);
        assert_eq!(neuron_value(fat, Some(1.0), -3.0), -3.0);
        assert_eq!(activate(fat, 0.1), 0.0);
        let d = Activation::DRelu;
        assert_eq!(neuron_value(d, Some(2.0), 3.0), 6.0);
        assert_eq!(neuron_value(d, Some(2.0), -3.0), 0.0);
        assert_eq!(neuron_value(d, Some(-2.0), 3.0), 0.0);
        assert_eq!(activate(d, -1.0), 0.0);
        assert_eq!(neuron_value(Activation::Relu, Some(2.0), -3.0), -6.0);
        // GELU: x * P(X <= x), P(X <= 1) = 0.841344746...
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-7);
        assert!((gelu_erf(-1.0) + 0.158_655_26).abs() < 1e-7);
    }
}
