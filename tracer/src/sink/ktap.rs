//! Findings as KTAP version 1 (the kernel's test output format, which kselftest runners,
//! KUnit's `kunit.py parse` and KernelCI read): one test per finding class, with a subtest
//! per finding whose report goes before it as `#` diagnostic lines, then a test for the
//! drop accounting.
use std::io::{self, Write};

use crate::{
    engine::{Class, Group},
    known::Known,
    summary::Summary,
};

/// The name of the test that accounts for lost events.
pub const LOST_EVENTS_TEST: &str = "lost-events";

/// Writes the whole KTAP document. `strict`: lost events fail their test (`--strict`). A
/// known finding (`known`) is a skipped subtest, `ok N TITLE # SKIP known: REASON`; a class
/// test fails only for new findings.
pub fn write(
    out: &mut impl Write,
    groups: &[&Group],
    summary: &Summary,
    strict: bool,
    known: &Known,
) -> io::Result<()> {
    writeln!(out, "KTAP version 1")?;
    writeln!(
        out,
        "# tracer: {} events seen, {} dropped in the kernel, {} undecodable",
        summary.events,
        summary.dropped(),
        summary.undecodable
    )?;
    if let Some(coverage) = &summary.coverage {
        let mut lines = Vec::new();
        super::text::write_coverage(&mut lines, coverage, "# ")?;
        out.write_all(&lines)?;
    }
    writeln!(out, "1..{}", Class::ALL.len() + 1)?;
    for (n, class) in Class::ALL.into_iter().enumerate() {
        let findings: Vec<&&Group> = groups.iter().filter(|g| g.finding.class == class).collect();
        if findings.is_empty() {
            writeln!(out, "ok {} {class}", n + 1)?;
            continue;
        }
        writeln!(out, "    KTAP version 1")?;
        writeln!(out, "    # Subtest: {class}")?;
        writeln!(out, "    1..{}", findings.len())?;
        let mut failed = false;
        for (i, group) in findings.iter().enumerate() {
            let reason = known.reason(group);
            let mut report = Vec::new();
            super::text::write_group(&mut report, group, reason)?;
            for line in String::from_utf8_lossy(&report).lines() {
                writeln!(out, "    # {line}")?;
            }
            match reason {
                Some(reason) => {
                    writeln!(out, "    ok {} {} # SKIP known: {}", i + 1, test_name(group), one_line(reason))?
                }
                None => {
                    failed = true;
                    writeln!(out, "    not ok {} {}", i + 1, test_name(group))?
                }
            }
        }
        writeln!(out, "{} {} {class}", if failed { "not ok" } else { "ok" }, n + 1)?;
    }
    for entry in &summary.known_unseen {
        writeln!(out, "# known but not seen ({} line {}): {}", known.path.display(), entry.line, entry.title)?;
    }
    let n = Class::ALL.len() + 1;
    if !summary.lost_anything() {
        writeln!(out, "ok {n} {LOST_EVENTS_TEST}")?;
    } else {
        let drops: Vec<String> = summary.drops().map(|(name, v)| format!("{name} {v}")).collect();
        writeln!(
            out,
            "# {} events dropped in the kernel ({}), {} undecodable, {} bytes cut off, {} state evictions",
            summary.dropped(),
            drops.join(", "),
            summary.undecodable,
            summary.truncated_bytes,
            summary.engine.evicted()
        )?;
        if strict {
            writeln!(out, "not ok {n} {LOST_EVENTS_TEST}")?;
        } else {
            writeln!(out, "# findings may be incomplete; --strict makes this a failure")?;
            writeln!(out, "ok {n} {LOST_EVENTS_TEST}")?;
        }
    }
    Ok(())
}

/// A result line's name: the finding's title, the same in every run, so a CI system can
/// track it across runs; no `#` (it would start a directive).
fn test_name(group: &Group) -> String {
    group.finding.title().replace('#', "")
}

/// A reason on a directive line: one line, no `#`.
fn one_line(reason: &str) -> String {
    reason.replace(['#', '\n'], " ")
}
