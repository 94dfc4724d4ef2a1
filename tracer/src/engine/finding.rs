//! What the engine reports, and how identical reports are grouped.
use std::{fmt, hash::Hash, str::FromStr, sync::Arc};

use rustc_hash::FxHashMap;

use crate::event::{Access, LockMode, Stack, frame_function};

/// The finding classes of docs/design.md section 2; their names are part of the CLI contract.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    UnlockedUse,
    StaleUse,
    UnlockedErase,
    UseAfterFree,
    RuleMismatch,
}

impl Class {
    pub const ALL: [Class; 5] =
        [Class::UnlockedUse, Class::StaleUse, Class::UnlockedErase, Class::UseAfterFree, Class::RuleMismatch];

    pub const fn name(self) -> &'static str {
        match self {
            Class::UnlockedUse => "unlocked-use",
            Class::StaleUse => "stale-use",
            Class::UnlockedErase => "unlocked-erase",
            Class::UseAfterFree => "use-after-free",
            Class::RuleMismatch => "rule-mismatch",
        }
    }

    /// Read-side classes: what a reader of `port->dports` can get wrong.
    pub const fn is_read_side(self) -> bool {
        matches!(self, Class::UnlockedUse | Class::StaleUse | Class::UseAfterFree)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Class {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL.into_iter().find(|class| class.name() == s).ok_or_else(|| format!("unknown finding class {s:?}"))
    }
}

/// Which of a dport's two locks a rule is about.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LockRole {
    /// `&host->mutex`: held across the devres teardown that frees the dport.
    Free,
    /// `&port->dev.mutex`: serializes writers of `port->dports`.
    Port,
}

impl LockRole {
    pub const fn name(self) -> &'static str {
        match self {
            LockRole::Free => "free lock",
            LockRole::Port => "port lock",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ExpectedLock {
    pub role: LockRole,
    pub addr: u64,
    /// What the lock is in kernel terms, e.g. "&port->uport_dev->mutex".
    pub what: &'static str,
}

/// A lock a thread held when a finding happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    pub lock: u64,
    pub mode: LockMode,
    /// Where it was taken: its lock call's return site (`None`: not seen taken, the kernel's
    /// `mutex->owner` said it is held).
    pub at: Option<Arc<str>>,
    /// The global it is, when its call site names one (`cxl_rwsem.region`).
    pub name: Option<Arc<str>>,
}

impl HeldLock {
    /// What it is to the finding's dport, if anything: "this dport's free lock", ...
    pub fn role(&self, f: &Finding) -> Option<&'static str> {
        let l = self.lock;
        Some(if l == f.free_lock && l == f.port_lock {
            "this dport's port lock and free lock"
        } else if l == f.free_lock {
            "this dport's free lock"
        } else if l == f.port_lock {
            "this dport's port lock"
        } else if l == f.uport_lock {
            "&port->uport_dev->mutex of this dport's port"
        } else {
            return None;
        })
    }

    /// "mutex", "rw_semaphore held for read", "rw_semaphore held for write".
    pub fn kind(&self) -> &'static str {
        match self.mode {
            LockMode::Mutex => "mutex",
            LockMode::Read => "rw_semaphore held for read",
            LockMode::Write => "rw_semaphore held for write",
        }
    }
}

/// The `xa_load` a judged reference came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadInfo {
    pub ts: u64,
    pub stack: Option<Stack>,
    /// Whether the free lock was held when the dport was loaded.
    pub free_lock_held: bool,
}

/// The acquisition of the expected lock, when the thread holds it (a stale use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub ts: u64,
    /// `None` when it was taken before tracing started or outside probed code.
    pub stack: Option<Stack>,
}

/// The free of the dport's memory, when a finding involves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreeInfo {
    pub ts: u64,
    pub tid: u32,
    pub comm: Arc<str>,
    pub stack: Option<Stack>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub class: Class,
    /// When the offending event happened.
    pub ts: u64,
    pub tid: u32,
    pub comm: Arc<str>,
    /// The function where it happened (the use site, or the function of the innermost frame).
    pub site: Arc<str>,
    pub stack: Option<Stack>,
    pub dport: u64,
    /// 1 for the first dport seen at this address, +1 for each reuse after a free.
    pub generation: u32,
    pub port: u64,
    pub root: bool,
    /// The dport's port lock and free lock (0 when the dport is unknown), and its port's
    /// `&port->uport_dev->mutex` (0 when not known).
    pub port_lock: u64,
    pub free_lock: u64,
    pub uport_lock: u64,
    pub expected_lock: Option<ExpectedLock>,
    /// The locks this thread held at the time, in acquisition order: the dport's own, and
    /// every mutex and rw_semaphore taken at a call site in CXL code.
    pub held_locks: Vec<HeldLock>,
    pub load: Option<LoadInfo>,
    /// Where the expected lock was taken, when it is held.
    pub lock: Option<LockInfo>,
    pub free: Option<FreeInfo>,
    /// For an inline dereference: the member touched, its size, read or write.
    pub access: Option<Arc<Access>>,
    /// One sentence on what exactly went wrong.
    pub reason: &'static str,
}

impl Finding {
    /// The finding's stable title, the same across runs, kernels, addresses and threads:
    /// its class and function, and for an inline access the member and how it was touched
    /// (`unlocked-use in cxl_mem_probe (read of dport->rch)`). Known-findings files list
    /// these (`known.rs`).
    pub fn title(&self) -> String {
        match &self.access {
            Some(access) => format!("{} in {} ({} of dport->{})", self.class, self.site, access.verb(), access.member),
            None => format!("{} in {}", self.class, self.site),
        }
    }
}

/// Identical findings share a class and a use stack, or a class and a site when there is
/// no stack (syzbot-style titles), and the lock rule their dport falls under: a root
/// dport's (the root's uport_dev mutex) or another port's (its port's own mutex). One code
/// path can meet both, as `cxl_mem_probe()` does below a virtual host (a switch or host
/// bridge port's dport) and below an RCH (a dport of the root): two facts, two fixes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum GroupKey {
    Stack(Class, Stack, bool),
    Site(Class, Arc<str>, bool),
}

impl GroupKey {
    fn of(finding: &Finding) -> GroupKey {
        match &finding.stack {
            Some(stack) if !stack.is_empty() => GroupKey::Stack(finding.class, stack.clone(), finding.root),
            _ => GroupKey::Site(finding.class, finding.site.clone(), finding.root),
        }
    }
}

/// A finding and how many identical occurrences it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The first occurrence.
    pub finding: Finding,
    pub count: u64,
    /// Time of the last occurrence.
    pub last_ts: u64,
    /// The other uses of the same loaded pointer in the same call chain, folded into this
    /// root cause, in order of first occurrence.
    pub also_at: Vec<AlsoAt>,
}

/// A use folded into a root-cause finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlsoAt {
    pub class: Class,
    /// The function the dport was passed to, or the function of the accessing instruction.
    pub site: Arc<str>,
    /// For an inline access: what it touched.
    pub access: Option<Arc<Access>>,
    pub count: u64,
}

impl AlsoAt {
    fn of(finding: &Finding) -> AlsoAt {
        AlsoAt { class: finding.class, site: finding.site.clone(), access: finding.access.clone(), count: 1 }
    }

    fn same_place(&self, other: &AlsoAt) -> bool {
        self.class == other.class && self.site == other.site && self.access == other.access
    }
}

/// The invocation a loaded pointer was used in: the thread, the load (its time), and the
/// call chain below the function that holds the pointer (the frames the load stack and the
/// use stack share, bottom up), and the class. Uses with the same key come from one
/// lockless lookup in one call of one function, wrong in the same way: one root cause.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LoadKey {
    class: Class,
    tid: u32,
    load_ts: u64,
    holder: Arc<str>,
    chain: Vec<Arc<str>>,
}

impl LoadKey {
    fn of(finding: &Finding) -> Option<LoadKey> {
        let load = finding.load.as_ref()?;
        let (load_stack, use_stack) = (load.stack.as_ref()?, finding.stack.as_ref()?);
        let shared = load_stack.iter().rev().zip(use_stack.iter().rev()).take_while(|(a, b)| a == b).count();
        // The holder is the function both stacks are in just above the shared frames: the
        // load went out of it through one call, the use through another (or is in it).
        let load_frame = load_stack.iter().rev().nth(shared)?;
        let use_frame = use_stack.iter().rev().nth(shared)?;
        let holder = frame_function(load_frame);
        if holder != frame_function(use_frame) {
            return None;
        }
        let chain = use_stack.iter().rev().take(shared).cloned().collect();
        Some(LoadKey { class: finding.class, tid: finding.tid, load_ts: load.ts, holder: Arc::from(holder), chain })
    }
}

/// Loads remembered for folding; older ones are forgotten (their later uses then open
/// groups of their own, which only makes a report longer).
const MAX_LOADS: usize = 4096;

/// Findings grouped in order of first occurrence; with folding, the uses of one load in
/// one call chain are one group at the outermost use.
#[derive(Default)]
pub struct Groups {
    index: FxHashMap<GroupKey, usize>,
    groups: Vec<Group>,
    /// Fold uses of the same load into one root cause (`--no-fold` turns it off).
    fold: bool,
    /// Each recent load's root group.
    loads: FxHashMap<LoadKey, usize>,
    load_order: std::collections::VecDeque<LoadKey>,
}

/// What `Groups::add` did with a finding.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Added {
    /// It opened a new group.
    New(usize),
    /// It is one more occurrence of a group.
    Repeat(usize),
    /// It is another use of a group's load, folded into it.
    Folded(usize),
}

impl Groups {
    /// Groups that fold the uses of one load into one root cause when `fold` is set.
    pub fn new(fold: bool) -> Groups {
        Groups { fold, ..Groups::default() }
    }

    pub fn add(&mut self, finding: Finding) -> Added {
        let load = if self.fold && finding.class.is_read_side() { LoadKey::of(&finding) } else { None };
        if let Some(load) = &load
            && let Some(&root) = self.loads.get(load)
        {
            self.fold_into(root, &finding);
            return Added::Folded(root);
        }
        let key = GroupKey::of(&finding);
        let added = if let Some(&i) = self.index.get(&key) {
            let group = &mut self.groups[i];
            group.count += 1;
            group.last_ts = group.last_ts.max(finding.ts);
            Added::Repeat(i)
        } else {
            let i = self.groups.len();
            self.index.insert(key, i);
            self.groups.push(Group { last_ts: finding.ts, finding, count: 1, also_at: Vec::new() });
            Added::New(i)
        };
        if let (Some(load), Added::New(i) | Added::Repeat(i)) = (load, added) {
            self.remember(load, i);
        }
        added
    }

    fn fold_into(&mut self, root: usize, finding: &Finding) {
        let group = &mut self.groups[root];
        let also = AlsoAt::of(finding);
        // The root's own place, seen again in a later occurrence of the same root cause.
        if also.same_place(&AlsoAt::of(&group.finding)) {
            return;
        }
        match group.also_at.iter_mut().find(|a| a.same_place(&also)) {
            Some(existing) => existing.count += 1,
            None => group.also_at.push(also),
        }
    }

    fn remember(&mut self, load: LoadKey, group: usize) {
        if self.loads.len() >= MAX_LOADS
            && let Some(old) = self.load_order.pop_front()
        {
            self.loads.remove(&old);
        }
        self.load_order.push_back(load.clone());
        self.loads.insert(load, group);
    }

    pub fn get(&self, i: usize) -> &Group {
        &self.groups[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}
