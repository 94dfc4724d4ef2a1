//! The bench's statistics, shared by the host's report and the guest's `bench-guest decide`
//! (this file is compiled into both, so it uses nothing but std).
//!
//! Every repetition runs each mode once, next to the others, and includes an A/A pair: two
//! periods without any tracer ("none" and "none-b"). A loop's time is measured against a
//! control timed in the same milliseconds (`rel`: its time per operation over the
//! control's, see guest.rs), which takes out most of the host's load on the emulated CPU.
//! A mode's cost in one repetition is its time over the geometric mean of that
//! repetition's two no-tracer times; the spread of B over A across repetitions is the
//! noise floor of the run. A cost is reported
//! with one-sided 95 % bounds (Student's t over the repetitions), and a target is judged met
//! only when the bound on the right side of it is: otherwise the run could not tell.
use std::collections::BTreeMap;

/// The A/A pair: the reference periods, without any tracer.
pub const NONE: &str = "none";
pub const NONE_B: &str = "none-b";
/// The mode whose targets the bench judges.
pub const TRACER: &str = "tracer";
/// The comparison point: bpftrace doing the same filtering.
pub const BPFTRACE: &str = "bpftrace";

/// The hot-path loops, as the guest names them.
pub const LOOPS: [&str; 2] = ["pipe", "select"];

/// Slowdown the tracer may add to a hot-path loop (docs/bench.md).
pub const SLOWDOWN_TARGET: f64 = 0.02;
/// How many times cheaper than bpftrace the tracer must be.
pub const CHEAPER_FACTOR: f64 = 3.0;

/// One timed run of a hot-path loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub mode: String,
    pub rep: u32,
    pub lp: String,
    pub ns_per_op: f64,
    /// Its time over the control's, when the run had a control.
    pub rel: Option<f64>,
}

impl Sample {
    /// What costs are computed from: the time relative to the control, or else the time.
    fn value(&self) -> f64 {
        self.rel.unwrap_or(self.ns_per_op)
    }
}

/// The `loop mode=M rep=R loop=L ... ns_per_op=X` lines of a results file.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("loop") {
                return None;
            }
            let fields: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
            Some(Sample {
                mode: fields.get("mode")?.to_string(),
                rep: fields.get("rep")?.parse().ok()?,
                lp: fields.get("loop")?.to_string(),
                ns_per_op: fields.get("ns_per_op")?.parse().ok()?,
                rel: fields.get("rel").and_then(|r| r.parse().ok()),
            })
        })
        .collect()
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
pub fn std_dev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// The one-sided 95 % quantile of Student's t with `dof` degrees of freedom.
pub fn t95(dof: usize) -> f64 {
    const TABLE: [f64; 30] = [
        6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753, 1.746,
        1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
    ];
    match dof {
        0 => f64::INFINITY,
        1..=30 => TABLE[dof - 1],
        // The normal quantile with the first correction term of the t expansion.
        _ => {
            let z = 1.645_f64;
            z + (z.powi(3) + z) / (4.0 * dof as f64)
        }
    }
}

/// The spread of the A/A pair: B's time over A's in each repetition.
#[derive(Clone, Debug, PartialEq)]
pub struct Floor {
    /// B / A per repetition, in repetition order.
    pub ratios: Vec<f64>,
    /// Standard deviation of ln(B / A).
    pub sd: f64,
    /// The half-width of the 95 % bound a mode costing nothing would get from this noise
    /// (the smallest cost the run can tell from none), as a fraction.
    pub resolution: f64,
}

/// A mode's cost: its time over the no-tracer reference, minus one (0.01 = 1 % slower).
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    pub cost: f64,
    /// One-sided 95 % lower and upper bounds.
    pub lo: f64,
    pub hi: f64,
    /// Repetitions it was measured in.
    pub n: usize,
    /// Its ratio to the reference per repetition.
    pub ratios: Vec<f64>,
    /// The mean of the per-repetition log ratios, and the spread the bounds used.
    pub log_mean: f64,
    pub spread: f64,
}

/// One hot-path loop in one run: the reference time, the noise floor and each mode's cost.
#[derive(Clone, Debug, Default)]
pub struct LoopStats {
    /// Median over the repetitions of the reference's plain time (guest ns per operation).
    pub reference_ns: Option<f64>,
    pub floor: Option<Floor>,
    pub costs: BTreeMap<String, Cost>,
}

/// The runs of one mode period: their values and their plain times.
type Runs = (Vec<f64>, Vec<f64>);

/// What the A/A spread implies for one mode's per-repetition log ratio. The ratio of a mode
/// to the geometric mean of A and B carries 1.5 periods' worth of noise variance, B over A
/// carries 2: scale the A/A deviation by √(3/4).
const FLOOR_TO_MODE: f64 = 0.866_025_403_784_438_6;

impl LoopStats {
    pub fn compute(samples: &[Sample], lp: &str) -> LoopStats {
        // (mode, rep) → median of the runs in that period, of their values and of their
        // plain times.
        let mut runs: BTreeMap<(&str, u32), Runs> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.lp == lp && s.value() > 0.0) {
            let e = runs.entry((s.mode.as_str(), s.rep)).or_default();
            e.0.push(s.value());
            e.1.push(s.ns_per_op);
        }
        let mut per = BTreeMap::new();
        let mut ns = BTreeMap::new();
        for (k, (values, times)) in runs {
            if let (Some(v), Some(t)) = (median(values), median(times)) {
                per.insert(k, v);
                ns.insert(k, t);
            }
        }
        // The reference of a repetition: the geometric mean of A and B, or A alone in
        // results from before the A/A pair.
        let pair = |m: &BTreeMap<(&str, u32), f64>| -> BTreeMap<u32, f64> {
            m.iter()
                .filter(|((mode, _), _)| *mode == NONE)
                .map(|((_, rep), a)| (*rep, m.get(&(NONE_B, *rep)).map_or(*a, |b| (a * b).sqrt())))
                .collect()
        };
        let reference = pair(&per);
        let aa: Vec<f64> = per
            .iter()
            .filter(|((m, _), _)| *m == NONE_B)
            .filter_map(|((_, rep), b)| per.get(&(NONE, *rep)).map(|a| b / a))
            .collect();
        let floor = (aa.len() >= 2).then(|| {
            let logs: Vec<f64> = aa.iter().map(|r| r.ln()).collect();
            let sd = std_dev(&logs);
            let n = aa.len();
            Floor { ratios: aa, sd, resolution: (t95(n - 1) * sd * FLOOR_TO_MODE / (n as f64).sqrt()).exp_m1() }
        });
        let floor_sd = floor.as_ref().map_or(0.0, |f| f.sd * FLOOR_TO_MODE);
        let mut modes: Vec<&str> = per.keys().map(|(m, _)| *m).filter(|m| *m != NONE && *m != NONE_B).collect();
        modes.dedup();
        let mut costs = BTreeMap::new();
        for mode in modes {
            let ratios: Vec<f64> = per
                .iter()
                .filter(|((m, _), _)| *m == mode)
                .filter_map(|((_, rep), t)| reference.get(rep).map(|r| t / r))
                .collect();
            if let Some(cost) = Cost::from_ratios(ratios, floor_sd) {
                costs.insert(mode.to_owned(), cost);
            }
        }
        LoopStats { reference_ns: median(pair(&ns).into_values().collect()), floor, costs }
    }
}

impl Cost {
    /// The cost and its bounds from per-repetition ratios; the spread used is the larger of
    /// the ratios' own and `floor_sd` (the A/A noise, in the same log units), so that a mode
    /// that happened to vary little in a few repetitions does not look more certain than the
    /// run's noise allows. None for fewer than two repetitions.
    pub fn from_ratios(ratios: Vec<f64>, floor_sd: f64) -> Option<Cost> {
        let n = ratios.len();
        if n < 2 || ratios.iter().any(|r| *r <= 0.0) {
            return None;
        }
        let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
        let m = mean(&logs);
        let spread = std_dev(&logs).max(floor_sd);
        let half = t95(n - 1) * spread / (n as f64).sqrt();
        Some(Cost {
            cost: m.exp_m1(),
            lo: (m - half).exp_m1(),
            hi: (m + half).exp_m1(),
            n,
            ratios,
            log_mean: m,
            spread,
        })
    }
}

/// A target's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    /// The bounds straddle the target: more repetitions (or a quieter machine) could tell.
    Unresolved,
}

impl Verdict {
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::NotMet => "**not met**",
            Verdict::Unresolved => "**not resolved at this noise**",
        }
    }
}

/// A cost of at most `target`: met when even its upper bound is, not met when even its
/// lower bound is above.
pub fn at_most(c: &Cost, target: f64) -> Verdict {
    if c.hi <= target {
        Verdict::Met
    } else if c.lo > target {
        Verdict::NotMet
    } else {
        Verdict::Unresolved
    }
}

/// At the noise floor: the run cannot tell the cost from none (its lower bound reaches 0).
pub fn at_floor(c: &Cost) -> Verdict {
    if c.lo <= 0.0 { Verdict::Met } else { Verdict::NotMet }
}

/// `cheap` costs at most 1/`factor` of `dear`: met when the upper bound of one is below
/// the lower bound of the other over the factor; not met when the lower bound of one is
/// above the upper bound of the other over it.
pub fn cheaper(cheap: &Cost, dear: &Cost, factor: f64) -> Verdict {
    if dear.lo > 0.0 && cheap.hi <= dear.lo / factor {
        Verdict::Met
    } else if cheap.lo > dear.hi.max(0.0) / factor {
        Verdict::NotMet
    } else {
        Verdict::Unresolved
    }
}

/// The statistics of every hot-path loop.
pub fn all_loops(samples: &[Sample]) -> Vec<(&'static str, LoopStats)> {
    LOOPS.iter().map(|lp| (*lp, LoopStats::compute(samples, lp))).collect()
}

/// Samples for the tests of this module and of `decide.rs`.
#[cfg(test)]
pub mod samples {
    use super::*;

    pub fn sample(mode: &str, rep: u32, lp: &str, ns: f64) -> Sample {
        Sample { mode: mode.into(), rep, lp: lp.into(), ns_per_op: ns, rel: None }
    }

    /// Repetitions of the pipe loop: per rep (none, none-b, tracer, bpftrace) ns/op.
    pub fn pipe_reps(reps: &[(f64, f64, f64, f64)]) -> Vec<Sample> {
        let mut out = Vec::new();
        for (i, (a, b, t, bt)) in reps.iter().enumerate() {
            let rep = i as u32 + 1;
            out.push(sample(NONE, rep, "pipe", *a));
            out.push(sample(NONE_B, rep, "pipe", *b));
            out.push(sample(TRACER, rep, "pipe", *t));
            out.push(sample(BPFTRACE, rep, "pipe", *bt));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{samples::*, *};

    #[test]
    fn parses_loop_lines_only() {
        let text = "calls loop=pipe ops=5\nloop mode=none-b rep=2 loop=select select ops=9 ns=90 ns_per_op=10.0\nloop mode=x\n";
        assert_eq!(samples(text), vec![sample(NONE_B, 2, "select", 10.0)]);
        let text = "loop mode=tracer rep=1 loop=pipe pipe ops=9 ns_per_op=10.0 control_ns_per_op=4.0 rel=2.5 t_ms=5\n";
        assert_eq!(samples(text)[0].rel, Some(2.5));
    }

    #[test]
    fn costs_come_from_the_control_ratio_and_the_reference_time_from_the_plain_one() {
        // The host got busier in rep 2: every plain time doubled, the ratios did not.
        let mut s = Vec::new();
        for (rep, load) in [(1, 1.0), (2, 2.0)] {
            for (mode, rel) in [(NONE, 4.0), (NONE_B, 4.0), (TRACER, 4.04)] {
                s.push(Sample { rel: Some(rel), ..sample(mode, rep, "pipe", 1000.0 * load * rel / 4.0) });
            }
        }
        let st = LoopStats::compute(&s, "pipe");
        let t = &st.costs[TRACER];
        assert!((t.cost - 0.01).abs() < 1e-9 && (t.hi - 0.01).abs() < 1e-9, "{t:?}");
        assert_eq!(st.reference_ns, Some(1500.0));
    }

    #[test]
    fn t_quantiles_fall_towards_the_normal() {
        assert_eq!(t95(0), f64::INFINITY);
        assert!((t95(2) - 2.920).abs() < 1e-9);
        assert!(t95(30) > t95(31) && t95(31) > 1.645 && t95(1000) < 1.647);
    }

    #[test]
    fn spread_and_median() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
        assert!((std_dev(&[1.0, 2.0, 3.0, 4.0]) - 1.290_994).abs() < 1e-6);
        assert_eq!(std_dev(&[5.0]), 0.0);
    }

    #[test]
    fn the_reference_is_the_geometric_mean_of_the_pair_and_runs_take_their_median() {
        let mut s = pipe_reps(&[(100.0, 100.0, 110.0, 200.0), (100.0, 100.0, 110.0, 200.0)]);
        // A third run of none in rep 1, far off: the median of the period's runs ignores it.
        s.push(sample(NONE, 1, "pipe", 100.0));
        s.push(sample(NONE, 1, "pipe", 500.0));
        let st = LoopStats::compute(&s, "pipe");
        assert_eq!(st.reference_ns, Some(100.0));
        let t = &st.costs[TRACER];
        assert!((t.cost - 0.10).abs() < 1e-9);
        // No spread at all: the bounds close on the cost.
        assert!((t.lo - 0.10).abs() < 1e-9 && (t.hi - 0.10).abs() < 1e-9);
        assert_eq!(st.floor.as_ref().unwrap().ratios, vec![1.0, 1.0]);
        // Other loops' samples do not leak in.
        assert!(LoopStats::compute(&s, "select").costs.is_empty());
    }

    #[test]
    fn the_aa_spread_widens_a_mode_that_looks_steadier_than_the_run() {
        // The tracer is exactly +1 % each time, but B differs from A by ±3 %.
        let s = pipe_reps(&[
            (100.0, 103.0, 102.5, 200.0),
            (103.0, 100.0, 102.5, 200.0),
            (100.0, 103.0, 102.5, 200.0),
            (103.0, 100.0, 102.5, 200.0),
        ]);
        let st = LoopStats::compute(&s, "pipe");
        let floor = st.floor.unwrap();
        assert!(floor.sd > 0.03 && floor.resolution > 0.01, "{floor:?}");
        let t = &st.costs[TRACER];
        assert!((t.cost - 0.01).abs() < 0.001);
        assert!(t.hi - t.lo > 0.02, "bounds {t:?} must reflect the A/A noise");
    }

    #[test]
    fn results_without_the_pair_use_none_alone() {
        let mut s = Vec::new();
        for rep in 1..=3 {
            s.push(sample(NONE, rep, "pipe", 100.0));
            s.push(sample(TRACER, rep, "pipe", 101.0 + rep as f64));
        }
        let st = LoopStats::compute(&s, "pipe");
        assert!(st.floor.is_none());
        assert_eq!(st.costs[TRACER].n, 3);
        assert!((st.costs[TRACER].cost - 0.03).abs() < 0.001);
    }

    #[test]
    fn a_single_repetition_has_no_bounds() {
        assert_eq!(Cost::from_ratios(vec![1.01], 0.0), None);
        assert_eq!(Cost::from_ratios(vec![1.01, 0.0], 0.0), None);
    }

    fn cost(lo: f64, hi: f64) -> Cost {
        Cost { cost: (lo + hi) / 2.0, lo, hi, n: 4, ratios: Vec::new(), log_mean: 0.0, spread: 0.0 }
    }

    #[test]
    fn verdicts_need_the_bound_on_the_right_side() {
        assert_eq!(at_most(&cost(-0.01, 0.015), 0.02), Verdict::Met);
        assert_eq!(at_most(&cost(0.021, 0.05), 0.02), Verdict::NotMet);
        assert_eq!(at_most(&cost(0.0, 0.03), 0.02), Verdict::Unresolved);
        assert_eq!(at_floor(&cost(-0.002, 0.004)), Verdict::Met);
        assert_eq!(at_floor(&cost(0.001, 0.004)), Verdict::NotMet);
        assert_eq!(cheaper(&cost(-0.01, 0.01), &cost(0.05, 0.07), 3.0), Verdict::Met);
        assert_eq!(cheaper(&cost(0.03, 0.04), &cost(0.05, 0.07), 3.0), Verdict::NotMet);
        assert_eq!(cheaper(&cost(0.0, 0.02), &cost(0.05, 0.07), 3.0), Verdict::Unresolved);
        // bpftrace itself not measurably costly: the tracer cannot be shown 3x cheaper.
        assert_eq!(cheaper(&cost(-0.01, 0.01), &cost(-0.01, 0.02), 3.0), Verdict::Unresolved);
    }
}
