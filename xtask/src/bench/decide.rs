//! Whether one more repetition is worth its time, and of which modes: asked by the guest
//! after each repetition (`bench-guest decide`), from the figures so far. More repetitions
//! narrow the bounds of a cost only as the square root of their number, so the bound is a
//! count and a time budget; and only the modes a still-open target needs are run again.
//!
//! Deciding after looking at the data makes a "met" slightly more likely than the nominal
//! 95 % bound says; the bench reports how many repetitions it took and why it stopped.
use super::stats::{
    BPFTRACE, CHEAPER_FACTOR, Cost, LoopStats, NONE, NONE_B, SLOWDOWN_TARGET, TRACER, Verdict, at_floor, at_most,
    cheaper, t95,
};

/// The same cost and spread as if measured in `n` repetitions: what more repetitions would
/// make of the bounds, were the figures to stay what they are.
pub fn projected(c: &Cost, n: usize) -> Cost {
    let n = n.max(2);
    let half = t95(n - 1) * c.spread / (n as f64).sqrt();
    Cost { lo: (c.log_mean - half).exp_m1(), hi: (c.log_mean + half).exp_m1(), n, ..c.clone() }
}

/// What is still open after some repetitions.
#[derive(Debug, Default, PartialEq)]
pub struct Open {
    /// The modes one more repetition should run (the A/A pair and the tracer always).
    pub modes: Vec<&'static str>,
    /// Every target still unresolved, with its figures.
    pub why: Vec<String>,
    /// Of those, the ones that would stay unresolved even at `max_reps` repetitions if the
    /// costs and spreads stayed what they are.
    pub beyond: Vec<String>,
}

/// The targets that decide whether more repetitions are worth their time, per loop: the
/// tracer's slowdown and its comparison with bpftrace.
pub fn unresolved(stats: &[(&str, LoopStats)], max_reps: usize) -> Open {
    let mut bpftrace = false;
    let mut open = Open::default();
    for (lp, s) in stats {
        let Some(tracer) = s.costs.get(TRACER) else {
            open.why.push(format!("{lp}: the tracer's cost is not measured yet"));
            continue;
        };
        // Whether some repetition count up to the maximum would resolve it, were the costs
        // and spreads to stay what they are.
        let reachable = |resolved: &dyn Fn(usize) -> bool| (tracer.n..=max_reps).any(resolved);
        if at_most(tracer, SLOWDOWN_TARGET) == Verdict::Unresolved {
            let figures = format!(
                "{lp}: tracer {:+.2} % ({:+.2}…{:+.2})",
                tracer.cost * 100.0,
                tracer.lo * 100.0,
                tracer.hi * 100.0
            );
            if !reachable(&|n| at_most(&projected(tracer, n), SLOWDOWN_TARGET) != Verdict::Unresolved) {
                open.beyond.push(figures.clone());
            }
            open.why.push(figures);
        }
        if let Some(b) = s.costs.get(BPFTRACE)
            && cheaper(tracer, b, CHEAPER_FACTOR) == Verdict::Unresolved
        {
            let figures = format!("{lp}: tracer vs bpftrace {:+.2} % vs {:+.2} %", tracer.cost * 100.0, b.cost * 100.0);
            if reachable(&|n| cheaper(&projected(tracer, n), &projected(b, n), CHEAPER_FACTOR) != Verdict::Unresolved) {
                bpftrace = true;
            } else {
                open.beyond.push(figures.clone());
            }
            open.why.push(figures);
        }
    }
    open.modes = vec![NONE, NONE_B, TRACER];
    if bpftrace {
        open.modes.push(BPFTRACE);
    }
    open
}

/// One line on where the loops stand: per loop the A/A floor, the tracer's cost with its
/// bounds and its verdicts, bpftrace's cost.
pub fn state(stats: &[(&str, LoopStats)]) -> String {
    let pct = |x: f64| format!("{:+.2} %", x * 100.0);
    let mut parts = Vec::new();
    for (lp, s) in stats {
        let mut part = format!("{lp}:");
        if let Some(f) = &s.floor {
            part.push_str(&format!(" A/A floor ±{:.2} % ({} reps)", f.resolution * 100.0, f.ratios.len()));
        }
        if let Some(t) = s.costs.get(TRACER) {
            part.push_str(&format!(
                ", tracer {} ({}…{}), at the floor {}, ≤ {:.0} % {}",
                pct(t.cost),
                pct(t.lo),
                pct(t.hi),
                at_floor(t).describe(),
                SLOWDOWN_TARGET * 100.0,
                at_most(t, SLOWDOWN_TARGET).describe()
            ));
        }
        if let Some(b) = s.costs.get(BPFTRACE) {
            part.push_str(&format!(", bpftrace {}", pct(b.cost)));
        }
        if let Some(ns) = s.reference_ns {
            part.push_str(&format!(", no tracer {ns:.0} ns/op"));
        }
        parts.push(part);
    }
    parts.join("; ")
}

/// Where a run of repetitions stands, for the decision on one more.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub reps_done: u32,
    pub max_reps: u32,
    /// Seconds spent on extra repetitions so far, and the most they may take.
    pub extra_secs: f64,
    pub budget_secs: f64,
    /// The last repetition: its duration and how many mode periods it had.
    pub last_rep_secs: f64,
    pub last_rep_modes: usize,
}

/// Whether to run one more repetition, and of which modes.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    More(Vec<&'static str>),
    Enough(String),
}

pub fn decide(stats: &[(&str, LoopStats)], progress: Progress) -> Decision {
    let open = unresolved(stats, progress.max_reps as usize);
    if open.why.is_empty() {
        return Decision::Enough("every target is resolved".to_owned());
    }
    let still = open.why.join("; ");
    if progress.reps_done >= progress.max_reps {
        return Decision::Enough(format!("{} repetitions is the maximum; still open: {still}", progress.max_reps));
    }
    if open.beyond.len() == open.why.len() {
        return Decision::Enough(format!(
            "at this noise even {} repetitions would not resolve what is open: {still}",
            progress.max_reps
        ));
    }
    let per_mode = progress.last_rep_secs / progress.last_rep_modes.max(1) as f64;
    let next = per_mode * open.modes.len() as f64;
    if progress.extra_secs + next > progress.budget_secs {
        return Decision::Enough(format!(
            "one more repetition (~{next:.0} s) would pass the {:.0} s budget for extra ones; still open: {still}",
            progress.budget_secs
        ));
    }
    Decision::More(open.modes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Sample, all_loops, samples::*};

    fn progress(reps_done: u32) -> Progress {
        Progress { reps_done, max_reps: 8, extra_secs: 0.0, budget_secs: 300.0, last_rep_secs: 40.0, last_rep_modes: 4 }
    }

    #[test]
    fn projected_bounds_narrow_as_the_root_of_the_repetitions() {
        let c = Cost::from_ratios(vec![0.98, 1.02, 1.0], 0.0).unwrap();
        let later = projected(&c, 12);
        let ratio = (later.hi - later.lo) / (c.hi - c.lo);
        let expected = t95(11) / t95(2) * (3.0f64 / 12.0).sqrt();
        assert!((ratio - expected).abs() < 0.01, "{ratio} vs {expected}");
        assert_eq!(later.cost, c.cost);
    }

    #[test]
    fn resolved_targets_end_the_repetitions() {
        let s = pipe_reps(&[(100.0, 100.1, 100.2, 150.0), (100.1, 100.0, 100.1, 151.0), (100.0, 100.0, 100.0, 149.0)]);
        // select: the same shape.
        let mut all = s.clone();
        all.extend(s.iter().map(|x| Sample { lp: "select".into(), ..x.clone() }));
        assert_eq!(decide(&all_loops(&all), progress(3)), Decision::Enough("every target is resolved".into()));
    }

    #[test]
    fn noise_asks_for_the_tracer_and_the_pair_until_the_maximum_or_the_budget() {
        let s = pipe_reps(&[(100.0, 101.0, 101.0, 150.0), (101.0, 100.0, 101.5, 151.0), (100.0, 101.0, 100.5, 149.0)]);
        let mut all = s.clone();
        all.extend(s.iter().map(|x| Sample { lp: "select".into(), ..x.clone() }));
        assert_eq!(decide(&all_loops(&all), progress(3)), Decision::More(vec![NONE, NONE_B, TRACER]));
        assert!(matches!(decide(&all_loops(&all), progress(8)), Decision::Enough(why) if why.contains("maximum")));
        let late = Progress { extra_secs: 280.0, ..progress(4) };
        assert!(matches!(decide(&all_loops(&all), late), Decision::Enough(why) if why.contains("budget")));
    }

    #[test]
    fn noise_no_repetition_count_allowed_could_beat_ends_them_at_once() {
        // A/A ±10 %: resolving 2 % would take hundreds of repetitions.
        let s = pipe_reps(&[(100.0, 110.0, 104.0, 200.0), (110.0, 100.0, 103.0, 201.0), (100.0, 111.0, 107.0, 199.0)]);
        let mut all = s.clone();
        all.extend(s.iter().map(|x| Sample { lp: "select".into(), ..x.clone() }));
        let open = unresolved(&all_loops(&all), 8);
        assert_eq!(open.beyond.len(), 2, "{open:?}");
        assert!(
            matches!(decide(&all_loops(&all), progress(3)), Decision::Enough(why) if why.contains("at this noise"))
        );
    }

    #[test]
    fn an_unclear_comparison_with_bpftrace_brings_bpftrace_back() {
        // bpftrace costs about 6 %, the tracer about 1.3 %: at three repetitions the bounds
        // overlap a third of bpftrace's, at eight they would not.
        let s = pipe_reps(&[(100.0, 100.5, 101.0, 106.0), (100.5, 100.0, 102.0, 105.0), (100.0, 100.2, 101.5, 107.0)]);
        match decide(&all_loops(&s), progress(3)) {
            Decision::More(modes) => assert!(modes.contains(&BPFTRACE), "{modes:?}"),
            other => panic!("expected more repetitions, got {other:?}"),
        }
    }
}
