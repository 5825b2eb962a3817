//! The DRAM budget policy of the disk modes, as one unit: from what must stay
//! resident (dense part, selectors, KV cache, read buffers) and what each
//! bundle set (one FFN layer's neurons, or one MoE layer's experts sharing a
//! cache) would like to keep, decide each set's cache rows, scratch rows and
//! pinned rows under `--dram-budget`, or refuse a budget below the minimum
//! that the mode needs, saying what it is made of.
//!
//! Rules, the same for every budget:
//! - the *minimum* is the resident part plus each set's smallest working
//!   cache (scratch only, no cached rows);
//! - with no budget, every set gets the rows it wants;
//! - under a budget below what the sets want, every set's wanted rows shrink
//!   by one factor (what does not fit goes through scratch: more reads, the
//!   same output);
//! - above it, the spare goes to the sets equally: dense-model layers pin
//!   their hottest neurons (never evicted), MoE layers keep more experts.
//!
//! The runtime builds its caches from the plan; nothing here reads a file.

use crate::error::{Error, Result};
use crate::runtime::flash::MemoryPlan;

/// Scratch rows beside a cache of `capacity` rows: none when the cache holds
/// the whole layer, else an eighth of it but at least 64 (or the layer).
pub fn scratch_for(capacity: usize, neurons: usize) -> usize {
    if capacity >= neurons {
        0
    } else {
        (capacity / 8).clamp(64.min(neurons), neurons)
    }
}

/// How a bundle set's scratch and index grow, and what it does with spare
/// budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// An FFN layer of a dense model: scratch grows with the cache
    /// ([`scratch_for`]), 12 index bytes per neuron, spare budget pins its
    /// hottest neurons.
    Neurons,
    /// A dense FFN layer of a MoE model: scratch as [`SetKind::Neurons`], 4
    /// index bytes per neuron, no share of the spare (it is cached whole).
    MoeDense,
    /// A sparse MoE layer's experts in one cache: `scratch` rows whatever
    /// the cache size, 4 index bytes per (expert, neuron), spare budget keeps
    /// more experts.
    Experts {
        /// Scratch rows (fixed).
        scratch: usize,
    },
}

/// One bundle set's demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleSet {
    /// How it grows (see [`SetKind`]).
    pub kind: SetKind,
    /// Bytes of one cache row (one bundle).
    pub stride: usize,
    /// Bundles in the set (neurons, or experts x neurons): the most rows it
    /// can use and the size of its index.
    pub keys: usize,
    /// Rows it would like (from calibration or the window); at most `keys`.
    pub want: usize,
}

impl BundleSet {
    fn index_bytes(&self, rows: usize) -> u64 {
        let per_key = match self.kind {
            SetKind::Neurons => 12,
            SetKind::MoeDense | SetKind::Experts { .. } => 4,
        };
        (rows * 4 + self.keys * per_key) as u64
    }

    fn scratch(&self, rows: usize) -> usize {
        match self.kind {
            SetKind::Neurons | SetKind::MoeDense => scratch_for(rows, self.keys),
            SetKind::Experts { scratch } => scratch,
        }
    }

    fn bytes(&self, rows: usize, scratch: usize) -> u64 {
        ((rows + scratch) * self.stride) as u64 + self.index_bytes(rows + scratch)
    }
}

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// The resident parts, filled in (`dense`, `predictors`, `selector`,
    /// `kv_cache`, `staging`, `fixed_overhead`); the rest is computed.
    pub resident: MemoryPlan,
    /// One entry per layer.
    pub sets: Vec<BundleSet>,
    /// Whether the mode caches bundles (`flash`, `oracle-flash`); `naive`
    /// reads whole sections and keeps no rows.
    pub caching: bool,
    /// The DRAM budget in bytes.
    pub budget: Option<u64>,
    /// Rows per set fixed by the caller (tests, benchmarks): the budget then
    /// only checks the minimum.
    pub capacity: Option<usize>,
    /// The mode's name, for the refusal.
    pub mode: &'static str,
}

/// The plan for `req`, or [`Error::InvalidOption`] (`dram_budget`) when the
/// budget is below the minimum.
pub fn plan(req: &PlanRequest) -> Result<MemoryPlan> {
    let mut plan = req.resident.clone();
    let sets = &req.sets;
    let n = sets.len();
    let fixed = plan.dense
        + plan.predictors
        + plan.selector
        + plan.kv_cache
        + plan.staging
        + plan.fixed_overhead;
    let mut want: Vec<usize> = sets
        .iter()
        .map(|s| match (req.caching, req.capacity) {
            (false, _) => 0,
            (true, Some(c)) => c.min(s.keys),
            (true, None) => s.want.min(s.keys),
        })
        .collect();
    let min_scratch = |s: &BundleSet| if req.caching { s.scratch(0) } else { 0 };
    let mut scratch: Vec<usize> = sets
        .iter()
        .zip(&want)
        .map(|(s, &w)| if req.caching { s.scratch(w) } else { 0 })
        .collect();
    let mut pinned = vec![0usize; n];
    let min_caches: u64 = sets.iter().map(|s| s.bytes(0, min_scratch(s))).sum();
    plan.minimum = fixed + min_caches;
    let want_caches: u64 = (0..n).map(|i| sets[i].bytes(want[i], scratch[i])).sum();
    let moe = sets.iter().any(|s| s.kind != SetKind::Neurons);
    if let Some(budget) = req.budget {
        if budget < plan.minimum {
            return Err(Error::InvalidOption {
                option: "dram_budget",
                problem: format!(
                    "{budget} bytes is below the minimum of {} bytes ({:.1} MiB) that the {} mode needs \
                     for this model (dense part {}, predictors {}, selector copies {}, KV cache {}, \
                     read buffers {}, smallest FFN caches {min_caches}, fixed overhead {})",
                    plan.minimum,
                    plan.minimum as f64 / (1u64 << 20) as f64,
                    req.mode,
                    plan.dense,
                    plan.predictors,
                    plan.selector,
                    plan.kv_cache,
                    plan.staging,
                    plan.fixed_overhead
                ),
            });
        }
        if req.caching && req.capacity.is_none() {
            if fixed + want_caches > budget {
                // Every set shrinks by one factor. A dense model's scratch
                // grows with its cache (up to 1/8 of it): room is left for
                // it. A MoE model's sets are trimmed until the plan fits.
                let room = (budget - plan.minimum) as f64;
                let extra = (want_caches - min_caches).max(1) as f64;
                let headroom = if moe { 1.0 } else { 1.125 };
                let f = (room / extra / headroom).clamp(0.0, 1.0);
                for (i, s) in sets.iter().enumerate() {
                    want[i] = (want[i] as f64 * f).floor() as usize;
                    scratch[i] = match s.kind {
                        SetKind::Neurons => s.scratch(want[i]),
                        SetKind::MoeDense => s.scratch(want[i]).min(scratch[i].max(min_scratch(s))),
                        SetKind::Experts { .. } => scratch[i],
                    };
                }
                while moe
                    && fixed
                        + (0..n)
                            .map(|i| sets[i].bytes(want[i], scratch[i]))
                            .sum::<u64>()
                        > budget
                {
                    let Some(i) = (0..n).filter(|&i| want[i] > 0).max_by_key(|&i| want[i]) else {
                        break;
                    };
                    want[i] -= 1;
                }
            } else {
                // Spare budget, shared equally among the sets that take it.
                let spare = budget - (fixed + want_caches);
                let takers = sets.iter().filter(|s| s.kind != SetKind::MoeDense).count();
                let per_set = spare / takers.max(1) as u64;
                for (i, s) in sets.iter().enumerate() {
                    let rows = (per_set / (s.stride as u64 + 4)) as usize;
                    match s.kind {
                        SetKind::Neurons => {
                            pinned[i] = rows.min(s.keys - want[i]);
                            want[i] += pinned[i];
                            scratch[i] = s.scratch(want[i]).min(scratch[i]);
                        }
                        SetKind::Experts { .. } => want[i] = (want[i] + rows).min(s.keys),
                        SetKind::MoeDense => {}
                    }
                }
            }
        }
    }
    plan.capacity_per_layer = want;
    plan.scratch_per_layer = scratch;
    plan.pinned_per_layer = pinned;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(bytes: u64) -> MemoryPlan {
        MemoryPlan {
            dense: bytes,
            fixed_overhead: 1000,
            ..MemoryPlan::default()
        }
    }

    fn dense_request(budget: Option<u64>) -> PlanRequest {
        PlanRequest {
            resident: resident(10_000),
            sets: vec![
                BundleSet {
                    kind: SetKind::Neurons,
                    stride: 100,
                    keys: 1000,
                    want: 400,
                };
                3
            ],
            caching: true,
            budget,
            capacity: None,
            mode: "flash",
        }
    }

    fn cache_bytes(req: &PlanRequest, p: &MemoryPlan) -> u64 {
        (0..req.sets.len())
            .map(|i| req.sets[i].bytes(p.capacity_per_layer[i], p.scratch_per_layer[i]))
            .sum()
    }

    #[test]
    fn no_budget_gives_every_set_what_it_wants() {
        let req = dense_request(None);
        let p = plan(&req).unwrap();
        assert_eq!(p.capacity_per_layer, vec![400; 3]);
        assert_eq!(p.scratch_per_layer, vec![64; 3]);
        assert_eq!(p.pinned_per_layer, vec![0; 3]);
        // Minimum: resident + per set 64 scratch rows and the index.
        let per_set = 64 * 100 + (64 * 4 + 1000 * 12) as u64;
        assert_eq!(p.minimum, 11_000 + 3 * per_set);
    }

    #[test]
    fn the_minimum_itself_is_accepted_and_one_byte_less_refused() {
        let min = plan(&dense_request(None)).unwrap().minimum;
        let at = plan(&dense_request(Some(min))).unwrap();
        assert_eq!(at.capacity_per_layer, vec![0; 3], "no room for cached rows");
        assert_eq!(at.scratch_per_layer, vec![64; 3]);
        let below = plan(&dense_request(Some(min - 1))).unwrap_err();
        match below {
            Error::InvalidOption { option, problem } => {
                assert_eq!(option, "dram_budget");
                assert!(
                    problem.contains(&format!("minimum of {min} bytes")),
                    "{problem}"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_tight_budget_shrinks_every_set_alike_and_fits() {
        let full = plan(&dense_request(None)).unwrap();
        let want_total = 11_000 + cache_bytes(&dense_request(None), &full);
        for budget in [full.minimum + 10_000, full.minimum + 50_000, want_total - 1] {
            let req = dense_request(Some(budget));
            let p = plan(&req).unwrap();
            let rows = p.capacity_per_layer[0];
            assert!(p.capacity_per_layer.iter().all(|&r| r == rows), "{p:?}");
            assert!(rows < 400, "shrunk below the want at {budget}: {rows}");
            assert!(
                11_000 + cache_bytes(&req, &p) <= budget,
                "over budget at {budget}"
            );
            assert_eq!(p.pinned_per_layer, vec![0; 3]);
        }
    }

    #[test]
    fn spare_budget_pins_hot_neurons_up_to_the_whole_layer() {
        let full = plan(&dense_request(None)).unwrap();
        let want_total = 11_000 + cache_bytes(&dense_request(None), &full);
        let p = plan(&dense_request(Some(want_total + 3 * 104 * 50))).unwrap();
        assert_eq!(p.pinned_per_layer, vec![50; 3]);
        assert_eq!(p.capacity_per_layer, vec![450; 3]);
        // A budget beyond the model: every neuron resident, no scratch.
        let p = plan(&dense_request(Some(u64::MAX / 2))).unwrap();
        assert_eq!(p.capacity_per_layer, vec![1000; 3]);
        assert_eq!(p.pinned_per_layer, vec![600; 3]);
        assert_eq!(p.scratch_per_layer, vec![0; 3]);
    }

    #[test]
    fn naive_keeps_no_rows_and_needs_no_scratch() {
        let mut req = dense_request(Some(u64::MAX / 2));
        req.caching = false;
        let p = plan(&req).unwrap();
        assert_eq!(p.capacity_per_layer, vec![0; 3]);
        assert_eq!(p.scratch_per_layer, vec![0; 3]);
        assert_eq!(p.minimum, 11_000 + 3 * 12_000);
    }

    #[test]
    fn fixed_capacity_overrides_the_budget_policy() {
        let mut req = dense_request(Some(u64::MAX / 2));
        req.capacity = Some(5000);
        let p = plan(&req).unwrap();
        assert_eq!(p.capacity_per_layer, vec![1000; 3], "capped at the layer");
        assert_eq!(p.pinned_per_layer, vec![0; 3]);
        req.capacity = Some(10);
        assert_eq!(plan(&req).unwrap().capacity_per_layer, vec![10; 3]);
    }

    fn moe_request(budget: Option<u64>) -> PlanRequest {
        PlanRequest {
            resident: resident(10_000),
            sets: vec![
                BundleSet {
                    kind: SetKind::MoeDense,
                    stride: 100,
                    keys: 200,
                    want: 200,
                },
                BundleSet {
                    kind: SetKind::Experts { scratch: 16 },
                    stride: 60,
                    keys: 8 * 32,
                    want: 4 * 32,
                },
            ],
            caching: true,
            budget,
            capacity: None,
            mode: "flash",
        }
    }

    #[test]
    fn moe_spare_budget_keeps_more_experts_not_dense_layers() {
        let full = plan(&moe_request(None)).unwrap();
        assert_eq!(full.capacity_per_layer, vec![200, 128]);
        assert_eq!(full.scratch_per_layer, vec![0, 16]);
        let want_total = 11_000 + cache_bytes(&moe_request(None), &full);
        // Room for 10 more rows of the experts' set (stride + 4 each).
        let p = plan(&moe_request(Some(want_total + 64 * 10))).unwrap();
        assert_eq!(p.capacity_per_layer, vec![200, 138]);
        assert_eq!(p.pinned_per_layer, vec![0, 0]);
        let p = plan(&moe_request(Some(u64::MAX / 2))).unwrap();
        assert_eq!(p.capacity_per_layer, vec![200, 256], "at most every expert");
    }

    #[test]
    fn moe_tight_budget_fits_exactly_within() {
        let full = plan(&moe_request(None)).unwrap();
        let want_total = 11_000 + cache_bytes(&moe_request(None), &full);
        for budget in [full.minimum, full.minimum + 3000, want_total - 1] {
            let req = moe_request(Some(budget));
            let p = plan(&req).unwrap();
            assert!(
                11_000 + cache_bytes(&req, &p) <= budget,
                "over budget at {budget}: {p:?}"
            );
            assert!(p.capacity_per_layer[1] < 128);
            assert_eq!(p.scratch_per_layer[1], 16, "experts keep their scratch");
        }
    }
}
