//! The subcommands.
use std::io::{self, BufWriter, Write};

use anyhow::Context as _;
use tracer::{
    analysis::Analysis,
    engine::Limits,
    format::jsonl,
    sink::{self, Format},
    source::FileSource,
};

use crate::{
    Outcome,
    cli::{Command, ProbeArgs},
    doctor::{self, DoctorOptions},
    live::{self, LiveOptions},
};

pub fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Analyze { file, format } => analyze(&file, format),
        Command::Print { file, format } => print(&file, format),
        Command::Run { format, record, probe, command } => live::run(LiveOptions {
            format: Some(format),
            record,
            ring_bytes: ring_bytes(&probe)?,
            use_sites: probe.use_sites,
            command,
        }),
        Command::Record { output, probe, command } => live::run(LiveOptions {
            format: None,
            record: Some(output),
            ring_bytes: ring_bytes(&probe)?,
            use_sites: probe.use_sites,
            command,
        }),
        Command::Doctor { use_sites, no_attach } => doctor::run(DoctorOptions { use_sites, no_attach }),
    }
}

fn ring_bytes(probe: &ProbeArgs) -> anyhow::Result<u32> {
    let kib = probe.ring_kib;
    if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
        anyhow::bail!("--ring-kib {kib}: the ring buffer size must be a power of two between 4 KiB and 1 GiB");
    }
    Ok(kib * 1024)
}

fn analyze(path: &std::path::Path, format: Format) -> anyhow::Result<Outcome> {
    let mut source = FileSource::open(path)?;
    let mut analysis = Analysis::new(Limits::default());
    let mut failure = None;
    for event in source.by_ref() {
        match event {
            Ok(event) => analysis.feed(&event, |_| {}),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let mut summary = analysis.summary();
    summary.kernel = source.kernel_counters();
    if let Some(cut) = source.truncation() {
        summary.truncated_bytes = cut.lost_bytes;
        eprintln!(
            "tracer: warning: {}: trace cut off inside a record at byte offset {}: {} bytes lost, analyzed up to the last complete record",
            path.display(),
            cut.offset,
            cut.lost_bytes
        );
    }
    let mut out = BufWriter::new(io::stdout().lock());
    for group in analysis.groups().iter() {
        sink::write_group(&mut out, format, group)?;
    }
    sink::write_summary(&mut out, format, &summary)?;
    out.flush()?;
    if let Some(err) = failure {
        return Err(err).context("analysis stopped at a bad record; the findings above cover the events before it");
    }
    Ok(if analysis.groups().is_empty() { Outcome::Clean } else { Outcome::Findings })
}

fn print(path: &std::path::Path, format: Format) -> anyhow::Result<Outcome> {
    let source = FileSource::open(path)?;
    let mut out = BufWriter::new(io::stdout().lock());
    if format == Format::Text
        && let Some(header) = source.header()
    {
        writeln!(
            out,
            "# trace recorded by tracer {} on kernel {}; clock base {} ns",
            header.tool_version, header.kernel_release, header.clock_base_ns
        )?;
        for (name, value) in &header.offsets {
            writeln!(out, "# offset {name} = {value}")?;
        }
    }
    let mut source = source;
    for event in source.by_ref() {
        let event = event?;
        match format {
            Format::Text => writeln!(out, "{event}")?,
            Format::Json => jsonl::write_event(&mut out, &event)?,
        }
    }
    if let Some(cut) = source.truncation() {
        eprintln!(
            "tracer: warning: {}: trace cut off inside a record at byte offset {}: {} bytes lost",
            path.display(),
            cut.offset,
            cut.lost_bytes
        );
    }
    out.flush()?;
    Ok(Outcome::Clean)
}
