//! The probe hits the hit-path figure runs (`hitpath.rs`): one per kind of event each program
//! handles, in the state a real run has when it fires (the dport tracked, the call pending),
//! with every map and read succeeding: the path a hit takes when no diagnostic fires.
use tracer_common::{DportInfo, LoadedKey, PendingXa, Reg, SiteInfo, SiteRole};

use super::bpfvm::{Kernel, Program, Run, run};

const TID: u64 = 4242;
const TGID: u64 = 4200;
const TASK: u64 = 0xffff_8880_0a00_0000;
const DPORT: u64 = 0xffff_8880_0b00_0000;
const PORT: u64 = 0xffff_8880_0c00_0000;
const XA: u64 = PORT + 0x600;
const INDEX: u64 = 0xffff_8880_0d00_0000;
/// The dport's port lock and free lock, held by the task.
const LOCK: u64 = PORT + 0x80;
const BLOCK: u64 = DPORT - 0x48;
const COOKIE: u32 = 7;

/// Where a register is in `struct pt_regs` (x86_64), the context of a kprobe.
fn pt_regs_offset(reg: Reg) -> usize {
    8 * match reg {
        Reg::R15 => 0,
        Reg::R14 => 1,
        Reg::R13 => 2,
        Reg::R12 => 3,
        Reg::Rbp => 4,
        Reg::Rbx => 5,
        Reg::R11 => 6,
        Reg::R10 => 7,
        Reg::R9 => 8,
        Reg::R8 => 9,
        Reg::Rax => 10,
        Reg::Rcx => 11,
        Reg::Rdx => 12,
        Reg::Rsi => 13,
        Reg::Rdi => 14,
    }
}

/// The bytes of a `#[repr(C)]` value of tracer-common (no padding).
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `T` is one of tracer-common's `#[repr(C)]` plain-data types, all of whose bytes
    // are initialized (their sizes are checked at compile time to have no padding).
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn tracked() -> DportInfo {
    DportInfo { port: PORT, xa: XA, port_lock: LOCK, free_lock: LOCK, block: BLOCK, uport_lock: 0, root: 0, flags: 0 }
}

/// What the kernel side's maps hold, and what the probed context is.
enum State {
    SiteProbe { role: SiteRole, arg: u32, regs: &'static [(Reg, u64)] },
    Args(&'static [u64]),
}

pub struct Hit {
    pub name: &'static str,
    pub entry: &'static str,
    state: State,
    /// What the maps hold before the hit (beyond the site's own entry).
    loaded: bool,
    tracked: bool,
    pending_xa: bool,
    pending_lock: bool,
    lock_tracked: bool,
    block_tracked: bool,
    /// Records the hit submits.
    pub submits: u64,
}

const NONE: Hit = Hit {
    name: "",
    entry: "",
    state: State::Args(&[]),
    loaded: false,
    tracked: false,
    pending_xa: false,
    pending_lock: false,
    lock_tracked: false,
    block_tracked: false,
    submits: 0,
};

pub const HITS: &[Hit] = &[
    Hit {
        name: "deref of a loaded dport",
        entry: "site",
        state: State::SiteProbe { role: SiteRole::Deref, arg: Reg::Rbx as u32, regs: &[(Reg::Rbx, DPORT)] },
        loaded: true,
        tracked: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "deref of another pointer",
        entry: "site",
        state: State::SiteProbe { role: SiteRole::Deref, arg: Reg::Rbx as u32, regs: &[(Reg::Rbx, DPORT + 8)] },
        tracked: true,
        ..NONE
    },
    Hit {
        name: "use of a tracked dport",
        entry: "site",
        state: State::SiteProbe { role: SiteRole::Use, arg: 0, regs: &[(Reg::Rdi, DPORT)] },
        tracked: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "xa_load call",
        entry: "site",
        state: State::SiteProbe { role: SiteRole::LoadCall, arg: 0, regs: &[(Reg::Rdi, XA), (Reg::Rsi, INDEX)] },
        ..NONE
    },
    Hit {
        name: "xa_load return of a tracked dport",
        entry: "site",
        state: State::SiteProbe { role: SiteRole::LoadReturn, arg: 0, regs: &[(Reg::Rax, DPORT)] },
        tracked: true,
        pending_xa: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "lock call",
        entry: "lock_site",
        state: State::SiteProbe { role: SiteRole::LockCall, arg: 0, regs: &[(Reg::Rdi, LOCK)] },
        ..NONE
    },
    Hit {
        name: "lock return of a tracked mutex",
        entry: "lock_site",
        state: State::SiteProbe { role: SiteRole::LockReturn, arg: 0, regs: &[] },
        pending_lock: true,
        lock_tracked: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "unlock call",
        entry: "lock_site",
        state: State::SiteProbe { role: SiteRole::UnlockCall, arg: 0, regs: &[(Reg::Rdi, LOCK)] },
        submits: 1,
        ..NONE
    },
    Hit {
        name: "free of a tracked dport",
        entry: "lifetime_site",
        state: State::SiteProbe { role: SiteRole::FreeCall, arg: 0, regs: &[(Reg::Rdi, DPORT)] },
        tracked: true,
        block_tracked: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "shared deref of a loaded dport",
        entry: "shared_deref",
        state: State::SiteProbe { role: SiteRole::Deref, arg: Reg::Rbx as u32, regs: &[(Reg::Rbx, DPORT)] },
        loaded: true,
        tracked: true,
        submits: 1,
        ..NONE
    },
    Hit {
        name: "dport registered",
        entry: "dport_add_exit",
        state: State::Args(&[PORT, 0, 0, 0, 0, 0]),
        submits: 1,
        ..NONE
    },
    Hit { name: "kfree of another block", entry: "kfree", state: State::Args(&[0, BLOCK + 8]), ..NONE },
    Hit {
        name: "kfree of a tracked dport",
        entry: "kfree",
        state: State::Args(&[0, BLOCK]),
        tracked: true,
        block_tracked: true,
        submits: 1,
        ..NONE
    },
    Hit { name: "global hook on another mutex", entry: "mutex_lock_exit", state: State::Args(&[LOCK + 8, 0]), ..NONE },
];

impl Hit {
    /// Runs the hit against a fresh mock kernel.
    pub fn run(&self, program: &Program) -> anyhow::Result<Run> {
        let mut kernel = Kernel { pid_tgid: TGID << 32 | TID, task: TASK, func_ret: DPORT, ..Kernel::default() };
        kernel.memory.insert(LOCK, TASK);
        let mut put = |map: &str, key: Vec<u8>, value: Vec<u8>| -> anyhow::Result<()> {
            kernel.entries.insert((program.map(map)?, key), value);
            Ok(())
        };
        if self.tracked {
            put("DPORTS", DPORT.to_le_bytes().to_vec(), bytes_of(&tracked()))?;
        }
        if self.loaded {
            put("LOADED", bytes_of(&LoadedKey { tid: TID as u32, pad: 0, dport: DPORT }), vec![1])?;
        }
        if self.pending_xa {
            put(
                "PENDING_XA",
                (TID as u32).to_le_bytes().to_vec(),
                bytes_of(&PendingXa { xa: XA, index: INDEX, by_ref: 0 }),
            )?;
        }
        if self.pending_lock {
            put("PENDING_LOCK", (TID as u32).to_le_bytes().to_vec(), LOCK.to_le_bytes().to_vec())?;
        }
        if self.lock_tracked {
            put("LOCKS", LOCK.to_le_bytes().to_vec(), vec![1])?;
        }
        if self.block_tracked {
            put("BLOCKS", BLOCK.to_le_bytes().to_vec(), DPORT.to_le_bytes().to_vec())?;
            put("BLOCKS", DPORT.to_le_bytes().to_vec(), DPORT.to_le_bytes().to_vec())?;
        }
        let ctx = match &self.state {
            State::SiteProbe { role, arg, regs } => {
                let site = SiteInfo { addr: 0, role: *role as u32, arg: *arg };
                put("SITES", COOKIE.to_le_bytes().to_vec(), bytes_of(&site))?;
                kernel.cookie = u64::from(COOKIE);
                let mut ctx = vec![0u8; 21 * 8];
                for (reg, value) in *regs {
                    let at = pt_regs_offset(*reg);
                    ctx[at..at + 8].copy_from_slice(&value.to_le_bytes());
                }
                ctx
            }
            State::Args(args) => args.iter().flat_map(|a| a.to_le_bytes()).collect(),
        };
        run(program, &mut kernel, self.entry, &ctx, super::hitpath::DIAG)
            .map_err(|err| err.context(format!("running the hit {:?} in {}", self.name, self.entry)))
    }
}
