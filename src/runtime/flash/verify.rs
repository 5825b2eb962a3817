//! `--verify-reads`: the first time a run uses any bundle of an FFN chunk, the
//! whole chunk's sha256 is checked against the manifest, so a file damaged after
//! packing stops the run (exit 1, naming section and chunk) instead of producing
//! silent garbage. Each chunk is checked once per run; the check reads the chunk
//! through the page cache, apart from the counted flash reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::error::FormatError;
use crate::format::layout::SectionEntry;

pub struct ChunkVerifier {
    path: PathBuf,
    file: File,
    section: String,
    /// File offset of the section (chunk 0).
    offset: u64,
    chunk_bytes: u64,
    section_bytes: u64,
    /// Bundles per chunk (chunks hold whole bundles, R13).
    bundles_per_chunk: usize,
    hashes: Vec<[u8; 32]>,
    /// Chunks already checked, preallocated: no allocation on the token path.
    checked: Mutex<Vec<bool>>,
    /// Scratch for one chunk, preallocated.
    buffer: Mutex<Vec<u8>>,
    /// Bytes hashed by the checks (not part of the flash reads' count).
    pub bytes_checked: AtomicU64,
}

impl ChunkVerifier {
    /// For the FFN section `section` (uncompressed, chunks of whole bundles of
    /// `stride` bytes).
    pub fn new(
        path: &std::path::Path,
        section: &SectionEntry,
        stride: usize,
    ) -> Result<ChunkVerifier> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
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
            file,
            section: section.name.clone(),
            offset: section.offset,
            chunk_bytes: section.chunk_raw_bytes,
            section_bytes: section.length,
            bundles_per_chunk: (section.chunk_raw_bytes as usize / stride).max(1),
            checked: Mutex::new(vec![false; hashes.len()]),
            buffer: Mutex::new(vec![0u8; section.chunk_raw_bytes as usize]),
            hashes,
            bytes_checked: AtomicU64::new(0),
        })
    }

    /// Checks the chunks holding bundles `first..last` (inclusive) that no earlier
    /// call checked.
    pub fn check_bundles(&self, first: usize, last: usize) -> Result<()> {
        let (from, to) = (
            first / self.bundles_per_chunk,
            last / self.bundles_per_chunk,
        );
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in from..=to.min(self.hashes.len().saturating_sub(1)) {
            if checked[chunk] {
                continue;
            }
            let start = chunk as u64 * self.chunk_bytes;
            let len = (self.section_bytes - start).min(self.chunk_bytes) as usize;
            let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            self.file
                .read_exact_at(&mut buffer[..len], self.offset + start)
                .map_err(|e| Error::io(&self.path, e))?;
            if Sha256::digest(&buffer[..len]).as_slice() != self.hashes[chunk] {
                return Err(Error::Format {
                    path: self.path.clone(),
                    source: FormatError::ChunkHash {
                        section: self.section.clone(),
                        chunk,
                        offset: self.offset + start,
                    },
                });
            }
            self.bytes_checked.fetch_add(len as u64, Ordering::Relaxed);
            checked[chunk] = true;
        }
        Ok(())
    }
}
