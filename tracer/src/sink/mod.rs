//! Where findings go: a lockdep/KASAN-style text report, JSON lines, or KTAP.
pub mod json;
pub mod ktap;
pub mod text;

use std::io::Write;

use crate::{engine::Group, summary::Summary};

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// KTAP version 1: a test per finding class, a subtest per finding.
    Ktap,
}

/// Writes the findings and the closing summary in one format. `strict`: in KTAP, lost
/// events fail their test.
pub fn write_report<'a>(
    out: &mut impl Write,
    format: Format,
    groups: impl IntoIterator<Item = &'a Group>,
    summary: &Summary,
    strict: bool,
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            for group in groups {
                text::write_group(out, group)?;
            }
            text::write_summary(out, summary)
        }
        Format::Json => {
            for group in groups {
                json::write_group(out, group)?;
            }
            json::write_summary(out, summary)
        }
        Format::Ktap => ktap::write(out, &groups.into_iter().collect::<Vec<_>>(), summary, strict),
    }
}
