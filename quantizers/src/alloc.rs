//! Bits under a size budget: each item (a tensor) has options (a type, with its size in bytes and its predicted
//! cost, e.g. the KL divergence it adds); choose one option per item so that the sizes fit the budget and the
//! summed cost is least. A multiple-choice knapsack.
//!
//! Two solvers, and the better answer is kept: a dynamic programme over the budget in `units` (sizes rounded
//! *up*, so its answer always fits; exact but for that rounding, used when the problem is small enough), and the
//! Lagrangian greedy on each item's lower convex hull (upgrade the item whose next step buys the most cost per
//! byte; near-optimal when every item is small against the budget, which is the case on large models). A last
//! pass spends what is left on the single change that lowers the cost most, until none fits. Everything is
//! deterministic: ties go to the lower item index and the cheaper option.

/// One choice for an item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub bytes: u64,
    pub cost: f64,
}

/// Why no allocation exists.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocError {
    #[error("item {0} has no options")]
    NoOptions(usize),
    #[error("item {item} option {option}: the cost is not a finite number")]
    BadCost { item: usize, option: usize },
    #[error("the budget of {budget} bytes is below the smallest allocation, {min} bytes")]
    TooSmall { budget: u64, min: u64 },
}

/// Work above which the dynamic programme is not run (items × options × budget units).
const DP_WORK: u64 = 200_000_000;

/// The option chosen for each item, minimising the summed cost with summed bytes ≤ `budget`.
pub fn allocate(items: &[Vec<Choice>], budget: u64) -> Result<Vec<usize>, AllocError> {
    for (i, opts) in items.iter().enumerate() {
        if opts.is_empty() {
            return Err(AllocError::NoOptions(i));
        }
        if let Some(o) = opts.iter().position(|c| !c.cost.is_finite()) {
            return Err(AllocError::BadCost { item: i, option: o });
        }
    }
    let cheapest: Vec<usize> = items.iter().map(|o| argmin_by(o, |c| (c.bytes, c.cost))).collect();
    let min = total_bytes(items, &cheapest);
    if min > budget {
        return Err(AllocError::TooSmall { budget, min });
    }
    let mut best = fill(items, greedy(items, budget, cheapest), budget);
    if let Some(dp) = dynamic(items, budget) {
        let dp = fill(items, dp, budget);
        if total_cost(items, &dp) < total_cost(items, &best) {
            best = dp;
        }
    }
    Ok(best)
}

pub fn total_bytes(items: &[Vec<Choice>], pick: &[usize]) -> u64 {
    items.iter().zip(pick).map(|(o, &k)| o[k].bytes).sum()
}

pub fn total_cost(items: &[Vec<Choice>], pick: &[usize]) -> f64 {
    items.iter().zip(pick).map(|(o, &k)| o[k].cost).sum()
}

fn argmin_by<K: PartialOrd>(opts: &[Choice], key: impl Fn(&Choice) -> K) -> usize {
    let mut best = 0;
    for (k, c) in opts.iter().enumerate().skip(1) {
        if key(c) < key(&opts[best]) {
            best = k;
        }
    }
    best
}

/// The lower convex hull of an item's options, by increasing bytes: each step lowers the cost, and at a falling
/// rate per byte.
fn hull(opts: &[Choice]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..opts.len()).collect();
    idx.sort_by(|&a, &b| opts[a].bytes.cmp(&opts[b].bytes).then(opts[a].cost.total_cmp(&opts[b].cost)).then(a.cmp(&b)));
    let mut h: Vec<usize> = Vec::new();
    for k in idx {
        let c = opts[k];
        // Only options that lower the cost (the cheapest of equal size comes first and stays).
        if let Some(&last) = h.last() {
            if c.cost >= opts[last].cost || c.bytes == opts[last].bytes {
                continue;
            }
        }
        // Drop points that lie on or above the segment from their predecessor to this one.
        while h.len() >= 2 {
            let (a, b) = (opts[h[h.len() - 2]], opts[h[h.len() - 1]]);
            let s_ab = (a.cost - b.cost) / (b.bytes - a.bytes) as f64;
            let s_bc = (b.cost - c.cost) / (c.bytes - b.bytes) as f64;
            if s_bc >= s_ab {
                h.pop();
            } else {
                break;
            }
        }
        h.push(k);
    }
    h
}

/// The Lagrangian greedy: from the cheapest hull point of every item, take the upgrade with the best cost saved
/// per byte that still fits, until none does.
fn greedy(items: &[Vec<Choice>], budget: u64, start: Vec<usize>) -> Vec<usize> {
    let hulls: Vec<Vec<usize>> = items.iter().map(|o| hull(o)).collect();
    let mut pos = vec![0usize; items.len()];
    let mut pick: Vec<usize> = hulls.iter().map(|h| h[0]).collect();
    // The hull starts at the smallest option, which may be a different one of the same size than `start`.
    debug_assert!(pick.iter().zip(&start).zip(items).all(|((&a, &b), o)| o[a].bytes == o[b].bytes));
    let mut used = total_bytes(items, &pick);
    let mut blocked = vec![false; items.len()];
    loop {
        let mut best: Option<(f64, usize)> = None;
        for (i, h) in hulls.iter().enumerate() {
            if blocked[i] || pos[i] + 1 >= h.len() {
                continue;
            }
            let (a, b) = (items[i][h[pos[i]]], items[i][h[pos[i] + 1]]);
            let rate = (a.cost - b.cost) / (b.bytes - a.bytes) as f64;
            if best.is_none_or(|(r, _)| rate > r) {
                best = Some((rate, i));
            }
        }
        let Some((_, i)) = best else { break };
        let (a, b) = (items[i][hulls[i][pos[i]]], items[i][hulls[i][pos[i] + 1]]);
        if used - a.bytes + b.bytes <= budget {
            used = used - a.bytes + b.bytes;
            pos[i] += 1;
            pick[i] = hulls[i][pos[i]];
        } else {
            // Its next step does not fit now, and later steps are larger still.
            blocked[i] = true;
        }
    }
    pick
}

/// Spends what the budget has left: the single change (to any option, hull or not) that lowers the cost most and
/// fits, repeated until none does.
fn fill(items: &[Vec<Choice>], mut pick: Vec<usize>, budget: u64) -> Vec<usize> {
    let mut used = total_bytes(items, &pick);
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, opts) in items.iter().enumerate() {
            let cur = opts[pick[i]];
            for (k, c) in opts.iter().enumerate() {
                let gain = cur.cost - c.cost;
                if gain > 0.0 && used - cur.bytes + c.bytes <= budget && best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, i, k));
                }
            }
        }
        let Some((_, i, k)) = best else { return pick };
        used = used - items[i][pick[i]].bytes + items[i][k].bytes;
        pick[i] = k;
    }
}

/// The dynamic programme over the budget in units (sizes rounded up, so the answer fits); `None` when the
/// problem is too large for it.
fn dynamic(items: &[Vec<Choice>], budget: u64) -> Option<Vec<usize>> {
    let n_opts: u64 = items.iter().map(|o| o.len() as u64).sum();
    if n_opts == 0 {
        return None;
    }
    let units = (DP_WORK / n_opts).min(1 << 16);
    if units < 64 {
        return None;
    }
    let unit = budget.div_ceil(units).max(1);
    let cap = (budget / unit) as usize;
    let size = |c: &Choice| c.bytes.div_ceil(unit) as usize;
    const INF: f64 = f64::INFINITY;
    // best[u]: least cost of the items so far within u units; choice[i][u]: the option item i took there.
    let mut best = vec![0.0f64; cap + 1];
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(items.len());
    for opts in items {
        let mut next = vec![INF; cap + 1];
        let mut took = vec![u8::MAX; cap + 1];
        for (k, c) in opts.iter().enumerate() {
            let s = size(c);
            if s > cap {
                continue;
            }
            for u in s..=cap {
                let v = best[u - s] + c.cost;
                if v < next[u] {
                    next[u] = v;
                    took[u] = k as u8;
                }
            }
        }
        best = next;
        choice.push(took);
    }
    if !best[cap].is_finite() || items.iter().any(|o| o.len() > u8::MAX as usize) {
        return None;
    }
    let mut pick = vec![0usize; items.len()];
    let mut u = cap;
    for i in (0..items.len()).rev() {
        let k = choice[i][u] as usize;
        pick[i] = k;
        u -= size(&items[i][k]);
    }
    Some(pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bytes: u64, cost: f64) -> Choice {
        Choice { bytes, cost }
    }

    /// Every combination, for checking the solvers on small problems.
    fn brute(items: &[Vec<Choice>], budget: u64) -> f64 {
        let mut best = f64::INFINITY;
        let mut pick = vec![0usize; items.len()];
        loop {
            if total_bytes(items, &pick) <= budget {
                best = best.min(total_cost(items, &pick));
            }
            let mut i = 0;
            loop {
                if i == items.len() {
                    return best;
                }
                pick[i] += 1;
                if pick[i] < items[i].len() {
                    break;
                }
                pick[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn matches_exhaustive_search_on_random_problems() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..300 {
            let n = 1 + (rnd() % 5) as usize;
            let items: Vec<Vec<Choice>> = (0..n)
                .map(|_| {
                    let k = 1 + (rnd() % 5) as usize;
                    (0..k).map(|_| c(1 + rnd() % 1000, (rnd() % 10_000) as f64 / 100.0)).collect()
                })
                .collect();
            let min: u64 = items.iter().map(|o| o.iter().map(|c| c.bytes).min().unwrap()).sum();
            let max: u64 = items.iter().map(|o| o.iter().map(|c| c.bytes).max().unwrap()).sum();
            let budget = min + rnd() % (max - min + 1);
            let pick = allocate(&items, budget).unwrap();
            assert!(total_bytes(&items, &pick) <= budget);
            // Budgets this small fit the programme's units byte for byte: the answer is the optimum.
            assert!(total_cost(&items, &pick) <= brute(&items, budget) + 1e-9);
        }
    }

    #[test]
    fn deterministic_and_within_budget() {
        let items: Vec<Vec<Choice>> =
            (0..50).map(|i| vec![c(10, 5.0 + i as f64), c(20, 2.0), c(40, 1.0 + (i % 3) as f64 * 0.1)]).collect();
        let a = allocate(&items, 1200).unwrap();
        assert_eq!(a, allocate(&items, 1200).unwrap());
        assert!(total_bytes(&items, &a) <= 1200);
    }

    #[test]
    fn a_budget_below_the_smallest_allocation_names_both() {
        let items = vec![vec![c(10, 1.0), c(5, 2.0)], vec![c(7, 0.0)]];
        assert_eq!(allocate(&items, 11), Err(AllocError::TooSmall { budget: 11, min: 12 }));
        assert_eq!(allocate(&items, 12).unwrap(), vec![1, 0]);
        assert_eq!(allocate(&[vec![]], 12), Err(AllocError::NoOptions(0)));
        assert!(matches!(allocate(&[vec![c(1, f64::NAN)]], 12), Err(AllocError::BadCost { .. })));
    }

    #[test]
    fn hull_drops_dominated_and_concave_points() {
        let o = [c(10, 10.0), c(20, 9.5), c(30, 4.0), c(15, 12.0), c(40, 3.9)];
        assert_eq!(hull(&o), vec![0, 2, 4]);
    }
}
