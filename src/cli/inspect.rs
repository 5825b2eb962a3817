//! `flashpack inspect <DIR>`: what a checkpoint holds.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::input::summary::CheckpointSummary;
use crate::input::Checkpoint;

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  flashpack inspect fixtures/models/opt-relu --json")]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory (config.json, model.safetensors or shards
    /// with model.safetensors.index.json, tokenizer.json).
    pub model: PathBuf,
}

pub fn run(args: &InspectArgs, out: &Output) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let s = CheckpointSummary::of(&ckpt);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let m = |n: u64| n as f64 / 1e6;
    out.human(format_args!(
        "{}  ({})",
        args.model.display(),
        s.architecture
    ));
    out.human(format_args!(
        "  layers {}  hidden {}  ffn {} ({})  heads {} (kv {}, dim {})  vocab {}  context {}",
        s.num_layers,
        s.hidden_size,
        s.ffn_width,
        s.activation,
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
    out.json_result(&s)
}
