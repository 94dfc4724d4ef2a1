//! The JSON-lines event interchange (README, "Trace files and the event interchange"): one event per line,
//! `{"ts":NS,"cpu":N,"tid":N,"comm":"...","kind":K, ...}` with addresses and xarray indexes
//! as hex strings, and optional `stack` (["symbol+0xoff", ...]) and `free_lock_held`.
//! `port_lock_held` (optional, on `xa_erase`/`xa_insert`) is this tool's one extension: the
//! kernel's `mutex->owner` stamp of the container's port lock.
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::{
    event::{Access, Event, Hex, Kind, LockMode, parse_hex},
    intern::Interner,
};

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("line {line}: not a JSON event: {source}")]
    Syntax { line: u64, source: serde_json::Error },
    #[error("line {line}: unknown event kind {kind:?}")]
    UnknownKind { line: u64, kind: String },
    #[error("line {line}: {kind} event lacks the field {field:?}")]
    MissingField { line: u64, kind: &'static str, field: &'static str },
    #[error("line {line}: field {field:?} is not a hex address (\"0x...\"): {value:?}")]
    BadHex { line: u64, field: &'static str, value: String },
    #[error("line {line}: deref site {value:?} is not \"function+0xoffset\"")]
    BadPlace { line: u64, value: String },
    #[error("line {line}: lock mode {value:?} is not read or write (a mutex has no mode)")]
    BadMode { line: u64, value: String },
    #[error("line {line}: cannot read: {source}")]
    Io { line: u64, source: std::io::Error },
}

/// The wire shape of one line: every field any kind uses, all optional but the common ones.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Line {
    ts: u64,
    cpu: u32,
    tid: u32,
    comm: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xa: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port_lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    free_lock: Option<String>,
    /// `&port->uport_dev->mutex` of a dport's port (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    uport_lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock: Option<String>,
    /// A rw_semaphore's lock or unlock: "read" or "write" (absent: a mutex).
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    /// Where a lock was taken ("function+0xoff"), and the global it is (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    /// A deref's member path, offset and size in the dport, and whether it writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    member: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    write: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stack: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    free_lock_held: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port_lock_held: Option<bool>,
}

/// Reads interchange events from a buffered reader, one per line; blank lines are skipped.
pub struct JsonlReader<R> {
    input: R,
    line_no: u64,
    buf: String,
    interner: Interner,
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(input: R) -> Self {
        JsonlReader { input, line_no: 0, buf: String::new(), interner: Interner::default() }
    }

    /// The number of the last line read (1-based).
    pub fn line(&self) -> u64 {
        self.line_no
    }

    fn parse(&mut self) -> Result<Event, JsonlError> {
        let line = self.line_no;
        let wire: Line = serde_json::from_str(&self.buf).map_err(|source| JsonlError::Syntax { line, source })?;
        let kind: &'static str = match wire.kind.as_str() {
            "dport_add" => "dport_add",
            "xa_load" => "xa_load",
            "xa_erase" => "xa_erase",
            "xa_insert" => "xa_insert",
            "lock" => "lock",
            "unlock" => "unlock",
            "use" => "use",
            "free" => "free",
            "deref" => "deref",
            other => return Err(JsonlError::UnknownKind { line, kind: other.to_owned() }),
        };
        let hex = |field: &'static str, value: &Option<String>| -> Result<u64, JsonlError> {
            let value = value.as_deref().ok_or(JsonlError::MissingField { line, kind, field })?;
            parse_hex(value).ok_or_else(|| JsonlError::BadHex { line, field, value: value.to_owned() })
        };
        let parsed = match kind {
            "dport_add" => Kind::DportAdd {
                dport: hex("dport", &wire.dport)?,
                port: hex("port", &wire.port)?,
                xa: hex("xa", &wire.xa)?,
                port_lock: hex("port_lock", &wire.port_lock)?,
                free_lock: hex("free_lock", &wire.free_lock)?,
                uport_lock: match &wire.uport_lock {
                    Some(_) => hex("uport_lock", &wire.uport_lock)?,
                    None => 0,
                },
                root: wire.root.ok_or(JsonlError::MissingField { line, kind, field: "root" })?,
            },
            "xa_load" => Kind::XaLoad {
                xa: hex("xa", &wire.xa)?,
                index: hex("index", &wire.index)?,
                ret: hex("ret", &wire.ret)?,
            },
            "xa_erase" => Kind::XaErase {
                xa: hex("xa", &wire.xa)?,
                index: hex("index", &wire.index)?,
                ret: hex("ret", &wire.ret)?,
            },
            "xa_insert" => Kind::XaInsert {
                xa: hex("xa", &wire.xa)?,
                index: hex("index", &wire.index)?,
                entry: hex("entry", &wire.entry)?,
            },
            "lock" => Kind::Lock {
                lock: hex("lock", &wire.lock)?,
                mode: mode(line, &wire.mode)?,
                at: wire.at.as_deref().map(|s| self.interner.string(s)),
                name: wire.name.as_deref().map(|s| self.interner.string(s)),
            },
            "unlock" => Kind::Unlock { lock: hex("lock", &wire.lock)?, mode: mode(line, &wire.mode)? },
            "use" => Kind::Use {
                dport: hex("dport", &wire.dport)?,
                site: self.interner.string(wire.site.as_deref().ok_or(JsonlError::MissingField {
                    line,
                    kind,
                    field: "site",
                })?),
            },
            "deref" => {
                let missing = |field| JsonlError::MissingField { line, kind, field };
                let site = wire.site.as_deref().ok_or(missing("site"))?;
                let (function, insn) =
                    Access::parse_place(site).ok_or(JsonlError::BadPlace { line, value: site.to_owned() })?;
                let access = Access {
                    function: self.interner.string(function),
                    insn,
                    member: self.interner.string(wire.member.as_deref().ok_or(missing("member"))?),
                    offset: wire.offset.ok_or(missing("offset"))?,
                    size: wire.size.ok_or(missing("size"))?,
                    write: wire.write.ok_or(missing("write"))?,
                };
                Kind::Deref { dport: hex("dport", &wire.dport)?, access: self.interner.access(access) }
            }
            _ => Kind::Free { dport: hex("dport", &wire.dport)? },
        };
        Ok(Event {
            ts: wire.ts,
            cpu: wire.cpu,
            tid: wire.tid,
            comm: self.interner.string(&wire.comm),
            kind: parsed,
            stack: wire.stack.as_deref().map(|frames| self.interner.stack(frames)),
            free_lock_held: wire.free_lock_held,
            port_lock_held: wire.port_lock_held,
        })
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<Event, JsonlError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) if self.buf.trim().is_empty() => continue,
                Ok(_) => return Some(self.parse()),
                Err(source) => return Some(Err(JsonlError::Io { line: self.line_no, source })),
            }
        }
    }
}

/// A lock's mode on the wire: absent for a mutex, "read" or "write" for a rw_semaphore.
fn mode(line: u64, value: &Option<String>) -> Result<LockMode, JsonlError> {
    match value.as_deref() {
        None => Ok(LockMode::Mutex),
        Some("read") => Ok(LockMode::Read),
        Some("write") => Ok(LockMode::Write),
        Some(other) => Err(JsonlError::BadMode { line, value: other.to_owned() }),
    }
}

/// Writes one event as one interchange line (with the trailing newline).
pub fn write_event(out: &mut impl Write, event: &Event) -> std::io::Result<()> {
    let hex = |v: u64| Some(Hex(v).to_string());
    let mut line = Line {
        ts: event.ts,
        cpu: event.cpu,
        tid: event.tid,
        comm: event.comm.to_string(),
        kind: event.kind.name().to_owned(),
        stack: event.stack.as_ref().map(|s| s.iter().map(|f| f.to_string()).collect()),
        free_lock_held: event.free_lock_held,
        port_lock_held: event.port_lock_held,
        ..Line::default()
    };
    match &event.kind {
        Kind::DportAdd { dport, port, xa, port_lock, free_lock, uport_lock, root } => {
            line.dport = hex(*dport);
            line.port = hex(*port);
            line.xa = hex(*xa);
            line.port_lock = hex(*port_lock);
            line.free_lock = hex(*free_lock);
            line.uport_lock = (*uport_lock != 0).then(|| Hex(*uport_lock).to_string());
            line.root = Some(*root);
        }
        Kind::XaLoad { xa, index, ret } | Kind::XaErase { xa, index, ret } => {
            line.xa = hex(*xa);
            line.index = hex(*index);
            line.ret = hex(*ret);
        }
        Kind::XaInsert { xa, index, entry } => {
            line.xa = hex(*xa);
            line.index = hex(*index);
            line.entry = hex(*entry);
        }
        Kind::Lock { lock, mode, at, name } => {
            line.lock = hex(*lock);
            line.mode = (*mode != LockMode::Mutex).then(|| mode.name().to_owned());
            line.at = at.as_deref().map(str::to_owned);
            line.name = name.as_deref().map(str::to_owned);
        }
        Kind::Unlock { lock, mode } => {
            line.lock = hex(*lock);
            line.mode = (*mode != LockMode::Mutex).then(|| mode.name().to_owned());
        }
        Kind::Use { dport, site } => {
            line.dport = hex(*dport);
            line.site = Some(site.to_string());
        }
        Kind::Free { dport } => line.dport = hex(*dport),
        Kind::Deref { dport, access } => {
            line.dport = hex(*dport);
            line.site = Some(access.place());
            line.member = Some(access.member.to_string());
            line.offset = Some(access.offset);
            line.size = Some(access.size);
            line.write = Some(access.write);
        }
    }
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Vec<Result<Event, JsonlError>> {
        JsonlReader::new(text.as_bytes()).collect()
    }

    #[test]
    fn reads_every_kind_and_writes_it_back_identically() {
        let text = r#"{"ts":1,"cpu":0,"tid":7,"comm":"modprobe","kind":"dport_add","dport":"0xffff888100001000","port":"0xffff888100002000","xa":"0xffff888100002318","port_lock":"0xffff888100002090","free_lock":"0xffff888100002090","root":false}
{"ts":2,"cpu":0,"tid":7,"comm":"modprobe","kind":"xa_load","xa":"0xffff888100002318","index":"0xffff888100003000","ret":"0xffff888100001000","stack":["match_port_by_dport+0x47","bus_for_each_dev+0x7d"],"free_lock_held":false}
{"ts":3,"cpu":1,"tid":7,"comm":"modprobe","kind":"lock","lock":"0xffff888100002090"}
{"ts":4,"cpu":1,"tid":7,"comm":"modprobe","kind":"use","dport":"0xffff888100001000","site":"devm_cxl_add_port","free_lock_held":true}
{"ts":5,"cpu":1,"tid":7,"comm":"modprobe","kind":"unlock","lock":"0xffff888100002090"}
{"ts":6,"cpu":1,"tid":8,"comm":"kworker/1:0","kind":"xa_erase","xa":"0xffff888100002318","index":"0xffff888100003000","ret":"0xffff888100001000","port_lock_held":true}
{"ts":7,"cpu":1,"tid":8,"comm":"kworker/1:0","kind":"xa_insert","xa":"0xffff888100002318","index":"0xffff888100003000","entry":"0xffff888100001000"}
{"ts":8,"cpu":1,"tid":8,"comm":"kworker/1:0","kind":"free","dport":"0xffff888100001000","free_lock_held":true}
"#;
        let events: Vec<Event> = read_all(text).into_iter().map(Result::unwrap).collect();
        assert_eq!(events.len(), 8);
        assert_eq!(events[1].stack.as_ref().unwrap().len(), 2);
        assert_eq!(events[1].free_lock_held, Some(false));
        let mut out = Vec::new();
        for event in &events {
            write_event(&mut out, event).unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), text);
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let good = r#"{"ts":1,"cpu":0,"tid":7,"comm":"x","kind":"lock","lock":"0x10"}"#;
        let cases = [
            (format!("{good}\n{{\"ts\":1"), "line 2: not a JSON event"),
            (format!("{good}\n\n{}", good.replace("\"lock\",", "\"frob\",")), "line 3: unknown event kind \"frob\""),
            (good.replace(",\"lock\":\"0x10\"", ""), "line 1: lock event lacks the field \"lock\""),
            (good.replace("0x10", "16"), "line 1: field \"lock\" is not a hex address"),
            (good.replace("\"cpu\":0", "\"cpu\":0,\"bogus\":1"), "line 1: not a JSON event: unknown field `bogus`"),
        ];
        for (text, expected) in cases {
            let err = read_all(&text).into_iter().find_map(Result::err).expect(&text);
            assert!(err.to_string().starts_with(expected), "{err} does not start with {expected}");
        }
    }
}
