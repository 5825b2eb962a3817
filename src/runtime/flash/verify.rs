//! First-use verification of FFN chunks (on by default; `--no-verify-reads`
//! turns it off): the first time a run uses any bundle of an FFN chunk, the
//! whole chunk's sha256 is checked against the manifest before any of its
//! bytes is computed with, so a file damaged after packing stops the run (exit
//! 1, naming section and chunk) instead of producing silent garbage. Each chunk
//! is checked once per run.
//!
//! The check hashes the bytes the flash reader brought in, not a second copy:
//! a read that uses an unchecked chunk is widened to cover that whole chunk
//! ([`ChunkVerifier::widen_start`], [`ChunkVerifier::widen_end`]; chunks are at
//! most max(64 KiB, one bundle), rule 13), and the chunk is hashed in the read
//! buffer by the I/O thread that read it, right after the read
//! ([`ChunkVerifier::check`]). Naive reads whole layers in chunk-aligned
//! pieces, so nothing is widened; flash reads a few bundles, so a chunk's first
//! use costs the rest of that chunk in the same direct read, once per run.
//! Hashing a part of a chunk as it arrives and the rest later would not do: the
//! token that first uses a chunk must be computed only after its chunk is
//! verified.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::error::FormatError;
use crate::format::layout::SectionEntry;
use crate::runtime::flash::io::ReadOp;

/// What verification did over a run, summed over layers.
#[derive(Debug, Default)]
pub struct VerifyCounters {
    /// Chunks whose hash was checked (each once per run).
    pub chunks: AtomicU64,
    /// Bytes hashed (a chunk that two reads of one batch both held is hashed
    /// twice).
    pub hashed_bytes: AtomicU64,
    /// Bytes read only because a read was widened to a whole unchecked chunk
    /// (counted in the reader's bytes too).
    pub extra_read_bytes: AtomicU64,
    /// CPU time spent hashing (each hashing thread's own clock, summed: what
    /// the check costs the processor, whatever else shares it; it overlaps
    /// other reads in flight).
    pub hash_cpu_ns: AtomicU64,
}

/// One FFN section's chunk hashes and which chunks are checked.
pub struct ChunkVerifier {
    path: PathBuf,
    section: String,
    /// File offset of the section (chunk 0).
    offset: u64,
    chunk_bytes: u64,
    section_bytes: u64,
    hashes: Vec<[u8; 32]>,
    /// Chunks already checked, preallocated: no allocation on the token path.
    checked: Vec<AtomicBool>,
}

impl ChunkVerifier {
    /// For the FFN section `section` (uncompressed, chunks of whole bundles).
    pub fn new(path: &std::path::Path, section: &SectionEntry) -> Result<ChunkVerifier> {
        let hashes = section
            .chunks
            .iter()
            .map(|c| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&c.sha256, &mut h).map(|()| h)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::Format {
                path: path.to_path_buf(),
                source: FormatError::ChunkTable {
                    section: section.name.clone(),
                    message: "sha256 is not hex".into(),
                },
            })?;
        Ok(ChunkVerifier {
            path: path.to_path_buf(),
            section: section.name.clone(),
            offset: section.offset,
            chunk_bytes: section.chunk_raw_bytes.max(1),
            section_bytes: section.length,
            checked: (0..hashes.len()).map(|_| AtomicBool::new(false)).collect(),
            hashes,
        })
    }

    /// Raw bytes per chunk (every chunk but the last).
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Whether chunk `chunk` has been checked.
    pub fn is_checked(&self, chunk: usize) -> bool {
        match self.checked.get(chunk) {
            Some(c) => c.load(Ordering::Acquire),
            None => true,
        }
    }

    /// Chunks checked so far.
    pub fn checked_chunks(&self) -> usize {
        self.checked
            .iter()
            .filter(|c| c.load(Ordering::Relaxed))
            .count()
    }

    /// The chunk holding file byte `at` (inside the section).
    fn chunk_at(&self, at: u64) -> usize {
        (((at - self.offset) / self.chunk_bytes) as usize).min(self.hashes.len().saturating_sub(1))
    }

    /// File range of chunk `chunk`.
    fn chunk_range(&self, chunk: usize) -> (u64, u64) {
        let start = chunk as u64 * self.chunk_bytes;
        let end = (start + self.chunk_bytes).min(self.section_bytes);
        (self.offset + start, self.offset + end)
    }

    /// Where a read of wanted bytes starting at `start` must start: the start
    /// of its chunk when that chunk is unchecked, else `start`.
    pub fn widen_start(&self, start: u64) -> u64 {
        let c = self.chunk_at(start);
        if self.is_checked(c) {
            start
        } else {
            self.chunk_range(c).0
        }
    }

    /// Where a read of wanted bytes ending at `end` (exclusive) must end: the
    /// end of the chunk holding byte `end - 1` when that chunk is unchecked.
    pub fn widen_end(&self, end: u64) -> u64 {
        let c = self.chunk_at(end - 1);
        if self.is_checked(c) {
            end
        } else {
            self.chunk_range(c).1
        }
    }

    /// Checks every unchecked chunk that the wanted bytes `start..end` touch,
    /// in `data`, the bytes of `op` (a read widened by [`Self::widen_start`] /
    /// [`Self::widen_end`], so that it holds each such chunk whole). A
    /// mismatch is an error naming section and chunk; so is an unchecked chunk
    /// that the read does not hold whole (never used unchecked).
    pub fn check(
        &self,
        op: &ReadOp,
        data: &[u8],
        start: u64,
        end: u64,
        counters: &VerifyCounters,
    ) -> Result<()> {
        if start >= end || self.hashes.is_empty() {
            return Ok(());
        }
        for chunk in self.chunk_at(start)..=self.chunk_at(end - 1) {
            if self.is_checked(chunk) {
                continue;
            }
            let (from, to) = self.chunk_range(chunk);
            if from < op.offset || to > op.end() || (to - op.offset) as usize > data.len() {
                return Err(Error::InvalidArgument(format!(
                    "section {:?} chunk {chunk} (bytes {from}..{to}) is not whole in the read at {} of {} bytes: it cannot be verified",
                    self.section, op.offset, op.len
                )));
            }
            let bytes = &data[(from - op.offset) as usize..(to - op.offset) as usize];
            let t0 = thread_cpu_ns();
            let ok = Sha256::digest(bytes).as_slice() == self.hashes[chunk];
            counters
                .hash_cpu_ns
                .fetch_add(thread_cpu_ns().saturating_sub(t0), Ordering::Relaxed);
            if !ok {
                return Err(Error::Format {
                    path: self.path.clone(),
                    source: FormatError::ChunkHash {
                        section: self.section.clone(),
                        chunk,
                        offset: from,
                    },
                });
            }
            counters
                .hashed_bytes
                .fetch_add(to - from, Ordering::Relaxed);
            // Two reads of one batch may hold the same chunk: count it once.
            if !self.checked[chunk].swap(true, Ordering::AcqRel) {
                counters.chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// CPU time of the calling thread, in nanoseconds (0 where unavailable).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
