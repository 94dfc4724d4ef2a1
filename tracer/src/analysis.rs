//! One analysis run, live or replayed: the engine, the grouped findings and the counts.
//! `tracer run` and `tracer analyze` both go through this, so a recorded trace replays to
//! the findings the live run printed.
use crate::{
    coverage::Coverage,
    engine::{Added, Engine, Group, Groups, Limits},
    event::{Event, Kind},
    known::Known,
    summary::Summary,
};

/// A finding that opened a new group, and why it is known, if it is.
pub struct NewGroup<'a> {
    pub group: &'a Group,
    pub known: Option<&'a str>,
}

#[derive(Default)]
pub struct Analysis {
    engine: Engine,
    groups: Groups,
    /// Findings known not to be new (`--known`): reported apart, not failing the run.
    known: Known,
    events: u64,
    /// Events about dports (anything but lock and unlock): without any, there was no CXL
    /// activity to judge.
    dport_events: u64,
}

impl Analysis {
    /// An analysis that folds the uses of one load into one root-cause finding.
    pub fn new(limits: Limits) -> Analysis {
        Analysis::with_folding(limits, true)
    }

    /// `fold: false` reports every use on its own (`--no-fold`).
    pub fn with_folding(limits: Limits, fold: bool) -> Analysis {
        Analysis { engine: Engine::new(limits), groups: Groups::new(fold), ..Analysis::default() }
    }

    /// Feeds one event; `on_new` sees each finding that opens a new group, as it happens.
    pub fn feed(&mut self, event: &Event, mut on_new: impl FnMut(NewGroup<'_>)) {
        self.events += 1;
        if !matches!(event.kind, Kind::Lock { .. } | Kind::Unlock { .. }) {
            self.dport_events += 1;
        }
        for finding in self.engine.process(event) {
            if let Added::New(i) = self.groups.add(finding) {
                let group = self.groups.get(i);
                on_new(NewGroup { group, known: self.known.reason(group) });
            }
        }
    }

    /// Findings with these titles are known: reported apart, not judged new.
    pub fn with_known(mut self, known: Known) -> Analysis {
        self.known = known;
        self
    }

    pub fn known(&self) -> &Known {
        &self.known
    }

    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Why `group` is known, if it is.
    pub fn known_reason(&self, group: &Group) -> Option<&str> {
        self.known.reason(group)
    }

    /// Whether any finding is not known: the exit status's `findings`.
    pub fn has_new_findings(&self) -> bool {
        self.groups.iter().any(|g| self.known.reason(g).is_none())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Why a clean result means nothing, if it does: no events at all, or none about a dport
    /// (a crashed recorder, a wrong file, a workload that never reached CXL code).
    pub fn silence(&self) -> Option<&'static str> {
        if self.events == 0 {
            Some("no events at all")
        } else if self.dport_events == 0 {
            Some("no event about a dport (only lock events): no CXL lookup, use, write or free was seen")
        } else {
            None
        }
    }

    /// `coverage` (from the kernel's per-site counters) with the engine's judged counts.
    pub fn judge_coverage(&self, coverage: Coverage) -> Coverage {
        coverage.with_judged(|_, place| self.engine.judged_at(place))
    }

    pub fn summary(&self) -> Summary {
        Summary::new(self.events, *self.engine.stats(), &self.groups, &self.known)
    }
}
