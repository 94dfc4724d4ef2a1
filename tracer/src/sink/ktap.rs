//! Findings as KTAP version 1 (the kernel's test output format, which kselftest runners,
//! KUnit's `kunit.py parse` and KernelCI read): one test per finding class, with a subtest
//! per finding whose report goes before it as `#` diagnostic lines, then a test for the
//! drop accounting.
use std::io::{self, Write};

use crate::{
    engine::{Class, Group},
    summary::Summary,
};

/// The name of the test that accounts for lost events.
pub const LOST_EVENTS_TEST: &str = "lost-events";

/// Writes the whole KTAP document. `strict`: lost events fail their test (`--strict`).
pub fn write(out: &mut impl Write, groups: &[&Group], summary: &Summary, strict: bool) -> io::Result<()> {
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
        for (i, group) in findings.iter().enumerate() {
            let mut report = Vec::new();
            super::text::write_group(&mut report, group)?;
            for line in String::from_utf8_lossy(&report).lines() {
                writeln!(out, "    # {line}")?;
            }
            writeln!(out, "    not ok {} {}", i + 1, test_name(group))?;
        }
        writeln!(out, "not ok {} {class}", n + 1)?;
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

/// A result line's name: no `#` (it would start a directive).
fn test_name(group: &Group) -> String {
    let f = &group.finding;
    let place = match &f.access {
        Some(access) => format!("{} of dport->{} at {}", access.verb(), access.member, access.place()),
        None => format!("in {}", f.site),
    };
    format!("{} {place} by {} ({} occurrences)", f.class, f.comm, group.count).replace('#', "")
}
