//! The binary trace file: compact, versioned, framed, readable as a stream, and readable up
//! to the last complete record when the writer was cut off.
//!
//! ```text
//! file   = MAGIC record*
//! record = len:u32le crc32:u32le body[len]          (crc32 of body)
//! body   = type:u8 fields...
//!   HEADER   (first record)  version:u16 tool:str kernel:str clock_base:u64 n:u16 (name:str value:u64)*n
//!   STRING   id:u32 text:str32                       ids 1, 2, 3... in order
//!   STACK    id:u32 n:u16 frame:u32*n                (frame = STRING id), ids 1, 2, 3...
//!   EVENT    ts:u64 cpu:u32 tid:u32 comm:u32 kind:u8 flags:u8 stack:u32 payload
//!   COUNTERS n:u16 (name:str value:u64)*n            kernel counters so far (last wins)
//! str = len:u16 utf8[len]; str32 = len:u32 utf8[len]; integers little-endian
//! ```
//! EVENT payloads by kind: dport_add dport port xa port_lock free_lock:u64 root:u8;
//! xa_load/xa_erase xa index ret:u64; xa_insert xa index entry:u64; lock/unlock lock:u64;
//! use dport:u64 site:u32 (STRING id); free dport:u64. Stack id 0 means no stack.
use std::{
    io::{Read, Write},
    sync::Arc,
};

use bytes::{Buf, BufMut, BytesMut};
use rustc_hash::FxHashMap;

use crate::event::{Event, EventKind, Kind, Stack};

pub const MAGIC: [u8; 8] = *b"CXLTRACE";
/// Bumped on any incompatible change; readers refuse other versions.
pub const FORMAT_VERSION: u16 = 1;
/// Largest record body accepted (a stack of 127 frames is far below this).
pub const MAX_RECORD: u32 = 1 << 20;

const FRAME_HEADER: usize = 8;

const REC_HEADER: u8 = 1;
const REC_STRING: u8 = 2;
const REC_STACK: u8 = 3;
const REC_EVENT: u8 = 4;
const REC_COUNTERS: u8 = 5;

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
    #[error("trace format version {found} is not supported: this tracer reads version {FORMAT_VERSION}")]
    Version { found: u16 },
    #[error("byte offset {offset}: the first record is not a header (type {kind})")]
    MissingHeader { offset: u64, kind: u8 },
    #[error("byte offset {offset}: record checksum mismatch (the file is corrupt)")]
    Checksum { offset: u64 },
    #[error("byte offset {offset}: record length {len} is out of range (1..={MAX_RECORD})")]
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
    /// Offset of the incomplete record.
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
    buf: BytesMut,
    /// File offset of `buf[0]`.
    offset: u64,
    eof: bool,
    header: TraceHeader,
    strings: Vec<Arc<str>>,
    stacks: Vec<Stack>,
    counters: Vec<(String, u64)>,
    truncation: Option<Truncation>,
    failed: bool,
}

impl<R: Read> TraceReader<R> {
    /// Checks the magic and reads the header record.
    pub fn new(input: R) -> Result<Self, TraceError> {
        let mut reader = TraceReader {
            input,
            buf: BytesMut::with_capacity(1 << 16),
            offset: 0,
            eof: false,
            header: TraceHeader::default(),
            strings: Vec::new(),
            stacks: Vec::new(),
            counters: Vec::new(),
            truncation: None,
            failed: false,
        };
        reader.fill(MAGIC.len())?;
        if reader.buf.len() < MAGIC.len() || reader.buf[..MAGIC.len()] != MAGIC {
            let found = reader.buf[..reader.buf.len().min(MAGIC.len())].to_vec();
            return Err(TraceError::BadMagic { found });
        }
        reader.consume(MAGIC.len());
        match reader.next_frame()? {
            Some((offset, body)) => {
                if body[0] != REC_HEADER {
                    return Err(TraceError::MissingHeader { offset, kind: body[0] });
                }
                reader.header = parse_header(&body, offset)?;
            }
            None => {
                let offset = reader.offset;
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

    /// Set when the file ends inside a record (the writer was cut off).
    pub fn truncation(&self) -> Option<Truncation> {
        self.truncation
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.offset += n as u64;
    }

    /// Reads until `buf` holds at least `n` bytes or the input ends.
    fn fill(&mut self, n: usize) -> Result<(), TraceError> {
        while self.buf.len() < n && !self.eof {
            let want = (n - self.buf.len()).max(1 << 16);
            let start = self.buf.len();
            self.buf.resize(start + want, 0);
            let read = loop {
                match self.input.read(&mut self.buf[start..]) {
                    Ok(read) => break read,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        self.buf.truncate(start);
                        return Err(err.into());
                    }
                }
            };
            self.buf.truncate(start + read);
            self.eof = read == 0;
        }
        Ok(())
    }

    /// The next complete record body and its offset; `None` at the end (a partial record at
    /// the end is recorded as a truncation).
    fn next_frame(&mut self) -> Result<Option<(u64, BytesMut)>, TraceError> {
        self.fill(FRAME_HEADER)?;
        if self.buf.is_empty() {
            return Ok(None);
        }
        let offset = self.offset;
        if self.buf.len() < FRAME_HEADER {
            self.truncation = Some(Truncation { offset, lost_bytes: self.buf.len() as u64 });
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(self.buf[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD {
            return Err(TraceError::Length { offset, len });
        }
        let total = FRAME_HEADER + len as usize;
        self.fill(total)?;
        if self.buf.len() < total {
            self.truncation = Some(Truncation { offset, lost_bytes: self.buf.len() as u64 });
            return Ok(None);
        }
        if crc32fast::hash(&self.buf[FRAME_HEADER..total]) != crc {
            return Err(TraceError::Checksum { offset });
        }
        self.consume(FRAME_HEADER);
        let body = self.buf.split_to(len as usize);
        self.offset += u64::from(len);
        Ok(Some((offset, body)))
    }

    /// The next event, skipping the string, stack and counter records it depends on.
    pub fn next_event(&mut self) -> Result<Option<Event>, TraceError> {
        while let Some((offset, body)) = self.next_frame()? {
            match body[0] {
                REC_EVENT => return self.parse_event(&body[1..], offset).map(Some),
                REC_STRING => {
                    let mut b = Body { buf: &body[1..], offset, record: "string" };
                    let id = b.u32()?;
                    let text = b.str32()?;
                    b.end()?;
                    if id as usize != self.strings.len() + 1 {
                        return Err(b.err("string ids are not consecutive"));
                    }
                    self.strings.push(Arc::from(text));
                }
                REC_STACK => {
                    let mut b = Body { buf: &body[1..], offset, record: "stack" };
                    let id = b.u32()?;
                    let n = b.u16()? as usize;
                    let mut frames = Vec::with_capacity(n.min(256));
                    for _ in 0..n {
                        let string = b.u32()?;
                        frames.push(self.string(string).ok_or_else(|| b.err("frame names an undefined string"))?);
                    }
                    b.end()?;
                    if id as usize != self.stacks.len() + 1 {
                        return Err(b.err("stack ids are not consecutive"));
                    }
                    self.stacks.push(Arc::from(frames));
                }
                REC_COUNTERS => {
                    let mut b = Body { buf: &body[1..], offset, record: "counters" };
                    let n = b.u16()?;
                    let mut counters = Vec::with_capacity(usize::from(n).min(64));
                    for _ in 0..n {
                        counters.push((b.str()?, b.u64()?));
                    }
                    b.end()?;
                    self.counters = counters;
                }
                REC_HEADER => {
                    return Err(TraceError::Malformed { offset, record: "header", what: "a second header record" });
                }
                kind => return Err(TraceError::UnknownRecord { offset, kind }),
            }
        }
        Ok(None)
    }

    fn string(&self, id: u32) -> Option<Arc<str>> {
        self.strings.get((id as usize).checked_sub(1)?).cloned()
    }

    fn parse_event(&self, buf: &[u8], offset: u64) -> Result<Event, TraceError> {
        let mut b = Body { buf, offset, record: "event" };
        let ts = b.u64()?;
        let cpu = b.u32()?;
        let tid = b.u32()?;
        let comm = self.string(b.u32()?).ok_or_else(|| b.err("task name is an undefined string"))?;
        let kind = EventKind::from_u32(u32::from(b.u8()?)).ok_or_else(|| b.err("unknown event kind"))?;
        let flags = b.u8()?;
        let stack = match b.u32()? {
            0 => None,
            id => Some(self.stacks.get(id as usize - 1).cloned().ok_or_else(|| b.err("undefined stack"))?),
        };
        let kind = match kind {
            EventKind::DportAdd => Kind::DportAdd {
                dport: b.u64()?,
                port: b.u64()?,
                xa: b.u64()?,
                port_lock: b.u64()?,
                free_lock: b.u64()?,
                root: match b.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(b.err("root flag is neither 0 nor 1")),
                },
            },
            EventKind::XaLoad => Kind::XaLoad { xa: b.u64()?, index: b.u64()?, ret: b.u64()? },
            EventKind::XaErase => Kind::XaErase { xa: b.u64()?, index: b.u64()?, ret: b.u64()? },
            EventKind::XaInsert => Kind::XaInsert { xa: b.u64()?, index: b.u64()?, entry: b.u64()? },
            EventKind::Lock => Kind::Lock { lock: b.u64()? },
            EventKind::Unlock => Kind::Unlock { lock: b.u64()? },
            EventKind::Use => Kind::Use {
                dport: b.u64()?,
                site: self.string(b.u32()?).ok_or_else(|| b.err("use site is an undefined string"))?,
            },
            EventKind::Free => Kind::Free { dport: b.u64()? },
        };
        b.end()?;
        let stamp = |known, held| if flags & known != 0 { Some(flags & held != 0) } else { None };
        Ok(Event {
            ts,
            cpu,
            tid,
            comm,
            kind,
            stack,
            free_lock_held: stamp(FLAG_FREE_KNOWN, FLAG_FREE_HELD),
            port_lock_held: stamp(FLAG_PORT_KNOWN, FLAG_PORT_HELD),
        })
    }
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

fn parse_header(body: &[u8], offset: u64) -> Result<TraceHeader, TraceError> {
    let mut b = Body { buf: &body[1..], offset, record: "header" };
    let version = b.u16()?;
    if version != FORMAT_VERSION {
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
    Ok(TraceHeader { tool_version, kernel_release, clock_base_ns, offsets })
}

/// Writes a trace: interns strings and stacks, frames every record, buffers until `flush`.
pub struct TraceWriter<W: Write> {
    out: W,
    buf: BytesMut,
    strings: FxHashMap<Arc<str>, u32>,
    stacks: FxHashMap<Stack, u32>,
    written: u64,
}

/// Buffered bytes past which `write_event` flushes by itself.
const FLUSH_AT: usize = 1 << 16;

impl<W: Write> TraceWriter<W> {
    pub fn new(out: W, header: &TraceHeader) -> std::io::Result<Self> {
        let mut writer = TraceWriter {
            out,
            buf: BytesMut::with_capacity(FLUSH_AT * 2),
            strings: FxHashMap::default(),
            stacks: FxHashMap::default(),
            written: 0,
        };
        writer.buf.put_slice(&MAGIC);
        writer.record(|b| {
            b.put_u8(REC_HEADER);
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

    /// Appends one framed record built by `fill`.
    fn record(&mut self, fill: impl FnOnce(&mut BytesMut)) {
        let start = self.buf.len();
        self.buf.put_u64_le(0);
        fill(&mut self.buf);
        let len = (self.buf.len() - start - FRAME_HEADER) as u32;
        let crc = crc32fast::hash(&self.buf[start + FRAME_HEADER..]);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn string_id(&mut self, text: &Arc<str>) -> u32 {
        if let Some(&id) = self.strings.get(text) {
            return id;
        }
        let id = self.strings.len() as u32 + 1;
        self.strings.insert(text.clone(), id);
        self.record(|b| {
            b.put_u8(REC_STRING);
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
        self.record(|b| {
            b.put_u8(REC_STACK);
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
        let site = match &event.kind {
            Kind::Use { site, .. } => self.string_id(site),
            _ => 0,
        };
        let mut flags = 0;
        if let Some(held) = event.free_lock_held {
            flags |= FLAG_FREE_KNOWN | if held { FLAG_FREE_HELD } else { 0 };
        }
        if let Some(held) = event.port_lock_held {
            flags |= FLAG_PORT_KNOWN | if held { FLAG_PORT_HELD } else { 0 };
        }
        self.record(|b| {
            b.put_u8(REC_EVENT);
            b.put_u64_le(event.ts);
            b.put_u32_le(event.cpu);
            b.put_u32_le(event.tid);
            b.put_u32_le(comm);
            b.put_u8(event.kind.event_kind() as u8);
            b.put_u8(flags);
            b.put_u32_le(stack);
            match &event.kind {
                Kind::DportAdd { dport, port, xa, port_lock, free_lock, root } => {
                    for v in [dport, port, xa, port_lock, free_lock] {
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
                Kind::Lock { lock } | Kind::Unlock { lock } => b.put_u64_le(*lock),
                Kind::Use { dport, .. } => {
                    b.put_u64_le(*dport);
                    b.put_u32_le(site);
                }
                Kind::Free { dport } => b.put_u64_le(*dport),
            }
        });
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Records the kernel counters so far (a reader keeps the last such record).
    pub fn write_counters(&mut self, counters: &[(&str, u64)]) -> std::io::Result<()> {
        self.record(|b| {
            b.put_u8(REC_COUNTERS);
            b.put_u16_le(counters.len() as u16);
            for (name, value) in counters {
                put_str(b, name);
                b.put_u64_le(*value);
            }
        });
        self.flush()
    }

    /// Writes out whole records buffered so far.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
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
