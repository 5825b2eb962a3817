//! The flash reader's two engines side by side (issue 15, "Asynchronous I/O done
//! well"): a pool of threads each doing one blocking `pread`, against one
//! io_uring with a batch's reads submitted together. A measurement, not a test.
//!
//! A scratch file (`FLASHPACK_IO_BENCH_GIB`, default 2 GiB, in
//! `FLASHPACK_BENCH_DIR` or the target directory) is written once and dropped
//! from the page cache; then for each read size flash makes (a bundle of a
//! 2048-wide f16 model is 12 KiB, the scale benchmark's mean read ~21 KiB, naive
//! reads 1 MiB) and each number of reads in flight, batches of that many reads
//! at random aligned offsets go through [`FlashReader::read_batch`], exactly as
//! the flash FFN issues them. The engines alternate cell by cell and round by
//! round (`FLASHPACK_IO_BENCH_ROUNDS`, default 3, best round kept) so that the
//! disk's drift over minutes falls on both. Printed per cell: MB/s, µs per read
//! and CPU ms per GiB read (user + system of this process, all threads), and
//! the ratio uring / threads.
//!
//! Run: `cargo bench --bench io_engines`.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flashpack::runtime::flash::io::{FlashReader, IoEngine, ReadOp, Staging};
use rand::{Rng, SeedableRng};

const ALIGN: usize = 4096;
/// Bytes read per cell and round (enough reads to average the disk's jitter).
const BYTES_PER_CELL: usize = 96 << 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().expect(name))
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a valid open descriptor; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
}

/// The scratch file, written once (pseudo-random bytes, so no layer below
/// can shortcut zeros) and kept for later runs.
fn scratch_file(bytes: u64) -> PathBuf {
    let dir = std::env::var_os("FLASHPACK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-io"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("io-engines-{bytes}.bin"));
    if std::fs::metadata(&path).map(|m| m.len()).ok() == Some(bytes) {
        return path;
    }
    eprintln!(
        "writing {:.1} GiB scratch file {}",
        bytes as f64 / (1u64 << 30) as f64,
        path.display()
    );
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp).unwrap());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < bytes {
        rng.fill(&mut block[..]);
        let n = (bytes - written).min(block.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &block[..n]).unwrap();
        written += n as u64;
    }
    let f = f.into_inner().unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

struct Cell {
    mb_s: f64,
    us_per_read: f64,
    cpu_ms_per_gib: f64,
}

/// One cell: `reads` reads of `size` bytes, `in_flight` per batch, at offsets
/// drawn from `seed` (the same offsets for both engines).
fn measure(
    reader: &FlashReader,
    staging: &mut Staging,
    size: usize,
    in_flight: usize,
    file_len: u64,
    seed: u64,
) -> Cell {
    let reads = (BYTES_PER_CELL / size).max(in_flight * 8);
    let batches = reads.div_ceil(in_flight);
    let slots = file_len / size as u64 - 1;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut ops = Vec::with_capacity(in_flight);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for _ in 0..batches {
        ops.clear();
        for _ in 0..in_flight {
            // Offsets aligned to the read size, as bundles in a section are
            // laid out back to back (at least the 4 KiB alignment).
            let at = rng.random_range(0..slots) * size as u64;
            let at = at / ALIGN as u64 * ALIGN as u64;
            ops.push(ReadOp {
                offset: at,
                len: size,
            });
        }
        reader.read_batch(staging, &ops).unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let bytes = (batches * in_flight * size) as f64;
    Cell {
        mb_s: bytes / secs / 1e6,
        us_per_read: secs * 1e6 / (batches * in_flight) as f64,
        cpu_ms_per_gib: cpu * 1e3 / (bytes / (1u64 << 30) as f64),
    }
}

fn main() {
    let gib = env_usize("FLASHPACK_IO_BENCH_GIB", 2) as u64;
    let rounds = env_usize("FLASHPACK_IO_BENCH_ROUNDS", 3);
    let path = scratch_file(gib << 30);
    let file_len = std::fs::metadata(&path).unwrap().len();
    let sizes = [4 << 10, 12 << 10, 20 << 10, 64 << 10, 256 << 10, 1 << 20];
    let depths = [1usize, 4, 16, 32, 64];
    let max_depth = *depths.iter().max().unwrap();
    // One reader per engine and depth (the pool's size and the ring's depth are
    // fixed when opened), opened once.
    let readers: Vec<(IoEngine, usize, FlashReader)> = depths
        .iter()
        .flat_map(|&d| {
            [IoEngine::Threads, IoEngine::Uring]
                .into_iter()
                .map(move |e| (e, d))
        })
        .map(|(e, d)| (e, d, FlashReader::open_with(&path, ALIGN, 0, d, e).unwrap()))
        .collect();
    let mode = readers[0].2.mode();
    let mut staging = Staging::new(max_depth, 1 << 20, ALIGN).unwrap();
    // best[(size, depth, engine)] over rounds, by MB/s.
    let mut best: std::collections::BTreeMap<(usize, usize, &str), Cell> = Default::default();
    for round in 0..rounds {
        for (si, &size) in sizes.iter().enumerate() {
            for (di, &depth) in depths.iter().enumerate() {
                let seed = (round * 1000 + si * 10 + di) as u64;
                // Alternate which engine goes first, round by round.
                let mut order = [IoEngine::Threads, IoEngine::Uring];
                if round % 2 == 1 {
                    order.reverse();
                }
                for engine in order {
                    let reader = &readers
                        .iter()
                        .find(|(e, d, _)| *e == engine && *d == depth)
                        .unwrap()
                        .2;
                    drop_cache(&path);
                    let cell = measure(reader, &mut staging, size, depth, file_len, seed);
                    let key = (size, depth, engine.as_str());
                    if best.get(&key).is_none_or(|b| b.mb_s < cell.mb_s) {
                        best.insert(key, cell);
                    }
                }
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "flash reader engines, {:.1} GiB file, {} reads, best of {rounds} rounds, load average {}",
        file_len as f64 / (1u64 << 30) as f64,
        mode.as_str(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("| read | in flight | threads MB/s | uring MB/s | uring/threads | threads us/read | uring us/read | threads CPU ms/GiB | uring CPU ms/GiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &size in &sizes {
        for &depth in &depths {
            let t = &best[&(size, depth, "threads")];
            let u = &best[&(size, depth, "uring")];
            println!(
                "| {} KiB | {depth} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
                size >> 10,
                t.mb_s,
                u.mb_s,
                u.mb_s / t.mb_s,
                t.us_per_read,
                u.us_per_read,
                t.cpu_ms_per_gib,
                u.cpu_ms_per_gib
            );
        }
    }
}
