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
    /// Starts writing `target`. Refuses (before creating or removing anything) a
    /// target that is a directory or a special file, or whose directory does not
    /// exist; writers that read inputs call [`check_output_path`] with them first.
    pub fn create(target: &Path) -> Result<AtomicOutput> {
        check_output_path(target, &[])?;
        let dir = output_dir(target);
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
            .map_err(|e| {
                crate::cleanup::unregister(&temp);
                // Name the directory the user gave, not the temporary file they
                // never asked for.
                if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() {
                    Error::OutputDirectory {
                        dir: dir.clone(),
                        output: target.to_path_buf(),
                        problem: "does not exist",
                    }
                } else {
                    Error::OutputDirectoryIo {
                        dir: dir.clone(),
                        output: target.to_path_buf(),
                        source: e,
                    }
                }
            })?;
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

/// The directory an output is written in (`.` for a bare file name).
fn output_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A path a command reads (or writes beside its output), which the output must
/// not replace.
#[derive(Debug, Clone)]
pub struct InputPath {
    pub path: PathBuf,
    /// What it is, for the message: "checkpoint file", "calibration text", ...
    pub what: &'static str,
    /// Advice appended to a refusal ("" for none).
    pub hint: &'static str,
}

impl InputPath {
    pub fn new(path: impl Into<PathBuf>, what: &'static str) -> InputPath {
        InputPath {
            path: path.into(),
            what,
            hint: "",
        }
    }

    /// The same input, with advice for the refusal ("; omit ...").
    pub fn with_hint(self, hint: &'static str) -> InputPath {
        InputPath { hint, ..self }
    }
}

/// The ways one path can name a file: where the name is (its directory resolved,
/// the last component kept, so a symbolic link is its own location), what it
/// resolves to through every symbolic link, and the file's device and inode (the
/// same for every hard link).
struct Identity {
    location: Option<PathBuf>,
    resolved: Option<PathBuf>,
    inode: Option<(u64, u64)>,
}

impl Identity {
    fn of(path: &Path) -> Identity {
        use std::os::unix::fs::MetadataExt;
        let location = match path.file_name() {
            Some(name) => std::fs::canonicalize(output_dir(path))
                .ok()
                .map(|d| d.join(name)),
            None => std::fs::canonicalize(path).ok(),
        };
        Identity {
            location,
            resolved: std::fs::canonicalize(path).ok(),
            inode: std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
        }
    }

    /// How `self` (the output) names the same file as `input`, if it does.
    fn same_as(&self, input: &Identity) -> Option<&'static str> {
        let eq = |a: &Option<PathBuf>, b: &Option<PathBuf>| a.is_some() && a == b;
        if eq(&self.location, &input.location) {
            Some("")
        } else if eq(&self.location, &input.resolved)
            || eq(&self.resolved, &input.location)
            || eq(&self.resolved, &input.resolved)
        {
            Some(" (through a symbolic link)")
        } else if self.inode.is_some() && self.inode == input.inode {
            Some(" (through a hard link)")
        } else {
            None
        }
    }
}

/// Checks, before anything is created or removed, that `output` may be written:
/// its directory exists, it is not an existing directory or special file, and it
/// is none of `inputs` under any name (the same path, a symbolic link either way,
/// a hard link).
pub fn check_output_path(output: &Path, inputs: &[InputPath]) -> Result<()> {
    let expected = "a file path for the output";
    match std::fs::metadata(output) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::WrongKind {
                path: output.to_path_buf(),
                found: "is a directory",
                expected,
            })
        }
        Ok(meta) if !meta.is_file() => {
            return Err(Error::WrongKind {
                path: output.to_path_buf(),
                found: "is not a regular file (a device, FIFO or socket)",
                expected,
            })
        }
        _ => {}
    }
    // "out/" or "out/." names a directory, whether or not one is there.
    let raw = output.as_os_str().as_encoded_bytes();
    if raw.ends_with(b"/") || raw.ends_with(b"/.") {
        return Err(Error::WrongKind {
            path: output.to_path_buf(),
            found: "ends in '/' (a directory)",
            expected,
        });
    }
    if output.file_name().is_none() {
        return Err(Error::InvalidArgument(format!(
            "output {} has no file name",
            output.display()
        )));
    }
    let dir = output_dir(output);
    let dir_error = |problem| Error::OutputDirectory {
        dir: dir.clone(),
        output: output.to_path_buf(),
        problem,
    };
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(dir_error("is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(dir_error("does not exist"))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(dir_error("does not exist (a component of it is a file)"))
        }
        Err(e) => return Err(Error::io(&dir, e)),
    }
    let out = Identity::of(output);
    for input in inputs {
        if let Some(via) = out.same_as(&Identity::of(&input.path)) {
            return Err(Error::OutputIsInput {
                output: output.to_path_buf(),
                input: input.path.clone(),
                what: input.what,
                via,
                hint: input.hint,
            });
        }
    }
    Ok(())
}
