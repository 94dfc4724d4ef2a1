//! Per-dport and per-thread state, bounded.
use std::{collections::VecDeque, sync::Arc};

use rustc_hash::FxHashMap;

use super::finding::FreeInfo;
use crate::event::{LockMode, Stack};

/// Caps on the engine's state; what goes past them is evicted and counted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Live (not freed) dports tracked at once.
    pub max_dports: usize,
    /// Freed dports remembered to recognise a use-after-free.
    pub max_freed_dports: usize,
    /// Threads with state (held locks or loaded references).
    pub max_threads: usize,
    /// References a thread keeps (one per dport it loaded).
    pub max_refs_per_thread: usize,
    /// Locks a thread holds at once (past it, a lock whose release was not seen is
    /// forgotten first).
    pub max_held_per_thread: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dports: 65_536,
            max_freed_dports: 16_384,
            max_threads: 16_384,
            max_refs_per_thread: 64,
            max_held_per_thread: 32,
        }
    }
}

/// A tracked dport (one generation of an address).
#[derive(Clone, Debug)]
pub struct Dport {
    pub port: u64,
    pub xa: u64,
    pub port_lock: u64,
    pub free_lock: u64,
    /// `&port->uport_dev->mutex` (0: not known).
    pub uport_lock: u64,
    pub root: bool,
    pub generation: u32,
    pub freed: Option<Arc<FreeInfo>>,
    /// The free of the generation before this one at the same address: a pointer to that
    /// one, used after the address was reused, is a use-after-free with this free's stack.
    pub prior_free: Option<Arc<FreeInfo>>,
}

/// A dports xarray and the port it belongs to.
#[derive(Copy, Clone, Debug)]
pub struct Container {
    pub port: u64,
    pub port_lock: u64,
}

/// A dport pointer a thread got from `xa_load`.
#[derive(Clone, Debug)]
pub struct Ref {
    pub dport: u64,
    pub generation: u32,
    pub ts: u64,
    pub stack: Option<Stack>,
    /// The hold period of the dport's free lock the load happened in, if it was held.
    pub free_lock_period: Option<u64>,
}

/// A lock held by a thread (a dport's mutex, or any lock taken in CXL code), with the hold
/// period it is in.
#[derive(Clone, Debug)]
pub struct Held {
    pub lock: u64,
    pub mode: LockMode,
    /// The lock call's return site, and the global the call names.
    pub at: Option<Arc<str>>,
    pub name: Option<Arc<str>>,
    pub period: u64,
    /// When it was taken, and where (no stack when it was taken before tracing started or
    /// where no lock event is probed: the kernel's `mutex->owner` stamp said so).
    pub ts: u64,
    pub stack: Option<Stack>,
}

#[derive(Clone, Debug, Default)]
pub struct Thread {
    /// In acquisition order.
    pub held: Vec<Held>,
    pub refs: Vec<Ref>,
    pub last_ts: u64,
}

impl Thread {
    pub fn period_of(&self, lock: u64) -> Option<u64> {
        self.held(lock).map(|h| h.period)
    }

    pub fn held(&self, lock: u64) -> Option<&Held> {
        self.held.iter().find(|h| h.lock == lock)
    }

    pub fn release(&mut self, lock: u64) -> bool {
        let before = self.held.len();
        self.held.retain(|h| h.lock != lock);
        self.held.len() != before
    }

    pub fn find_ref(&self, dport: u64) -> Option<&Ref> {
        self.refs.iter().find(|r| r.dport == dport)
    }

    /// Replaces this thread's reference to the same dport; evicts the oldest past `cap`.
    /// Returns whether one was evicted.
    pub fn put_ref(&mut self, new: Ref, cap: usize) -> bool {
        if let Some(slot) = self.refs.iter_mut().find(|r| r.dport == new.dport) {
            *slot = new;
            return false;
        }
        let evicted = self.refs.len() >= cap.max(1);
        if evicted {
            self.refs.remove(0);
        }
        self.refs.push(new);
        evicted
    }

    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.refs.is_empty()
    }
}

/// Counts of what the engine could not judge or had to forget.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    /// Uses of a dport the thread was not seen loading (not judged, by design).
    pub unjudged_uses: u64,
    /// Events naming a dport or xarray never registered nor discovered.
    pub unknown_objects: u64,
    /// A dport registered again at a live address (a free was missed).
    pub reregistered: u64,
    /// Lock state corrected from a kernel `mutex->owner` stamp (lock taken before
    /// tracing, or a lock event not observed).
    pub stamp_corrections: u64,
    pub evicted_dports: u64,
    pub evicted_containers: u64,
    pub evicted_threads: u64,
    pub evicted_refs: u64,
    /// Held locks forgotten past `max_held_per_thread`.
    pub evicted_locks: u64,
}

impl EngineStats {
    pub fn evicted(&self) -> u64 {
        self.evicted_dports + self.evicted_containers + self.evicted_threads + self.evicted_refs + self.evicted_locks
    }
}

/// Dports by address, with freed ones kept in a bounded FIFO for use-after-free checks.
#[derive(Default)]
pub struct Dports {
    map: FxHashMap<u64, Dport>,
    /// Freed addresses, oldest first (an address may appear again after a reuse).
    freed_order: VecDeque<(u64, u32)>,
    live: usize,
}

impl Dports {
    pub fn get(&self, addr: u64) -> Option<&Dport> {
        self.map.get(&addr)
    }

    /// Records a dport at `addr`, as a new generation when the address was used before.
    /// Returns the generation and whether a live dport had to be replaced.
    pub fn add(&mut self, addr: u64, mut dport: Dport, limits: &Limits, stats: &mut EngineStats) -> u32 {
        match self.map.get(&addr) {
            Some(old) if old.freed.is_none() && old.port == dport.port && old.xa == dport.xa => {
                // Seen again (registration after discovery, or rediscovery): same object.
                return old.generation;
            }
            Some(old) => {
                if old.freed.is_none() {
                    stats.reregistered += 1;
                    self.live -= 1;
                }
                dport.generation = old.generation + 1;
                dport.prior_free = old.freed.clone();
            }
            None => dport.generation = 1,
        }
        if self.live >= limits.max_dports {
            self.evict_one_live(stats);
        }
        let generation = dport.generation;
        self.map.insert(addr, dport);
        self.live += 1;
        generation
    }

    pub fn mark_freed(&mut self, addr: u64, free: Arc<FreeInfo>, limits: &Limits, stats: &mut EngineStats) {
        let Some(dport) = self.map.get_mut(&addr) else { return };
        if dport.freed.is_some() {
            return;
        }
        dport.freed = Some(free);
        self.live -= 1;
        self.freed_order.push_back((addr, dport.generation));
        while self.freed_order.len() > limits.max_freed_dports {
            let (old, generation) = self.freed_order.pop_front().expect("non-empty");
            if self.map.get(&old).is_some_and(|d| d.generation == generation && d.freed.is_some()) {
                self.map.remove(&old);
                stats.evicted_dports += 1;
            }
        }
    }

    fn evict_one_live(&mut self, stats: &mut EngineStats) {
        // Rare (only past the cap): drop the oldest-generation live dport.
        if let Some((&addr, _)) = self.map.iter().filter(|(_, d)| d.freed.is_none()).min_by_key(|(_, d)| d.generation) {
            self.map.remove(&addr);
            self.live -= 1;
            stats.evicted_dports += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
