//! Turns decoded kernel records into events: task names interned, stacks symbolized, use
//! sites named. After this an event means the same on any machine.
use std::sync::Arc;

use rustc_hash::FxHashSet;

use crate::{
    decode::{RawEvent, RawPayload},
    event::{Access, Event, Kind},
    intern::Interner,
    symbolize::{StackCache, Symbols},
};

/// Reads the kernel's symbols afresh (in `tracer run`: /proc/kallsyms).
pub type SymbolSource = Box<dyn FnMut(&Symbols) -> Option<Symbols>>;

/// What a site index stands for: its function, and for a deref site what it accesses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteName {
    pub function: Arc<str>,
    pub access: Option<Arc<Access>>,
}

impl From<Arc<str>> for SiteName {
    fn from(function: Arc<str>) -> SiteName {
        SiteName { function, access: None }
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
    reload: Option<SymbolSource>,
    /// Addresses still unknown after a re-read (the BPF programs' own code, mostly): not
    /// worth another one.
    unresolvable: FxHashSet<u64>,
}

impl Resolver {
    pub fn new(symbols: Symbols, sites: Vec<SiteName>) -> Resolver {
        Resolver {
            symbols,
            stacks: StackCache::default(),
            interner: Interner::default(),
            sites,
            reload: None,
            unresolvable: FxHashSet::default(),
        }
    }

    /// Re-reads the symbols when a stack has an address they do not know: a module loaded
    /// since (its first events can come before the periodic check notices it).
    pub fn with_reload(mut self, reload: SymbolSource) -> Resolver {
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

    /// New symbols (a module was loaded or unloaded).
    pub fn set_symbols(&mut self, symbols: Symbols) {
        self.symbols = symbols;
        self.stacks.clear();
        self.unresolvable.clear();
    }

    fn know(&mut self, addrs: &[u64]) {
        let Some(reload) = &mut self.reload else { return };
        let unknown: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|&a| self.symbols.resolve(a).is_none() && !self.unresolvable.contains(&a))
            .collect();
        if unknown.is_empty() {
            return;
        }
        if let Some(symbols) = reload(&self.symbols) {
            self.set_symbols(symbols);
        }
        if self.unresolvable.len() + unknown.len() > MAX_UNRESOLVABLE {
            self.unresolvable.clear();
        }
        for addr in unknown {
            if self.symbols.resolve(addr).is_none() {
                self.unresolvable.insert(addr);
            }
        }
    }

    fn site(&mut self, index: u64) -> SiteName {
        match usize::try_from(index).ok().and_then(|i| self.sites.get(i)) {
            Some(site) => site.clone(),
            None => SiteName { function: self.interner.string(&format!("site#{index}")), access: None },
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
                root: d.root != 0,
            },
            RawPayload::XaLoad(x) => Kind::XaLoad { xa: x.xa, index: x.index, ret: x.entry },
            RawPayload::XaErase(x) => Kind::XaErase { xa: x.xa, index: x.index, ret: x.entry },
            RawPayload::XaInsert(x) => Kind::XaInsert { xa: x.xa, index: x.index, entry: x.entry },
            RawPayload::Lock(l) => Kind::Lock { lock: l.lock },
            RawPayload::Unlock(l) => Kind::Unlock { lock: l.lock },
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
        self.know(&raw.stack);
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
            SiteName { function: Arc::from("cxl_mem_probe"), access: Some(rch.clone()) },
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
        assert_eq!(event.kind, Kind::Use { dport: 0xffff888104a2d000, site: Arc::from("cxl_dport_init_ras_reporting") });
        let frames: Vec<&str> = event.stack.as_ref().unwrap().iter().map(|f| &**f).collect();
        assert_eq!(frames, ["cxl_dport_init_ras_reporting+0x0/0x90", "cxl_mem_probe+0x13a/0x400 [cxl_mem]"]);
        let unknown = RawEvent { payload: RawPayload::Use(DportUse { dport: 1, site: 9 }), ..raw.clone() };
        assert!(matches!(resolver.resolve(&unknown).kind, Kind::Use { site, .. } if &*site == "site#9"));
        let deref = RawEvent { payload: RawPayload::Deref(DportUse { dport: 1, site: 2 }), ..raw };
        assert_eq!(resolver.resolve(&deref).kind, Kind::Deref { dport: 1, access: rch });
    }

    #[test]
    fn a_module_loaded_since_is_symbolized_after_a_reread() {
        let before = "ffffffff81001000 t cxl_dport_init_ras_reporting\nffffffff81001090 t other\n";
        let after = "ffffffff81001000 t cxl_dport_init_ras_reporting\nffffffff81001090 t other\nffffffffc0661000 t cxl_mem_probe\t[cxl_mem]\nffffffffc0661400 t x\t[cxl_mem]\n";
        let rereads = std::rc::Rc::new(std::cell::Cell::new(0));
        let count = rereads.clone();
        let mut resolver = Resolver::new(Symbols::parse(before.as_bytes()).unwrap(), vec![SiteName::from(Arc::<str>::from("f"))])
            .with_reload(Box::new(move |old: &Symbols| {
                count.set(count.get() + 1);
                old.with_modules_from(after.as_bytes()).ok()
            }));
        let raw = RawEvent {
            ts: 1,
            cpu: 0,
            tid: 7,
            tgid: 7,
            comm: [0; 16],
            flags: 0,
            payload: RawPayload::Use(DportUse { dport: 1, site: 0 }),
            stack: vec![0xffffffff81001005, 0xffffffffc0661318],
        };
        let frames: Vec<String> = resolver.resolve(&raw).stack.unwrap().iter().map(|f| f.to_string()).collect();
        assert_eq!(frames, ["cxl_dport_init_ras_reporting+0x5/0x90", "cxl_mem_probe+0x318/0x400 [cxl_mem]"]);
        // An address unknown even after a re-read is not re-read for again.
        let odd = RawEvent { stack: vec![0xffffffff81001005, 0xffffffffd0000000], ..raw };
        resolver.resolve(&odd);
        resolver.resolve(&odd);
        assert_eq!(rereads.get(), 2);
    }
}
