//! Findings as JSON lines (README, "Three output forms"): one finding per line, then one summary line.
use std::io::{self, Write};

use serde_json::{Map, Value, json};

use crate::{
    coverage::{Coverage, SiteKind},
    engine::{Class, Finding, Group, HeldLock},
    event::{Access, Hex, Stack},
    kernel::profile,
    summary::Summary,
};

fn hex(v: u64) -> Value {
    Value::String(Hex(v).to_string())
}

fn stack(stack: Option<&Stack>) -> Value {
    match stack {
        Some(stack) => Value::Array(stack.iter().map(|f| Value::String(f.to_string())).collect()),
        None => Value::Null,
    }
}

fn access_value(access: &Access) -> Value {
    json!({
        "member": &*access.member,
        "offset": access.offset,
        "size": access.size,
        "write": access.write,
        "at": access.place(),
    })
}

/// One finding as JSON; `known` says why it is known, if it is.
/// A held lock: its address, kind, what it is to the finding's dport or its global name,
/// and where it was taken.
fn held_value(l: &HeldLock, f: &Finding) -> Value {
    let mut v = json!({ "lock": hex(l.lock), "kind": l.kind() });
    let map = v.as_object_mut().expect("object");
    if let Some(role) = l.role(f) {
        map.insert("role".into(), role.into());
    }
    if let Some(name) = &l.name {
        map.insert("name".into(), (**name).into());
    }
    if let Some(at) = &l.at {
        map.insert("at".into(), (**at).into());
    }
    v
}

pub fn group_value(group: &Group, known: Option<&str>) -> Value {
    let f = &group.finding;
    let mut v = json!({
        "title": f.title(),
        "class": f.class.name(),
        "dport": hex(f.dport),
        "generation": f.generation,
        "port": hex(f.port),
        "root": f.root,
        "tid": f.tid,
        "comm": &*f.comm,
        "site": &*f.site,
        "ts": f.ts,
        "stack": stack(f.stack.as_ref()),
        "load_stack": stack(f.load.as_ref().and_then(|l| l.stack.as_ref())),
        "expected_lock": f.expected_lock.map_or(Value::Null, |l| hex(l.addr)),
        "held_locks": f.held_locks.iter().map(|l| hex(l.lock)).collect::<Vec<_>>(),
        "held": f.held_locks.iter().map(|l| held_value(l, f)).collect::<Vec<_>>(),
        "reason": f.reason,
        "count": group.count,
        "last_ts": group.last_ts,
    });
    let map = v.as_object_mut().expect("object");
    if let Some(reason) = known {
        map.insert("known".into(), reason.into());
    }
    if let Some(lock) = &f.expected_lock {
        map.insert("expected_lock_role".into(), lock.role.name().into());
        map.insert("expected_lock_is".into(), lock.what.into());
    }
    if let Some(load) = &f.load {
        map.insert("load_ts".into(), load.ts.into());
        map.insert("load_free_lock_held".into(), load.free_lock_held.into());
    }
    if let Some(lock) = &f.lock {
        map.insert("lock_ts".into(), lock.ts.into());
        map.insert("lock_stack".into(), stack(lock.stack.as_ref()));
    }
    if let Some(access) = &f.access {
        map.insert("access".into(), access_value(access));
    }
    if !group.also_at.is_empty() {
        let also: Vec<Value> = group
            .also_at
            .iter()
            .map(|a| {
                let mut v = json!({ "class": a.class.name(), "site": &*a.site, "count": a.count });
                if let Some(access) = &a.access {
                    v.as_object_mut().expect("object").insert("access".into(), access_value(access));
                }
                v
            })
            .collect();
        map.insert("also_at".into(), also.into());
    }
    if let Some(free) = &f.free {
        map.insert("free_ts".into(), free.ts.into());
        map.insert("free_tid".into(), free.tid.into());
        map.insert("free_comm".into(), (*free.comm).into());
        map.insert("free_stack".into(), stack(free.stack.as_ref()));
    }
    v
}

pub fn write_group(out: &mut impl Write, group: &Group, known: Option<&str>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &group_value(group, known))?;
    out.write_all(b"\n")
}

pub fn summary_value(s: &Summary) -> Value {
    let by_reason: Map<String, Value> = s.drops().map(|(name, n)| (name.to_owned(), n.into())).collect();
    let kernel: Map<String, Value> = s.kernel.iter().map(|(name, n)| (name.clone(), (*n).into())).collect();
    let findings: Map<String, Value> = s.findings.iter().map(|(c, n, _)| (c.name().to_owned(), (*n).into())).collect();
    let occurrences: Map<String, Value> =
        s.findings.iter().map(|(c, _, n)| (c.name().to_owned(), (*n).into())).collect();
    let e = &s.engine;
    let mut v = json!({ "summary": {
        "events": s.events,
        "dropped": s.dropped(),
        "dropped_by_reason": by_reason,
        "undecodable": s.undecodable,
        "truncated_bytes": s.truncated_bytes,
        "kernel_counters": kernel,
        "findings": findings,
        "occurrences": occurrences,
        "unjudged_uses": e.unjudged_uses,
        "unknown_objects": e.unknown_objects,
        "stamp_corrections": e.stamp_corrections,
        "frees_missed": e.reregistered,
        "evicted": {
            "dports": e.evicted_dports,
            "containers": e.evicted_containers,
            "threads": e.evicted_threads,
            "refs": e.evicted_refs,
        },
    }});
    v["summary"]["new_findings"] = s.new_groups().into();
    if !s.known.is_empty() || !s.known_unseen.is_empty() {
        let by_class = |pick: fn(&(Class, u64, u64)) -> u64| -> Map<String, Value> {
            s.known.iter().map(|k| (k.0.name().to_owned(), pick(k).into())).collect()
        };
        let unseen: Vec<Value> =
            s.known_unseen.iter().map(|e| json!({ "title": e.title, "reason": e.reason, "line": e.line })).collect();
        v["summary"]["known"] = json!({
            "findings": by_class(|k| k.1),
            "occurrences": by_class(|k| k.2),
            "unseen": unseen,
        });
    }
    if let Some(coverage) = &s.coverage {
        v["summary"]["coverage"] = coverage_value(coverage);
    }
    v
}

/// Per kind: sites, sites that ran, reports, judged, and every site that never ran.
fn coverage_value(coverage: &Coverage) -> Value {
    let mut out = Map::new();
    for kind in SiteKind::ALL {
        let t = coverage.totals(kind);
        let never: Vec<Value> = coverage
            .sites
            .iter()
            .filter(|s| s.kind == kind && s.ran == 0 && s.is_dport_site())
            .map(|s| Value::String(s.place.to_string()))
            .collect();
        let functions: Vec<Value> = coverage
            .never_ran(kind)
            .iter()
            .map(|n| {
                let mut v = json!({ "function": &*n.function, "sites": n.sites });
                let map = v.as_object_mut().expect("object");
                if let Some(file) = &n.file {
                    map.insert("file".into(), (**file).into());
                }
                if let Some(why) = profile::unreachable(&n.function) {
                    map.insert("unreachable".into(), why.into());
                }
                v
            })
            .collect();
        out.insert(
            kind.name().to_owned(),
            json!({
                "sites": t.sites,
                "ran": t.ran,
                "reported": t.reported,
                "judged": t.judged,
                "never_ran": never,
                "never_ran_functions": functions,
            }),
        );
    }
    let (unknown, ran) = coverage.unknown_loads();
    out.insert("unknown_xarray_loads".into(), json!({ "sites": unknown, "ran": ran }));
    let (loads, derefs) = coverage.other_sites();
    out.insert("other_xarray_sites".into(), json!({ "load": loads, "deref": derefs }));
    let misread: Vec<Value> = coverage.misread().iter().map(|p| Value::String(p.to_string())).collect();
    out.insert("misread".into(), misread.into());
    Value::Object(out)
}

pub fn write_summary(out: &mut impl Write, s: &Summary) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &summary_value(s))?;
    out.write_all(b"\n")
}
