//! Turns decoded kernel records into events: task names interned, stacks symbolized, use
//! sites named. After this an event means the same on any machine.
use std::sync::Arc;

use rustc_hash::FxHashMap;
use tracer_common::NO_SITE;

use crate::{
    decode::{RawEvent, RawPayload},
    event::{Access, Event, Kind, LockMode},
    intern::Interner,
    symbolize::{StackCache, Symbols},
};

/// Where a live run reads the kernel's symbols afresh (in `tracer run`: /proc/kallsyms and
/// /proc/modules).
pub trait SymbolSource {
    /// `old` with the modules' symbols read again; `None` when they could not be read.
    fn reread(&mut self, old: &Symbols) -> Option<Symbols>;
    /// The address ranges of the modules loaded now: cheap to read, unlike the symbols.
    fn module_ranges(&mut self) -> Vec<std::ops::Range<u64>>;
    /// Now, on the events' clock (CLOCK_MONOTONIC).
    fn now_ns(&self) -> u64;
}

/// What a site index stands for: its function, for a deref site what it accesses, and for
/// a lock site where it is and which lock it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteName {
    pub function: Arc<str>,
    pub access: Option<Arc<Access>>,
    /// "function+0xoff" of the probed instruction.
    pub place: Option<Arc<str>>,
    /// The lock a lock or unlock call site names statically (`cxl_rwsem.region`).
    pub lock: Option<Arc<str>>,
}

impl From<Arc<str>> for SiteName {
    fn from(function: Arc<str>) -> SiteName {
        SiteName { function, ..SiteName::default() }
    }
}

/// Addresses remembered as unresolvable even after a re-read, at most.
const MAX_UNRESOLVABLE: usize = 4096;

pub struct Resolver {
    symbols: Symbols,
    stacks: StackCache,
    interner: Interner,
    /// Each site index (`SITES` order).
    sites: Vec<SiteName>,
    reload: Option<Box<dyn SymbolSource>>,
    /// Addresses still unknown after a re-read (BPF trampolines, a module gone before its
    /// events were read), with when that was found: not worth another re-read for events
    /// older than that. A newer event can be of a module loaded there since.
    unresolvable: FxHashMap<u64, u64>,
    /// The module ranges when the symbols were last read again: a covered address still
    /// unknown is only worth another read once they changed.
    reread_ranges: Vec<std::ops::Range<u64>>,
}

impl Resolver {
    pub fn new(symbols: Symbols, sites: Vec<SiteName>) -> Resolver {
        Resolver {
            symbols,
            stacks: StackCache::default(),
            interner: Interner::default(),
            sites,
            reload: None,
            unresolvable: FxHashMap::default(),
            reread_ranges: Vec::new(),
        }
    }

    /// Re-reads the symbols when a stack has an address they do not know: a module loaded
    /// since (its first events can come before the periodic check notices it).
    pub fn with_reload(mut self, reload: Box<dyn SymbolSource>) -> Resolver {
        self.reload = Some(reload);
        self
    }

    pub fn symbols(&self) -> &Symbols {
        &self.symbols
    }

    /// New site names (a module's sites were found again after it was reloaded).
    pub fn set_sites(&mut self, sites: Vec<SiteName>) {
        self.sites = sites;
    }

    /// Reads the modules' symbols again through the source (a module was loaded or
    /// unloaded); without one, nothing changes.
    pub fn reread_symbols(&mut self) {
        let Some(source) = &mut self.reload else { return };
        self.reread_ranges = source.module_ranges();
        if let Some(symbols) = source.reread(&self.symbols) {
            self.set_symbols(symbols);
        }
    }

    /// New symbols (a module was loaded or unloaded).
    fn set_symbols(&mut self, symbols: Symbols) {
        self.symbols = symbols;
        self.stacks.clear();
        self.unresolvable.clear();
    }

    /// Reads the symbols again when the stack of an event at `ts` has an address they do not
    /// know, unless that address was found unknown after `ts`, or no module covers it now,
    /// or the modules are where they were at the last read. A hotplug loop can reload a
    /// module at the address its previous load had: an address written off while the
    /// module was away is then the new load's.
    fn know(&mut self, addrs: &[u64], ts: u64) {
        let Some(source) = &mut self.reload else { return };
        let mut modules: Option<(u64, Vec<std::ops::Range<u64>>)> = None;
        let mut reread = false;
        for &addr in addrs {
            if self.symbols.resolve(addr).is_some() {
                continue;
            }
            let Some(found) = self.unresolvable.get_mut(&addr) else {
                reread = true;
                break;
            };
            if ts <= *found {
                continue;
            }
            let (checked, ranges) = modules.get_or_insert_with(|| (source.now_ns(), source.module_ranges()));
            if *ranges != self.reread_ranges && ranges.iter().any(|m| m.contains(&addr)) {
                reread = true;
                break;
            }
            *found = *checked;
        }
        if !reread {
            return;
        }
        let now = source.now_ns();
        self.reread_symbols();
        let unknown: Vec<u64> = addrs.iter().copied().filter(|&a| self.symbols.resolve(a).is_none()).collect();
        if self.unresolvable.len() + unknown.len() > MAX_UNRESOLVABLE {
            self.unresolvable.clear();
        }
        for addr in unknown {
            self.unresolvable.insert(addr, now);
        }
    }

    fn site(&mut self, index: u64) -> SiteName {
        match usize::try_from(index).ok().and_then(|i| self.sites.get(i)) {
            Some(site) => site.clone(),
            None => SiteName::from(self.interner.string(&format!("site#{index}"))),
        }
    }

    pub fn resolve(&mut self, raw: &RawEvent) -> Event {
        let kind = match &raw.payload {
            RawPayload::DportAdd(d) => Kind::DportAdd {
                dport: d.dport,
                port: d.port,
                xa: d.xa,
                port_lock: d.port_lock,
                free_lock: d.free_lock,
                uport_lock: d.uport_lock,
                root: d.root != 0,
            },
            RawPayload::XaLoad(x) => Kind::XaLoad { xa: x.xa, index: x.index, ret: x.entry },
            RawPayload::XaErase(x) => Kind::XaErase { xa: x.xa, index: x.index, ret: x.entry },
            RawPayload::XaInsert(x) => Kind::XaInsert { xa: x.xa, index: x.index, entry: x.entry },
            RawPayload::Lock(l) => {
                let site = (l.site != NO_SITE).then(|| self.site(u64::from(l.site)));
                Kind::Lock {
                    lock: l.lock,
                    mode: LockMode::from_u32(l.mode).unwrap_or_default(),
                    at: site.as_ref().and_then(|s| s.place.clone()),
                    name: site.and_then(|s| s.lock),
                }
            }
            RawPayload::Unlock(l) => {
                Kind::Unlock { lock: l.lock, mode: LockMode::from_u32(l.mode).unwrap_or_default() }
            }
            RawPayload::Use(u) => Kind::Use { dport: u.dport, site: self.site(u.site).function },
            RawPayload::Free(f) => Kind::Free { dport: f.dport },
            RawPayload::Deref(u) => {
                let site = self.site(u.site);
                let access = site.access.unwrap_or_else(|| {
                    // Not a deref site: say so rather than invent a member.
                    Arc::new(Access {
                        function: site.function,
                        insn: 0,
                        member: self.interner.string("?"),
                        offset: 0,
                        size: 0,
                        write: false,
                    })
                });
                Kind::Deref { dport: u.dport, access }
            }
        };
        self.know(&raw.stack, raw.ts);
        let stack = (!raw.stack.is_empty()).then(|| self.stacks.symbolize(&self.symbols, &raw.stack));
        Event {
            ts: raw.ts,
            cpu: raw.cpu,
            tid: raw.tid,
            comm: self.interner.string(&String::from_utf8_lossy(raw.comm())),
            kind,
            stack,
            free_lock_held: raw.free_lock_held(),
            port_lock_held: raw.port_lock_held(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{DportUse, FLAG_FREE_LOCK_HELD, FLAG_FREE_LOCK_KNOWN};

    use super::*;

    #[test]
    fn use_sites_are_named_and_stacks_symbolized() {
        let symbols = Symbols::parse(
            "ffffffff81001000 t cxl_dport_init_ras_reporting\nffffffff81001090 t other\nffffffffc0001000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0001400 t x\t[cxl_mem]\n"
                .as_bytes(),
        )
        .unwrap();
        let rch = Arc::new(Access {
            function: Arc::from("cxl_mem_probe"),
            insn: 0x19a,
            member: Arc::from("rch"),
            offset: 144,
            size: 1,
            write: false,
        });
        let sites = vec![
            SiteName::from(Arc::<str>::from("xa_load")),
            SiteName::from(Arc::<str>::from("cxl_dport_init_ras_reporting")),
            SiteName { function: Arc::from("cxl_mem_probe"), access: Some(rch.clone()), ..SiteName::default() },
        ];
        let mut resolver = Resolver::new(symbols, sites);
        let mut comm = [0u8; 16];
        comm[..12].copy_from_slice(b"kworker/u8:3");
        let raw = RawEvent {
            ts: 5,
            cpu: 1,
            tid: 95,
            tgid: 95,
            comm,
            flags: FLAG_FREE_LOCK_KNOWN | FLAG_FREE_LOCK_HELD,
            payload: RawPayload::Use(DportUse { dport: 0xffff888104a2d000, site: 1 }),
            stack: vec![0xffffffff81001000, 0xffffffffc000113a],
        };
        let event = resolver.resolve(&raw);
        assert_eq!(&*event.comm, "kworker/u8:3");
        assert_eq!(event.free_lock_held, Some(true));
        assert_eq!(
            event.kind,
            Kind::Use { dport: 0xffff888104a2d000, site: Arc::from("cxl_dport_init_ras_reporting") }
        );
        let frames: Vec<&str> = event.stack.as_ref().unwrap().iter().map(|f| &**f).collect();
        assert_eq!(frames, ["cxl_dport_init_ras_reporting+0x0/0x90", "cxl_mem_probe+0x13a/0x400 [cxl_mem]"]);
        let unknown = RawEvent { payload: RawPayload::Use(DportUse { dport: 1, site: 9 }), ..raw.clone() };
        assert!(matches!(resolver.resolve(&unknown).kind, Kind::Use { site, .. } if &*site == "site#9"));
        let deref = RawEvent { payload: RawPayload::Deref(DportUse { dport: 1, site: 2 }), ..raw };
        assert_eq!(resolver.resolve(&deref).kind, Kind::Deref { dport: 1, access: rch });
    }

    /// Kallsyms text swapped by the test, /proc/modules ranges, a clock, and a count of reads.
    #[derive(Clone, Default)]
    struct Fake(std::rc::Rc<std::cell::RefCell<FakeKernel>>);

    #[derive(Default)]
    struct FakeKernel {
        kallsyms: String,
        modules: Vec<std::ops::Range<u64>>,
        now: u64,
        rereads: usize,
    }

    impl SymbolSource for Fake {
        fn reread(&mut self, old: &Symbols) -> Option<Symbols> {
            let mut k = self.0.borrow_mut();
            k.rereads += 1;
            old.with_modules_from(k.kallsyms.as_bytes()).ok()
        }

        fn module_ranges(&mut self) -> Vec<std::ops::Range<u64>> {
            self.0.borrow().modules.clone()
        }

        fn now_ns(&self) -> u64 {
            self.0.borrow().now
        }
    }

    const VMLINUX: &str = "ffffffff81001000 t cxl_dport_init_ras_reporting\nffffffff81001090 t other\n";
    const CXL_MEM: &str = "ffffffffc0661000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0661400 t x\t[cxl_mem]\n";

    fn use_event(ts: u64, stack: Vec<u64>) -> RawEvent {
        RawEvent {
            ts,
            cpu: 0,
            tid: 7,
            tgid: 7,
            comm: [0; 16],
            flags: 0,
            payload: RawPayload::Use(DportUse { dport: 1, site: 0 }),
            stack,
        }
    }

    fn frames(event: Event) -> Vec<String> {
        event.stack.unwrap().iter().map(|f| f.to_string()).collect()
    }

    fn resolver(kernel: &Fake) -> Resolver {
        Resolver::new(Symbols::parse(VMLINUX.as_bytes()).unwrap(), vec![SiteName::from(Arc::<str>::from("f"))])
            .with_reload(Box::new(kernel.clone()))
    }

    #[test]
    fn a_module_loaded_since_is_symbolized_after_a_reread() {
        let kernel = Fake::default();
        kernel.0.borrow_mut().kallsyms = format!("{VMLINUX}{CXL_MEM}");
        let mut resolver = resolver(&kernel);
        let raw = use_event(1, vec![0xffffffff81001005, 0xffffffffc0661318]);
        assert_eq!(
            frames(resolver.resolve(&raw)),
            ["cxl_dport_init_ras_reporting+0x5/0x90", "cxl_mem_probe+0x318/0x400 [cxl_mem]"]
        );
        // An address unknown even after a re-read (a BPF trampoline) is not re-read for
        // again while no module covers it.
        let odd = use_event(2, vec![0xffffffff81001005, 0xffffffffd0000000]);
        resolver.resolve(&odd);
        kernel.0.borrow_mut().now = 10;
        resolver.resolve(&use_event(20, odd.stack.clone()));
        resolver.resolve(&use_event(30, odd.stack.clone()));
        assert_eq!(kernel.0.borrow().rereads, 2);
    }

    #[test]
    fn a_module_back_at_an_address_written_off_is_read_again() {
        let kernel = Fake::default();
        let mut resolver = resolver(&kernel);
        let stack = vec![0xffffffff81001005, 0xffffffffc0661318];
        // Its first load's event is read after the module was unloaded again: unknown.
        kernel.0.borrow_mut().now = 100;
        assert_eq!(
            frames(resolver.resolve(&use_event(50, stack.clone()))),
            ["cxl_dport_init_ras_reporting+0x5/0x90", "0xffffffffc0661318"]
        );
        // Events older than that finding are not worth another read.
        resolver.resolve(&use_event(60, stack.clone()));
        assert_eq!(kernel.0.borrow().rereads, 1);
        // Loaded again at the same place: a newer event there reads the symbols again.
        {
            let mut k = kernel.0.borrow_mut();
            k.kallsyms = format!("{VMLINUX}{CXL_MEM}");
            k.modules = std::iter::once(0xffffffffc0661000..0xffffffffc0668000).collect();
            k.now = 300;
        }
        assert_eq!(
            frames(resolver.resolve(&use_event(200, stack))),
            ["cxl_dport_init_ras_reporting+0x5/0x90", "cxl_mem_probe+0x318/0x400 [cxl_mem]"]
        );
        assert_eq!(kernel.0.borrow().rereads, 2);
        // An address a module's range covers but kallsyms does not list (past its text):
        // read again once, then not while the modules stay where they are.
        let past = vec![0xffffffffc0667000];
        kernel.0.borrow_mut().now = 400;
        resolver.resolve(&use_event(350, past.clone()));
        kernel.0.borrow_mut().now = 500;
        resolver.resolve(&use_event(450, past.clone()));
        resolver.resolve(&use_event(550, past));
        assert_eq!(kernel.0.borrow().rereads, 3);
    }
}
