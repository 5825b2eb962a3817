//! Writes the damaged packed files of `fixtures/broken/` from its valid base:
//!
//! ```sh
//! cargo run --example make_broken_files -- fixtures/broken/base.flashpack fixtures/broken \
//!     fixtures/broken/base-q.flashpack
//! ```
//!
//! (the third argument, the quantized base, derives the files of rules 21-26).
//! The files of the mixture-of-experts rules (31-33) derive from another base,
//! `base-moe.flashpack` in the output directory, when it is there, and those
//! of the selector rules (27-29) from `base-sel.flashpack` there.
//!
//! The mutations live in `tests/common/broken.rs`, which `tests/broken_files.rs`
//! also runs to check that the committed files are exactly what this writes.
//! For each file it prints the size and what the library reports, the material
//! of `fixtures/broken/README.md`'s table.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use flashpack::format::integrity::check_integrity;
use flashpack::format::PackedFile;

#[path = "../tests/common/broken.rs"]
mod broken;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (base, outdir, base_q) = match args.as_slice() {
        [base, outdir] => (base, outdir, None),
        [base, outdir, base_q] => (base, outdir, Some(base_q)),
        _ => bail!("usage: make_broken_files <BASE.flashpack> <OUTDIR> [<BASE-Q.flashpack>]"),
    };
    let bytes = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    std::fs::create_dir_all(outdir)?;
    let mut files = derive(base, &bytes, broken::broken_files)?;
    if let Some(base_q) = base_q {
        let bytes_q =
            std::fs::read(base_q).with_context(|| format!("reading {}", base_q.display()))?;
        files.extend(derive(base_q, &bytes_q, broken::broken_quant_files)?);
    }
    let moe_base = outdir.join(broken::MOE_BASE);
    if moe_base.exists() {
        let moe_bytes =
            std::fs::read(&moe_base).with_context(|| format!("reading {}", moe_base.display()))?;
        files.extend(derive(&moe_base, &moe_bytes, broken::broken_moe_files)?);
    }
    let sel_base = outdir.join(broken::SELECTOR_BASE);
    if sel_base.exists() {
        let sel_bytes =
            std::fs::read(&sel_base).with_context(|| format!("reading {}", sel_base.display()))?;
        files.extend(derive(
            &sel_base,
            &sel_bytes,
            broken::broken_selector_files,
        )?);
    }
    for (name, content) in files {
        let path = outdir.join(&name);
        std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
        println!("{name}  {} bytes  {}", content.len(), reported(&path));
    }
    Ok(())
}

/// Named files derived from a base's bytes.
type Derived = Vec<(String, Vec<u8>)>;

/// The files `mutations` derives from `base`, once it is known to verify (a
/// damaged base would make every derived file fail for the wrong reason).
fn derive(base: &Path, bytes: &[u8], mutations: fn(&[u8]) -> Derived) -> anyhow::Result<Derived> {
    let file = PackedFile::open(base)?;
    let failures = check_integrity(&file)?.failures;
    if !failures.is_empty() {
        bail!("{} does not verify: {failures:?}", base.display());
    }
    Ok(mutations(bytes))
}

/// The first error the library reports for `path`: at open, or else from the
/// full integrity check.
fn reported(path: &Path) -> String {
    match PackedFile::open(path) {
        Err(e) => e.to_string(),
        Ok(file) => match check_integrity(&file) {
            Err(e) => e.to_string(),
            Ok(r) if r.failures.is_empty() => "ACCEPTED".into(),
            Ok(r) => r
                .failures
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        },
    }
}
