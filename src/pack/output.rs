//! Writing a file so that nothing half-written is ever visible at the output path:
//! a temporary file beside it, fsynced, then renamed into place. An interrupted or
//! failed write leaves the previous output (if any) untouched and removes the
//! temporary file (on error or drop; a SIGKILL can leave a `.tmp` file behind,
//! never a file at the output path).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct AtomicOutput {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    /// Bytes written so far: the offset of the next write.
    pub position: u64,
}

impl AtomicOutput {
    pub fn create(target: &Path) -> Result<AtomicOutput> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("output {} has no file name", target.display()))
        })?;
        // pid + time make concurrent writers of one output use distinct temporaries;
        // create_new refuses to reuse an existing one.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let temp = dir.join(format!(
            ".{}.tmp-{}-{nonce}",
            name.to_string_lossy(),
            std::process::id()
        ));
        remove_stale_temporaries(&dir, &name.to_string_lossy());
        crate::cleanup::register(&temp);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            temp,
            file: Some(file),
            position: 0,
        })
    }

    fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is present until commit")
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.clone();
        self.file()
            .write_all(bytes)
            .map_err(|e| Error::io(&temp, e))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    /// Writes zero bytes up to the next multiple of `alignment`.
    pub fn pad_to(&mut self, alignment: u64) -> Result<()> {
        let target = crate::format::layout::align_up(self.position, alignment)
            .ok_or_else(|| Error::InvalidArgument("file offset overflow".into()))?;
        let zeros = vec![0u8; (target - self.position) as usize];
        self.write_all(&zeros)
    }

    /// Overwrites bytes at `offset` (used once, for the preamble).
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let temp = self.temp.clone();
        self.file()
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(&temp, e))
    }

    /// Makes the file durable and moves it to the output path. On failure the
    /// temporary file is removed and the output path is untouched.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("commit once");
        let synced = file.sync_all().map_err(|e| Error::io(&self.temp, e));
        drop(file);
        let renamed = synced.and_then(|()| {
            std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))
        });
        crate::cleanup::unregister(&self.temp);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        renamed?;
        // Make the rename itself durable.
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
            crate::cleanup::unregister(&self.temp);
        }
    }
}

/// What finishing a packed file wrote.
pub struct Finished {
    pub file_bytes: u64,
    pub manifest_bytes: u64,
    pub manifest_sha256: [u8; 32],
    /// Time of the fsync and rename.
    pub commit_ms: f64,
}

/// Appends the manifest, writes the preamble that points at it, and commits the
/// file: the last step of every packed-file writer.
pub fn finish_packed_file(
    mut out: AtomicOutput,
    manifest: &crate::format::layout::Manifest,
) -> Result<Finished> {
    use crate::format::layout::{Preamble, FORMAT_VERSION, MAGIC};
    use sha2::{Digest, Sha256};
    let manifest_bytes = serde_json::to_vec(manifest)
        .map_err(|e| Error::InvalidArgument(format!("manifest serialisation: {e}")))?;
    let manifest_offset = out.position;
    out.write_all(&manifest_bytes)?;
    let manifest_sha256: [u8; 32] = Sha256::digest(&manifest_bytes).into();
    let preamble = Preamble {
        magic: MAGIC,
        version: FORMAT_VERSION,
        flags: 0,
        manifest_offset,
        manifest_length: manifest_bytes.len() as u64,
        manifest_sha256,
    };
    out.write_at(0, &preamble.to_bytes())?;
    let file_bytes = out.position;
    let clock = std::time::Instant::now();
    out.commit()?;
    Ok(Finished {
        file_bytes,
        manifest_bytes: manifest_bytes.len() as u64,
        manifest_sha256,
        commit_ms: clock.elapsed().as_secs_f64() * 1e3,
    })
}

/// Removes temporary files of earlier writers of the same output that were killed
/// (SIGKILL skips every cleanup): `.NAME.tmp-PID-NONCE` whose process is gone.
/// Those of live processes (a concurrent convert) are left alone.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
