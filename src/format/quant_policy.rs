//! Section 9 of the format: which tensors a block type may be given (the weight
//! matrices of four parts: the embedding, the attention projections, the FFN
//! bundles and an untied output projection), and the `--quant` policy that says
//! which type each part takes. Norms, biases, OPT's learned positions and
//! projections, neuron orders and predictors always stay floating point.

use std::collections::HashMap;

use crate::format::layout::QuantPolicy;
use crate::input::config::ModelConfig;
use crate::input::tensors::ModelNames;
use crate::quant::QuantType;

/// A part of the model a policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantPart {
    Embed,
    Attn,
    Ffn,
    Head,
}

impl QuantPart {
    pub const ALL: [QuantPart; 4] = [
        QuantPart::Embed,
        QuantPart::Attn,
        QuantPart::Ffn,
        QuantPart::Head,
    ];

    /// The policy's key for the part.
    pub fn key(self) -> &'static str {
        match self {
            QuantPart::Embed => "embed",
            QuantPart::Attn => "attn",
            QuantPart::Ffn => "ffn",
            QuantPart::Head => "head",
        }
    }
}

/// The dense tensors a block type may be given (rule 22), by name, with their
/// part. The FFN matrices are not dense tensors: their part is the bundles'.
pub fn part_of_tensor<'a>(
    config: &ModelConfig,
    names: &'a ModelNames,
) -> HashMap<&'a str, QuantPart> {
    let mut parts = HashMap::new();
    parts.insert(names.embed_tokens.as_str(), QuantPart::Embed);
    if !config.tie_word_embeddings {
        parts.insert(names.lm_head.weight.as_str(), QuantPart::Head);
    }
    for l in &names.layers {
        for lin in [&l.q, &l.k, &l.v, &l.o] {
            parts.insert(lin.weight.as_str(), QuantPart::Attn);
        }
    }
    parts
}

/// The block type of `part` under `policy`.
pub fn policy_type(policy: &QuantPolicy, part: QuantPart) -> Option<QuantType> {
    match part {
        QuantPart::Embed => policy.embed,
        QuantPart::Attn => policy.attn,
        QuantPart::Ffn => policy.ffn,
        QuantPart::Head => policy.head,
    }
}

/// Parses `convert --quant`: one type for every part (`q8`, `q4`, `q8_0`,
/// `q4_1`), or `part=type` pairs separated by commas (`ffn=q4,attn=q8`), where a
/// part left out, or given `none`, stays floating point.
pub fn parse_policy(text: &str) -> Result<QuantPolicy, String> {
    if !text.contains('=') {
        let q: QuantType = text.parse()?;
        return Ok(QuantPolicy {
            embed: Some(q),
            attn: Some(q),
            ffn: Some(q),
            head: Some(q),
        });
    }
    let mut policy = QuantPolicy::default();
    let mut seen = Vec::new();
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not part=type"))?;
        let part = QuantPart::ALL
            .into_iter()
            .find(|p| p.key() == key.trim())
            .ok_or_else(|| format!("unknown part {key:?} (embed, attn, ffn or head)"))?;
        if seen.contains(&part) {
            return Err(format!("part {key:?} given twice"));
        }
        seen.push(part);
        let q = match value.trim() {
            "none" => None,
            v => Some(v.parse::<QuantType>()?),
        };
        match part {
            QuantPart::Embed => policy.embed = q,
            QuantPart::Attn => policy.attn = q,
            QuantPart::Ffn => policy.ffn = q,
            QuantPart::Head => policy.head = q,
        }
    }
    Ok(policy)
}

/// Format 9.3: bytes of a bundle of `parts` rows of `hidden` values of `q`,
/// padded to a multiple of `alignment` when that costs at most 1/8 of it.
/// `None` when `hidden` is not a multiple of 32 (or on overflow).
pub fn quantized_bundle_bytes(
    q: QuantType,
    parts: u64,
    hidden: u64,
    alignment: u64,
) -> Option<u64> {
    let row = q.row_bytes(usize::try_from(hidden).ok()?)? as u64;
    let unpadded = row.checked_mul(parts)?;
    let padded = crate::format::layout::align_up(unpadded, alignment)?;
    Some(if (padded - unpadded).checked_mul(8)? <= unpadded {
        padded
    } else {
        unpadded
    })
}

/// Format 9.6: whether `convert` gives an FFN layer of type `q` a
/// per-output-channel down scale. Measured on SmolLM2-135M (BENCHMARKS.md):
/// it takes `q8_0` from +0.69% to within 0.01% of f16 perplexity, and makes
/// `q4_1` worse (the down projection alone: +7.4% without, +8.1% with it,
/// +9.2% with its square root), so `q4_1` layers have none.
pub fn has_down_scale(q: QuantType) -> bool {
    q == QuantType::Q8_0
}

/// Rule 26: the first value of a down scale that is not finite and positive.
pub fn first_bad_scale(scale: &[f32]) -> Option<usize> {
    scale.iter().position(|v| !(v.is_finite() && *v > 0.0))
}

/// Rule 24 over a section of quantized bundles: the first block whose scale
/// or minimum is not finite, or the first bundle whose padding is not zero, as
/// `(byte offset in the section, what)`.
pub fn first_bad_bundle_byte(
    q: QuantType,
    parts: usize,
    hidden: usize,
    bundle_bytes: usize,
    bytes: &[u8],
) -> Option<(usize, &'static str)> {
    let row = q.row_bytes(hidden)?;
    for (p, bundle) in bytes.chunks(bundle_bytes).enumerate() {
        let used = (row * parts).min(bundle.len());
        if let Some(b) = q.first_bad_block(&bundle[..used]) {
            return Some((
                p * bundle_bytes + b * q.block_bytes(),
                "a scale or minimum that is not finite",
            ));
        }
        if let Some(i) = bundle[used..].iter().position(|&b| b != 0) {
            return Some((
                p * bundle_bytes + used + i,
                "a padding byte that is not zero",
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse() {
        let all = parse_policy("q8").unwrap();
        assert_eq!(all.ffn, Some(QuantType::Q8_0));
        assert_eq!(all.head, Some(QuantType::Q8_0));
        let p = parse_policy("ffn=q4,attn=q8_0,embed=none").unwrap();
        assert_eq!(p.ffn, Some(QuantType::Q4_1));
        assert_eq!(p.attn, Some(QuantType::Q8_0));
        assert_eq!(p.embed, None);
        assert_eq!(p.head, None);
        for bad in ["q5", "ffn=q4,ffn=q8", "mlp=q4", "ffn", "ffn=q3"] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }

    /// The bytes-per-bundle table of formats/flashpack-v1.md 9.3.
    #[test]
    fn bundle_sizes_match_the_spec_table() {
        let table = [
            (2048, 6528, 4096),
            (4096, 13056, 8192),
            (5120, 16384, 9600),
            (8192, 28672, 16384),
        ];
        for (hidden, q8, q4) in table {
            assert_eq!(
                quantized_bundle_bytes(QuantType::Q8_0, 3, hidden, 4096),
                Some(q8)
            );
            assert_eq!(
                quantized_bundle_bytes(QuantType::Q4_1, 3, hidden, 4096),
                Some(q4)
            );
        }
        assert_eq!(quantized_bundle_bytes(QuantType::Q8_0, 3, 48, 4096), None);
    }
}
