//! Streaming one section into the output: bytes in, fixed-size raw chunks out,
//! each compressed (optionally) and hashed in parallel, written in order. Memory
//! is a few batches of chunks, whatever the section size.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::layout::{ChunkEntry, Compression, SectionEntry, SectionKind};
use crate::pack::output::AtomicOutput;

/// Chunks compressed together in one parallel batch.
const BATCH_CHUNKS: usize = 32;

pub struct SectionWriter {
    name: String,
    kind: SectionKind,
    zstd_level: Option<i32>,
    chunk_raw_bytes: u64,
    offset: u64,
    pending: Vec<u8>,
    chunks: Vec<ChunkEntry>,
    hasher: Sha256,
    length: u64,
    raw_length: u64,
}

impl SectionWriter {
    /// Starts a section at the output's current position (already aligned).
    pub fn new(
        out: &AtomicOutput,
        name: &str,
        kind: SectionKind,
        zstd_level: Option<i32>,
        chunk_raw_bytes: u64,
    ) -> SectionWriter {
        SectionWriter {
            name: name.to_string(),
            kind,
            zstd_level,
            chunk_raw_bytes,
            offset: out.position,
            pending: Vec::new(),
            chunks: Vec::new(),
            hasher: Sha256::new(),
            length: 0,
            raw_length: 0,
        }
    }

    /// Raw bytes written so far: the raw offset of the next byte.
    pub fn raw_position(&self) -> u64 {
        self.raw_length + self.pending.len() as u64
    }

    pub fn write(&mut self, out: &mut AtomicOutput, bytes: &[u8]) -> Result<()> {
        let chunk = self.chunk_raw_bytes as usize;
        if self.pending.is_empty() && bytes.len() >= chunk {
            // Whole chunks straight from the caller's buffer: no copy of an FFN layer.
            let whole = bytes.len() / chunk * chunk;
            self.emit(out, &bytes[..whole])?;
            self.pending.extend_from_slice(&bytes[whole..]);
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= chunk * BATCH_CHUNKS {
            self.flush(out, false)?;
        }
        Ok(())
    }

    /// Pads the raw stream with zeros to a multiple of `alignment`.
    pub fn pad_raw(&mut self, out: &mut AtomicOutput, alignment: u64) -> Result<()> {
        let pos = self.raw_position();
        let padded = pos.div_ceil(alignment) * alignment;
        self.write(out, &vec![0u8; (padded - pos) as usize])
    }

    /// Writes every complete pending chunk (and the final partial one when `last`).
    fn flush(&mut self, out: &mut AtomicOutput, last: bool) -> Result<()> {
        let chunk = self.chunk_raw_bytes as usize;
        let complete = if last {
            self.pending.len()
        } else {
            self.pending.len() / chunk * chunk
        };
        if complete == 0 {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.emit(out, &pending[..complete])?;
        self.pending = pending[complete..].to_vec();
        Ok(())
    }

    /// Writes `raw` as consecutive chunks (all full but possibly the last), a batch
    /// at a time: compressed and hashed in parallel, written in order.
    fn emit(&mut self, out: &mut AtomicOutput, raw: &[u8]) -> Result<()> {
        let chunk = self.chunk_raw_bytes as usize;
        let level = self.zstd_level;
        for batch in raw.chunks(chunk * BATCH_CHUNKS) {
            // `None`: stored bytes are the raw bytes (uncompressed), not copied.
            let encoded: Vec<std::io::Result<(Option<Vec<u8>>, String)>> = batch
                .par_chunks(chunk)
                .map(|piece| match level {
                    Some(level) => {
                        let stored = zstd::bulk::compress(piece, level)?;
                        let hash = hex::encode(Sha256::digest(&stored));
                        Ok((Some(stored), hash))
                    }
                    None => Ok((None, hex::encode(Sha256::digest(piece)))),
                })
                .collect();
            for (item, piece) in encoded.into_iter().zip(batch.chunks(chunk)) {
                let (stored, sha256) = item.map_err(|e| Error::Io {
                    path: format!("zstd compression of section {}", self.name).into(),
                    source: e,
                })?;
                let stored = stored.as_deref().unwrap_or(piece);
                out.write_all(stored)?;
                self.hasher.update(stored);
                self.length += stored.len() as u64;
                self.chunks.push(ChunkEntry {
                    length: stored.len() as u64,
                    sha256,
                });
            }
            self.raw_length += batch.len() as u64;
        }
        Ok(())
    }

    pub fn finish(mut self, out: &mut AtomicOutput) -> Result<SectionEntry> {
        self.flush(out, true)?;
        Ok(SectionEntry {
            name: self.name,
            kind: self.kind,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
            compression: if self.zstd_level.is_some() {
                Compression::Zstd
            } else {
                Compression::None
            },
            chunk_raw_bytes: self.chunk_raw_bytes,
            sha256: hex::encode(self.hasher.finalize()),
            chunks: self.chunks,
        })
    }
}
