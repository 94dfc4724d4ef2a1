//! End-of-run accounting: every event seen, lost or undecodable, and the findings by class.
use tracer_common::Counter;

use crate::{
    coverage::Coverage,
    engine::{Class, EngineStats, Groups},
    known::{Entry, Known},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events fed to the engine.
    pub events: u64,
    /// Records that could not be decoded (each one counted, none silently skipped).
    pub undecodable: u64,
    /// Kernel-side counters by name (drops per reason, lost stacks...).
    pub kernel: Vec<(String, u64)>,
    /// Bytes at the end of a trace file cut off mid-record.
    pub truncated_bytes: u64,
    pub engine: EngineStats,
    /// (class, grouped findings, occurrences), for every class: known ones included.
    pub findings: Vec<(Class, u64, u64)>,
    /// Of those, the known ones (`--known`): (class, grouped findings, occurrences).
    pub known: Vec<(Class, u64, u64)>,
    /// Known entries no finding matched.
    pub known_unseen: Vec<Entry>,
    /// Which probed sites ran (a live run, or a trace that recorded it).
    pub coverage: Option<Coverage>,
}

impl Summary {
    pub fn new(events: u64, engine: EngineStats, groups: &Groups, known: &Known) -> Summary {
        let count = |class: Class, known_only: bool| {
            let matching =
                groups.iter().filter(|g| g.finding.class == class && (!known_only || known.reason(g).is_some()));
            matching.fold((class, 0, 0), |(class, n, occurrences), g| (class, n + 1, occurrences + g.count))
        };
        Summary {
            events,
            engine,
            findings: Class::ALL.into_iter().map(|class| count(class, false)).collect(),
            known: if known.is_empty() {
                Vec::new()
            } else {
                Class::ALL.into_iter().map(|class| count(class, true)).collect()
            },
            known_unseen: known.unseen(groups.iter()).into_iter().cloned().collect(),
            ..Summary::default()
        }
    }

    /// Kernel drops by reason (only the counters that stand for lost events).
    pub fn drops(&self) -> impl Iterator<Item = (&str, u64)> {
        self.kernel.iter().filter(|(name, _)| is_drop_counter(name)).map(|(name, value)| (name.as_str(), *value))
    }

    /// Events lost in the kernel, all reasons together.
    pub fn dropped(&self) -> u64 {
        self.drops().map(|(_, n)| n).sum()
    }

    pub fn finding_groups(&self) -> u64 {
        self.findings.iter().map(|(_, n, _)| n).sum()
    }

    pub fn known_groups(&self) -> u64 {
        self.known.iter().map(|(_, n, _)| n).sum()
    }

    /// Findings that are not known: what the exit status and `--strict` judge.
    pub fn new_groups(&self) -> u64 {
        self.finding_groups() - self.known_groups()
    }

    /// Whether anything was lost: drops, undecodable records, a truncated tail, evictions.
    pub fn lost_anything(&self) -> bool {
        self.dropped() > 0 || self.undecodable > 0 || self.truncated_bytes > 0 || self.engine.evicted() > 0
    }
}

fn is_drop_counter(name: &str) -> bool {
    Counter::ALL.iter().any(|c| c.is_drop() && c.name() == name)
}
