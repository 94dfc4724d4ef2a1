//! Site coverage: for every probed load, use and deref site, how often its probe ran, how
//! often it reported a tracked dport, and how often the engine judged what it reported. A
//! gate that passes because the workload never reached the code proves nothing: the sites
//! that never ran are listed.
use std::{collections::BTreeMap, sync::Arc};

/// What a site is, for coverage.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// The return of a `call xa_load` (a lookup).
    Load,
    /// The entry of a function taking `struct cxl_dport *`.
    Use,
    /// An instruction accessing a dport's field.
    Deref,
}

impl SiteKind {
    pub const ALL: [SiteKind; 3] = [SiteKind::Load, SiteKind::Use, SiteKind::Deref];

    pub const fn name(self) -> &'static str {
        match self {
            SiteKind::Load => "load",
            SiteKind::Use => "use",
            SiteKind::Deref => "deref",
        }
    }

    pub fn from_name(name: &str) -> Option<SiteKind> {
        SiteKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One site's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRun {
    pub kind: SiteKind,
    /// "match_port_by_dport+0x4a", "cxl_add_ep", "cxl_mem_probe+0x19a [cxl_mem]"-style: the
    /// return address of a load, the function of a use, the instruction of a deref.
    pub place: Arc<str>,
    /// The function it is in (a use site's is itself).
    pub function: Arc<str>,
    /// How often its probe ran.
    pub ran: u64,
    /// How often it reported a tracked dport to the engine.
    pub reported: u64,
    /// How often the engine judged what it reported (a pointer the thread was seen loading).
    pub judged: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub sites: Vec<SiteRun>,
}

/// (sites, sites that ran, reports, judged) of one kind.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KindTotals {
    pub sites: usize,
    pub ran: usize,
    pub reported: u64,
    pub judged: u64,
}

impl Coverage {
    pub fn totals(&self, kind: SiteKind) -> KindTotals {
        self.sites.iter().filter(|s| s.kind == kind).fold(KindTotals::default(), |t, s| KindTotals {
            sites: t.sites + 1,
            ran: t.ran + usize::from(s.ran > 0),
            reported: t.reported + s.reported,
            judged: t.judged + s.judged,
        })
    }

    /// The functions whose sites of `kind` never ran, with how many sites each.
    pub fn never_ran(&self, kind: SiteKind) -> Vec<(Arc<str>, usize)> {
        let mut by_function: BTreeMap<Arc<str>, usize> = BTreeMap::new();
        for s in self.sites.iter().filter(|s| s.kind == kind && s.ran == 0) {
            *by_function.entry(s.function.clone()).or_default() += 1;
        }
        by_function.into_iter().collect()
    }

    /// Fills in `judged` from the engine's counts by place (uses and derefs), and for loads
    /// from what they reported (every reported load is judged).
    pub fn with_judged(mut self, judged: impl Fn(SiteKind, &str) -> u64) -> Coverage {
        for s in &mut self.sites {
            s.judged = match s.kind {
                SiteKind::Load => s.reported,
                kind => judged(kind, &s.place),
            };
        }
        self
    }
}
