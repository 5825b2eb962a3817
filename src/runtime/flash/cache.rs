//! One layer's resident bundles in DRAM, as in the paper (section 3.3): a
//! matrix preallocated once with `capacity` rows of one bundle each, plus a
//! fixed scratch area of `scratch` rows for neurons a token needs beyond the
//! capacity. An index maps each neuron to its row and each row to its neuron.
//!
//! - insert: append at the first free row;
//! - delete: move the last used row into the freed one (row order does not
//!   matter: the runtime looks neurons up by index and sums in neuron order);
//! - nothing is ever reallocated.

use crate::error::Result;
use crate::runtime::flash::io::AlignedBuf;

/// Marks a neuron that has no row.
pub const NO_ROW: u32 = u32::MAX;

pub struct BundleCache {
    stride: usize,
    capacity: usize,
    scratch: usize,
    /// `(capacity + scratch) * stride` bytes.
    rows: AlignedBuf,
    /// Neuron -> row (`NO_ROW` when absent).
    row_of: Vec<u32>,
    /// Row -> neuron, for the `used` resident rows and the scratch rows.
    neuron_of: Vec<u32>,
    used: usize,
    /// Rows `0..pinned` hold neurons that are never evicted.
    pinned: usize,
}

impl BundleCache {
    /// A cache for a layer of `neurons` bundles of `stride` bytes.
    pub fn new(
        neurons: usize,
        stride: usize,
        capacity: usize,
        scratch: usize,
    ) -> Result<BundleCache> {
        let capacity = capacity.min(neurons);
        let rows = capacity + scratch;
        Ok(BundleCache {
            stride,
            capacity,
            scratch,
            // 64: cache-line aligned rows; every stride is a whole number of elements.
            rows: AlignedBuf::new(rows * stride, 64)?,
            row_of: vec![NO_ROW; neurons],
            neuron_of: vec![NO_ROW; rows],
            used: 0,
            pinned: 0,
        })
    }

    /// DRAM this cache holds (rows and index).
    pub fn size_bytes(&self) -> usize {
        self.rows.len() + 4 * (self.row_of.len() + self.neuron_of.len())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn scratch_rows(&self) -> usize {
        self.scratch
    }

    /// Resident neurons (pinned included).
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn pinned(&self) -> usize {
        self.pinned
    }

    pub fn free(&self) -> usize {
        self.capacity - self.used
    }

    /// The row holding `neuron` (resident or in scratch).
    #[inline]
    pub fn row_of(&self, neuron: u32) -> Option<usize> {
        match self.row_of[neuron as usize] {
            NO_ROW => None,
            r => Some(r as usize),
        }
    }

    /// The neuron in row `row`.
    pub fn neuron_at(&self, row: usize) -> u32 {
        self.neuron_of[row]
    }

    #[inline]
    pub fn row(&self, row: usize) -> &[u8] {
        &self.rows.as_slice()[row * self.stride..(row + 1) * self.stride]
    }

    #[inline]
    pub fn row_mut(&mut self, row: usize) -> &mut [u8] {
        &mut self.rows.as_mut_slice()[row * self.stride..(row + 1) * self.stride]
    }

    /// Appends `neuron` (not present) as a resident row, whose bytes the
    /// caller then fills; `None` when the cache is full.
    pub fn insert(&mut self, neuron: u32) -> Option<usize> {
        debug_assert_eq!(self.row_of[neuron as usize], NO_ROW);
        if self.used == self.capacity {
            return None;
        }
        let r = self.used;
        self.used += 1;
        self.row_of[neuron as usize] = r as u32;
        self.neuron_of[r] = neuron;
        Some(r)
    }

    /// Makes the resident rows so far permanent (hot neurons pinned at start).
    pub fn pin_all(&mut self) {
        self.pinned = self.used;
    }

    /// Evicts every unpinned resident neuron for which `keep` is false, moving
    /// the last row into each freed slot; returns how many left.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) -> usize {
        let mut evicted = 0;
        let mut r = self.pinned;
        while r < self.used {
            let neuron = self.neuron_of[r];
            if keep(neuron) {
                r += 1;
                continue;
            }
            self.row_of[neuron as usize] = NO_ROW;
            let last = self.used - 1;
            if r != last {
                let moved = self.neuron_of[last];
                let s = self.stride;
                self.rows
                    .as_mut_slice()
                    .copy_within(last * s..(last + 1) * s, r * s);
                self.neuron_of[r] = moved;
                self.row_of[moved as usize] = r as u32;
            }
            self.neuron_of[last] = NO_ROW;
            self.used -= 1;
            evicted += 1;
        }
        evicted
    }

    /// Puts `neuron` (not present) in scratch row `k` for the current token.
    pub fn place_scratch(&mut self, neuron: u32, k: usize) -> usize {
        debug_assert!(k < self.scratch);
        debug_assert_eq!(self.row_of[neuron as usize], NO_ROW);
        let r = self.capacity + k;
        self.row_of[neuron as usize] = r as u32;
        self.neuron_of[r] = neuron;
        r
    }

    /// Forgets the neurons in scratch rows `0..k`.
    pub fn clear_scratch(&mut self, k: usize) {
        for r in self.capacity..self.capacity + k {
            let n = std::mem::replace(&mut self.neuron_of[r], NO_ROW);
            if n != NO_ROW {
                self.row_of[n as usize] = NO_ROW;
            }
        }
    }

    /// Checks the index against the rows (tests).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for r in 0..self.used {
            let n = self.neuron_of[r];
            if n == NO_ROW || self.row_of[n as usize] != r as u32 {
                return Err(format!("row {r} holds {n}, whose index disagrees"));
            }
        }
        for r in self.used..self.capacity {
            if self.neuron_of[r] != NO_ROW {
                return Err(format!(
                    "free row {r} still names neuron {}",
                    self.neuron_of[r]
                ));
            }
        }
        let indexed = self.row_of.iter().filter(|&&r| r != NO_ROW).count();
        let in_scratch = self.neuron_of[self.capacity..]
            .iter()
            .filter(|&&n| n != NO_ROW)
            .count();
        if indexed != self.used + in_scratch {
            return Err(format!(
                "{indexed} neurons indexed, {} resident and {in_scratch} in scratch",
                self.used
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &mut BundleCache, n: u32) {
        let r = c.insert(n).expect("room");
        c.row_mut(r).fill(n as u8);
    }

    #[test]
    fn insert_appends_and_delete_moves_the_last_row() {
        let mut c = BundleCache::new(100, 8, 5, 2).unwrap();
        for n in [10, 20, 30, 40] {
            fill(&mut c, n);
        }
        assert_eq!(c.row_of(30), Some(2));
        assert_eq!(c.retain(|n| n != 20), 1);
        // 40 (the last row) moved into 20's slot, bytes and index together.
        assert_eq!(c.row_of(40), Some(1));
        assert_eq!(c.row(1), &[40u8; 8]);
        assert_eq!(c.row_of(20), None);
        assert_eq!(c.used(), 3);
        c.check_invariants().unwrap();
        fill(&mut c, 50);
        fill(&mut c, 60);
        assert_eq!(c.insert(70), None, "full at capacity");
        assert_eq!(c.retain(|n| n % 20 == 0), 3);
        c.check_invariants().unwrap();
        let mut left: Vec<u32> = (0..c.used()).map(|r| c.neuron_at(r)).collect();
        left.sort();
        assert_eq!(left, vec![40, 60]);
        for r in 0..c.used() {
            assert_eq!(c.row(r), &[c.neuron_at(r) as u8; 8]);
        }
    }

    #[test]
    fn pinned_rows_survive_eviction_and_scratch_is_temporary() {
        let mut c = BundleCache::new(50, 4, 4, 2).unwrap();
        fill(&mut c, 1);
        c.pin_all();
        fill(&mut c, 2);
        assert_eq!(c.retain(|_| false), 1);
        assert_eq!(c.row_of(1), Some(0));
        let r = c.place_scratch(7, 1);
        assert_eq!(r, 5);
        assert_eq!(c.row_of(7), Some(5));
        c.check_invariants().unwrap();
        c.clear_scratch(2);
        assert_eq!(c.row_of(7), None);
        c.check_invariants().unwrap();
    }

    #[test]
    fn random_inserts_and_evictions_keep_the_index_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut c = BundleCache::new(64, 2, 16, 0).unwrap();
        for _ in 0..2000 {
            let n: u32 = rng.random_range(0..64);
            if c.row_of(n).is_none() {
                if let Some(r) = c.insert(n) {
                    c.row_mut(r).fill(n as u8);
                }
            }
            let cut: u32 = rng.random_range(0..64);
            c.retain(|m| m < cut || rng.random_bool(0.9));
            c.check_invariants().unwrap();
            for r in 0..c.used() {
                assert_eq!(c.row(r)[0], c.neuron_at(r) as u8);
            }
        }
    }
}
