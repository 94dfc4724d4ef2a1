//! The lock-discipline engine: pure and synchronous, `(state, event) -> findings`.
//!
//! It rebuilds, from events alone, which tracked mutexes each thread holds (and since when),
//! which dport pointers each thread loaded from `port->dports` and under which hold of the
//! free lock, and the life of every dport (registration, generations, free). The rules are
//! those of docs/design.md section 2, from the CXL dport lifetime rules in drivers/cxl/core/port.c (v6.12):
//! a dport is freed by devres on its host device, under the host's `dev->mutex` (the free
//! lock), and `port->dports` is written under `port->dev.mutex` (the port lock).
pub mod finding;
pub mod state;

use std::sync::Arc;

use rustc_hash::FxHashMap;

use self::state::{Container, Dport, Dports, Held, Ref, Thread};
pub use self::{
    finding::{
        Added, AlsoAt, Class, ExpectedLock, Finding, FreeInfo, Group, Groups, HeldLock, LoadInfo, LockInfo, LockRole,
    },
    state::{EngineStats, Limits},
};
use crate::event::{Access, Event, Kind, LockMode, frame_function};

#[derive(Default)]
pub struct Engine {
    limits: Limits,
    dports: Dports,
    containers: FxHashMap<u64, Container>,
    threads: FxHashMap<u32, Thread>,
    /// Which thread holds each tracked mutex, as far as the events tell.
    owners: FxHashMap<u64, u32>,
    next_period: u64,
    stats: EngineStats,
    /// Uses judged, by site: the function of a use, "function+0xoff" of a deref.
    judged: FxHashMap<String, u64>,
}

impl Engine {
    pub fn new(limits: Limits) -> Engine {
        Engine { limits, ..Engine::default() }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Feeds one event; returns the findings it raises (usually none).
    pub fn process(&mut self, event: &Event) -> Vec<Finding> {
        self.stats.events += 1;
        let mut findings = Vec::new();
        match &event.kind {
            Kind::DportAdd { dport, port, xa, port_lock, free_lock, uport_lock, root } => {
                let new = Dport {
                    port: *port,
                    xa: *xa,
                    port_lock: *port_lock,
                    free_lock: *free_lock,
                    uport_lock: *uport_lock,
                    root: *root,
                    generation: 0,
                    freed: None,
                    prior_free: None,
                };
                self.dports.add(*dport, new, &self.limits, &mut self.stats);
                self.forget_older_refs(event.tid, *dport);
                if !self.containers.contains_key(xa) && self.containers.len() >= self.limits.max_dports {
                    // Past the cap only (as many containers as live dports): forget one.
                    let victim = *self.containers.keys().next().expect("non-empty");
                    self.containers.remove(&victim);
                    self.stats.evicted_containers += 1;
                }
                self.containers.insert(*xa, Container { port: *port, port_lock: *port_lock });
            }
            Kind::XaLoad { ret, .. } => self.on_load(event, *ret, &mut findings),
            Kind::XaErase { xa, ret, .. } => self.on_write(event, *xa, *ret, &mut findings),
            Kind::XaInsert { xa, entry, .. } => {
                self.forget_older_refs(event.tid, *entry);
                self.on_write(event, *xa, *entry, &mut findings)
            }
            Kind::Lock { lock, mode, at, name } => {
                let held = Held {
                    lock: *lock,
                    mode: *mode,
                    at: at.clone(),
                    name: name.clone(),
                    period: 0,
                    ts: event.ts,
                    stack: event.stack.clone(),
                };
                self.acquire(event.tid, held)
            }
            Kind::Unlock { lock, .. } => self.release(event.tid, *lock),
            Kind::Use { dport, site } => self.on_use(event, *dport, site, None, &mut findings),
            Kind::Deref { dport, access } => self.on_use(event, *dport, &access.function, Some(access), &mut findings),
            Kind::Free { dport } => self.on_free(event, *dport, &mut findings),
        }
        findings
    }

    /// Forgets the threads that `exited` says are gone and that have had no event since
    /// `quiet_since` (so none of theirs can still be on its way). Their loaded pointers and
    /// held locks can never be used again, and a new thread that reuses the tid must not
    /// inherit them. What a live run learns from /proc; a replay keeps them until the cap.
    /// Returns how many were forgotten.
    pub fn forget_exited_threads(&mut self, quiet_since: u64, mut exited: impl FnMut(u32) -> bool) -> usize {
        let gone: Vec<u32> = self
            .threads
            .iter()
            .filter(|(tid, t)| t.last_ts < quiet_since && exited(**tid))
            .map(|(tid, _)| *tid)
            .collect();
        for tid in &gone {
            if let Some(thread) = self.threads.remove(tid) {
                for held in thread.held {
                    if self.owners.get(&held.lock) == Some(tid) {
                        self.owners.remove(&held.lock);
                    }
                }
            }
        }
        gone.len()
    }

    /// A thread that registers or publishes (`xa_insert`) the dport at `addr` holds it from
    /// its own allocation, not from a lookup: a pointer it loaded from an older generation at
    /// that address is not the one it uses now. Without this, a registration that reuses a
    /// freed dport's address and uses the new dport before returning (7.2's
    /// `__devm_cxl_add_dport()` calls `devm_cxl_dport_ras_setup(dport)` after `add_dport()`)
    /// looked like a use after free to a thread that had loaded the old one (the `cxl_acpi`
    /// bind that looks its root dport up, in every rebind cycle). Other threads' old
    /// pointers stay: their uses are still use-after-free.
    fn forget_older_refs(&mut self, tid: u32, addr: u64) {
        let Some(generation) = self.dports.get(addr).map(|d| d.generation) else { return };
        if let Some(thread) = self.threads.get_mut(&tid) {
            thread.refs.retain(|r| r.dport != addr || r.generation == generation);
        }
    }

    fn thread(&mut self, tid: u32, ts: u64) -> &mut Thread {
        if !self.threads.contains_key(&tid) && self.threads.len() >= self.limits.max_threads {
            self.evict_thread();
        }
        let thread = self.threads.entry(tid).or_default();
        thread.last_ts = thread.last_ts.max(ts);
        thread
    }

    fn evict_thread(&mut self) {
        // Past the cap only: forget idle threads first, else the least recently seen.
        let victim = self.threads.iter().min_by_key(|(_, t)| (!t.is_idle(), t.last_ts)).map(|(&tid, _)| tid);
        if let Some(tid) = victim {
            if let Some(thread) = self.threads.remove(&tid) {
                for held in thread.held {
                    self.owners.remove(&held.lock);
                }
            }
            self.stats.evicted_threads += 1;
        }
    }

    /// `held` (its period not yet set) is taken by `tid`.
    fn acquire(&mut self, tid: u32, mut held: Held) {
        let lock = held.lock;
        // A mutex has one owner: if the events said another thread held it, its unlock was
        // not observed. A rw_semaphore held for read has many.
        if held.mode == LockMode::Mutex
            && let Some(previous) = self.owners.insert(lock, tid)
            && previous != tid
            && let Some(other) = self.threads.get_mut(&previous)
        {
            other.release(lock);
        }
        self.next_period += 1;
        held.period = self.next_period;
        let cap = self.limits.max_held_per_thread.max(1);
        let thread = self.thread(tid, held.ts);
        thread.release(lock);
        let evicted = thread.held.len() >= cap;
        if evicted {
            // The oldest: a lock whose release was not seen (taken in CXL code, released
            // elsewhere) is the likeliest to be stale.
            let gone = thread.held.remove(0);
            if self.owners.get(&gone.lock) == Some(&tid) {
                self.owners.remove(&gone.lock);
            }
            self.stats.evicted_locks += 1;
        }
        self.threads.get_mut(&tid).expect("made above").held.push(held);
    }

    /// A mutex held since before its lock event could be seen (the kernel's stamp says so).
    fn acquire_unseen(&mut self, tid: u32, lock: u64, ts: u64) {
        let held = Held { lock, mode: LockMode::Mutex, at: None, name: None, period: 0, ts, stack: None };
        self.acquire(tid, held);
    }

    fn release(&mut self, tid: u32, lock: u64) {
        if self.owners.get(&lock) == Some(&tid) {
            self.owners.remove(&lock);
        }
        if let Some(thread) = self.threads.get_mut(&tid) {
            thread.release(lock);
        }
    }

    /// Trusts the kernel's `mutex->owner` stamp over the lock events: a lock taken before
    /// tracing started, or whose event was not observed, still counts.
    fn reconcile(&mut self, event: &Event, lock: u64, stamp: Option<bool>) {
        let Some(held) = stamp else { return };
        let known = self.threads.get(&event.tid).and_then(|t| t.period_of(lock)).is_some();
        if held && !known {
            self.stats.stamp_corrections += 1;
            self.acquire_unseen(event.tid, lock, event.ts);
        } else if !held && known {
            self.stats.stamp_corrections += 1;
            self.release(event.tid, lock);
        }
    }

    fn held_locks(&self, tid: u32) -> Vec<HeldLock> {
        let Some(thread) = self.threads.get(&tid) else { return Vec::new() };
        thread
            .held
            .iter()
            .map(|h| HeldLock {
                lock: h.lock,
                mode: h.mode,
                // A lock event of an older trace names no site: its stack's top frame does.
                at: h.at.clone().or_else(|| h.stack.as_ref().and_then(|s| s.first().cloned())),
                name: h.name.clone(),
            })
            .collect()
    }

    fn finding(&self, event: &Event, class: Class, dport: u64, reason: &'static str) -> Finding {
        let (generation, port, root, port_lock, free_lock, uport_lock) = match self.dports.get(dport) {
            Some(d) => (d.generation, d.port, d.root, d.port_lock, d.free_lock, d.uport_lock),
            None => (0, 0, false, 0, 0, 0),
        };
        Finding {
            class,
            ts: event.ts,
            tid: event.tid,
            comm: event.comm.clone(),
            site: event_site(event),
            stack: event.stack.clone(),
            dport,
            generation,
            port,
            root,
            port_lock,
            free_lock,
            uport_lock,
            expected_lock: None,
            held_locks: self.held_locks(event.tid),
            load: None,
            lock: None,
            free: None,
            access: None,
            reason,
        }
    }

    fn free_lock(dport: &Dport) -> ExpectedLock {
        ExpectedLock {
            role: LockRole::Free,
            addr: dport.free_lock,
            what: if dport.root { "&port->uport_dev->mutex" } else { "&port->dev.mutex" },
        }
    }

    fn on_load(&mut self, event: &Event, ret: u64, findings: &mut Vec<Finding>) {
        if ret == 0 {
            return;
        }
        let Some(dport) = self.dports.get(ret) else {
            self.stats.unknown_objects += 1;
            return;
        };
        if let Some(free) = &dport.freed {
            let (free, lock) = ((**free).clone(), Self::free_lock(dport));
            let mut f = self.finding(
                event,
                Class::UseAfterFree,
                ret,
                "xa_load returned a dport whose memory was already freed",
            );
            f.free = Some(free);
            f.expected_lock = Some(lock);
            findings.push(f);
            return;
        }
        let (free_lock, generation) = (dport.free_lock, dport.generation);
        self.reconcile(event, free_lock, event.free_lock_held);
        let cap = self.limits.max_refs_per_thread;
        let thread = self.thread(event.tid, event.ts);
        let new = Ref {
            dport: ret,
            generation,
            ts: event.ts,
            stack: event.stack.clone(),
            free_lock_period: thread.period_of(free_lock),
        };
        if thread.put_ref(new, cap) {
            self.stats.evicted_refs += 1;
        }
    }

    /// A use: the dport passed to a function, or (`access`) one of its fields read or written
    /// inline. Both are judged by the same rules.
    fn on_use(
        &mut self,
        event: &Event,
        addr: u64,
        site: &Arc<str>,
        access: Option<&Arc<Access>>,
        findings: &mut Vec<Finding>,
    ) {
        let Some(dport) = self.dports.get(addr) else {
            self.stats.unknown_objects += 1;
            return;
        };
        let (free_lock, generation, freed) = (dport.free_lock, dport.generation, dport.freed.is_some());
        // Only pointers this thread was seen loading are judged.
        let Some((load_generation, load_period)) =
            self.threads.get(&event.tid).and_then(|t| t.find_ref(addr)).map(|r| (r.generation, r.free_lock_period))
        else {
            self.stats.unjudged_uses += 1;
            return;
        };
        let place = match access {
            Some(access) => access.place(),
            None => site.to_string(),
        };
        *self.judged.entry(place).or_default() += 1;
        self.reconcile(event, free_lock, event.free_lock_held);
        let period = self.threads.get(&event.tid).and_then(|t| t.period_of(free_lock));

        // The object the thread loaded is gone if it was freed, or if its address was reused
        // for a newer dport (which can only happen after a free).
        let (class, reason) = if load_generation != generation || freed {
            (Class::UseAfterFree, "dport used after its memory was freed")
        } else if period.is_none() {
            (Class::UnlockedUse, "dport from a lockless xa_load used without holding its free lock")
        } else if load_period.is_none() {
            (Class::StaleUse, "dport loaded before its free lock was taken, used under the lock without re-fetching")
        } else if load_period != period {
            (
                Class::StaleUse,
                "dport loaded under an earlier hold of its free lock, used after an unlock/relock without re-fetching",
            )
        } else {
            return;
        };
        let dport = self.dports.get(addr).expect("looked up above");
        let free = if load_generation == generation {
            dport.freed.as_deref().cloned()
        } else if load_generation + 1 == generation {
            dport.prior_free.as_deref().cloned()
        } else {
            None
        };
        let lock = Self::free_lock(dport);
        let load = self.threads.get(&event.tid).and_then(|t| t.find_ref(addr)).expect("found above");
        let load = LoadInfo { ts: load.ts, stack: load.stack.clone(), free_lock_held: load.free_lock_period.is_some() };
        let held = self.threads.get(&event.tid).and_then(|t| t.held(lock.addr));
        let lock_info = held.map(|h| LockInfo { ts: h.ts, stack: h.stack.clone() });
        let mut f = self.finding(event, class, addr, reason);
        f.site = site.clone();
        f.generation = load_generation;
        f.expected_lock = Some(lock);
        f.load = Some(load);
        f.lock = lock_info;
        f.free = free;
        f.access = access.cloned();
        findings.push(f);
    }

    fn on_write(&mut self, event: &Event, xa: u64, entry: u64, findings: &mut Vec<Finding>) {
        let Some(container) = self.containers.get(&xa).copied() else {
            self.stats.unknown_objects += 1;
            return;
        };
        self.reconcile(event, container.port_lock, event.port_lock_held);
        let held = self.threads.get(&event.tid).and_then(|t| t.period_of(container.port_lock)).is_some();
        if !held {
            let mut f =
                self.finding(event, Class::UnlockedErase, entry, "port->dports written without holding the port lock");
            f.port = container.port;
            f.port_lock = container.port_lock;
            f.expected_lock =
                Some(ExpectedLock { role: LockRole::Port, addr: container.port_lock, what: "&port->dev.mutex" });
            findings.push(f);
        }
    }

    fn on_free(&mut self, event: &Event, addr: u64, findings: &mut Vec<Finding>) {
        let Some(dport) = self.dports.get(addr) else {
            self.stats.unknown_objects += 1;
            return;
        };
        if let Some(earlier) = dport.freed.as_deref().cloned() {
            let mut f = self.finding(event, Class::UseAfterFree, addr, "dport memory freed twice");
            f.free = Some(earlier);
            findings.push(f);
            return;
        }
        let (free_lock, lock) = (dport.free_lock, Self::free_lock(dport));
        self.reconcile(event, free_lock, event.free_lock_held);
        let held = self.threads.get(&event.tid).and_then(|t| t.period_of(free_lock)).is_some();
        if !held {
            let mut f = self.finding(
                event,
                Class::RuleMismatch,
                addr,
                "dport freed by a thread not holding the predicted free lock: the lock model is wrong for this kernel",
            );
            f.expected_lock = Some(lock);
            findings.push(f);
        }
        let free =
            Arc::new(FreeInfo { ts: event.ts, tid: event.tid, comm: event.comm.clone(), stack: event.stack.clone() });
        self.dports.mark_freed(addr, free, &self.limits, &mut self.stats);
    }

    /// How many uses at `place` (a use site's function, a deref's "function+0xoff") were
    /// judged: their pointer was one the thread was seen loading.
    pub fn judged_at(&self, place: &str) -> u64 {
        self.judged.get(place).copied().unwrap_or(0)
    }

    /// Tracked dports (live and remembered freed ones).
    pub fn tracked_dports(&self) -> usize {
        self.dports.len()
    }

    pub fn tracked_threads(&self) -> usize {
        self.threads.len()
    }
}

/// Where an event happened: the use site, else the function of the innermost frame, else
/// the event kind.
fn event_site(event: &Event) -> Arc<str> {
    match &event.kind {
        Kind::Use { site, .. } => return site.clone(),
        Kind::Deref { access, .. } => return access.function.clone(),
        _ => {}
    }
    match event.stack.as_deref().and_then(|s| s.first()) {
        Some(frame) => Arc::from(frame_function(frame)),
        None => Arc::from(event.kind.name()),
    }
}
