//! Synthetic event streams shaped like CXL hotplug, for the replay benchmark and the
//! bounded-memory churn tests: dports are registered, looked up and used by several readers
//! (mostly under the free lock, sometimes not), erased and freed, and their addresses reused.
use std::sync::Arc;

use crate::{
    event::{Event, Kind, Stack},
    intern::Interner,
};

/// Offsets of the 6.12.117 guest (read from its BTF), to make addresses look real.
const DEVICE_MUTEX: u64 = 144;
const PORT_DPORTS: u64 = 792;

pub struct Churn {
    /// Dports created over the whole stream (each is registered, used and freed).
    pub dports: u64,
    /// Dports alive at once (addresses are reused after frees).
    pub live: u64,
    /// Locked lookups and uses per dport.
    pub reads_per_dport: u64,
    /// One in this many reads is an unlocked use (the stock `cxl_mem_probe` pattern).
    pub unlocked_every: u64,
    pub threads: u32,
}

impl Default for Churn {
    fn default() -> Self {
        Churn { dports: 10_000, live: 64, reads_per_dport: 8, unlocked_every: 16, threads: 8 }
    }
}

struct Stacks {
    load: Stack,
    use_: Stack,
    erase: Stack,
    free: Stack,
    site: Arc<str>,
}

impl Churn {
    /// Events of the whole stream, in time order.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        let mut interner = Interner::default();
        let stacks = Stacks {
            load: interner.stack(&[
                "match_port_by_dport+0x47/0x80",
                "bus_find_device+0x8b/0xd0",
                "cxl_mem_probe+0xe6/0x3f0",
            ]),
            use_: interner.stack(&[
                "devm_cxl_add_port+0x0/0x5a0",
                "cxl_mem_probe+0x1f4/0x3f0",
                "really_probe+0xd9/0x380",
            ]),
            erase: interner.stack(&["cxl_dport_remove+0x2d/0x60", "release_nodes+0x3e/0xb0"]),
            free: interner.stack(&["kfree+0x2a9/0x380", "release_nodes+0x5c/0xb0"]),
            site: interner.string("devm_cxl_add_port"),
        };
        let comms: Vec<Arc<str>> =
            (0..self.threads.max(1)).map(|t| interner.string(&format!("kworker/u8:{t}"))).collect();
        let writer_comm = interner.string("sh");
        let mut ts = 1_000_000_000u64;
        (0..self.dports).flat_map(move |i| {
            let slot = i % self.live.max(1);
            let port = 0xffff_8881_0300_0000 + slot * 0x1000;
            let dport = 0xffff_8881_0400_0000 + slot * 0x100;
            let lock = port + DEVICE_MUTEX;
            let xa = port + PORT_DPORTS;
            let index = 0xffff_8881_0100_0000 + slot * 0x1000;
            let mut out = Vec::with_capacity(8 + self.reads_per_dport as usize * 4);
            let mut push = |tid: u32, comm: &Arc<str>, kind: Kind, stack: Option<&Stack>, held: Option<bool>| {
                ts += 1_000;
                out.push(Event {
                    ts,
                    cpu: tid % 2,
                    tid,
                    comm: comm.clone(),
                    kind,
                    stack: stack.cloned(),
                    free_lock_held: held,
                    port_lock_held: None,
                });
            };
            let writer = 1;
            push(
                writer,
                &writer_comm,
                Kind::DportAdd { dport, port, xa, port_lock: lock, free_lock: lock, uport_lock: 0, root: false },
                None,
                None,
            );
            push(writer, &writer_comm, Kind::mutex_lock(lock), None, None);
            push(writer, &writer_comm, Kind::XaInsert { xa, index, entry: dport }, None, None);
            push(writer, &writer_comm, Kind::mutex_unlock(lock), None, None);
            for r in 0..self.reads_per_dport {
                let t = ((i + r) % u64::from(self.threads.max(1))) as u32;
                let (tid, comm) = (100 + t, &comms[t as usize]);
                let unlocked =
                    self.unlocked_every != 0 && (i * self.reads_per_dport + r).is_multiple_of(self.unlocked_every);
                if unlocked {
                    push(tid, comm, Kind::XaLoad { xa, index, ret: dport }, Some(&stacks.load), Some(false));
                    push(tid, comm, Kind::Use { dport, site: stacks.site.clone() }, Some(&stacks.use_), Some(false));
                } else {
                    push(tid, comm, Kind::mutex_lock(lock), None, None);
                    push(tid, comm, Kind::XaLoad { xa, index, ret: dport }, Some(&stacks.load), Some(true));
                    push(tid, comm, Kind::Use { dport, site: stacks.site.clone() }, Some(&stacks.use_), Some(true));
                    push(tid, comm, Kind::mutex_unlock(lock), None, None);
                }
            }
            push(writer, &writer_comm, Kind::mutex_lock(lock), None, None);
            push(writer, &writer_comm, Kind::XaErase { xa, index, ret: dport }, Some(&stacks.erase), None);
            push(writer, &writer_comm, Kind::Free { dport }, Some(&stacks.free), Some(true));
            push(writer, &writer_comm, Kind::mutex_unlock(lock), None, None);
            out
        })
    }
}
