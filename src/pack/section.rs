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
        self.pending.extend_from_slice(bytes);
        let batch = self.chunk_raw_bytes as usize * BATCH_CHUNKS;
        if self.pending.len() >= batch {
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

    /// Writes every complete chunk (and the final partial one when `last`).
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
        let level = self.zstd_level;
        let encoded: Vec<std::io::Result<(Vec<u8>, String)>> = self.pending[..complete]
            .par_chunks(chunk)
            .map(|raw| {
                let stored = match level {
                    Some(level) => zstd::bulk::compress(raw, level)?,
                    None => raw.to_vec(),
                };
                let hash = hex::encode(Sha256::digest(&stored));
                Ok((stored, hash))
            })
            .collect();
        for item in encoded {
            let (stored, sha256) = item.map_err(|e| Error::Io {
                path: format!("zstd ({})", self.name).into(),
                source: e,
            })?;
            out.write_all(&stored)?;
            self.hasher.update(&stored);
            self.length += stored.len() as u64;
            self.chunks.push(ChunkEntry {
                length: stored.len() as u64,
                sha256,
            });
        }
        self.raw_length += complete as u64;
        self.pending.drain(..complete);
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
