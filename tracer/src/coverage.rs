//! Site coverage: for every probed load, use and deref site, how often its probe ran, how
//! often it reported a tracked dport, and how often the engine judged what it reported. A
//! gate that passes because the workload never reached the code proves nothing: the sites
//! that never ran are listed. Only dport sites count: a load site is one when its code
//! passes `&port->dports`, or when it returned a dport; a load site whose xarray is not
//! known statically and that never returned a dport is counted apart.
use std::{collections::BTreeMap, sync::Arc};

pub use crate::kernel::callsites::XaTarget;

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
    /// A load site's xarray as its code shows it (a use or deref site: `Dports`).
    pub xarray: XaTarget,
    /// The source file of its function, when known (`drivers/cxl/mem.c`).
    pub file: Option<Arc<str>>,
}

impl SiteRun {
    /// Whether it is a dport site: every use site; a load site whose code passes
    /// `&port->dports`, or whose xarray is not known; a deref site a dport lookup reaches;
    /// and any site that reported a dport.
    pub fn is_dport_site(&self) -> bool {
        match self.kind {
            SiteKind::Use => true,
            SiteKind::Load | SiteKind::Deref => self.xarray == XaTarget::Dports || self.reported > 0,
        }
    }

    /// A site read as being about another xarray that reported a dport: the reading was
    /// wrong (the site was probed all the same, so nothing was missed).
    pub fn misread(&self) -> bool {
        self.xarray == XaTarget::Other && self.reported > 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub sites: Vec<SiteRun>,
}

/// A function whose dport sites never ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeverRan {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    pub sites: usize,
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
    /// The dport sites of `kind`.
    pub fn totals(&self, kind: SiteKind) -> KindTotals {
        self.sites.iter().filter(|s| s.kind == kind && s.is_dport_site()).fold(KindTotals::default(), |t, s| {
            KindTotals {
                sites: t.sites + 1,
                ran: t.ran + usize::from(s.ran > 0),
                reported: t.reported + s.reported,
                judged: t.judged + s.judged,
            }
        })
    }

    /// The functions whose dport sites of `kind` never ran, with their source file when
    /// known and how many sites each.
    pub fn never_ran(&self, kind: SiteKind) -> Vec<NeverRan> {
        let mut by_function: BTreeMap<Arc<str>, NeverRan> = BTreeMap::new();
        for s in self.sites.iter().filter(|s| s.kind == kind && s.ran == 0 && s.is_dport_site()) {
            let entry = by_function.entry(s.function.clone()).or_insert_with(|| NeverRan {
                function: s.function.clone(),
                file: s.file.clone(),
                sites: 0,
            });
            entry.sites += 1;
        }
        by_function.into_values().collect()
    }

    /// Load sites whose xarray is not known statically and that never returned a dport:
    /// (sites, of which ran).
    pub fn unknown_loads(&self) -> (usize, usize) {
        let unknown =
            self.sites.iter().filter(|s| s.kind == SiteKind::Load && s.xarray == XaTarget::Unknown && s.reported == 0);
        unknown.fold((0, 0), |(n, ran), s| (n + 1, ran + usize::from(s.ran > 0)))
    }

    /// Sites about another xarray, as their code reads (not dport sites unless they reported
    /// one): (load sites, deref sites).
    pub fn other_sites(&self) -> (usize, usize) {
        let other = |kind| self.sites.iter().filter(|s| s.kind == kind && !s.is_dport_site()).count();
        (other(SiteKind::Load) - self.unknown_loads().0, other(SiteKind::Deref))
    }

    /// The places of the sites `misread`.
    pub fn misread(&self) -> Vec<Arc<str>> {
        self.sites.iter().filter(|s| s.misread()).map(|s| s.place.clone()).collect()
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
