//! Writes the damaged packed files of `fixtures/broken/` from its valid base:
//!
//! ```sh
//! cargo run --example make_broken_files -- fixtures/broken/base.flashpack fixtures/broken
//! ```
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
    let [base, outdir] = args.as_slice() else {
        bail!("usage: make_broken_files <BASE.flashpack> <OUTDIR>");
    };
    let bytes = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    // A damaged base would make every derived file fail for the wrong reason.
    let file = PackedFile::open(base)?;
    let failures = check_integrity(&file)?.failures;
    if !failures.is_empty() {
        bail!("{} does not verify: {failures:?}", base.display());
    }
    std::fs::create_dir_all(outdir)?;
    for (name, content) in broken::broken_files(&bytes) {
        let path = outdir.join(&name);
        std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
        println!("{name}  {} bytes  {}", content.len(), reported(&path));
    }
    Ok(())
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
