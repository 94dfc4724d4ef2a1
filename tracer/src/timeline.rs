//! The story of findings on a time axis: a lane per thread, the load, lock and unlock spans,
//! uses, inline accesses, erases and frees as marks, the findings highlighted. Written as
//! one self-contained HTML page (no network, no external script) or as Trace Event Format
//! JSON for Perfetto's UI and `chrome://tracing`.
use std::{collections::BTreeMap, sync::Arc};

use rustc_hash::FxHashMap;
use serde_json::{Value, json};

use crate::{
    engine::Group,
    event::{Event, Hex, Kind},
};

/// Most events a timeline shows; past it the page says how many it left out.
pub const MAX_MARKS: usize = 20_000;

/// Time shown before the first and after the last event of a finding's story.
const PAD_NS: u64 = 50_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lane {
    pub tid: u32,
    pub comm: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub lane: usize,
    pub ts: u64,
    /// "load", "use", "deref", "erase", "insert", "free", "register".
    pub kind: &'static str,
    pub label: String,
    pub stack: Vec<String>,
    /// The finding (index into `Timeline::findings`) this mark is, if any.
    pub finding: Option<usize>,
}

/// A tracked mutex held by a thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub lane: usize,
    pub lock: u64,
    pub start: u64,
    pub end: u64,
    /// Still held when the timeline ends.
    pub open: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Highlight {
    /// "stale-use in devm_cxl_add_endpoint".
    pub title: String,
    pub class: &'static str,
    /// The finding's report, as `tracer analyze` prints it.
    pub report: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    pub lanes: Vec<Lane>,
    pub marks: Vec<Mark>,
    pub spans: Vec<Span>,
    pub findings: Vec<Highlight>,
    pub start: u64,
    pub end: u64,
    /// Events not shown (past `MAX_MARKS`).
    pub left_out: u64,
}

/// Which part of a trace to show.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Everything (up to `MAX_MARKS`), with every finding highlighted.
    All,
    /// One finding (index into the report's findings): its dport, its locks and its window.
    Finding(usize),
}

/// What a selected finding's story involves.
struct Focus {
    dport: u64,
    locks: [u64; 2],
    from: u64,
    to: u64,
}

/// The story of a finding's first occurrence: from its load (or the lock, if taken
/// earlier) to the finding, or to the free when that came later.
fn focus(group: &Group) -> Focus {
    let f = &group.finding;
    let from = f.load.as_ref().map_or(f.ts, |l| l.ts).min(f.lock.as_ref().map_or(u64::MAX, |l| l.ts));
    let to = f.ts.max(f.free.as_ref().map_or(0, |fr| fr.ts));
    let pad = PAD_NS.max((to - from.min(to)) / 20);
    Focus { dport: f.dport, locks: [f.free_lock, f.port_lock], from: from.saturating_sub(pad), to: to + pad }
}

fn about(kind: &Kind) -> Option<u64> {
    match kind {
        Kind::DportAdd { dport, .. } | Kind::Use { dport, .. } | Kind::Free { dport } | Kind::Deref { dport, .. } => {
            Some(*dport)
        }
        Kind::XaLoad { ret, .. } | Kind::XaErase { ret, .. } => Some(*ret),
        Kind::XaInsert { entry, .. } => Some(*entry),
        Kind::Lock { .. } | Kind::Unlock { .. } => None,
    }
}

impl Timeline {
    /// Builds the timeline of `events` (in order) for the findings `groups` reported.
    pub fn build(events: &[Event], groups: &[&Group], selection: Selection) -> Timeline {
        let focus = match selection {
            Selection::Finding(i) => groups.get(i).map(|g| focus(g)),
            Selection::All => None,
        };
        let shown: Vec<(usize, &Group)> = match selection {
            Selection::Finding(i) => groups.get(i).map(|g| (0, *g)).into_iter().collect(),
            Selection::All => groups.iter().copied().enumerate().collect(),
        };
        // A finding is marked where it happened: its thread and its time, first and last
        // occurrences.
        let mut at: FxHashMap<(u32, u64), usize> = FxHashMap::default();
        let mut findings = Vec::new();
        for (n, (_, group)) in shown.iter().enumerate() {
            let f = &group.finding;
            at.insert((f.tid, f.ts), n);
            at.insert((f.tid, group.last_ts), n);
            let mut report = Vec::new();
            let _ = crate::sink::text::write_group(&mut report, group, None);
            findings.push(Highlight {
                title: f.title(),
                class: f.class.name(),
                report: String::from_utf8_lossy(&report).into_owned(),
            });
        }
        let mut t = Timeline { findings, start: u64::MAX, ..Timeline::default() };
        let mut lanes: FxHashMap<u32, usize> = FxHashMap::default();
        let mut open: BTreeMap<(usize, u64), u64> = BTreeMap::new();
        let mut lane_of = |t: &mut Timeline, e: &Event| {
            *lanes.entry(e.tid).or_insert_with(|| {
                t.lanes.push(Lane { tid: e.tid, comm: e.comm.clone() });
                t.lanes.len() - 1
            })
        };
        for e in events {
            let relevant = match &focus {
                None => true,
                Some(f) => {
                    (f.from..=f.to).contains(&e.ts)
                        && match &e.kind {
                            Kind::Lock { lock, .. } | Kind::Unlock { lock, .. } => f.locks.contains(lock),
                            kind => about(kind) == Some(f.dport),
                        }
                }
            };
            if !relevant {
                continue;
            }
            if t.marks.len() + t.spans.len() >= MAX_MARKS {
                t.left_out += 1;
                continue;
            }
            let lane = lane_of(&mut t, e);
            t.start = t.start.min(e.ts);
            t.end = t.end.max(e.ts);
            let (kind, label) = match &e.kind {
                Kind::Lock { lock, .. } => {
                    open.insert((lane, *lock), e.ts);
                    continue;
                }
                Kind::Unlock { lock, .. } => {
                    // An unlock whose lock was taken before the timeline starts shows from there.
                    let start = open.remove(&(lane, *lock)).unwrap_or(t.start);
                    t.spans.push(Span { lane, lock: *lock, start, end: e.ts, open: false });
                    continue;
                }
                Kind::XaLoad { ret, .. } => ("load", format!("xa_load returned dport {}", Hex(*ret))),
                Kind::Use { dport, site } => ("use", format!("dport {} passed to {site}", Hex(*dport))),
                Kind::Deref { dport, access } => (
                    "deref",
                    format!(
                        "{} of dport->{} ({} bytes) at {}, dport {}",
                        access.verb(),
                        access.member,
                        access.size,
                        access.place(),
                        Hex(*dport)
                    ),
                ),
                Kind::XaErase { ret, .. } => ("erase", format!("xa_erase of dport {}", Hex(*ret))),
                Kind::XaInsert { entry, .. } => ("insert", format!("dport {} inserted", Hex(*entry))),
                Kind::Free { dport } => ("free", format!("dport {} freed", Hex(*dport))),
                Kind::DportAdd { dport, .. } => ("register", format!("dport {} registered", Hex(*dport))),
            };
            let held = match e.free_lock_held {
                Some(true) => " (free lock held)",
                Some(false) => " (free lock not held)",
                None => "",
            };
            t.marks.push(Mark {
                lane,
                ts: e.ts,
                kind,
                label: format!("{label}{held}"),
                stack: e.stack.as_ref().map(|s| s.iter().map(|f| f.to_string()).collect()).unwrap_or_default(),
                finding: at.get(&(e.tid, e.ts)).copied(),
            });
        }
        if t.start == u64::MAX {
            t.start = 0;
        }
        for ((lane, lock), start) in open {
            t.spans.push(Span { lane, lock, start, end: t.end, open: true });
        }
        t
    }

    /// The data the page renders.
    fn data(&self) -> Value {
        json!({
            "start": self.start,
            "end": self.end,
            "left_out": self.left_out,
            "lanes": self.lanes.iter().map(|l| json!({"tid": l.tid, "comm": &*l.comm})).collect::<Vec<_>>(),
            "spans": self.spans.iter().map(|s| json!({"lane": s.lane, "lock": Hex(s.lock).to_string(), "start": s.start, "end": s.end, "open": s.open})).collect::<Vec<_>>(),
            "marks": self.marks.iter().map(|m| json!({"lane": m.lane, "ts": m.ts, "kind": m.kind, "label": m.label, "stack": m.stack, "finding": m.finding})).collect::<Vec<_>>(),
            "findings": self.findings.iter().map(|f| json!({"title": f.title, "class": f.class, "report": f.report})).collect::<Vec<_>>(),
        })
    }

    /// One self-contained HTML page.
    pub fn html(&self, title: &str) -> String {
        // `</` cannot appear inside the script element that carries the data.
        let data = self.data().to_string().replace("</", "<\\/");
        PAGE.replace("{{TITLE}}", &html_escape(title)).replace("{{DATA}}", &data)
    }

    /// Trace Event Format JSON (Perfetto, `chrome://tracing`): a thread per lane, the lock
    /// spans as complete events, the marks as instant events. Times in microseconds.
    pub fn chrome_trace(&self) -> Value {
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut events = Vec::new();
        for lane in &self.lanes {
            events.push(json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": lane.tid, "args": {"name": format!("{} ({})", lane.comm, lane.tid)}}));
        }
        for s in &self.spans {
            let tid = self.lanes[s.lane].tid;
            events.push(json!({
                "ph": "X", "name": format!("holds {}", Hex(s.lock)), "cat": "lock", "pid": 1, "tid": tid,
                "ts": us(s.start), "dur": us(s.end.saturating_sub(s.start)),
                "args": {"lock": Hex(s.lock).to_string(), "still_held_at_end": s.open},
            }));
        }
        for m in &self.marks {
            let tid = self.lanes[m.lane].tid;
            let name = match m.finding {
                Some(i) => format!("{}: {}", m.kind, self.findings[i].title),
                None => m.kind.to_owned(),
            };
            events.push(json!({
                "ph": "i", "s": "t", "name": name, "cat": if m.finding.is_some() { "finding" } else { m.kind }, "pid": 1, "tid": tid,
                "ts": us(m.ts), "args": {"what": m.label, "stack": m.stack},
            }));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"tool": "tracer", "findings": self.findings.iter().map(|f| &f.title).collect::<Vec<_>>()}})
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The page: data in a JSON script element, drawn into SVG by a small script, all inline.
const PAGE: &str = include_str!("timeline.html");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{analysis::Analysis, engine::Limits, format::jsonl::JsonlReader};

    fn scenario(name: &str) -> Vec<Event> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
        JsonlReader::new(std::fs::read(path).unwrap().as_slice()).map(Result::unwrap).collect()
    }

    #[test]
    fn one_findings_story_has_its_load_lock_span_and_use() {
        let events = scenario("deref-before-lock.jsonl");
        let mut analysis = Analysis::new(Limits::default());
        events.iter().for_each(|e| analysis.feed(e, |_| {}));
        let groups: Vec<&Group> = analysis.groups().iter().collect();
        let stale = groups.iter().position(|g| g.finding.class.name() == "stale-use").unwrap();
        let t = Timeline::build(&events, &groups, Selection::Finding(stale));
        let kinds: Vec<&str> = t.marks.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, ["register", "load", "deref", "use"]);
        // The use is the finding; the lock span covers it, not the load.
        let use_mark = t.marks.iter().find(|m| m.kind == "use").unwrap();
        assert_eq!(use_mark.finding, Some(0));
        assert_eq!(t.spans.len(), 1);
        assert!(t.spans[0].start > t.marks[0].ts && t.spans[0].start < use_mark.ts && t.spans[0].end > use_mark.ts);
        assert_eq!(t.findings[0].title, "stale-use in devm_cxl_add_endpoint");
        let trace = t.chrome_trace();
        let events = trace["traceEvents"].as_array().unwrap();
        assert!(events.iter().any(|e| e["ph"] == "X" && e["cat"] == "lock"));
        assert!(events.iter().any(|e| e["cat"] == "finding" && e["name"].as_str().unwrap().contains("stale-use")));
        let page = t.html("deref-before-lock");
        assert!(page.contains("stale-use in devm_cxl_add_endpoint") && !page.contains("{{DATA}}"));
        for fetch in ["src=", "<link", "@import", "url(", "fetch(", "XMLHttpRequest"] {
            assert!(!page.contains(fetch), "the page must not load anything ({fetch})");
        }
    }
}
