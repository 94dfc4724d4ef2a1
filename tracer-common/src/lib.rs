//! The event model shared by the kernel side (`tracer-ebpf`) and userspace (`tracer`).
//!
//! Everything that crosses the kernel/user boundary is defined here once: the ring-buffer
//! record, the per-kind payloads, the map values and the offsets passed in as globals.
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte; the
//! size asserts below catch an accidental layout change at compile time.
#![no_std]

use core::mem::size_of;

/// What a ring-buffer record reports. The numeric values are part of the wire format.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A dport became known: registered by `__devm_cxl_add_dport`, or discovered on first
    /// sight as the result of an `xa_load` on its port's `dports` xarray.
    DportAdd = 1,
    /// `xa_load(xa, index)` returned `entry` (the dport, or 0).
    XaLoad = 2,
    /// `xa_erase(xa, index)` on a dports xarray; `entry` is what it removed.
    XaErase = 3,
    /// `xa_insert` / `xa_store` of `entry` at `index` in a dports xarray.
    XaInsert = 4,
    /// A lock was taken at a call site in CXL code (a mutex or a rw_semaphore), or a tracked
    /// mutex (a port lock or a free lock) by the global lock hook.
    Lock = 5,
    /// Such a lock was released.
    Unlock = 6,
    /// A tracked dport reached a function that takes `struct cxl_dport *`.
    Use = 7,
    /// The memory of a tracked dport was freed.
    Free = 8,
    /// An instruction in CXL code read or wrote a field of a dport this thread loaded
    /// (an inline dereference, such as `if (dport->rch)`).
    Deref = 9,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::DportAdd,
        EventKind::XaLoad,
        EventKind::XaErase,
        EventKind::XaInsert,
        EventKind::Lock,
        EventKind::Unlock,
        EventKind::Use,
        EventKind::Free,
        EventKind::Deref,
    ];

    pub const fn from_u32(value: u32) -> Option<EventKind> {
        Some(match value {
            1 => EventKind::DportAdd,
            2 => EventKind::XaLoad,
            3 => EventKind::XaErase,
            4 => EventKind::XaInsert,
            5 => EventKind::Lock,
            6 => EventKind::Unlock,
            7 => EventKind::Use,
            8 => EventKind::Free,
            9 => EventKind::Deref,
            _ => return None,
        })
    }

    /// The name used in the JSON-lines interchange and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::DportAdd => "dport_add",
            EventKind::XaLoad => "xa_load",
            EventKind::XaErase => "xa_erase",
            EventKind::XaInsert => "xa_insert",
            EventKind::Lock => "lock",
            EventKind::Unlock => "unlock",
            EventKind::Use => "use",
            EventKind::Free => "free",
            EventKind::Deref => "deref",
        }
    }

    /// Size of this kind's payload, which follows the header in a record.
    pub const fn payload_size(self) -> usize {
        match self {
            EventKind::DportAdd => size_of::<DportAdd>(),
            EventKind::XaLoad | EventKind::XaErase | EventKind::XaInsert => size_of::<XaAccess>(),
            EventKind::Lock | EventKind::Unlock => size_of::<LockOp>(),
            EventKind::Use | EventKind::Deref => size_of::<DportUse>(),
            EventKind::Free => size_of::<DportFree>(),
        }
    }
}

/// `EventHeader::flags`: the kernel read `mutex->owner` of the event's free lock.
pub const FLAG_FREE_LOCK_KNOWN: u32 = 1 << 0;
/// `EventHeader::flags`: ... and the current task owns it.
pub const FLAG_FREE_LOCK_HELD: u32 = 1 << 1;
/// `EventHeader::flags`: the kernel read `mutex->owner` of the event's port lock.
pub const FLAG_PORT_LOCK_KNOWN: u32 = 1 << 2;
/// `EventHeader::flags`: ... and the current task owns it.
pub const FLAG_PORT_LOCK_HELD: u32 = 1 << 3;
/// `EventHeader::flags`: a stack was wanted but `bpf_get_stack` failed.
pub const FLAG_STACK_LOST: u32 = 1 << 4;

/// Most kernel stack frames kept per event. Probe paths through the driver core
/// (sysfs write -> bind -> really_probe -> cxl probe) are about 30 deep.
pub const MAX_STACK_FRAMES: usize = 48;

/// The start of every ring-buffer record.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// An `EventKind` value.
    pub kind: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub cpu: u32,
    /// Kernel task id (the thread).
    pub tid: u32,
    /// Thread group id (the process).
    pub tgid: u32,
    /// Bytes of kernel stack (u64 return addresses) after the payload; 0 when none.
    pub stack_bytes: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<EventHeader>() == 48);

/// Payload of `EventKind::DportAdd`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DportAdd {
    pub dport: u64,
    pub port: u64,
    /// `&port->dports`.
    pub xa: u64,
    /// `&port->dev.mutex`.
    pub port_lock: u64,
    /// `&host->mutex`, host being `port->uport_dev` for a root port, `&port->dev` otherwise.
    pub free_lock: u64,
    /// `&port->uport_dev->mutex`, whatever the port (0 when it has no uport_dev): a reader
    /// taking it instead of the free lock is named in reports.
    pub uport_lock: u64,
    /// 1 when `port` is a root port (`port->uport_dev == port->dev.parent`).
    pub root: u32,
    /// A `DportOrigin` value.
    pub origin: u32,
}
const _: () = assert!(size_of::<DportAdd>() == 56);

/// How the kernel side learnt of a dport.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DportOrigin {
    /// Seen being registered (`__devm_cxl_add_dport` returned it).
    Registered = 0,
    /// Validated on first sight as the result of an `xa_load` (it existed before attach).
    Discovered = 1,
}

/// Payload of `XaLoad`, `XaErase` and `XaInsert`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct XaAccess {
    pub xa: u64,
    pub index: u64,
    /// Returned entry for a load or an erase; stored entry for an insert.
    pub entry: u64,
}
const _: () = assert!(size_of::<XaAccess>() == 24);

/// Payload of `Lock` and `Unlock`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LockOp {
    /// Address of the `struct mutex` or `struct rw_semaphore`.
    pub lock: u64,
    /// The site the lock was taken or released at (its return site for a lock), or
    /// `NO_SITE` (the global lock hook).
    pub site: u32,
    /// A `LockMode` value.
    pub mode: u32,
}
const _: () = assert!(size_of::<LockOp>() == 16);

/// `LockOp::site` of an event that does not come from a site.
pub const NO_SITE: u32 = u32::MAX;

/// What kind of lock, and how it is held.
#[repr(u32)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// A mutex (`mutex_lock*`).
    #[default]
    Mutex = 0,
    /// A rw_semaphore held for reading (`down_read*`).
    Read = 1,
    /// A rw_semaphore held for writing (`down_write*`).
    Write = 2,
}

impl LockMode {
    pub const fn from_u32(value: u32) -> Option<LockMode> {
        Some(match value {
            0 => LockMode::Mutex,
            1 => LockMode::Read,
            2 => LockMode::Write,
            _ => return None,
        })
    }

    /// The name in the JSON-lines interchange and reports.
    pub const fn name(self) -> &'static str {
        match self {
            LockMode::Mutex => "mutex",
            LockMode::Read => "read",
            LockMode::Write => "write",
        }
    }
}

/// Payload of `Use` and `Deref`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DportUse {
    pub dport: u64,
    /// Index of the site in `SITES`: the loader knows which function (and for a deref, which
    /// instruction and member) it is. An index, not an address, stays right when a module
    /// is reloaded elsewhere.
    pub site: u64,
}
const _: () = assert!(size_of::<DportUse>() == 16);

/// Payload of `Free`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DportFree {
    pub dport: u64,
    /// The block handed to `kfree` (the devres node holding the dport).
    pub block: u64,
}
const _: () = assert!(size_of::<DportFree>() == 16);

/// The largest payload; the kernel reserves records of a fixed size.
pub const MAX_PAYLOAD_SIZE: usize = 56;
const _: () = {
    let mut i = 0;
    while i < EventKind::ALL.len() {
        assert!(EventKind::ALL[i].payload_size() <= MAX_PAYLOAD_SIZE);
        i += 1;
    }
};

/// The payload area of a record, written by the kernel through the member of its kind.
#[repr(C)]
#[derive(Copy, Clone)]
pub union Payload {
    pub dport_add: DportAdd,
    pub xa: XaAccess,
    pub lock: LockOp,
    pub dport_use: DportUse,
    pub free: DportFree,
    pub bytes: [u8; MAX_PAYLOAD_SIZE],
}
const _: () = assert!(size_of::<Payload>() == MAX_PAYLOAD_SIZE);

/// A whole ring-buffer record as the kernel reserves it. Userspace never casts bytes to
/// this: it decodes the header, then `payload_size()` bytes, then `stack_bytes` of frames.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct Record {
    pub header: EventHeader,
    pub payload: Payload,
    pub stack: [u64; MAX_STACK_FRAMES],
}
/// A record without a stack, as the kernel reserves it for events that carry none (locks,
/// registrations): a fifth of the ring-buffer room of a `Record`.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct ShortRecord {
    pub header: EventHeader,
    pub payload: Payload,
}
const _: () = assert!(size_of::<ShortRecord>() == STACK_OFFSET);

/// Offset of the payload inside a record.
pub const PAYLOAD_OFFSET: usize = size_of::<EventHeader>();
/// Offset of the first stack frame inside a record.
pub const STACK_OFFSET: usize = PAYLOAD_OFFSET + MAX_PAYLOAD_SIZE;
const _: () = assert!(size_of::<Record>() == STACK_OFFSET + MAX_STACK_FRAMES * 8);

/// Kernel-side counters, one slot each in a per-CPU array.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Records submitted to the ring buffer.
    Emitted = 0,
    /// Records lost because the ring buffer was full.
    DropRingFull = 1,
    /// Dports, locks or containers not tracked because a tracking map was full.
    DropMapFull = 2,
    /// Events whose stack could not be captured (the event itself was kept).
    StackLost = 3,
    /// A return-site probe fired without the pending call it pairs with (its call-site
    /// probe missed, or the pending-call map was full).
    Unpaired = 4,
    /// Dport registrations whose devres host (the `dev` given to `devm_kmalloc`) was
    /// compared with the host the model predicts.
    HostChecked = 5,
    /// ... and differed: the model's free lock is wrong for this kernel (the real host's
    /// mutex is tracked instead).
    HostMismatch = 6,
    /// Records lost although the ring buffer had room: a kprobe that fires on an int3 runs
    /// in NMI-like context, where the ring buffer's lock is only tried, and another CPU
    /// held it through every attempt.
    DropRingBusy = 7,
}
pub const COUNTERS: usize = 8;

impl Counter {
    pub const ALL: [Counter; COUNTERS] = [
        Counter::Emitted,
        Counter::DropRingFull,
        Counter::DropMapFull,
        Counter::StackLost,
        Counter::Unpaired,
        Counter::HostChecked,
        Counter::HostMismatch,
        Counter::DropRingBusy,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Emitted => "emitted",
            Counter::DropRingFull => "ring_buffer_full",
            Counter::DropMapFull => "map_full",
            Counter::StackLost => "stack_lost",
            Counter::Unpaired => "unpaired_return",
            Counter::HostChecked => "host_checked",
            Counter::HostMismatch => "host_mismatch",
            Counter::DropRingBusy => "ring_buffer_busy",
        }
    }

    /// Whether this counter stands for lost events (as opposed to lost detail).
    pub const fn is_drop(self) -> bool {
        matches!(self, Counter::DropRingFull | Counter::DropRingBusy | Counter::DropMapFull)
    }
}

/// Value of the kernel's map of tracked dports (key: dport address).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DportInfo {
    pub port: u64,
    pub xa: u64,
    pub port_lock: u64,
    pub free_lock: u64,
    /// The devres block the dport lives in (what `kfree` receives).
    pub block: u64,
    /// `&port->uport_dev->mutex` (0 when the port has no uport_dev).
    pub uport_lock: u64,
    pub root: u32,
    /// `DPORT_FREED` once its memory was freed (kept so later uses are still reported).
    pub flags: u32,
}
pub const DPORT_FREED: u32 = 1;

/// What the probe at a site does. A site is one kprobe; its attach cookie is the index of
/// its `SiteInfo` in the `SITES` array.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SiteRole {
    /// Entry of a function taking `struct cxl_dport *` as argument `SiteInfo::arg`.
    Use = 1,
    /// A `call xa_load`: rdi = xa, rsi = index; or a `call xa_find`/`xa_find_after` (an
    /// `xa_for_each` walk): rsi = &index (`SITE_INDEX_BY_REF`).
    LoadCall = 2,
    /// The return address of that call: rax = the entry.
    LoadReturn = 3,
    /// A `call xa_erase` / `__xa_erase`: rdi = xa, rsi = index.
    EraseCall = 4,
    /// Its return address: rax = the erased entry.
    EraseReturn = 5,
    /// A `call __xa_insert` / `xa_store` / `__xa_store`: rdi = xa, rsi = index, rdx = entry.
    StoreCall = 6,
    /// A `call mutex_lock*`, `down_read*` or `down_write*`: rdi = the lock; `SiteInfo::arg`
    /// is its `LockMode`.
    LockCall = 7,
    /// Its return address, for `mutex_lock` (always acquired).
    LockReturn = 8,
    /// Its return address, for `mutex_lock_interruptible`/`_killable`: acquired iff rax == 0.
    LockReturnIfZero = 9,
    /// Its return address, for `mutex_trylock`: acquired iff rax == 1.
    LockReturnIfOne = 10,
    /// A `call mutex_unlock`, `up_read` or `up_write`: rdi = the lock; `SiteInfo::arg` is
    /// its `LockMode`.
    UnlockCall = 11,
    /// A `call devm_kmalloc` in dport registration: rdi = the devres host device.
    HostAllocCall = 12,
    /// Its return address: rax = the allocation (the dport).
    HostAllocReturn = 13,
    /// A `call __devm_add_action`: rdi = the devres host, rsi = the action, rdx = its data.
    /// When the action is the one that frees dports, the data is a dport being registered.
    HostActionCall = 14,
    /// An instruction that accesses memory at a displacement inside `struct cxl_dport` from
    /// base register `SiteInfo::arg` (a `Reg` value).
    Deref = 15,
    /// A `call kfree` in the devres release path: rdi = the block (a devres node, or a devm
    /// dport's node).
    FreeCall = 16,
    /// The entry of the function that frees dports (`free_dport(dport)`, 7.2), when fentry
    /// cannot be used: argument `SiteInfo::arg` is the dport.
    FreeEntry = 17,
    /// The return of the function that registers a dport, when it is in a module (a
    /// kretprobe; fexit in vmlinux): rax = the new dport, or an error pointer.
    RegisterReturn = 18,
}

/// The kprobe program a site's role is handled by. One dispatcher for every role passed
/// 6.1's verifier limit of a million processed instructions, so they are split by family.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SiteProgram {
    /// `site`: lookups, xarray writes, uses and inline accesses.
    Site,
    /// `lock_site`: lock and unlock calls.
    Lock,
    /// `lifetime_site`: a dport's registration (its devres host, the registration's return)
    /// and its free.
    Lifetime,
}

impl SiteProgram {
    pub const ALL: [SiteProgram; 3] = [SiteProgram::Site, SiteProgram::Lock, SiteProgram::Lifetime];

    /// The program's name in the eBPF object.
    pub const fn name(self) -> &'static str {
        match self {
            SiteProgram::Site => "site",
            SiteProgram::Lock => "lock_site",
            SiteProgram::Lifetime => "lifetime_site",
        }
    }
}

impl SiteRole {
    /// The program that handles it.
    pub const fn program(self) -> SiteProgram {
        use SiteRole::*;
        match self {
            Use | LoadCall | LoadReturn | EraseCall | EraseReturn | StoreCall | Deref => SiteProgram::Site,
            LockCall | LockReturn | LockReturnIfZero | LockReturnIfOne | UnlockCall => SiteProgram::Lock,
            HostAllocCall | HostAllocReturn | HostActionCall | FreeCall | FreeEntry | RegisterReturn => {
                SiteProgram::Lifetime
            }
        }
    }

    pub const fn from_u32(value: u32) -> Option<SiteRole> {
        Some(match value {
            1 => SiteRole::Use,
            2 => SiteRole::LoadCall,
            3 => SiteRole::LoadReturn,
            4 => SiteRole::EraseCall,
            5 => SiteRole::EraseReturn,
            6 => SiteRole::StoreCall,
            7 => SiteRole::LockCall,
            8 => SiteRole::LockReturn,
            9 => SiteRole::LockReturnIfZero,
            10 => SiteRole::LockReturnIfOne,
            11 => SiteRole::UnlockCall,
            12 => SiteRole::HostAllocCall,
            13 => SiteRole::HostAllocReturn,
            14 => SiteRole::HostActionCall,
            15 => SiteRole::Deref,
            16 => SiteRole::FreeCall,
            17 => SiteRole::FreeEntry,
            18 => SiteRole::RegisterReturn,
            _ => return None,
        })
    }
}

/// One probed site (value of the `SITES` array).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteInfo {
    /// Kernel address of the probed instruction (for a use: of the function).
    pub addr: u64,
    /// A `SiteRole` value; 0 for an unused slot.
    pub role: u32,
    /// For `Use`: which argument (0-5) is the dport. For other roles, `SITE_*` flags.
    pub arg: u32,
}

/// A general-purpose register, as `SiteInfo::arg` of a `Deref` site names the base register.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reg {
    Rax = 0,
    Rbx = 1,
    Rcx = 2,
    Rdx = 3,
    Rsi = 4,
    Rdi = 5,
    Rbp = 6,
    R8 = 7,
    R9 = 8,
    R10 = 9,
    R11 = 10,
    R12 = 11,
    R13 = 12,
    R14 = 13,
    R15 = 14,
}

impl Reg {
    pub const ALL: [Reg; 15] = [
        Reg::Rax,
        Reg::Rbx,
        Reg::Rcx,
        Reg::Rdx,
        Reg::Rsi,
        Reg::Rdi,
        Reg::Rbp,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reg::Rax => "rax",
            Reg::Rbx => "rbx",
            Reg::Rcx => "rcx",
            Reg::Rdx => "rdx",
            Reg::Rsi => "rsi",
            Reg::Rdi => "rdi",
            Reg::Rbp => "rbp",
            Reg::R8 => "r8",
            Reg::R9 => "r9",
            Reg::R10 => "r10",
            Reg::R11 => "r11",
            Reg::R12 => "r12",
            Reg::R13 => "r13",
            Reg::R14 => "r14",
            Reg::R15 => "r15",
        }
    }
}

/// Key of the kernel's map of dports each thread loaded: a deref site reports only a
/// pointer its thread got from `xa_load`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedKey {
    pub tid: u32,
    pub pad: u32,
    pub dport: u64,
}
const _: () = assert!(size_of::<LoadedKey>() == 16);

/// `SiteInfo::arg` of a return role: a return without a pending call is normal here (the
/// return of a function that tail-calls the callee, whose other return paths have none; or
/// a direct probe whose call probe skipped the call).
pub const SITE_UNPAIRED_OK: u32 = 1;
/// `SiteInfo::arg` of a call role: the callee itself is probed (every caller in the system
/// comes by), so calls on xarrays known not to hold dports are skipped at once.
pub const SITE_DIRECT: u32 = 2;
/// `SiteInfo::arg` of a lookup call whose index is passed by reference (`xa_find(xa,
/// &index, ...)`, `xa_find_after`: the `xa_for_each` walk): rsi points to the index, which
/// the return site reads.
pub const SITE_INDEX_BY_REF: u32 = 4;
const _: () = assert!(size_of::<SiteInfo>() == 16);

/// Most sites the kernel side can tell apart (size of `SITES`).
pub const MAX_SITES: u32 = 8192;

/// An xarray call seen at its call site, waiting for its return site (per thread).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingXa {
    pub xa: u64,
    /// The index, or where it is (`SITE_INDEX_BY_REF`).
    pub index: u64,
    /// 1 when `index` is the index's address.
    pub by_ref: u64,
}
const _: () = assert!(size_of::<PendingXa>() == 24);
const _: () = assert!(size_of::<DportInfo>() == 56);

/// A struct member whose offset the kernel side needs. The kernel profile
/// (`tracer/src/kernel/profile.rs`) says which struct and which names each has had; the
/// kernel side reads `Offsets::get(member)`: one list, matched by name on both sides.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Member {
    /// `struct cxl_dport`.`port`
    DportPort = 0,
    /// `struct cxl_dport`.`dport_dev` (`dport` before 6.5): the index of the dport in its
    /// port's xarray.
    DportDev = 1,
    /// `struct cxl_port`.`dev`
    PortDev = 2,
    /// `struct cxl_port`.`uport_dev` (`uport` before 6.5)
    PortUportDev = 3,
    /// `struct cxl_port`.`dports`
    PortDports = 4,
    /// `struct device`.`parent`
    DeviceParent = 5,
    /// `struct device`.`mutex`
    DeviceMutex = 6,
    /// `struct mutex`.`owner`
    MutexOwner = 7,
    /// `struct devres`.`data`: where a devm allocation starts inside its devres block.
    DevresData = 8,
}

/// How many `Member`s there are.
pub const MEMBERS: usize = 9;

impl Member {
    pub const ALL: [Member; MEMBERS] = [
        Member::DportPort,
        Member::DportDev,
        Member::PortDev,
        Member::PortUportDev,
        Member::PortDports,
        Member::DeviceParent,
        Member::DeviceMutex,
        Member::MutexOwner,
        Member::DevresData,
    ];
}

/// Struct member offsets read from the running kernel's BTF, passed as one global, indexed
/// by `Member`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub values: [u64; MEMBERS],
}
const _: () = assert!(size_of::<Offsets>() == 72);

impl Offsets {
    pub const ZERO: Offsets = Offsets { values: [0; MEMBERS] };

    pub const fn get(&self, member: Member) -> u64 {
        self.values[member as usize]
    }

    pub fn set(&mut self, member: Member, offset: u64) {
        self.values[member as usize] = offset;
    }
}

/// Low bits of `mutex->owner` are flags (MUTEX_FLAGS in kernel/locking/mutex.h, v6.12).
pub const MUTEX_OWNER_FLAGS: u64 = 0x07;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, without padding, valid for any bit pattern.
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for DportAdd {}
    unsafe impl aya::Pod for XaAccess {}
    unsafe impl aya::Pod for LockOp {}
    unsafe impl aya::Pod for DportUse {}
    unsafe impl aya::Pod for DportFree {}
    unsafe impl aya::Pod for DportInfo {}
    unsafe impl aya::Pod for SiteInfo {}
    unsafe impl aya::Pod for PendingXa {}
    unsafe impl aya::Pod for Offsets {}
    unsafe impl aya::Pod for LoadedKey {}
}
