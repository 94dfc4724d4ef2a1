//! The binary trace file: compact, versioned, framed, readable as a stream, and readable up
//! to the last complete record when the writer was cut off.
//!
//! ```text
//! file   = MAGIC chunk*
//! chunk  = len:u32le crc32:u32le record*             (crc32 of the records; one per flush)
//! record = len:u32le type:u8 fields[len-1]
//!   HEADER   (first record)  version:u16 tool:str kernel:str clock_base:u64 n:u16 (name:str value:u64)*n
//!   STRING   id:u32 text:str32                       ids 1, 2, 3... in order
//!   STACK    id:u32 n:u16 frame:u32*n                (frame = STRING id), ids 1, 2, 3...
//!   EVENT    ts:u64 cpu:u32 tid:u32 comm:u32 kind:u8 flags:u8 stack:u32 payload
//!   COUNTERS n:u16 (name:str value:u64)*n            kernel counters so far (last wins)
//!   COVERAGE n:u32 (kind:u8 place:str function:str ran:u64 reported:u64
//!                   [xarray:u8 file:str])*n          probed sites at the end (version 2;
//!                                                    xarray and file from version 3)
//! str = len:u16 utf8[len]; str32 = len:u32 utf8[len]; integers little-endian
//! ```
//! EVENT payloads by kind: dport_add dport port xa port_lock free_lock uport_lock:u64 root:u8
//! (uport_lock from version 3); xa_load/xa_erase xa index ret:u64; xa_insert xa index
//! entry:u64; lock lock:u64 mode:u8 at:u32 name:u32 (STRING ids, 0 for none), unlock lock:u64
//! mode:u8 (mode, at and name from version 3; before, lock:u64 alone, a mutex); use dport:u64
//! site:u32 (STRING id); free dport:u64; deref dport:u64 function:u32 insn:u32 member:u32
//! (STRING ids) offset:u32 size:u32 write:u8 (version 2). Stack id 0 means no stack.
use std::{
    io::{Read, Write},
    ops::Range,
    sync::Arc,
};

use bytes::{Buf, BufMut, BytesMut};
use rustc_hash::FxHashMap;

use crate::{
    coverage::{Coverage, SiteKind, SiteRun, XaTarget},
    event::{Access, Event, EventKind, Kind, LockMode, Stack},
};

pub const MAGIC: [u8; 8] = *b"CXLTRACE";
/// Bumped on any incompatible change; readers refuse newer versions. Version 2 added the
/// deref event; a version 1 file is read as it is (it has none). Version 3 added the
/// registration's uport lock, and the mode, site and name of a lock.
pub const FORMAT_VERSION: u16 = 3;
const OLDEST_READABLE: u16 = 1;
/// Largest chunk accepted; the writer ends a chunk at every flush and at 64 KiB.
pub const MAX_CHUNK: u32 = 1 << 24;

const CHUNK_HEADER: usize = 8;
const RECORD_HEADER: usize = 4;

const REC_HEADER: u8 = 1;
const REC_STRING: u8 = 2;
const REC_STACK: u8 = 3;
const REC_EVENT: u8 = 4;
const REC_COUNTERS: u8 = 5;
const REC_COVERAGE: u8 = 6;

const FLAG_FREE_KNOWN: u8 = 1 << 0;
const FLAG_FREE_HELD: u8 = 1 << 1;
const FLAG_PORT_KNOWN: u8 = 1 << 2;
const FLAG_PORT_HELD: u8 = 1 << 3;

/// What a trace was recorded on and with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeader {
    pub tool_version: String,
    pub kernel_release: String,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC when recording started, in ns: adds to an event's
    /// `ts` to give wall-clock time.
    pub clock_base_ns: u64,
    /// The struct offsets the kernel side was given (name, value).
    pub offsets: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("not a tracer trace file (starts with {found:02x?}, expected {MAGIC:02x?} \"CXLTRACE\")")]
    BadMagic { found: Vec<u8> },
    #[error(
        "trace format version {found} is not supported: this tracer reads versions {OLDEST_READABLE} to {FORMAT_VERSION}"
    )]
    Version { found: u16 },
    #[error("byte offset {offset}: the first record is not a header (type {kind})")]
    MissingHeader { offset: u64, kind: u8 },
    #[error("byte offset {offset}: chunk checksum mismatch (the file is corrupt)")]
    Checksum { offset: u64 },
    #[error("byte offset {offset}: chunk length {len} is out of range (1..={MAX_CHUNK})")]
    Length { offset: u64, len: u32 },
    #[error("byte offset {offset}: malformed {record} record: {what}")]
    Malformed { offset: u64, record: &'static str, what: &'static str },
    #[error("byte offset {offset}: unknown record type {kind}")]
    UnknownRecord { offset: u64, kind: u8 },
    #[error("cannot read the trace: {0}")]
    Io(#[from] std::io::Error),
}

/// The tail of a trace whose writer was cut off mid-record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// Offset of the first byte not read (the incomplete record or chunk header).
    pub offset: u64,
    /// Bytes after the last complete record.
    pub lost_bytes: u64,
}

/// Body of one record being parsed: every read is bounds-checked.
struct Body<'a> {
    buf: &'a [u8],
    offset: u64,
    record: &'static str,
}

impl Body<'_> {
    fn err(&self, what: &'static str) -> TraceError {
        TraceError::Malformed { offset: self.offset, record: self.record, what }
    }

    fn need(&self, n: usize) -> Result<(), TraceError> {
        if self.buf.remaining() < n { Err(self.err("shorter than its fields")) } else { Ok(()) }
    }

    fn u8(&mut self) -> Result<u8, TraceError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, TraceError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }

    fn u32(&mut self) -> Result<u32, TraceError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }

    fn u64(&mut self) -> Result<u64, TraceError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }

    fn bytes(&mut self, len: usize) -> Result<&[u8], TraceError> {
        self.need(len)?;
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    fn str(&mut self) -> Result<String, TraceError> {
        let len = self.u16()? as usize;
        self.utf8(len)
    }

    fn str32(&mut self) -> Result<String, TraceError> {
        let len = self.u32()? as usize;
        self.utf8(len)
    }

    fn utf8(&mut self, len: usize) -> Result<String, TraceError> {
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn end(&self) -> Result<(), TraceError> {
        if self.buf.is_empty() { Ok(()) } else { Err(self.err("trailing bytes")) }
    }
}

/// Streams events out of a trace file.
pub struct TraceReader<R> {
    input: R,
    /// Bytes read and not yet consumed are `buf[start..end]`; `buf[0]` is at file offset
    /// `base`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    base: u64,
    eof: bool,
    /// End (in `buf`) of the chunk being read; records are parsed up to it.
    chunk_end: usize,
    header: TraceHeader,
    /// The file's format version (its event payloads differ by version).
    version: u16,
    strings: Vec<Arc<str>>,
    stacks: Vec<Stack>,
    counters: Vec<(String, u64)>,
    coverage: Option<Coverage>,
    truncation: Option<Truncation>,
    failed: bool,
}

impl<R: Read> TraceReader<R> {
    /// Checks the magic and reads the header record.
    pub fn new(input: R) -> Result<Self, TraceError> {
        let mut reader = TraceReader {
            input,
            buf: vec![0; 1 << 16],
            start: 0,
            end: 0,
            base: 0,
            eof: false,
            chunk_end: 0,
            header: TraceHeader::default(),
            version: FORMAT_VERSION,
            strings: Vec::new(),
            stacks: Vec::new(),
            counters: Vec::new(),
            coverage: None,
            truncation: None,
            failed: false,
        };
        reader.fill(MAGIC.len())?;
        let prefix = &reader.buf[..reader.end.min(MAGIC.len())];
        if prefix != MAGIC {
            return Err(TraceError::BadMagic { found: prefix.to_vec() });
        }
        reader.start = MAGIC.len();
        reader.chunk_end = reader.start;
        match reader.next_record()? {
            Some((offset, REC_HEADER, fields)) => {
                (reader.version, reader.header) = parse_header(&reader.buf[fields], offset)?
            }
            Some((offset, kind, _)) => return Err(TraceError::MissingHeader { offset, kind }),
            None => {
                let offset = reader.offset();
                return Err(TraceError::Malformed { offset, record: "header", what: "file ends before its header" });
            }
        }
        Ok(reader)
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// The kernel counters of the last COUNTERS record read so far.
    pub fn counters(&self) -> &[(String, u64)] {
        &self.counters
    }

    /// The site coverage, once its record was read (at the end of the file).
    pub fn coverage(&self) -> Option<&Coverage> {
        self.coverage.as_ref()
    }

    /// Set when the file ends inside a chunk or a record (the writer was cut off).
    pub fn truncation(&self) -> Option<Truncation> {
        self.truncation
    }

    /// File offset of the next unread byte.
    pub fn offset(&self) -> u64 {
        self.base + self.start as u64
    }

    /// Reads until `buf[start..end]` holds at least `n` bytes or the input ends.
    fn fill(&mut self, n: usize) -> Result<(), TraceError> {
        while self.end - self.start < n && !self.eof {
            if self.start + n > self.buf.len() {
                // Keep the unread tail (and the chunk it belongs to) at the front.
                let keep_from = self.start.min(self.chunk_end);
                self.buf.copy_within(keep_from..self.end, 0);
                self.base += keep_from as u64;
                self.start -= keep_from;
                self.end -= keep_from;
                self.chunk_end -= keep_from;
                if self.start + n > self.buf.len() {
                    self.buf.resize((self.start + n).next_power_of_two(), 0);
                }
            }
            let read = loop {
                match self.input.read(&mut self.buf[self.end..]) {
                    Ok(read) => break read,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(err.into()),
                }
            };
            self.end += read;
            self.eof = read == 0;
        }
        Ok(())
    }

    /// Opens the next chunk: checks its length and checksum. `false` at the end of the input.
    /// A chunk cut off by the end of the file is read without its checksum (its complete
    /// records are still delivered; the incomplete tail is recorded as a truncation).
    fn next_chunk(&mut self) -> Result<bool, TraceError> {
        self.fill(CHUNK_HEADER)?;
        let offset = self.offset();
        let avail = self.end - self.start;
        if avail == 0 {
            return Ok(false);
        }
        if avail < CHUNK_HEADER {
            self.truncation = Some(Truncation { offset, lost_bytes: avail as u64 });
            self.start = self.end;
            return Ok(false);
        }
        let at = self.start;
        let len = u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(self.buf[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_CHUNK {
            return Err(TraceError::Length { offset, len });
        }
        self.chunk_end = self.start; // keep the chunk header while filling
        self.fill(CHUNK_HEADER + len as usize)?;
        let body_start = self.start + CHUNK_HEADER;
        let whole = self.end - self.start >= CHUNK_HEADER + len as usize;
        if whole {
            let body_end = body_start + len as usize;
            if crc32fast::hash(&self.buf[body_start..body_end]) != crc {
                return Err(TraceError::Checksum { offset });
            }
            self.chunk_end = body_end;
        } else {
            // Until an incomplete record shows up, the cut is at the end of the file.
            self.chunk_end = self.end;
            self.truncation = Some(Truncation { offset: self.base + self.end as u64, lost_bytes: 0 });
        }
        self.start = body_start;
        Ok(true)
    }

    /// The next record (offset, type, where its fields are in `buf`); `None` at the end.
    fn next_record(&mut self) -> Result<Option<(u64, u8, Range<usize>)>, TraceError> {
        while self.start >= self.chunk_end {
            if self.truncation.is_some() || !self.next_chunk()? {
                return Ok(None);
            }
        }
        let offset = self.offset();
        let avail = self.chunk_end - self.start;
        let len = if avail >= RECORD_HEADER {
            u32::from_le_bytes(self.buf[self.start..self.start + 4].try_into().expect("4 bytes")) as usize
        } else {
            usize::MAX
        };
        if len == usize::MAX || RECORD_HEADER + len > avail {
            if let Some(cut) = &mut self.truncation {
                // The file ends inside this record: everything from here on is lost.
                *cut = Truncation { offset, lost_bytes: (self.end - self.start) as u64 };
                self.start = self.chunk_end;
                return Ok(None);
            }
            return Err(TraceError::Malformed { offset, record: "chunk", what: "a record overruns its chunk" });
        }
        if len == 0 {
            return Err(TraceError::Malformed { offset, record: "chunk", what: "a record of length 0" });
        }
        let body = self.start + RECORD_HEADER;
        self.start = body + len;
        Ok(Some((offset, self.buf[body], body + 1..body + len)))
    }

    /// The next event, taking in the string, stack and counter records it depends on.
    pub fn next_event(&mut self) -> Result<Option<Event>, TraceError> {
        loop {
            let Some((offset, kind, range)) = self.next_record()? else { return Ok(None) };
            let fields = &self.buf[range];
            match kind {
                REC_EVENT => return parse_event(fields, offset, self.version, &self.strings, &self.stacks).map(Some),
                REC_STRING => {
                    let mut b = Body { buf: fields, offset, record: "string" };
                    let id = b.u32()?;
                    let text = b.str32()?;
                    b.end()?;
                    if id as usize != self.strings.len() + 1 {
                        return Err(b.err("string ids are not consecutive"));
                    }
                    self.strings.push(Arc::from(text));
                }
                REC_STACK => {
                    let mut b = Body { buf: fields, offset, record: "stack" };
                    let id = b.u32()?;
                    let n = b.u16()? as usize;
                    let mut frames = Vec::with_capacity(n.min(256));
                    for _ in 0..n {
                        let string = b.u32()?;
                        frames.push(
                            string_at(&self.strings, string).ok_or_else(|| b.err("frame names an undefined string"))?,
                        );
                    }
                    b.end()?;
                    if id as usize != self.stacks.len() + 1 {
                        return Err(b.err("stack ids are not consecutive"));
                    }
                    self.stacks.push(Arc::from(frames));
                }
                REC_COUNTERS => {
                    let mut b = Body { buf: fields, offset, record: "counters" };
                    let n = b.u16()?;
                    let mut counters = Vec::with_capacity(usize::from(n).min(64));
                    for _ in 0..n {
                        counters.push((b.str()?, b.u64()?));
                    }
                    b.end()?;
                    self.counters = counters;
                }
                REC_COVERAGE => {
                    let mut b = Body { buf: fields, offset, record: "coverage" };
                    let n = b.u32()?;
                    let mut sites = Vec::with_capacity((n as usize).min(1 << 16));
                    for _ in 0..n {
                        let kind = match b.u8()? {
                            0 => SiteKind::Load,
                            1 => SiteKind::Use,
                            2 => SiteKind::Deref,
                            _ => return Err(b.err("unknown site kind")),
                        };
                        let place = Arc::from(b.str()?);
                        let function = Arc::from(b.str()?);
                        let (ran, reported) = (b.u64()?, b.u64()?);
                        // Version 3 added what xarray a load site reads and the source file.
                        let (xarray, file) = if self.version >= 3 {
                            let xarray = match b.u8()? {
                                0 => XaTarget::Unknown,
                                1 => XaTarget::Dports,
                                2 => XaTarget::Other,
                                _ => return Err(b.err("unknown xarray target")),
                            };
                            let file = b.str()?;
                            (xarray, (!file.is_empty()).then(|| Arc::from(file)))
                        } else if kind == SiteKind::Load {
                            (XaTarget::Unknown, None)
                        } else {
                            (XaTarget::Dports, None)
                        };
                        sites.push(SiteRun { kind, place, function, ran, reported, judged: 0, xarray, file });
                    }
                    b.end()?;
                    self.coverage = Some(Coverage { sites });
                }
                REC_HEADER => {
                    return Err(TraceError::Malformed { offset, record: "header", what: "a second header record" });
                }
                kind => return Err(TraceError::UnknownRecord { offset, kind }),
            }
        }
    }
}

fn string_at(strings: &[Arc<str>], id: u32) -> Option<Arc<str>> {
    strings.get((id as usize).checked_sub(1)?).cloned()
}

/// Bytes of an EVENT record before its payload: ts cpu tid comm kind flags stack.
const EVENT_FIXED: usize = 8 + 4 + 4 + 4 + 1 + 1 + 4;

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("length checked by the caller"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("length checked by the caller"))
}

/// Decodes an EVENT record. The hot path of every replay: lengths are checked once for the
/// fixed part and once for the payload of the kind.
fn parse_event(
    buf: &[u8],
    offset: u64,
    version: u16,
    strings: &[Arc<str>],
    stacks: &[Stack],
) -> Result<Event, TraceError> {
    let err = |what| TraceError::Malformed { offset, record: "event", what };
    if buf.len() < EVENT_FIXED {
        return Err(err("shorter than its fields"));
    }
    let comm = string_at(strings, le_u32(buf, 16)).ok_or_else(|| err("task name is an undefined string"))?;
    let kind = EventKind::from_u32(u32::from(buf[20])).ok_or_else(|| err("unknown event kind"))?;
    let flags = buf[21];
    let stack = match le_u32(buf, 22) {
        0 => None,
        id => Some(stacks.get(id as usize - 1).cloned().ok_or_else(|| err("undefined stack"))?),
    };
    let p = &buf[EVENT_FIXED..];
    let v3 = version >= 3;
    let payload_len = match kind {
        EventKind::DportAdd if v3 => 49,
        EventKind::DportAdd => 41,
        EventKind::XaLoad | EventKind::XaErase | EventKind::XaInsert => 24,
        EventKind::Lock if v3 => 17,
        EventKind::Unlock if v3 => 9,
        EventKind::Lock | EventKind::Unlock | EventKind::Free => 8,
        EventKind::Use => 12,
        EventKind::Deref => 29,
    };
    if p.len() != payload_len {
        return Err(err(if p.len() < payload_len { "shorter than its fields" } else { "trailing bytes" }));
    }
    let w = |i: usize| le_u64(p, i * 8);
    let kind = match kind {
        EventKind::DportAdd => Kind::DportAdd {
            dport: w(0),
            port: w(1),
            xa: w(2),
            port_lock: w(3),
            free_lock: w(4),
            uport_lock: if v3 { w(5) } else { 0 },
            root: match p[payload_len - 1] {
                0 => false,
                1 => true,
                _ => return Err(err("root flag is neither 0 nor 1")),
            },
        },
        EventKind::XaLoad => Kind::XaLoad { xa: w(0), index: w(1), ret: w(2) },
        EventKind::XaErase => Kind::XaErase { xa: w(0), index: w(1), ret: w(2) },
        EventKind::XaInsert => Kind::XaInsert { xa: w(0), index: w(1), entry: w(2) },
        EventKind::Lock if v3 => {
            let optional = |at: usize, what| match le_u32(p, at) {
                0 => Ok(None),
                id => string_at(strings, id).map(Some).ok_or_else(|| err(what)),
            };
            Kind::Lock {
                lock: w(0),
                mode: LockMode::from_u32(u32::from(p[8])).ok_or_else(|| err("unknown lock mode"))?,
                at: optional(9, "lock site is an undefined string")?,
                name: optional(13, "lock name is an undefined string")?,
            }
        }
        EventKind::Unlock if v3 => Kind::Unlock {
            lock: w(0),
            mode: LockMode::from_u32(u32::from(p[8])).ok_or_else(|| err("unknown lock mode"))?,
        },
        EventKind::Lock => Kind::mutex_lock(w(0)),
        EventKind::Unlock => Kind::mutex_unlock(w(0)),
        EventKind::Use => Kind::Use {
            dport: w(0),
            site: string_at(strings, le_u32(p, 8)).ok_or_else(|| err("use site is an undefined string"))?,
        },
        EventKind::Free => Kind::Free { dport: w(0) },
        EventKind::Deref => {
            let string = |at: usize, what| string_at(strings, le_u32(p, at)).ok_or_else(|| err(what));
            let access = Access {
                function: string(8, "deref function is an undefined string")?,
                insn: u64::from(le_u32(p, 12)),
                member: string(16, "deref member is an undefined string")?,
                offset: le_u32(p, 20),
                size: le_u32(p, 24),
                write: match p[28] {
                    0 => false,
                    1 => true,
                    _ => return Err(err("deref write flag is neither 0 nor 1")),
                },
            };
            Kind::Deref { dport: w(0), access: Arc::new(access) }
        }
    };
    let stamp = |known, held| if flags & known != 0 { Some(flags & held != 0) } else { None };
    Ok(Event {
        ts: le_u64(buf, 0),
        cpu: le_u32(buf, 8),
        tid: le_u32(buf, 12),
        comm,
        kind,
        stack,
        free_lock_held: stamp(FLAG_FREE_KNOWN, FLAG_FREE_HELD),
        port_lock_held: stamp(FLAG_PORT_KNOWN, FLAG_PORT_HELD),
    })
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<Event, TraceError>;

    /// Events in order; an error ends the stream.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_event() {
            Ok(event) => event.map(Ok),
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

fn parse_header(fields: &[u8], offset: u64) -> Result<(u16, TraceHeader), TraceError> {
    let mut b = Body { buf: fields, offset, record: "header" };
    let version = b.u16()?;
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(TraceError::Version { found: version });
    }
    let tool_version = b.str()?;
    let kernel_release = b.str()?;
    let clock_base_ns = b.u64()?;
    let n = b.u16()?;
    let mut offsets = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        offsets.push((b.str()?, b.u64()?));
    }
    b.end()?;
    Ok((version, TraceHeader { tool_version, kernel_release, clock_base_ns, offsets }))
}

/// Writes a trace: interns strings and stacks, frames records, and ends a checksummed chunk
/// at every `flush` (and every 64 KiB), so a reader can trust all but a cut-off tail.
pub struct TraceWriter<W: Write> {
    out: W,
    /// The open chunk: its 8-byte header (filled at flush) and its records.
    buf: BytesMut,
    strings: FxHashMap<Arc<str>, u32>,
    stacks: FxHashMap<Stack, u32>,
    written: u64,
}

/// Chunk size past which `write_event` flushes by itself.
const FLUSH_AT: usize = 1 << 16;

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, header: &TraceHeader) -> std::io::Result<Self> {
        out.write_all(&MAGIC)?;
        let mut writer = TraceWriter {
            out,
            buf: BytesMut::with_capacity(FLUSH_AT * 2),
            strings: FxHashMap::default(),
            stacks: FxHashMap::default(),
            written: MAGIC.len() as u64,
        };
        writer.buf.put_u64_le(0);
        writer.record(REC_HEADER, |b| {
            b.put_u16_le(FORMAT_VERSION);
            put_str(b, &header.tool_version);
            put_str(b, &header.kernel_release);
            b.put_u64_le(header.clock_base_ns);
            b.put_u16_le(header.offsets.len() as u16);
            for (name, value) in &header.offsets {
                put_str(b, name);
                b.put_u64_le(*value);
            }
        });
        writer.flush()?;
        Ok(writer)
    }

    /// Appends one record of type `kind` whose fields `fill` writes.
    fn record(&mut self, kind: u8, fill: impl FnOnce(&mut BytesMut)) {
        let start = self.buf.len();
        self.buf.put_u32_le(0);
        self.buf.put_u8(kind);
        fill(&mut self.buf);
        let len = (self.buf.len() - start - RECORD_HEADER) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    fn string_id(&mut self, text: &Arc<str>) -> u32 {
        if let Some(&id) = self.strings.get(text) {
            return id;
        }
        let id = self.strings.len() as u32 + 1;
        self.strings.insert(text.clone(), id);
        self.record(REC_STRING, |b| {
            b.put_u32_le(id);
            b.put_u32_le(text.len() as u32);
            b.put_slice(text.as_bytes());
        });
        id
    }

    fn stack_id(&mut self, stack: &Stack) -> u32 {
        if let Some(&id) = self.stacks.get(stack) {
            return id;
        }
        let frames: Vec<u32> = stack.iter().take(u16::MAX as usize).map(|f| self.string_id(f)).collect();
        let id = self.stacks.len() as u32 + 1;
        self.stacks.insert(stack.clone(), id);
        self.record(REC_STACK, |b| {
            b.put_u32_le(id);
            b.put_u16_le(frames.len() as u16);
            for frame in frames {
                b.put_u32_le(frame);
            }
        });
        id
    }

    pub fn write_event(&mut self, event: &Event) -> std::io::Result<()> {
        let comm = self.string_id(&event.comm);
        let stack = event.stack.as_ref().map_or(0, |s| self.stack_id(s));
        let mut optional = |s: &Option<Arc<str>>| s.as_ref().map_or(0, |s| self.string_id(s));
        let (site, member) = match &event.kind {
            Kind::Use { site, .. } => (self.string_id(site), 0),
            Kind::Deref { access, .. } => (self.string_id(&access.function), self.string_id(&access.member)),
            Kind::Lock { at, name, .. } => (optional(at), optional(name)),
            _ => (0, 0),
        };
        let mut flags = 0;
        if let Some(held) = event.free_lock_held {
            flags |= FLAG_FREE_KNOWN | if held { FLAG_FREE_HELD } else { 0 };
        }
        if let Some(held) = event.port_lock_held {
            flags |= FLAG_PORT_KNOWN | if held { FLAG_PORT_HELD } else { 0 };
        }
        self.record(REC_EVENT, |b| {
            b.put_u64_le(event.ts);
            b.put_u32_le(event.cpu);
            b.put_u32_le(event.tid);
            b.put_u32_le(comm);
            b.put_u8(event.kind.event_kind() as u8);
            b.put_u8(flags);
            b.put_u32_le(stack);
            match &event.kind {
                Kind::DportAdd { dport, port, xa, port_lock, free_lock, uport_lock, root } => {
                    for v in [dport, port, xa, port_lock, free_lock, uport_lock] {
                        b.put_u64_le(*v);
                    }
                    b.put_u8(u8::from(*root));
                }
                Kind::XaLoad { xa, index, ret } | Kind::XaErase { xa, index, ret } => {
                    for v in [xa, index, ret] {
                        b.put_u64_le(*v);
                    }
                }
                Kind::XaInsert { xa, index, entry } => {
                    for v in [xa, index, entry] {
                        b.put_u64_le(*v);
                    }
                }
                Kind::Lock { lock, mode, .. } => {
                    b.put_u64_le(*lock);
                    b.put_u8(*mode as u8);
                    b.put_u32_le(site);
                    b.put_u32_le(member);
                }
                Kind::Unlock { lock, mode } => {
                    b.put_u64_le(*lock);
                    b.put_u8(*mode as u8);
                }
                Kind::Use { dport, .. } => {
                    b.put_u64_le(*dport);
                    b.put_u32_le(site);
                }
                Kind::Free { dport } => b.put_u64_le(*dport),
                Kind::Deref { dport, access } => {
                    b.put_u64_le(*dport);
                    b.put_u32_le(site);
                    b.put_u32_le(u32::try_from(access.insn).unwrap_or(u32::MAX));
                    b.put_u32_le(member);
                    b.put_u32_le(access.offset);
                    b.put_u32_le(access.size);
                    b.put_u8(u8::from(access.write));
                }
            }
        });
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Records which probed sites ran (written once, at the end of a run).
    pub fn write_coverage(&mut self, coverage: &Coverage) -> std::io::Result<()> {
        self.record(REC_COVERAGE, |b| {
            b.put_u32_le(coverage.sites.len() as u32);
            for s in &coverage.sites {
                b.put_u8(match s.kind {
                    SiteKind::Load => 0,
                    SiteKind::Use => 1,
                    SiteKind::Deref => 2,
                });
                put_str(b, &s.place);
                put_str(b, &s.function);
                b.put_u64_le(s.ran);
                b.put_u64_le(s.reported);
                b.put_u8(match s.xarray {
                    XaTarget::Unknown => 0,
                    XaTarget::Dports => 1,
                    XaTarget::Other => 2,
                });
                put_str(b, s.file.as_deref().unwrap_or(""));
            }
        });
        self.flush()
    }

    /// Records the kernel counters so far (a reader keeps the last such record).
    pub fn write_counters(&mut self, counters: &[(&str, u64)]) -> std::io::Result<()> {
        self.record(REC_COUNTERS, |b| {
            b.put_u16_le(counters.len() as u16);
            for (name, value) in counters {
                put_str(b, name);
                b.put_u64_le(*value);
            }
        });
        self.flush()
    }

    /// Ends the open chunk and writes it out.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() > CHUNK_HEADER {
            let len = (self.buf.len() - CHUNK_HEADER) as u32;
            let crc = crc32fast::hash(&self.buf[CHUNK_HEADER..]);
            self.buf[0..4].copy_from_slice(&len.to_le_bytes());
            self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
            self.out.write_all(&self.buf)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
            self.buf.put_u64_le(0);
        }
        self.out.flush()
    }

    /// Bytes handed to the output so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    pub fn into_inner(mut self) -> std::io::Result<W> {
        self.flush()?;
        Ok(self.out)
    }
}

fn put_str(b: &mut BytesMut, text: &str) {
    let mut end = text.len().min(u16::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &text.as_bytes()[..end];
    b.put_u16_le(bytes.len() as u16);
    b.put_slice(bytes);
}

/// Whether `prefix` (the start of a file) is a binary trace.
pub fn is_trace(prefix: &[u8]) -> bool {
    prefix.starts_with(&MAGIC)
}
