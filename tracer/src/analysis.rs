//! One analysis run, live or replayed: the engine, the grouped findings and the counts.
//! `tracer run` and `tracer analyze` both go through this, so a recorded trace replays to
//! the findings the live run printed.
use crate::{
    engine::{Added, Engine, Group, Groups, Limits},
    event::Event,
    summary::Summary,
};

#[derive(Default)]
pub struct Analysis {
    engine: Engine,
    groups: Groups,
    events: u64,
}

impl Analysis {
    /// An analysis that folds the uses of one load into one root-cause finding.
    pub fn new(limits: Limits) -> Analysis {
        Analysis::with_folding(limits, true)
    }

    /// `fold: false` reports every use on its own (`--no-fold`).
    pub fn with_folding(limits: Limits, fold: bool) -> Analysis {
        Analysis { engine: Engine::new(limits), groups: Groups::new(fold), events: 0 }
    }

    /// Feeds one event; `on_new` sees each finding that opens a new group, as it happens.
    pub fn feed(&mut self, event: &Event, mut on_new: impl FnMut(&Group)) {
        self.events += 1;
        for finding in self.engine.process(event) {
            if let Added::New(i) = self.groups.add(finding) {
                on_new(self.groups.get(i));
            }
        }
    }

    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn summary(&self) -> Summary {
        Summary::new(self.events, *self.engine.stats(), &self.groups)
    }
}
