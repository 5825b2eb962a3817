//! `flashpack inspect <DIR|FILE>`: what a checkpoint or a packed file holds.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::format::PackedFile;
use crate::input::summary::CheckpointSummary;
use crate::input::Checkpoint;

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  flashpack inspect fixtures/models/opt-relu --json")]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory (config.json, model.safetensors or shards
    /// with model.safetensors.index.json, tokenizer.json), or a flashpack file.
    pub model: PathBuf,
}

pub fn run(args: &InspectArgs, out: &Output) -> anyhow::Result<()> {
    let model = crate::input::hub::resolve_model(&args.model)?;
    let (s, packed) = match crate::input::model_path_kind(&model)? {
        crate::input::ModelPathKind::Packed => {
            let (s, p) = packed_summary(&model)?;
            (s, Some(p))
        }
        crate::input::ModelPathKind::Checkpoint => {
            let ckpt = Checkpoint::open(&model)?;
            ckpt.check_side_files()?;
            (CheckpointSummary::of(&ckpt), None)
        }
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let m = |n: u64| n as f64 / 1e6;
    out.human(format_args!(
        "{}  ({})",
        args.model.display(),
        s.architecture
    ));
    let activation = match s.activation_threshold {
        Some(t) => format!("{} at {t}", s.activation),
        None => s.activation.clone(),
    };
    out.human(format_args!(
        "  layers {}  hidden {}  ffn {} ({})  heads {} (kv {}, dim {})  vocab {}  context {}",
        s.num_layers,
        s.hidden_size,
        s.ffn_width,
        activation,
        s.num_heads,
        s.num_kv_heads,
        s.head_dim,
        s.vocab_size,
        s.max_context
    ));
    out.human(format_args!(
        "  parameters {:.3}M: embeddings {:.3}M, attention {:.3}M, ffn {:.3}M, other {:.3}M",
        m(s.params_total),
        m(s.params_embeddings),
        m(s.params_attention),
        m(s.params_ffn),
        m(s.params_other)
    ));
    if let Some(e) = &s.experts {
        let layers: Vec<String> = e.sparse_layers.iter().map(usize::to_string).collect();
        out.human(format_args!(
            "  experts {} per layer, top-{}{}, {} neurons each{}; sparse layers {}; ffn parameters per token {:.3}M",
            e.count,
            e.per_token,
            if e.norm_topk_prob { " (renormalised)" } else { "" },
            e.expert_width,
            e.shared_expert_width
                .map_or(String::new(), |w| format!(", a shared expert of {w}")),
            layers.join(", "),
            m(e.params_ffn_active)
        ));
    }
    let dtypes: Vec<String> = s
        .params_by_dtype
        .iter()
        .map(|(d, n)| format!("{d} {:.3}M", m(*n)))
        .collect();
    out.human(format_args!(
        "  dtypes: {}  files: {} ({:.2} MiB{})",
        dtypes.join(", "),
        s.weight_files.len(),
        mib(s.bytes_on_disk),
        if s.sharded { ", sharded" } else { "" }
    ));
    if !s.unused_tensors.is_empty() {
        out.human(format_args!(
            "  unused tensors: {}",
            s.unused_tensors.join(", ")
        ));
    }
    let mut json = serde_json::to_value(&s)?;
    json["format"] = if packed.is_some() {
        "flashpack"
    } else {
        "hf_checkpoint"
    }
    .into();
    if let Some(p) = packed {
        out.human(format_args!(
            "  flashpack v{}: {:.2} MiB, alignment {}, dense {:.2} MiB (raw {:.2}), ffn {:.2} MiB ({} bundles of {} bytes per layer), manifest sha256 {}",
            p.format_version,
            mib(s.bytes_on_disk),
            p.alignment,
            mib(p.dense_bytes),
            mib(p.dense_raw_bytes),
            mib(p.ffn_bytes),
            s.ffn_width,
            p.bundle_bytes,
            p.manifest_sha256
        ));
        if let Some(q) = &p.quantization {
            let name = |t: Option<crate::quant::QuantType>| t.map_or("float", |t| t.name());
            let b = &p.part_sizes;
            out.human(format_args!(
                "  quantization (raw bytes): embed {} {:.2} MiB, attn {} {:.2} MiB, ffn {} {:.2} MiB{}, head {} {:.2} MiB, other {:.2} MiB",
                name(q.embed),
                mib(b.embed_bytes),
                name(q.attn),
                mib(b.attn_bytes),
                name(q.ffn),
                mib(b.ffn_bytes),
                match p.down_scale_layers {
                    0 => String::new(),
                    n => format!(" (per-channel down scales in {n} layers)"),
                },
                name(q.head),
                mib(b.head_bytes),
                mib(b.other_bytes)
            ));
        }
        if let (Some(e), Some(bytes)) = (&s.experts, p.expert_bytes) {
            out.human(format_args!(
                "  experts: {} sections (one per expert of each sparse layer), {} bundles of {} bytes each ({:.3} MiB per expert); router{} resident in the dense part",
                p.expert_sections,
                e.expert_width,
                p.bundle_bytes,
                mib(bytes),
                if e.shared_expert_width.is_some() { " and shared expert" } else { "" }
            ));
        }
        if let Some(kind) = p.selector {
            out.human(format_args!(
                "  selector copies (gate and up, format section 10): {kind}, {:.2} MiB raw, {:.3} of the FFN's bytes",
                mib(p.selector_bytes),
                p.selector_share_of_ffn
            ));
        }
        if let Some(r) = &p.routing {
            out.human(format_args!(
                "  routing over {} calibration tokens (share of each layer's choices, hottest first):",
                r.tokens
            ));
            for l in &r.layers {
                let total: u64 = l.counts.iter().sum::<u64>().max(1);
                let shares: Vec<String> = l
                    .hottest_first()
                    .iter()
                    .map(|&e| format!("{e}:{:.1}%", 100.0 * l.counts[e] as f64 / total as f64))
                    .collect();
                out.human(format_args!(
                    "    layer {:>3}: {}",
                    l.layer,
                    shares.join(" ")
                ));
            }
        }
        print_layer_table(out, &p.layers);
        for (k, v) in serde_json::to_value(&p)?
            .as_object()
            .expect("a struct")
            .iter()
        {
            json[k] = v.clone();
        }
    }
    out.json_result(&json)
}

/// The per-layer table of a calibrated file (the same values as `--json`'s
/// `layers`): predictor rank, threshold and held-out metrics, calibration's
/// active fraction and window maxima.
fn print_layer_table(out: &Output, layers: &[serde_json::Value]) {
    if !layers
        .iter()
        .any(|l| l.get("rank").is_some() || l.get("window_max").is_some())
    {
        return;
    }
    let num = |l: &serde_json::Value, k: &str| l.get(k).and_then(serde_json::Value::as_f64);
    let cell = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    out.human("  layer  rank  threshold  recall  precision  predicted  truly active  calibration active  window max (1,2,4,8)  SiLU threshold (sparsity)");
    for l in layers {
        out.human(format_args!(
            "  {:>5}  {:>4}  {:>9}  {:>6}  {:>9}  {:>9}  {:>12}  {:>18}  {:<20}  {}",
            l["layer"],
            cell(num(l, "rank"), &|v| format!("{v}")),
            cell(num(l, "threshold"), &|v| format!("{v:.3}")),
            cell(num(l, "recall"), &|v| format!("{v:.4}")),
            cell(num(l, "precision"), &|v| format!("{v:.3}")),
            cell(num(l, "frac_predicted"), &|v| format!("{:.1}%", 100.0 * v)),
            cell(num(l, "frac_true"), &|v| format!("{:.1}%", 100.0 * v)),
            cell(num(l, "mean_active_fraction"), &|v| format!(
                "{:.1}%",
                100.0 * v
            )),
            l.get("window_max")
                .map_or("-".to_string(), |w| w.to_string()),
            match (num(l, "product_threshold"), num(l, "silu_threshold")) {
                (Some(t), _) => format!(
                    "|silu(g)*u| > {t:.4}{}",
                    cell(num(l, "layer_sparsity"), &|s| format!(
                        " ({:.0}%)",
                        100.0 * s
                    ))
                ),
                (None, Some(t)) => format!("|silu(g)| > {t:.4}"),
                (None, None) => "-".to_string(),
            }
        ));
    }
}

/// What a packed file adds to the model summary.
#[derive(serde::Serialize)]
struct PackedLayout {
    format_version: u32,
    alignment: u64,
    sections: usize,
    dense_bytes: u64,
    dense_raw_bytes: u64,
    ffn_bytes: u64,
    ffn_dtype: String,
    bundle_bytes: u64,
    /// Mixture-of-experts files: one section per expert (spec 4.1), each of
    /// `expert_bytes` (its bundles).
    #[serde(skip_serializing_if = "is_zero")]
    expert_sections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    expert_bytes: Option<u64>,
    has_predictors: bool,
    manifest_sha256: String,
    flashpack_version: String,
    convert_dtype: String,
    zstd_level: i32,
    calibration_tokens: Option<u64>,
    /// A calibrated mixture of experts: how often each expert was chosen per
    /// sparse layer (spec 5.1; `files` left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<RoutingSummary>,
    /// Format section 9: the block type of each part (null for a float file).
    quantization: Option<crate::format::layout::QuantPolicy>,
    /// Raw bytes of each part's weights (the policy's parts, `ffn` with its
    /// down scales; `other`: norms, biases, orders, predictors and every other
    /// tensor).
    part_sizes: PartBytes,
    /// FFN layers whose quantized down projection has a per-channel scale
    /// (spec 9.6).
    down_scale_layers: usize,
    /// Format section 10: the type of the selector copies (`int8`, `int4`;
    /// null without), their raw bytes (what `flash` holds in DRAM for them;
    /// not in `part_sizes`) and that as a fraction of the FFN bundles' bytes.
    selector: Option<&'static str>,
    selector_bytes: u64,
    selector_share_of_ffn: f64,
    /// Per layer: predictor rank, threshold and held-out metrics, calibration maxima.
    layers: Vec<serde_json::Value>,
}

/// The routing counts of a packed file, as `inspect` reports them.
#[derive(serde::Serialize)]
struct RoutingSummary {
    tokens: u64,
    layers: Vec<crate::format::layout::RoutingLayer>,
}

/// Raw bytes per part of the model, as `inspect` reports them.
#[derive(serde::Serialize, Default)]
struct PartBytes {
    embed_bytes: u64,
    attn_bytes: u64,
    ffn_bytes: u64,
    head_bytes: u64,
    other_bytes: u64,
}

/// Raw bytes of the selector copies' tensors.
fn selector_bytes(file: &PackedFile) -> u64 {
    file.manifest
        .tensors
        .iter()
        .filter(|t| t.section == crate::format::layout::SELECTOR_SECTION)
        .map(|t| t.length)
        .sum()
}

fn part_bytes(file: &PackedFile) -> PartBytes {
    use crate::format::quant_policy::{part_of_tensor, QuantPart};
    let parts = part_of_tensor(&file.config, &file.names);
    let mut b = PartBytes::default();
    for t in &file.manifest.tensors {
        // The selector copies are reported on their own (`selector_bytes`).
        if t.section == crate::format::layout::SELECTOR_SECTION {
            continue;
        }
        let slot = match parts.get(t.name.as_str()) {
            Some(QuantPart::Embed) => &mut b.embed_bytes,
            Some(QuantPart::Attn) => &mut b.attn_bytes,
            Some(QuantPart::Head) => &mut b.head_bytes,
            // A quantized down projection's scale (spec 9.6) is part of the FFN.
            None if crate::format::layout::down_scale_layer(&t.name).is_some() => &mut b.ffn_bytes,
            Some(QuantPart::Ffn) | None => &mut b.other_bytes,
        };
        *slot += t.length;
    }
    b.ffn_bytes += file
        .manifest
        .ffn_layers
        .iter()
        .map(|l| l.neurons * l.bundle_bytes)
        .chain(
            file.manifest
                .experts
                .iter()
                .map(|e| e.neurons * e.bundle_bytes),
        )
        .sum::<u64>();
    b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn packed_summary(path: &std::path::Path) -> anyhow::Result<(CheckpointSummary, PackedLayout)> {
    use crate::format::layout::SectionKind;
    let file = PackedFile::open(path)?;
    let m = &file.manifest;
    let ffn_dtype = |name: &str| {
        let layer = file
            .names
            .layers
            .iter()
            .position(|l| l.ffn.projections().iter().any(|p| p.weight == name))?
            as u64;
        // A dense layer's bundles, or (a sparse layer) its experts'.
        m.ffn_layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| l.dtype)
            .or_else(|| m.experts.iter().find(|e| e.layer == layer).map(|e| e.dtype))?
            .weight()
    };
    let dtype_of = |name: &str| {
        file.tensor_entry(name)
            .and_then(|t| t.dtype.weight())
            .or_else(|| ffn_dtype(name))
    };
    let mut s = CheckpointSummary::from_model(&file.config, &file.names, &dtype_of);
    s.bytes_on_disk = file.file_length;
    s.weight_files = vec![path.display().to_string()];
    let bytes = |kind: SectionKind| {
        m.sections
            .iter()
            .filter(|x| x.kind == kind)
            .map(|x| x.length)
            .sum::<u64>()
    };
    let layout = PackedLayout {
        format_version: m.format_version,
        alignment: m.alignment,
        sections: m.sections.len(),
        dense_bytes: bytes(SectionKind::Dense),
        dense_raw_bytes: m
            .sections
            .iter()
            .filter(|x| x.kind == SectionKind::Dense)
            .map(|x| x.raw_length)
            .sum(),
        ffn_bytes: bytes(SectionKind::Ffn),
        ffn_dtype: m
            .ffn_layers
            .first()
            .map(|l| l.dtype)
            .or_else(|| m.experts.first().map(|e| e.dtype))
            .map_or("none", |d| d.name())
            .into(),
        bundle_bytes: m
            .ffn_layers
            .first()
            .map(|l| l.bundle_bytes)
            .or_else(|| m.experts.first().map(|e| e.bundle_bytes))
            .unwrap_or(0),
        expert_sections: m.experts.len(),
        expert_bytes: m.experts.first().map(|e| e.neurons * e.bundle_bytes),
        has_predictors: m.sections.iter().any(|x| x.kind == SectionKind::Predictor),
        manifest_sha256: hex::encode(file.preamble.manifest_sha256),
        flashpack_version: m.provenance.flashpack_version.clone(),
        convert_dtype: m.provenance.options.dtype.clone(),
        zstd_level: m.provenance.options.zstd_level,
        calibration_tokens: m.calibration.as_ref().map(|c| c.tokens),
        routing: m.routing.as_ref().map(|r| RoutingSummary {
            tokens: r.tokens,
            layers: r.layers.clone(),
        }),
        quantization: m.quantization,
        part_sizes: part_bytes(&file),
        down_scale_layers: m
            .tensors
            .iter()
            .filter(|t| crate::format::layout::down_scale_layer(&t.name).is_some())
            .count(),
        selector: m.selectors.first().map(|s| s.kind.name()),
        selector_bytes: selector_bytes(&file),
        selector_share_of_ffn: selector_bytes(&file) as f64
            / part_bytes(&file).ffn_bytes.max(1) as f64,
        layers: (0..file.config.num_layers)
            .map(|i| {
                let mut layer = serde_json::json!({ "layer": i });
                if let Some(p) = m.predictors.iter().find(|p| p.layer == i as u64) {
                    layer["rank"] = p.rank.into();
                    layer["threshold"] = p.threshold.into();
                    layer["recall"] = p.recall.into();
                    layer["precision"] = p.precision.into();
                    layer["frac_predicted"] = p.frac_predicted.into();
                    layer["frac_true"] = p.frac_true.into();
                }
                if let Some(c) = m.calibration.as_ref().and_then(|c| c.layers.get(i)) {
                    layer["window_max"] = c.window_max.clone().into();
                    layer["mean_active_fraction"] = c.mean_active_fraction.into();
                    layer["silu_threshold"] = c.silu_threshold.into();
                    if let Some(t) = c.product_threshold {
                        layer["product_threshold"] = t.into();
                    }
                    if let Some(s) = c.layer_sparsity {
                        layer["layer_sparsity"] = s.into();
                    }
                }
                layer
            })
            .collect(),
    };
    Ok((s, layout))
}
