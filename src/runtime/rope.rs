//! Rotary position embeddings as transformers computes them
//! (`modeling_rope_utils.py`: default, `linear`, `llama3`; `modeling_llama.py`:
//! `rotate_half` convention, where dimension `i` pairs with `i + head_dim / 2`).
//!
//! transformers computes the inverse frequencies and the angles in f32; we do the
//! same so that the cos/sin tables match it bit for bit as far as libm allows.

use crate::input::config::{ModelConfig, RopeScaling, RopeSpec};

/// Inverse frequencies (`head_dim / 2` of them) for a config.
pub fn inv_freqs(cfg: &ModelConfig) -> Vec<f32> {
    inv_freqs_for(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
}

/// Phi-3's longrope frequencies: `1 / (factor_i * base^(2i / dim))`, in f32.
fn longrope_freqs(dim: usize, base: f64, factors: &[f64]) -> Vec<f32> {
    factors
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (f as f32 * (base as f32).powf(e))
        })
        .collect()
}

/// Inverse frequencies (`dim / 2` of them) for `dim` rotary dimensions.
pub fn inv_freqs_for(dim: usize, base: f64, scaling: Option<RopeScaling>) -> Vec<f32> {
    // 1 / base^(2i / dim), exponent formed in f32 as torch.arange(...).float() / dim.
    let mut inv: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (base as f32).powf(e)
        })
        .collect();
    match scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            for f in &mut inv {
                *f /= factor as f32;
            }
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let factor = factor as f32;
            let low = low_freq_factor as f32;
            let high = high_freq_factor as f32;
            let old = original_max_position_embeddings as f32;
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            for f in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_freq_wavelen {
                    *f / factor
                } else {
                    *f
                };
                // transformers: ~(wavelen < high) * ~(wavelen > low); wavelen is finite here.
                let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                *f = if medium {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    inv
}

/// RoPE for one model: the inverse frequencies; angles are computed per batch.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Longrope: the frequencies used by a forward pass whose positions go
    /// beyond the given length (transformers picks them per call by its largest
    /// position + 1), and the factor on cos and sin.
    long: Option<(Vec<f32>, usize)>,
    scale: f32,
}

/// cos/sin for the positions `start..start + n` of one forward pass.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    start: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Rope {
        Rope {
            inv_freq: inv_freqs(cfg),
            long: None,
            scale: 1.0,
        }
    }

    /// The RoPE of a [`RopeSpec`] (partial rotary, longrope; the newer families).
    pub fn from_spec(spec: &RopeSpec) -> Rope {
        let dim = spec.rotary_dim;
        match &spec.longrope {
            None => Rope {
                inv_freq: inv_freqs_for(dim, spec.theta, spec.scaling),
                long: None,
                scale: 1.0,
            },
            Some(l) => Rope {
                inv_freq: longrope_freqs(dim, spec.theta, &l.short_factor),
                long: Some((
                    longrope_freqs(dim, spec.theta, &l.long_factor),
                    l.original_max_position_embeddings,
                )),
                scale: l.attention_factor as f32,
            },
        }
    }

    /// The table for positions `start..start + n` (a few trig calls per position:
    /// cheaper than keeping a table for the whole context).
    pub fn table(&self, start: usize, n: usize) -> RopeTable {
        let inv_freq = match &self.long {
            Some((long, original)) if start + n > *original => long,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for pos in start..start + n {
            for &f in inv_freq {
                // f32 product then f32 cos/sin, as transformers does.
                let angle = pos as f32 * f;
                if self.scale == 1.0 {
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                } else {
                    cos.push(angle.cos() * self.scale);
                    sin.push(angle.sin() * self.scale);
                }
            }
        }
        RopeTable {
            half,
            start,
            cos,
            sin,
        }
    }
}

impl RopeTable {
    /// Rotates one head vector (`head_dim` = 2 * half) at absolute position `pos`
    /// in place: `x * cos + rotate_half(x) * sin`. With partial rotary (a head
    /// longer than 2 * half), only the first 2 * half dimensions rotate.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        let row = pos - self.start;
        let cos = &self.cos[row * half..(row + 1) * half];
        let sin = &self.sin[row * half..(row + 1) * half];
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i] + a * sin[i];
        }
    }
}
