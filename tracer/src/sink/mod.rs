//! Where findings go: a lockdep/KASAN-style text report, or JSON lines.
pub mod json;
pub mod text;

use std::io::Write;

use crate::{engine::Group, summary::Summary};

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Writes findings and the closing summary in one format.
pub fn write_group(out: &mut impl Write, format: Format, group: &Group) -> std::io::Result<()> {
    match format {
        Format::Text => text::write_group(out, group),
        Format::Json => json::write_group(out, group),
    }
}

pub fn write_summary(out: &mut impl Write, format: Format, summary: &Summary) -> std::io::Result<()> {
    match format {
        Format::Text => text::write_summary(out, summary),
        Format::Json => json::write_summary(out, summary),
    }
}
