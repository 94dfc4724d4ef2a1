//! The userspace event: what every source (ring buffer, trace file, JSON lines) produces
//! and what the engine consumes. Stacks, sites and task names are already symbolized, so an
//! event means the same on any machine.
use std::{fmt, sync::Arc};

pub use tracer_common::{EventKind, LockMode};

/// A symbolized kernel stack, innermost frame first ("symbol+0xoff").
pub type Stack = Arc<[Arc<str>]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Kernel monotonic time in nanoseconds.
    pub ts: u64,
    pub cpu: u32,
    pub tid: u32,
    pub comm: Arc<str>,
    pub kind: Kind,
    pub stack: Option<Stack>,
    /// Stamped in the kernel from `mutex->owner`: whether this task owns the dport's free
    /// lock at this event. `None` when not stamped.
    pub free_lock_held: Option<bool>,
    /// Same for the port lock of the container (xarray writes).
    pub port_lock_held: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    DportAdd {
        dport: u64,
        port: u64,
        xa: u64,
        port_lock: u64,
        free_lock: u64,
        /// `&port->uport_dev->mutex`, 0 when not known (a trace of an older tracer).
        uport_lock: u64,
        root: bool,
    },
    XaLoad {
        xa: u64,
        index: u64,
        ret: u64,
    },
    XaErase {
        xa: u64,
        index: u64,
        ret: u64,
    },
    XaInsert {
        xa: u64,
        index: u64,
        entry: u64,
    },
    /// A lock taken: a mutex or a rw_semaphore (`mode`), at a call site in CXL code.
    Lock {
        lock: u64,
        mode: LockMode,
        /// Where: the function and offset of the lock call's return (`None`: the global lock
        /// hook, or a trace of an older tracer).
        at: Option<Arc<str>>,
        /// The lock's name, when its call site names a global (`cxl_rwsem.region`).
        name: Option<Arc<str>>,
    },
    Unlock {
        lock: u64,
        mode: LockMode,
    },
    Use {
        dport: u64,
        site: Arc<str>,
    },
    Free {
        dport: u64,
    },
    /// An inline field access (`if (dport->rch)`) through a dport pointer.
    Deref {
        dport: u64,
        access: Arc<Access>,
    },
}

/// What a deref site's instruction touches, from the kernel's code and BTF.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// The function the instruction is in.
    pub function: Arc<str>,
    /// Offset of the instruction in that function.
    pub insn: u64,
    /// The member of `struct cxl_dport` it falls in, nested members as a path ("regs.ras").
    pub member: Arc<str>,
    /// Offset of the access in the dport, and its size in bytes.
    pub offset: u32,
    pub size: u32,
    pub write: bool,
}

impl Access {
    /// Where, as a frame is printed: "cxl_mem_probe+0x19a".
    pub fn place(&self) -> String {
        format!("{}+{:#x}", self.function, self.insn)
    }

    /// "read" or "write".
    pub fn verb(&self) -> &'static str {
        if self.write { "write" } else { "read" }
    }

    /// Parses `place()` back: (function, insn offset).
    pub fn parse_place(place: &str) -> Option<(&str, u64)> {
        let (function, offset) = place.split_once('+')?;
        Some((function, parse_hex(offset)?))
    }
}

impl Kind {
    /// A mutex taken, with no site (the global lock hook, a test's event).
    pub fn mutex_lock(lock: u64) -> Kind {
        Kind::Lock { lock, mode: LockMode::Mutex, at: None, name: None }
    }

    pub fn mutex_unlock(lock: u64) -> Kind {
        Kind::Unlock { lock, mode: LockMode::Mutex }
    }

    pub fn event_kind(&self) -> EventKind {
        match self {
            Kind::DportAdd { .. } => EventKind::DportAdd,
            Kind::XaLoad { .. } => EventKind::XaLoad,
            Kind::XaErase { .. } => EventKind::XaErase,
            Kind::XaInsert { .. } => EventKind::XaInsert,
            Kind::Lock { .. } => EventKind::Lock,
            Kind::Unlock { .. } => EventKind::Unlock,
            Kind::Use { .. } => EventKind::Use,
            Kind::Free { .. } => EventKind::Free,
            Kind::Deref { .. } => EventKind::Deref,
        }
    }

    pub fn name(&self) -> &'static str {
        self.event_kind().name()
    }
}

/// A kernel address printed the way the kernel and the interchange print it.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses "0x..." (the interchange's form for addresses and indexes).
pub fn parse_hex(text: &str) -> Option<u64> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The function a frame ("symbol+0xoff") is in.
pub fn frame_function(frame: &str) -> &str {
    frame.split_once('+').map_or(frame, |(function, _)| function)
}

/// One line per event, for `tracer print` and for debugging.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>5}.{:06} cpu{} {}/{} {}",
            self.ts / 1_000_000_000,
            (self.ts % 1_000_000_000) / 1_000,
            self.cpu,
            self.comm,
            self.tid,
            self.kind.name()
        )?;
        match &self.kind {
            Kind::DportAdd { dport, port, xa, port_lock, free_lock, uport_lock, root } => write!(
                f,
                " dport={} port={} xa={} port_lock={} free_lock={} uport_lock={} root={root}",
                Hex(*dport),
                Hex(*port),
                Hex(*xa),
                Hex(*port_lock),
                Hex(*free_lock),
                Hex(*uport_lock)
            )?,
            Kind::XaLoad { xa, index, ret } | Kind::XaErase { xa, index, ret } => {
                write!(f, " xa={} index={} ret={}", Hex(*xa), Hex(*index), Hex(*ret))?
            }
            Kind::XaInsert { xa, index, entry } => {
                write!(f, " xa={} index={} entry={}", Hex(*xa), Hex(*index), Hex(*entry))?
            }
            Kind::Lock { lock, mode, at, name } => {
                write!(f, " lock={} {}", Hex(*lock), mode.name())?;
                if let Some(name) = name {
                    write!(f, " ({name})")?;
                }
                if let Some(at) = at {
                    write!(f, " at {at}")?;
                }
            }
            Kind::Unlock { lock, mode } => write!(f, " lock={} {}", Hex(*lock), mode.name())?,
            Kind::Use { dport, site } => write!(f, " dport={} site={site}", Hex(*dport))?,
            Kind::Free { dport } => write!(f, " dport={}", Hex(*dport))?,
            Kind::Deref { dport, access } => write!(
                f,
                " dport={} {} of dport->{} ({} byte{} at +{:#x}) at {}",
                Hex(*dport),
                access.verb(),
                access.member,
                access.size,
                if access.size == 1 { "" } else { "s" },
                access.offset,
                access.place()
            )?,
        }
        if let Some(held) = self.free_lock_held {
            write!(f, " free_lock_held={held}")?;
        }
        if let Some(held) = self.port_lock_held {
            write!(f, " port_lock_held={held}")?;
        }
        if let Some(stack) = &self.stack {
            for frame in stack.iter() {
                write!(f, "\n        {frame}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(parse_hex("0xffff888104a2c000"), Some(0xffff_8881_04a2_c000));
        assert_eq!(Hex(0xffff_8881_04a2_c000).to_string(), "0xffff888104a2c000");
        assert_eq!(parse_hex("0x0"), Some(0));
        assert_eq!(parse_hex("ffff"), None);
        assert_eq!(parse_hex("0x"), None);
        assert_eq!(parse_hex("0x1ffffffffffffffff"), None);
        assert_eq!(parse_hex("0xzz"), None);
    }

    #[test]
    fn frame_function_strips_offset() {
        assert_eq!(frame_function("cxl_mem_probe+0x1b2/0x4d0"), "cxl_mem_probe");
        assert_eq!(frame_function("cxl_mem_probe"), "cxl_mem_probe");
    }
}
