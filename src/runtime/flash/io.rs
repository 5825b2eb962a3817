//! Reading bundles from flash: the packed file opened a second time with
//! `O_DIRECT` (reads bypass the page cache, so what is measured is the disk),
//! aligned reusable buffers, reads rounded out to the file's alignment, and a
//! small pool of threads so that several reads are in flight.
//!
//! Where the file system refuses direct I/O (tmpfs answers `EINVAL`), reads go
//! through the page cache with `posix_fadvise(DONTNEED)` after each, so that
//! repeated runs still read from the disk rather than from RAM.

use std::alloc::Layout;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A zeroed heap buffer aligned to `align` bytes, allocated once.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory; access goes through &/&mut self.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// How reads reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// `O_DIRECT`: no page cache.
    Direct,
    /// Buffered `pread` followed by `posix_fadvise(DONTNEED)`.
    Buffered,
}

impl IoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        }
    }
}

/// Counters of what was read (the rounded bytes: what the disk delivered).
#[derive(Debug, Default)]
pub struct IoCounters {
    pub bytes: AtomicU64,
    pub ops: AtomicU64,
}

/// One read: `len` bytes at file offset `offset` (both multiples of the
/// alignment) into slot `slot` of a [`Staging`] area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOp {
    pub offset: u64,
    pub len: usize,
}

impl ReadOp {
    /// One past the last byte read.
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// A fixed area of `slots` aligned slots of `slot_bytes` each: one read lands
/// in each slot.
pub struct Staging {
    buf: AlignedBuf,
    pub slot_bytes: usize,
    pub slots: usize,
}

impl Staging {
    pub fn new(slots: usize, slot_bytes: usize, align: usize) -> Result<Staging> {
        let slots = slots.max(1);
        Ok(Staging {
            buf: AlignedBuf::new(slots * slot_bytes, align)?,
            slot_bytes,
            slots,
        })
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn slot(&self, k: usize) -> &[u8] {
        &self.buf.as_slice()[k * self.slot_bytes..(k + 1) * self.slot_bytes]
    }
}

/// The packed file opened for bundle reads.
pub struct FlashReader {
    path: PathBuf,
    file: File,
    mode: IoMode,
    align: usize,
    pool: rayon::ThreadPool,
    threads: usize,
    /// The file's length when opened: every wanted byte lies before it, so an end
    /// of file before it means the file shrank under us (an error, never zeros).
    file_len: u64,
    pub counters: IoCounters,
}

impl FlashReader {
    /// Opens `path` for direct reads of `align`-aligned ranges, probing with
    /// one read at `probe_offset`; falls back to buffered reads when the file
    /// system refuses (said once on stderr). `threads` reads run at a time.
    pub fn open(
        path: &Path,
        align: usize,
        probe_offset: u64,
        threads: usize,
    ) -> Result<FlashReader> {
        if threads == 0 {
            return Err(Error::InvalidArgument(
                "--io-threads must be at least 1".into(),
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("flash-io-{i}"))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("I/O thread pool: {e}")))?;
        let direct = Self::open_direct(path, align, probe_offset);
        let (file, mode) = match direct {
            Some(f) => (f, IoMode::Direct),
            None => {
                let f = File::open(path).map_err(|e| Error::io(path, e))?;
                // Random access: no readahead beyond what is asked for.
                advise(&f, 0, 0, libc::POSIX_FADV_RANDOM);
                eprintln!(
                    "note: {}: direct I/O refused by the file system; using buffered reads with posix_fadvise(DONTNEED)",
                    path.display()
                );
                (f, IoMode::Buffered)
            }
        };
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(FlashReader {
            path: path.to_path_buf(),
            file,
            mode,
            align,
            pool,
            threads,
            file_len,
            counters: IoCounters::default(),
        })
    }

    fn open_direct(path: &Path, align: usize, probe_offset: u64) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt;
        if std::env::var_os("FLASHPACK_NO_DIRECT_IO").is_some() {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let mut probe = AlignedBuf::new(align, align).ok()?;
        match file.read_at(probe.as_mut_slice(), probe_offset) {
            Ok(_) => Some(file),
            Err(_) => None,
        }
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// Length of the file in bytes (0 if it cannot be read).
    pub fn file_len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    pub fn align(&self) -> usize {
        self.align
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The aligned range covering bytes `start..end` of the file.
    pub fn round_out(&self, start: u64, end: u64) -> ReadOp {
        let a = self.align as u64;
        let offset = start / a * a;
        let stop = end.div_ceil(a) * a;
        ReadOp {
            offset,
            len: (stop - offset) as usize,
        }
    }

    /// Performs `ops` (at most `staging.slots`, each at most `slot_bytes`), op
    /// `k` into slot `k`, in parallel on the I/O pool.
    pub fn read_batch(&self, staging: &mut Staging, ops: &[ReadOp]) -> Result<()> {
        self.read_batch_checked(staging, ops, &|_, _| Ok(()))
    }

    /// As [`Self::read_batch`], then `check(k, bytes)` on the bytes of op `k`,
    /// by the thread that read them, right after its read (so that hashing
    /// overlaps the other reads in flight). The first error is returned.
    pub fn read_batch_checked(
        &self,
        staging: &mut Staging,
        ops: &[ReadOp],
        check: &(dyn Fn(usize, &[u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        debug_assert!(ops.len() <= staging.slots);
        let slot_bytes = staging.slot_bytes;
        let buf = staging.buf.as_mut_slice();
        let one = |k: usize, slot: &mut [u8], op: &ReadOp| -> Result<()> {
            let dst = &mut slot[..op.len];
            self.read_one(dst, *op).map_err(|source| Error::FlashRead {
                path: self.path.clone(),
                offset: op.offset,
                ops: ops.len(),
                layer: None,
                source,
            })?;
            check(k, dst)
        };
        let result = if ops.len() == 1 {
            one(0, buf, &ops[0])
        } else {
            use rayon::prelude::*;
            self.pool.install(|| {
                buf.par_chunks_mut(slot_bytes)
                    .zip(ops.par_iter())
                    .enumerate()
                    .try_for_each(|(k, (slot, op))| one(k, slot, op))
            })
        };
        result?;
        let bytes: usize = ops.iter().map(|op| op.len).sum();
        self.counters
            .bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters
            .ops
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_one(&self, dst: &mut [u8], op: ReadOp) -> std::io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            let n = self
                .file
                .read_at(&mut dst[done..], op.offset + done as u64)?;
            if n == 0 {
                let at = op.offset + done as u64;
                if at < self.file_len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "end of file at byte {at}: the file is shorter than when it was opened"
                        ),
                    ));
                }
                // End of file inside the rounded-out tail past the file's end:
                // the wanted bytes end before it (sections lie inside the file).
                dst[done..].fill(0);
                break;
            }
            done += n;
        }
        if self.mode == IoMode::Buffered {
            advise(&self.file, op.offset, op.len, libc::POSIX_FADV_DONTNEED);
        }
        Ok(())
    }
}

fn advise(file: &File, offset: u64, len: usize, advice: libc::c_int) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor; the call only gives the kernel a hint.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        );
    }
}

/// Bytes this process has caused to be read from storage (`read_bytes` in
/// `/proc/self/io`), where the kernel reports it.
pub fn proc_read_bytes() -> Option<u64> {
    proc_field("/proc/self/io", "read_bytes:").map(|v| v as u64)
}

/// Peak resident set size (`VmHWM` in `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_field("/proc/self/status", "VmHWM:").map(|kib| kib as u64 * 1024)
}

fn proc_field(path: &str, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let b = AlignedBuf::new(10_000, 4096).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&v| v == 0));
    }

    #[test]
    fn reads_round_out_to_the_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let r = FlashReader::open(&path, 4096, 0, 2).unwrap();
        let op = r.round_out(5000, 9000);
        assert_eq!(
            op,
            ReadOp {
                offset: 4096,
                len: 8192
            }
        );
        let mut st = Staging::new(2, 16384, 4096).unwrap();
        let tail = r.round_out(17_000, 20_000);
        r.read_batch(&mut st, &[op, tail]).unwrap();
        assert_eq!(&st.slot(0)[..8192], &data[4096..12288]);
        assert_eq!(&st.slot(1)[..20_000 - 16384], &data[16384..]);
        assert_eq!(r.counters.ops.load(Ordering::Relaxed), 2);
        assert_eq!(r.counters.bytes.load(Ordering::Relaxed), 8192 + 4096);
    }
}
