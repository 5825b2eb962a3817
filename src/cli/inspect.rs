//! `flashpack inspect <DIR|FILE>`: what a checkpoint or a packed file holds
//! (the library's [`crate::pack::inspect`] report, printed).

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  flashpack inspect fixtures/models/opt-relu --json")]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory (config.json, model.safetensors or shards
    /// with model.safetensors.index.json, tokenizer.json), or a flashpack file.
    pub model: PathBuf,
}

pub fn run(args: &InspectArgs, out: &Output) -> anyhow::Result<()> {
    let report = crate::pack::inspect::inspect(&args.model)?;
    let (s, packed) = (&report.summary, &report.packed);
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
    }
    out.json_result(&report)
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
