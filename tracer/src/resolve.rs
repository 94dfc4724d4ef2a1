//! Turns decoded kernel records into events: task names interned, stacks symbolized, use
//! sites named. After this an event means the same on any machine.
use std::sync::Arc;

use crate::{
    decode::{RawEvent, RawPayload},
    event::{Event, Kind},
    intern::Interner,
    symbolize::{StackCache, Symbols},
};

pub struct Resolver {
    symbols: Symbols,
    stacks: StackCache,
    interner: Interner,
    /// Function of each site index (`SITES` order).
    sites: Vec<Arc<str>>,
}

impl Resolver {
    pub fn new(symbols: Symbols, sites: Vec<Arc<str>>) -> Resolver {
        Resolver { symbols, stacks: StackCache::default(), interner: Interner::default(), sites }
    }

    /// New symbols (a module was loaded or unloaded).
    pub fn set_symbols(&mut self, symbols: Symbols) {
        self.symbols = symbols;
        self.stacks.clear();
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
            RawPayload::Use(u) => {
                let site = match usize::try_from(u.site).ok().and_then(|i| self.sites.get(i)) {
                    Some(name) => name.clone(),
                    None => self.interner.string(&format!("site#{}", u.site)),
                };
                Kind::Use { dport: u.dport, site }
            }
            RawPayload::Free(f) => Kind::Free { dport: f.dport },
        };
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
        let mut resolver = Resolver::new(symbols, vec![Arc::from("xa_load"), Arc::from("cxl_dport_init_ras_reporting")]);
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
        let unknown = RawEvent { payload: RawPayload::Use(DportUse { dport: 1, site: 9 }), ..raw };
        assert!(matches!(resolver.resolve(&unknown).kind, Kind::Use { site, .. } if &*site == "site#9"));
    }
}
