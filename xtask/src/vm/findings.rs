//! The tracer's JSON report (`findings.jsonl`: one finding group per line, then a summary
//! line), read back on the host, and what the suite and the demo ask of it.
use std::{collections::BTreeMap, ffi::OsStr, fs, path::Path, process::Command};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// One finding group as `tracer run --format json` prints it.
#[derive(Clone, Debug)]
pub struct Finding {
    pub class: String,
    pub site: String,
    pub count: u64,
    pub comm: String,
    pub root: bool,
    pub stack: Vec<String>,
    pub load_stack: Option<Vec<String>>,
    pub lock_stack: Option<Vec<String>>,
    pub expected_lock: Option<String>,
    pub expected_lock_role: Option<String>,
    pub held_locks: Vec<String>,
    pub ts: Option<u64>,
    pub load_ts: Option<u64>,
    pub lock_ts: Option<u64>,
    pub load_free_lock_held: Option<bool>,
    /// For an inline access: the member touched.
    pub member: Option<String>,
    /// The sites of the uses folded into this root cause.
    pub also: Vec<String>,
    /// Where the dport was freed, for a use-after-free.
    pub free_stack: Option<Vec<String>>,
    /// The tracer's stable title (`unlocked-use in cxl_add_ep`).
    pub stable_title: Option<String>,
    /// Why it is known, when the run was given known findings.
    pub known: Option<String>,
    /// The held locks as the report names them: a dport's role, a global's name, or the kind.
    pub held_names: Vec<String>,
    /// The line as printed, for exact comparisons (live against replay).
    pub line: String,
}

impl Finding {
    pub fn is_read_side(&self) -> bool {
        matches!(self.class.as_str(), "unlocked-use" | "stale-use" | "use-after-free")
    }

    /// Its stable title (`class in function`, as the tracer writes it), or one made from its
    /// class and site for a report of a tracer before titles.
    pub fn title_key(&self) -> String {
        self.stable_title.clone().unwrap_or_else(|| format!("{} in {}", self.class, self.site))
    }

    /// `class at site (N, comm)`, for messages.
    pub fn title(&self) -> String {
        format!("{} at {} ({} occurrence(s), {})", self.class, self.site, self.count, self.comm)
    }
}

/// `cxl_mem_probe+0x167/0x370 [cxl_mem]` → `cxl_mem_probe`.
pub fn frame_function(frame: &str) -> &str {
    frame.split(['+', ' ']).next().unwrap_or(frame)
}

pub struct Report {
    pub findings: Vec<Finding>,
    pub summary: Value,
}

impl Report {
    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Report::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Report> {
        let mut findings = Vec::new();
        let mut summary = None;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("line {} is not JSON: {line:.120}", n + 1))?;
            if let Some(s) = v.get("summary") {
                ensure!(summary.is_none(), "two summary lines");
                summary = Some(s.clone());
                continue;
            }
            ensure!(summary.is_none(), "a finding after the summary line (line {})", n + 1);
            findings.push(finding(&v, line).with_context(|| format!("line {}", n + 1))?);
        }
        let summary = summary.context("no summary line: the tracer did not finish its report")?;
        Ok(Report { findings, summary })
    }

    pub fn summary_u64(&self, path: &[&str]) -> anyhow::Result<u64> {
        let mut v = &self.summary;
        for key in path {
            v = v.get(key).with_context(|| format!("the summary has no {}", path.join(".")))?;
        }
        v.as_u64().with_context(|| format!("summary.{} is not a number: {v}", path.join(".")))
    }

    /// Occurrences of `class` at `site`, summed over its groups (one per process context).
    pub fn occurrences(&self, class: &str, site: &str) -> u64 {
        self.matching(class, site).map(|f| f.count).sum()
    }

    pub fn matching<'a>(&'a self, class: &'a str, site: &'a str) -> impl Iterator<Item = &'a Finding> + 'a {
        self.findings.iter().filter(move |f| f.class == class && f.site == site)
    }

    /// Occurrences by (class, site), for tables.
    pub fn by_site(&self) -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for f in &self.findings {
            *m.entry((f.class.clone(), f.site.clone())).or_insert(0) += f.count;
        }
        m
    }

    /// The findings by stable title: one title has a group per process context.
    pub fn by_title(&self) -> BTreeMap<String, Vec<&Finding>> {
        let mut groups: BTreeMap<String, Vec<&Finding>> = BTreeMap::new();
        for f in &self.findings {
            groups.entry(f.title_key()).or_default().push(f);
        }
        groups
    }

    /// What every judged run must be, whatever it is expected to find: nothing lost, no
    /// use-after-free or rule-mismatch (no sequential workload can cause one), and the
    /// stacks each finding's class implies.
    pub fn check_clean(&self) -> anyhow::Result<()> {
        self.check_nothing_lost()?;
        self.check_none("use-after-free")?;
        self.check_none("rule-mismatch")?;
        self.check_stacks()
    }

    /// Fails unless nothing was lost: no kernel drop, nothing undecodable or cut off, no
    /// engine eviction.
    pub fn check_nothing_lost(&self) -> anyhow::Result<()> {
        for key in [
            &["dropped"][..],
            &["undecodable"],
            &["truncated_bytes"],
            &["kernel_counters", "ring_buffer_full"],
            &["kernel_counters", "ring_buffer_busy"],
            &["kernel_counters", "map_full"],
            &["kernel_counters", "stack_lost"],
        ] {
            let n = self.summary_u64(key)?;
            ensure!(n == 0, "summary.{} is {n}, not 0: events were lost", key.join("."));
        }
        if let Some(evicted) = self.summary.get("evicted").and_then(Value::as_object) {
            for (what, n) in evicted {
                ensure!(n.as_u64() == Some(0), "the engine evicted {n} {what}: its state cap was reached");
            }
        }
        Ok(())
    }

    /// Fails when any finding of `class` is present.
    pub fn check_none(&self, class: &str) -> anyhow::Result<()> {
        let found: Vec<String> = self.findings.iter().filter(|f| f.class == class).map(Finding::title).collect();
        ensure!(found.is_empty(), "unexpected {class} finding(s): {}", found.join("; "));
        let n = self.summary_u64(&["occurrences", class])?;
        ensure!(n == 0, "the summary counts {n} {class} occurrence(s)");
        Ok(())
    }

    /// The stacks each class implies: a use (or erase) stack starting at the site for all;
    /// for read-side findings, the xa_load's stack and time, before the use; for stale-use,
    /// the held free lock and the stack where it was taken, between load and use.
    pub fn check_stacks(&self) -> anyhow::Result<()> {
        for f in &self.findings {
            let title = f.title();
            // A raw address means the tracer had no symbol for it when it recorded the event
            // (e.g. a module reloaded at a new address, not yet re-read from kallsyms): the
            // finding then groups apart from its siblings and names no function.
            for (which, stack) in
                [("use", Some(&f.stack)), ("load", f.load_stack.as_ref()), ("lock", f.lock_stack.as_ref())]
            {
                if let Some(raw) = stack.into_iter().flatten().find(|fr| fr.starts_with("0x")) {
                    bail!(
                        "{title}: its {which} stack has an unsymbolized frame {raw}: the tracer \
                         did not know the symbol at that address when the event was recorded"
                    );
                }
            }
            let first = f.stack.first().map(|s| frame_function(s));
            ensure!(
                first == Some(f.site.as_str()),
                "{title}: the stack does not start at the site (first frame {first:?})"
            );
            if !f.is_read_side() {
                continue;
            }
            let load = f.load_stack.as_deref().unwrap_or_default();
            ensure!(!load.is_empty(), "{title}: no load stack: it cites a dport the tracer did not see loaded");
            let (Some(load_ts), Some(ts)) = (f.load_ts, f.ts) else {
                bail!("{title}: no load_ts or ts");
            };
            ensure!(load_ts <= ts, "{title}: loaded at {load_ts}, after its use at {ts}");
            let expected = f.expected_lock.as_deref().with_context(|| format!("{title}: no expected lock"))?;
            ensure!(
                f.expected_lock_role.as_deref() == Some("free lock"),
                "{title}: the expected lock is not the free lock: {:?}",
                f.expected_lock_role
            );
            match f.class.as_str() {
                "unlocked-use" => ensure!(
                    !f.held_locks.iter().any(|l| l == expected),
                    "{title}: the free lock {expected} is listed as held"
                ),
                "stale-use" => {
                    ensure!(
                        f.held_locks.iter().any(|l| l == expected),
                        "{title}: the free lock {expected} is not listed as held"
                    );
                    ensure!(f.load_free_lock_held == Some(false), "{title}: loaded with the free lock held, yet stale");
                    let lock_ts =
                        f.lock_ts.with_context(|| format!("{title}: no lock_ts (when the lock was taken)"))?;
                    ensure!(
                        load_ts <= lock_ts && lock_ts <= ts,
                        "{title}: the lock was taken at {lock_ts}, not between the load at \
                         {load_ts} and the use at {ts}"
                    );
                    let lock = f.lock_stack.as_deref().unwrap_or_default();
                    ensure!(!lock.is_empty(), "{title}: no stack where the free lock was taken");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn finding(v: &Value, line: &str) -> anyhow::Result<Finding> {
    let s = |key: &str| -> anyhow::Result<String> {
        v.get(key).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("no string field {key:?}"))
    };
    let stack = |key: &str| -> Option<Vec<String>> {
        v.get(key)?.as_array().map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
    };
    Ok(Finding {
        class: s("class")?,
        site: s("site")?,
        count: v.get("count").and_then(Value::as_u64).context("no count")?,
        comm: s("comm")?,
        root: v.get("root").and_then(Value::as_bool).unwrap_or(false),
        stack: stack("stack").unwrap_or_default(),
        load_stack: stack("load_stack"),
        lock_stack: stack("lock_stack"),
        expected_lock: v.get("expected_lock").and_then(Value::as_str).map(str::to_owned),
        expected_lock_role: v.get("expected_lock_role").and_then(Value::as_str).map(str::to_owned),
        held_locks: stack("held_locks").unwrap_or_default(),
        ts: v.get("ts").and_then(Value::as_u64),
        load_ts: v.get("load_ts").and_then(Value::as_u64),
        lock_ts: v.get("lock_ts").and_then(Value::as_u64),
        load_free_lock_held: v.get("load_free_lock_held").and_then(Value::as_bool),
        member: v.pointer("/access/member").and_then(Value::as_str).map(str::to_owned),
        also: v
            .get("also_at")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.get("site").and_then(Value::as_str).map(str::to_owned)).collect())
            .unwrap_or_default(),
        free_stack: stack("free_stack"),
        stable_title: v.get("title").and_then(Value::as_str).map(str::to_owned),
        known: v.get("known").and_then(Value::as_str).map(str::to_owned),
        held_names: v
            .get("held")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|h| {
                        ["role", "name", "kind"].iter().find_map(|k| h.get(*k)?.as_str()).map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        line: line.to_owned(),
    })
}

/// `tracer analyze FILE --format json` on the host. Exit 0 or 1 (findings) is a report;
/// anything else is an error with the tracer's stderr.
pub fn analyze(tracer: &Path, trace: &Path) -> anyhow::Result<(Report, String)> {
    analyze_with(tracer, trace, &[]).map(|(report, stderr, _)| (report, stderr))
}

/// `analyze` with more arguments (`--known FILE`); also its exit status.
pub fn analyze_with(tracer: &Path, trace: &Path, args: &[&OsStr]) -> anyhow::Result<(Report, String, i32)> {
    let out = Command::new(tracer)
        .args(["analyze", "--format", "json"])
        .args(args)
        .arg(trace)
        .output()
        .with_context(|| format!("cannot run {}", tracer.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0 | 1) => {}
        _ => bail!("tracer analyze {} failed ({}): {}", trace.display(), out.status, stderr.trim()),
    }
    let text = String::from_utf8(out.stdout).context("tracer analyze printed non-UTF-8")?;
    Ok((Report::parse(&text)?, stderr, out.status.code().unwrap_or(-1)))
}

/// `tracer print FILE --format json` on the host: the events as JSON values.
pub fn events(tracer: &Path, trace: &Path) -> anyhow::Result<Vec<Value>> {
    let out = Command::new(tracer)
        .args(["print", "--format", "json"])
        .arg(trace)
        .output()
        .with_context(|| format!("cannot run {}", tracer.display()))?;
    if !out.status.success() {
        bail!(
            "tracer print {} failed ({}): {}",
            trace.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("tracer print: not JSON: {l:.120}")))
        .collect()
}

/// Whether one of an event's `depth` innermost frames is in `function`.
pub fn event_near(event: &Value, function: &str, depth: usize) -> bool {
    event
        .get("stack")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().take(depth).filter_map(Value::as_str).any(|f| frame_function(f) == function))
}

/// Whether an event's innermost frame is in `function`.
pub fn event_at(event: &Value, function: &str) -> bool {
    event
        .get("stack")
        .and_then(Value::as_array)
        .and_then(|s| s.first())
        .and_then(Value::as_str)
        .is_some_and(|f| frame_function(f) == function)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: &str = r#"{"class":"stale-use","dport":"0x1","generation":1,"port":"0x2","root":false,"tid":9,"comm":"sh","site":"devm_cxl_add_port","ts":30,"stack":["devm_cxl_add_port+0x5/0x700","cxl_mem_probe+0x279/0x370 [cxl_mem]"],"load_stack":["match_port_by_dport+0x48/0x70"],"expected_lock":"0x90","held_locks":["0x90"],"reason":"r","count":3,"last_ts":40,"expected_lock_role":"free lock","expected_lock_is":"&port->dev.mutex","load_ts":10,"load_free_lock_held":false,"lock_ts":20,"lock_stack":["cxl_mem_probe+0x200/0x370 [cxl_mem]"]}"#;
    const SUMMARY: &str = r#"{"summary":{"events":5,"dropped":0,"undecodable":0,"truncated_bytes":0,"kernel_counters":{"ring_buffer_full":0,"ring_buffer_busy":0,"map_full":0,"stack_lost":0},"occurrences":{"stale-use":3,"unlocked-use":0},"evicted":{"dports":0}}}"#;

    #[test]
    fn reads_and_checks_a_report() {
        let r = Report::parse(&format!("{STALE}\n{SUMMARY}\n")).unwrap();
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.occurrences("stale-use", "devm_cxl_add_port"), 3);
        assert_eq!(frame_function(&r.findings[0].stack[1]), "cxl_mem_probe");
        r.check_stacks().unwrap();
        r.check_nothing_lost().unwrap();
        r.check_none("unlocked-use").unwrap();
        assert!(r.check_none("stale-use").is_err());
        assert_eq!(r.summary_u64(&["events"]).unwrap(), 5);
    }

    #[test]
    fn missing_stacks_and_losses_fail() {
        for (from, to) in [
            (r#""load_stack":["match_port_by_dport+0x48/0x70"]"#, r#""load_stack":null"#),
            (r#""lock_stack":["cxl_mem_probe+0x200/0x370 [cxl_mem]"]"#, r#""lock_stack":null"#),
            (r#""lock_ts":20"#, r#""lock_ts":50"#),
            (r#""held_locks":["0x90"]"#, r#""held_locks":[]"#),
            (r#""stack":["devm_cxl_add_port"#, r#""stack":["other"#),
            ("cxl_mem_probe+0x279/0x370 [cxl_mem]", "0xffffffffc07b3489"),
        ] {
            let bad = STALE.replace(from, to);
            assert_ne!(bad, STALE);
            let r = Report::parse(&format!("{bad}\n{SUMMARY}\n")).unwrap();
            assert!(r.check_stacks().is_err(), "{to}");
        }
        let r = Report::parse(&SUMMARY.replace(r#""dropped":0"#, r#""dropped":2"#)).unwrap();
        assert!(r.check_nothing_lost().is_err());
        assert!(Report::parse(STALE).is_err(), "a report without its summary line");
    }
}
