//! What the engine reports, and how identical reports are grouped.
use std::{fmt, hash::Hash, str::FromStr, sync::Arc};

use rustc_hash::FxHashMap;

use crate::event::{Access, Stack};

/// The finding classes of DESIGN §2; their names are part of the CLI contract.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    UnlockedUse,
    StaleUse,
    UnlockedErase,
    UseAfterFree,
    RuleMismatch,
}

impl Class {
    pub const ALL: [Class; 5] = [
        Class::UnlockedUse,
        Class::StaleUse,
        Class::UnlockedErase,
        Class::UseAfterFree,
        Class::RuleMismatch,
    ];

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
        Class::ALL
            .into_iter()
            .find(|class| class.name() == s)
            .ok_or_else(|| format!("unknown finding class {s:?}"))
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
    /// The dport's port lock and free lock (0 when the dport is unknown).
    pub port_lock: u64,
    pub free_lock: u64,
    pub expected_lock: Option<ExpectedLock>,
    /// Tracked mutexes this thread held at the time, in acquisition order.
    pub held_locks: Vec<u64>,
    pub load: Option<LoadInfo>,
    /// Where the expected lock was taken, when it is held.
    pub lock: Option<LockInfo>,
    pub free: Option<FreeInfo>,
    /// For an inline dereference: the member touched, its size, read or write.
    pub access: Option<Arc<Access>>,
    /// One sentence on what exactly went wrong.
    pub reason: &'static str,
}

/// Identical findings share a class and a use stack, or a class and a site when there is
/// no stack (syzbot-style titles).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum GroupKey {
    Stack(Class, Stack),
    Site(Class, Arc<str>),
}

impl GroupKey {
    fn of(finding: &Finding) -> GroupKey {
        match &finding.stack {
            Some(stack) if !stack.is_empty() => GroupKey::Stack(finding.class, stack.clone()),
            _ => GroupKey::Site(finding.class, finding.site.clone()),
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
}

/// Findings grouped in order of first occurrence.
#[derive(Default)]
pub struct Groups {
    index: FxHashMap<GroupKey, usize>,
    groups: Vec<Group>,
}

/// Whether `Groups::add` opened a new group.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Added {
    New(usize),
    Repeat(usize),
}

impl Groups {
    pub fn add(&mut self, finding: Finding) -> Added {
        let key = GroupKey::of(&finding);
        if let Some(&i) = self.index.get(&key) {
            let group = &mut self.groups[i];
            group.count += 1;
            group.last_ts = group.last_ts.max(finding.ts);
            return Added::Repeat(i);
        }
        let i = self.groups.len();
        self.index.insert(key, i);
        self.groups.push(Group { last_ts: finding.ts, finding, count: 1 });
        Added::New(i)
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

    /// (groups, occurrences) of one class.
    pub fn count_class(&self, class: Class) -> (u64, u64) {
        self.groups
            .iter()
            .filter(|g| g.finding.class == class)
            .fold((0, 0), |(groups, occurrences), g| (groups + 1, occurrences + g.count))
    }
}
