//! Where findings go: a lockdep/KASAN-style text report, JSON lines, or KTAP.
pub mod json;
pub mod ktap;
pub mod text;

use std::io::Write;

use crate::{engine::Group, known::Known, summary::Summary};

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// KTAP version 1: a test per finding class, a subtest per finding.
    Ktap,
}

/// Writes the findings and the closing summary in one format: new findings first, then
/// the known ones (`known`), each saying why it is known. `strict`: in KTAP, lost events
/// fail their test.
pub fn write_report<'a>(
    out: &mut impl Write,
    format: Format,
    groups: impl IntoIterator<Item = &'a Group>,
    summary: &Summary,
    strict: bool,
    known: &Known,
) -> std::io::Result<()> {
    let groups: Vec<&Group> = groups.into_iter().collect();
    let (new, old): (Vec<&Group>, Vec<&Group>) = groups.iter().partition(|g| known.reason(g).is_none());
    match format {
        Format::Text => {
            for group in &new {
                text::write_group(out, group, None)?;
            }
            if !old.is_empty() {
                writeln!(out, "known findings ({}, listed in {}):", old.len(), known.path.display())?;
                for group in &old {
                    text::write_group(out, group, known.reason(group))?;
                }
            }
            text::write_summary(out, summary)
        }
        Format::Json => {
            for group in new.iter().chain(&old) {
                json::write_group(out, group, known.reason(group))?;
            }
            json::write_summary(out, summary)
        }
        Format::Ktap => ktap::write(out, &groups, summary, strict, known),
    }
}
