//! Reading bundles from flash: the packed file opened a second time with
//! `O_DIRECT` (reads bypass the page cache, so what is measured is the disk),
//! aligned reusable buffers, reads rounded out to the file's alignment, and a
//! small pool of threads so that several reads are in flight.
//!
//! Where the file system refuses direct I/O (tmpfs answers `EINVAL`), reads go
//! through the page cache with `posix_fadvise(DONTNEED)` after each, so that
//! repeated runs still read from the disk rather than from RAM.
//!
//! Two engines put the reads in flight ([`IoEngine`]): a pool of threads, each
//! doing one `pread` at a time, or one io_uring on the calling thread with every
//! read of a batch submitted at once. Both read the same bytes into the same
//! slots and run the same checks; only the cost of keeping reads in flight
//! differs (`cargo bench --bench io_engines` compares them at flash's read sizes).

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

/// What keeps several reads in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum IoEngine {
    /// `uring` where the kernel allows it, `threads` otherwise (io_uring can
    /// be disabled by `kernel.io_uring_disabled` or a container's seccomp
    /// filter). What the reader chose is in its reports.
    Auto,
    /// A pool of `io_threads` threads, each doing one blocking `pread` at a time.
    Threads,
    /// One io_uring: a batch's reads submitted together, completions reaped by
    /// the calling thread (no thread per read in flight).
    Uring,
}

impl IoEngine {
    /// The name `--io-engine` takes and the reports print.
    pub fn as_str(self) -> &'static str {
        match self {
            IoEngine::Auto => "auto",
            IoEngine::Threads => "threads",
            IoEngine::Uring => "uring",
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

/// The io_uring engine's ring and its bookkeeping, kept between batches so
/// that a decode step allocates nothing once the first batches have run.
struct Uring {
    ring: io_uring::IoUring,
    /// Bytes of each op read so far.
    done: Vec<usize>,
    /// Ops waiting for (re)submission.
    waiting: std::collections::VecDeque<usize>,
    /// (op, result) of the completions reaped at once.
    completed: Vec<(usize, i32)>,
}

/// The packed file opened for bundle reads.
pub struct FlashReader {
    path: PathBuf,
    file: File,
    mode: IoMode,
    align: usize,
    pool: rayon::ThreadPool,
    threads: usize,
    /// `Some` when reads go through io_uring (its queue holds `threads` reads).
    ring: Option<std::sync::Mutex<Uring>>,
    /// The file's length when opened: every wanted byte lies before it, so an end
    /// of file before it means the file shrank under us (an error, never zeros).
    file_len: u64,
    pub counters: IoCounters,
}

impl FlashReader {
    /// Opens `path` for direct reads of `align`-aligned ranges, probing with
    /// one read at `probe_offset`; falls back to buffered reads when the file
    /// system refuses (said once on stderr). `threads` reads run at a time,
    /// through a pool of threads.
    pub fn open(
        path: &Path,
        align: usize,
        probe_offset: u64,
        threads: usize,
    ) -> Result<FlashReader> {
        Self::open_with(path, align, probe_offset, threads, IoEngine::Threads)
    }

    /// As [`Self::open`], with `threads` reads in flight through `engine`. An
    /// io_uring the kernel refuses (disabled by `kernel.io_uring_disabled`, a
    /// seccomp filter, an old kernel) is an error when asked for by name, and
    /// the thread pool under [`IoEngine::Auto`].
    pub fn open_with(
        path: &Path,
        align: usize,
        probe_offset: u64,
        threads: usize,
        engine: IoEngine,
    ) -> Result<FlashReader> {
        if threads == 0 {
            return Err(Error::InvalidArgument(
                "the number of reads in flight must be at least 1".into(),
            ));
        }
        let entries = (threads as u32).next_power_of_two();
        let ring = match engine {
            IoEngine::Threads => None,
            IoEngine::Auto => io_uring::IoUring::new(entries).ok().map(|ring| {
                std::sync::Mutex::new(Uring {
                    ring,
                    done: Vec::new(),
                    waiting: std::collections::VecDeque::new(),
                    completed: Vec::new(),
                })
            }),
            IoEngine::Uring => {
                let ring = io_uring::IoUring::new(entries).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "io_uring is not available here ({e}); use the thread pool engine"
                    ))
                })?;
                Some(std::sync::Mutex::new(Uring {
                    ring,
                    done: Vec::new(),
                    waiting: std::collections::VecDeque::new(),
                    completed: Vec::new(),
                }))
            }
        };
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
            ring,
            file_len,
            counters: IoCounters::default(),
        })
    }

    /// The engine that keeps reads in flight.
    pub fn engine(&self) -> IoEngine {
        if self.ring.is_some() {
            IoEngine::Uring
        } else {
            IoEngine::Threads
        }
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
        let result = if let Some(ring) = &self.ring {
            let mut uring = ring.lock().unwrap_or_else(|e| e.into_inner());
            self.read_batch_uring(&mut uring, buf, slot_bytes, ops, check)
        } else if ops.len() == 1 {
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

    /// The io_uring engine: every op's read submitted (as many at a time as the
    /// ring holds), completions reaped on this thread; a short read is
    /// resubmitted for its remainder, an end of file treated as [`Self::read_one`]
    /// does, and `check(k, bytes)` runs as soon as op `k` is complete, while the
    /// other reads are still in flight. On an error the reads already submitted
    /// are still reaped before returning: the kernel writes into `buf` until then.
    fn read_batch_uring(
        &self,
        uring: &mut Uring,
        buf: &mut [u8],
        slot_bytes: usize,
        ops: &[ReadOp],
        check: &(dyn Fn(usize, &[u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        let fd = io_uring::types::Fd(self.file.as_raw_fd());
        let base = buf.as_mut_ptr();
        assert!(ops.len() * slot_bytes <= buf.len());
        assert!(ops.iter().all(|op| op.len <= slot_bytes));
        let Uring {
            ring,
            done,
            waiting,
            completed,
        } = uring;
        done.clear();
        done.resize(ops.len(), 0);
        waiting.clear();
        waiting.extend(0..ops.len());
        let mut in_flight = 0usize;
        let mut first_error: Option<Error> = None;
        let fail = |k: usize, source: std::io::Error| Error::FlashRead {
            path: self.path.clone(),
            offset: ops[k].offset,
            ops: ops.len(),
            layer: None,
            source,
        };
        loop {
            if first_error.is_none() {
                let mut sq = ring.submission();
                while let Some(&k) = waiting.front() {
                    let op = ops[k];
                    // SAFETY: slot `k` lies inside `buf` (asserted above), stays
                    // borrowed by this function, and is reaped before it returns.
                    let dst = unsafe { base.add(k * slot_bytes + done[k]) };
                    let entry = io_uring::opcode::Read::new(fd, dst, (op.len - done[k]) as u32)
                        .offset(op.offset + done[k] as u64)
                        .build()
                        .user_data(k as u64);
                    // SAFETY: the entry's buffer is valid until its completion.
                    if unsafe { sq.push(&entry) }.is_err() {
                        break;
                    }
                    waiting.pop_front();
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                break;
            }
            if let Err(e) = ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    // A signal, or the completion queue is full: reap what is
                    // there and go on.
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                    // The reads submitted may still write into `buf`, so this
                    // cannot return: it is fatal (a bad ring or descriptor).
                    _ => panic!("io_uring_enter failed with reads in flight: {e}"),
                }
            }
            completed.clear();
            completed.extend(
                ring.completion()
                    .map(|c| (c.user_data() as usize, c.result())),
            );
            for &(k, res) in completed.iter() {
                in_flight -= 1;
                let op = ops[k];
                if first_error.is_some() {
                    continue;
                }
                if res < 0 {
                    let err = std::io::Error::from_raw_os_error(-res);
                    if matches!(err.kind(), std::io::ErrorKind::Interrupted) || res == -libc::EAGAIN
                    {
                        waiting.push_back(k);
                    } else {
                        first_error = Some(fail(k, err));
                    }
                    continue;
                }
                if res == 0 {
                    let at = op.offset + done[k] as u64;
                    if at < self.file_len {
                        first_error = Some(fail(
                            k,
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!(
                                    "end of file at byte {at}: the file is shorter than when it was opened"
                                ),
                            ),
                        ));
                        continue;
                    }
                    // Past the file's end inside the rounded-out tail.
                    // SAFETY: op k's read is complete; its slot lies in `buf`.
                    unsafe {
                        std::ptr::write_bytes(
                            base.add(k * slot_bytes + done[k]),
                            0,
                            op.len - done[k],
                        )
                    };
                    done[k] = op.len;
                } else {
                    done[k] += res as usize;
                }
                if done[k] < op.len {
                    waiting.push_back(k);
                    continue;
                }
                if self.mode == IoMode::Buffered {
                    advise(&self.file, op.offset, op.len, libc::POSIX_FADV_DONTNEED);
                }
                // SAFETY: op k's reads are complete and nothing writes its slot
                // any more; every access to `buf` in here goes through `base`.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(k * slot_bytes), op.len) };
                if let Err(e) = check(k, bytes) {
                    first_error = Some(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
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

    /// Both engines read the same bytes into the same slots, including a read
    /// rounded out past the end of the file, with more ops than reads in flight
    /// (the ring's queue refills as completions arrive), and run the check on
    /// every op exactly once.
    #[test]
    fn the_engines_read_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let threads = FlashReader::open_with(&path, 4096, 0, 2, IoEngine::Threads).unwrap();
        let uring = FlashReader::open_with(&path, 4096, 0, 2, IoEngine::Uring).unwrap();
        assert_eq!(uring.engine(), IoEngine::Uring);
        // Where io_uring works (it does here: `uring` opened), auto takes it.
        let auto = FlashReader::open_with(&path, 4096, 0, 2, IoEngine::Auto).unwrap();
        assert_eq!(auto.engine(), IoEngine::Uring);
        let ops: Vec<ReadOp> = [
            (0, 100),
            (5000, 9000),
            (40_000, 61_000),
            (8191, 8193),
            (150_000, 151_000),
            (196_000, 200_000),
            (90_000, 90_001),
        ]
        .iter()
        .map(|&(a, b)| threads.round_out(a, b))
        .collect();
        let slot = 32_768;
        for reader in [&threads, &uring] {
            let mut st = Staging::new(ops.len(), slot, 4096).unwrap();
            let seen = std::sync::Mutex::new(vec![0u32; ops.len()]);
            reader
                .read_batch_checked(&mut st, &ops, &|k, bytes| {
                    assert_eq!(bytes.len(), ops[k].len);
                    seen.lock().unwrap()[k] += 1;
                    Ok(())
                })
                .unwrap();
            assert_eq!(
                *seen.lock().unwrap(),
                vec![1; ops.len()],
                "{:?}",
                reader.engine()
            );
            for (k, op) in ops.iter().enumerate() {
                let start = op.offset as usize;
                let end = (start + op.len).min(data.len());
                assert_eq!(
                    &st.slot(k)[..end - start],
                    &data[start..end],
                    "{:?} op {k}",
                    reader.engine()
                );
                assert!(st.slot(k)[end - start..op.len].iter().all(|&b| b == 0));
            }
            assert_eq!(
                reader.counters.ops.load(Ordering::Relaxed),
                ops.len() as u64
            );
        }
    }

    /// A failing check is the batch's error under either engine, and the
    /// reader stays usable afterwards (the ring was drained).
    #[test]
    fn a_failed_check_fails_the_batch_and_the_reader_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..65_536u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for engine in [IoEngine::Threads, IoEngine::Uring] {
            let r = FlashReader::open_with(&path, 4096, 0, 4, engine).unwrap();
            let ops: Vec<ReadOp> = (0..6)
                .map(|i| ReadOp {
                    offset: i * 8192,
                    len: 8192,
                })
                .collect();
            let mut st = Staging::new(ops.len(), 8192, 4096).unwrap();
            let err = r
                .read_batch_checked(&mut st, &ops, &|k, _| {
                    if k == 3 {
                        Err(Error::InvalidArgument("chunk 3 is damaged".into()))
                    } else {
                        Ok(())
                    }
                })
                .unwrap_err();
            assert!(
                err.to_string().contains("chunk 3 is damaged"),
                "{engine:?}: {err}"
            );
            r.read_batch(&mut st, &ops[..2]).unwrap();
            assert_eq!(&st.slot(1)[..8192], &data[8192..16_384], "{engine:?}");
        }
    }

    /// A file that shrank after it was opened is an error naming the offset,
    /// never zeros, under either engine.
    #[test]
    fn a_file_that_shrank_is_an_error_under_both_engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 65_536]).unwrap();
        for engine in [IoEngine::Threads, IoEngine::Uring] {
            std::fs::write(&path, vec![7u8; 65_536]).unwrap();
            let r = FlashReader::open_with(&path, 4096, 0, 2, engine).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(16_384)
                .unwrap();
            let mut st = Staging::new(1, 8192, 4096).unwrap();
            let err = r
                .read_batch(
                    &mut st,
                    &[ReadOp {
                        offset: 32_768,
                        len: 8192,
                    }],
                )
                .unwrap_err();
            assert!(
                err.to_string().contains("shorter than when it was opened"),
                "{engine:?}: {err}"
            );
        }
    }
}
