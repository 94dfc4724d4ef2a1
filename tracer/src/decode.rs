//! Decodes ring-buffer records written by `tracer-ebpf`. Pure and bounds-checked: the record
//! layout comes from `tracer_common` (`EventHeader`, the payload of each kind, then the stack
//! frames); no byte is reinterpreted through a pointer cast.
use std::mem::{offset_of, size_of};

use tracer_common::{
    DportAdd, DportFree, DportUse, EventHeader, EventKind, FLAG_FREE_LOCK_HELD, FLAG_FREE_LOCK_KNOWN,
    FLAG_PORT_LOCK_HELD, FLAG_PORT_LOCK_KNOWN, FLAG_STACK_LOST, LockOp, MAX_STACK_FRAMES, PAYLOAD_OFFSET, STACK_OFFSET,
    XaAccess,
};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {need}-byte header")]
    ShortHeader { len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind} record of {len} bytes is shorter than its {need} bytes of payload and stack")]
    Short { kind: &'static str, len: usize, need: usize },
    #[error("stack of {0} bytes is not a whole number of frames up to {MAX_STACK_FRAMES}")]
    BadStack(u32),
}

/// One kernel record, still with raw addresses (stack and site not symbolized).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub ts: u64,
    pub cpu: u32,
    pub tid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    pub flags: u32,
    pub payload: RawPayload,
    /// Return addresses, innermost first.
    pub stack: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawPayload {
    DportAdd(DportAdd),
    XaLoad(XaAccess),
    XaErase(XaAccess),
    XaInsert(XaAccess),
    Lock(LockOp),
    Unlock(LockOp),
    Use(DportUse),
    Free(DportFree),
    Deref(DportUse),
}

impl RawEvent {
    pub fn free_lock_held(&self) -> Option<bool> {
        stamp(self.flags, FLAG_FREE_LOCK_KNOWN, FLAG_FREE_LOCK_HELD)
    }

    pub fn port_lock_held(&self) -> Option<bool> {
        stamp(self.flags, FLAG_PORT_LOCK_KNOWN, FLAG_PORT_LOCK_HELD)
    }

    pub fn stack_lost(&self) -> bool {
        self.flags & FLAG_STACK_LOST != 0
    }

    /// The task name up to its NUL.
    pub fn comm(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(self.comm.len());
        &self.comm[..end]
    }
}

fn stamp(flags: u32, known: u32, held: u32) -> Option<bool> {
    (flags & known != 0).then_some(flags & held != 0)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("caller checked the length"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("caller checked the length"))
}

/// Reads a `T` made only of u64 fields followed by u32 fields, field by field.
macro_rules! read_fields {
    ($bytes:expr, $base:expr, $ty:ident { $($f64:ident),* $(; $($f32:ident),*)? }) => {
        $ty {
            $($f64: u64_at($bytes, $base + offset_of!($ty, $f64)),)*
            $($($f32: u32_at($bytes, $base + offset_of!($ty, $f32)),)*)?
        }
    };
}

pub fn decode(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    let need = size_of::<EventHeader>();
    if bytes.len() < need {
        return Err(DecodeError::ShortHeader { len: bytes.len(), need });
    }
    let kind_raw = u32_at(bytes, offset_of!(EventHeader, kind));
    let kind = EventKind::from_u32(kind_raw).ok_or(DecodeError::UnknownKind(kind_raw))?;
    let stack_bytes = u32_at(bytes, offset_of!(EventHeader, stack_bytes));
    if !stack_bytes.is_multiple_of(8) || stack_bytes as usize > MAX_STACK_FRAMES * 8 {
        return Err(DecodeError::BadStack(stack_bytes));
    }
    let payload_end = PAYLOAD_OFFSET + kind.payload_size();
    let need = if stack_bytes == 0 { payload_end } else { STACK_OFFSET + stack_bytes as usize };
    if bytes.len() < need {
        return Err(DecodeError::Short { kind: kind.name(), len: bytes.len(), need });
    }
    let p = PAYLOAD_OFFSET;
    let payload = match kind {
        EventKind::DportAdd => RawPayload::DportAdd(
            read_fields!(bytes, p, DportAdd { dport, port, xa, port_lock, free_lock, uport_lock; root, origin }),
        ),
        EventKind::XaLoad => RawPayload::XaLoad(read_fields!(bytes, p, XaAccess { xa, index, entry })),
        EventKind::XaErase => RawPayload::XaErase(read_fields!(bytes, p, XaAccess { xa, index, entry })),
        EventKind::XaInsert => RawPayload::XaInsert(read_fields!(bytes, p, XaAccess { xa, index, entry })),
        EventKind::Lock => RawPayload::Lock(read_fields!(bytes, p, LockOp { lock; site, mode })),
        EventKind::Unlock => RawPayload::Unlock(read_fields!(bytes, p, LockOp { lock; site, mode })),
        EventKind::Use => RawPayload::Use(read_fields!(bytes, p, DportUse { dport, site })),
        EventKind::Free => RawPayload::Free(read_fields!(bytes, p, DportFree { dport, block })),
        EventKind::Deref => RawPayload::Deref(read_fields!(bytes, p, DportUse { dport, site })),
    };
    let stack = (0..stack_bytes as usize / 8).map(|i| u64_at(bytes, STACK_OFFSET + i * 8)).collect();
    let mut comm = [0u8; 16];
    let at = offset_of!(EventHeader, comm);
    comm.copy_from_slice(&bytes[at..at + 16]);
    Ok(RawEvent {
        ts: u64_at(bytes, offset_of!(EventHeader, ts_ns)),
        cpu: u32_at(bytes, offset_of!(EventHeader, cpu)),
        tid: u32_at(bytes, offset_of!(EventHeader, tid)),
        tgid: u32_at(bytes, offset_of!(EventHeader, tgid)),
        comm,
        flags: u32_at(bytes, offset_of!(EventHeader, flags)),
        payload,
        stack,
    })
}

/// Builds record bytes the way the kernel side lays them out (for tests and benchmarks).
pub fn encode(event: &RawEvent) -> Vec<u8> {
    let mut bytes = vec![0u8; STACK_OFFSET + event.stack.len() * 8];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let (kind, words, tail): (EventKind, Vec<u64>, Vec<u32>) = match &event.payload {
        RawPayload::DportAdd(d) => (
            EventKind::DportAdd,
            vec![d.dport, d.port, d.xa, d.port_lock, d.free_lock, d.uport_lock],
            vec![d.root, d.origin],
        ),
        RawPayload::XaLoad(x) => (EventKind::XaLoad, vec![x.xa, x.index, x.entry], vec![]),
        RawPayload::XaErase(x) => (EventKind::XaErase, vec![x.xa, x.index, x.entry], vec![]),
        RawPayload::XaInsert(x) => (EventKind::XaInsert, vec![x.xa, x.index, x.entry], vec![]),
        RawPayload::Lock(l) => (EventKind::Lock, vec![l.lock], vec![l.site, l.mode]),
        RawPayload::Unlock(l) => (EventKind::Unlock, vec![l.lock], vec![l.site, l.mode]),
        RawPayload::Use(u) => (EventKind::Use, vec![u.dport, u.site], vec![]),
        RawPayload::Free(f) => (EventKind::Free, vec![f.dport, f.block], vec![]),
        RawPayload::Deref(u) => (EventKind::Deref, vec![u.dport, u.site], vec![]),
    };
    put32(&mut bytes, offset_of!(EventHeader, kind), kind as u32);
    put32(&mut bytes, offset_of!(EventHeader, flags), event.flags);
    put64(&mut bytes, offset_of!(EventHeader, ts_ns), event.ts);
    put32(&mut bytes, offset_of!(EventHeader, cpu), event.cpu);
    put32(&mut bytes, offset_of!(EventHeader, tid), event.tid);
    put32(&mut bytes, offset_of!(EventHeader, tgid), event.tgid);
    put32(&mut bytes, offset_of!(EventHeader, stack_bytes), (event.stack.len() * 8) as u32);
    let at = offset_of!(EventHeader, comm);
    bytes[at..at + 16].copy_from_slice(&event.comm);
    for (i, w) in words.iter().enumerate() {
        put64(&mut bytes, PAYLOAD_OFFSET + i * 8, *w);
    }
    for (i, w) in tail.iter().enumerate() {
        put32(&mut bytes, PAYLOAD_OFFSET + words.len() * 8 + i * 4, *w);
    }
    for (i, frame) in event.stack.iter().enumerate() {
        put64(&mut bytes, STACK_OFFSET + i * 8, *frame);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: RawPayload, stack: Vec<u64>) -> RawEvent {
        let mut comm = [0u8; 16];
        comm[..8].copy_from_slice(b"modprobe");
        RawEvent { ts: 123_456_789, cpu: 1, tid: 211, tgid: 211, comm, flags: FLAG_FREE_LOCK_KNOWN, payload, stack }
    }

    #[test]
    fn every_kind_round_trips() {
        let payloads = [
            RawPayload::DportAdd(DportAdd {
                dport: 1,
                port: 2,
                xa: 3,
                port_lock: 4,
                free_lock: 5,
                uport_lock: 21,
                root: 1,
                origin: 1,
            }),
            RawPayload::XaLoad(XaAccess { xa: 6, index: 7, entry: 8 }),
            RawPayload::XaErase(XaAccess { xa: 9, index: 10, entry: 11 }),
            RawPayload::XaInsert(XaAccess { xa: 12, index: 13, entry: 14 }),
            RawPayload::Lock(LockOp { lock: 15, site: 22, mode: 2 }),
            RawPayload::Unlock(LockOp { lock: 16, site: tracer_common::NO_SITE, mode: 1 }),
            RawPayload::Use(DportUse { dport: 17, site: 18 }),
            RawPayload::Free(DportFree { dport: 19, block: 20 }),
        ];
        for payload in payloads {
            for stack in [vec![], vec![0xffff_ffff_8100_0000, 0xffff_ffff_c012_3456]] {
                let event = sample(payload.clone(), stack);
                let decoded = decode(&encode(&event)).unwrap();
                assert_eq!(decoded, event);
                assert_eq!(decoded.comm(), b"modprobe");
                assert_eq!(decoded.free_lock_held(), Some(false));
                assert_eq!(decoded.port_lock_held(), None);
            }
        }
    }

    #[test]
    fn kernel_sized_records_decode() {
        // The kernel reserves a whole `Record`; the bytes past the stack are ignored.
        let event = sample(RawPayload::Lock(LockOp { lock: 42, site: 3, mode: 0 }), vec![7, 8, 9]);
        let mut bytes = encode(&event);
        bytes.resize(size_of::<tracer_common::Record>(), 0xaa);
        assert_eq!(decode(&bytes).unwrap(), event);
    }

    #[test]
    fn bad_records_are_errors() {
        let event = sample(RawPayload::Use(DportUse { dport: 1, site: 2 }), vec![3]);
        let bytes = encode(&event);
        assert_eq!(decode(&bytes[..10]), Err(DecodeError::ShortHeader { len: 10, need: 48 }));
        assert!(matches!(decode(&bytes[..STACK_OFFSET + 4]), Err(DecodeError::Short { kind: "use", .. })));
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
        let mut odd_stack = bytes.clone();
        odd_stack[offset_of!(EventHeader, stack_bytes)] = 5;
        assert_eq!(decode(&odd_stack), Err(DecodeError::BadStack(5)));
    }
}
