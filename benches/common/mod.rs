//! What the scale benchmarks (`flash_scale`, `moe_scale`) share: their
//! environment knobs, dropping a file from the page cache, and the
//! llama.cpp-style baseline's machinery: a child process in a fresh memory
//! cgroup limited to the DRAM budget that maps the packed file, holds the
//! dense part's bytes in anonymous memory, and reads weights through the
//! page cache with the runtime's dot-product kernel.

#![allow(dead_code)] // each benchmark uses its own subset

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flashpack::format::layout::DENSE_SECTION;
use flashpack::format::PackedFile;
use flashpack::runtime::kernels::{dot_weights, Weights};
use rayon::prelude::*;

/// The child joins the cgroup whose `cgroup.procs` this names.
const PROCS_VAR: &str = "FLASHPACK_SCALE_MMAP_PROCS";

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().expect(name))
        .unwrap_or(default)
}

/// Drops `path`'s pages from the page cache (each mode starts cold).
pub fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().ok();
    // SAFETY: a valid open descriptor; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
}

/// The mmap child's measurement, one JSON line on its stdout.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MmapResult {
    pub tokens: usize,
    /// Mean over tokens after the first (the first also faults in what a
    /// warm page cache would already hold).
    pub ms_per_token: f64,
    /// Bytes the child made the kernel read from storage per token
    /// (`read_bytes` of `/proc/self/io`, page-fault readahead included).
    pub read_bytes_per_token: f64,
    /// Weight bytes of the file the child's dot products went through per
    /// token (what a warm page cache would serve).
    #[serde(default)]
    pub touched_bytes_per_token: f64,
    pub peak_rss_bytes: u64,
}

/// Runs the current executable with `envs` (the benchmark's child mode) in a
/// fresh memory cgroup limited to `budget` bytes; the child calls
/// [`join_cgroup`] first and prints an [`MmapResult`] as its last line.
pub fn run_in_cgroup(budget: u64, envs: &[(&str, &std::ffi::OsStr)]) -> Result<MmapResult, String> {
    let cg = MemoryCgroup::create(budget)?;
    let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .env(PROCS_VAR, &cg.procs)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    drop(cg);
    if !out.status.success() {
        return Err(format!("the mmap child failed: {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).map_err(|e| e.to_string())
}

/// In the child: moves this process into the cgroup [`run_in_cgroup`] made.
pub fn join_cgroup() {
    if let Some(procs) = std::env::var_os(PROCS_VAR) {
        std::fs::write(procs, std::process::id().to_string()).expect("join the cgroup");
    }
}

/// A memory cgroup made for one child, removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
    procs: PathBuf,
}

impl MemoryCgroup {
    fn create(limit: u64) -> Result<MemoryCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        // cgroup v1's memory controller, else the v2 unified hierarchy.
        let (parent, limit_file) = if let Some(p) = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        {
            (
                Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')),
                "memory.limit_in_bytes",
            )
        } else if let Some(p) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            (
                Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')),
                "memory.max",
            )
        } else {
            return Err("no memory cgroup in /proc/self/cgroup".into());
        };
        let dir = parent.join(format!("flashpack-mmap-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = MemoryCgroup {
            procs: dir.join("cgroup.procs"),
            dir,
        };
        std::fs::write(cg.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("{limit_file}: {e}"))?;
        Ok(cg)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// As many bytes as `file`'s dense part holds (less the token embedding
/// table with `skip_embeddings`: a forward reads one row of it), in
/// anonymous memory, as llama.cpp's resident weights would be. Their values
/// do not matter to the timing; the section is compressed in this format,
/// so it cannot be mapped, and decompressing it would need twice the room.
pub fn dense_stand_in(file: &PackedFile, skip_embeddings: bool) -> Vec<u8> {
    let len: usize = file
        .manifest
        .tensors
        .iter()
        .filter(|t| t.section == DENSE_SECTION)
        .filter(|t| !(skip_embeddings && t.name.ends_with("embed_tokens.weight")))
        .map(|t| t.length as usize)
        .sum();
    (0..len).map(|i| (i * 131 % 251) as u8 & 0x3b).collect()
}

/// The sum of dot products of every f16 row of `bytes` (rows of `x.len()`
/// values) with `x`, on the rayon pool, as a dense forward's matmuls would
/// read them.
pub fn rows_dot(bytes: &[u8], x: &[f32]) -> f32 {
    let row = x.len() * 2;
    bytes
        .par_chunks(row * 64)
        .map(|block| {
            block
                .chunks_exact(row)
                .map(|r| {
                    dot_weights(
                        Weights::from_le_bytes(flashpack::dtype::DType::F16, r).unwrap(),
                        x,
                    )
                })
                .sum::<f32>()
        })
        .sum()
}

/// Maps `path` read-only (the child's view of the packed file).
pub fn map_file(path: &Path) -> memmap2::Mmap {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: read-only map of a file nothing writes during the run.
    unsafe { memmap2::Mmap::map(&f) }.expect("mmap")
}

/// Runs `token(t)` (which returns the file bytes it read through the map)
/// `tokens` times (at least 2) and measures each: the child's result, the
/// first token left out of the means.
pub fn measure_tokens(tokens: usize, token: &mut dyn FnMut(usize) -> (f32, u64)) -> MmapResult {
    let tokens = tokens.max(2);
    let (mut ms, mut bytes, mut touched) = (Vec::new(), Vec::new(), Vec::new());
    let mut checksum = 0.0f32;
    for t in 0..tokens {
        let r0 = flashpack::runtime::flash::proc_read_bytes().unwrap_or(0);
        let t0 = Instant::now();
        let (sum, n) = token(t);
        checksum += sum;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        bytes.push((flashpack::runtime::flash::proc_read_bytes().unwrap_or(0) - r0) as f64);
        touched.push(n as f64);
    }
    eprintln!("mmap child: per token ms {ms:.0?}, read bytes {bytes:.0?} (checksum {checksum})");
    let mean = |v: &[f64]| v[1..].iter().sum::<f64>() / (v.len() - 1) as f64;
    MmapResult {
        tokens: tokens - 1,
        ms_per_token: mean(&ms),
        read_bytes_per_token: mean(&bytes),
        touched_bytes_per_token: mean(&touched),
        peak_rss_bytes: flashpack::runtime::flash::peak_rss_bytes().unwrap_or(0),
    }
}
