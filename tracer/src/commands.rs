//! The subcommands.
use std::{
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::Context as _;
use tracer::{
    analysis::Analysis,
    engine::Limits,
    format::{
        jsonl,
        tracefile::{TraceHeader, TraceWriter},
    },
    known::{self, Known},
    sink::{self, Format},
    source::FileSource,
    timeline::{Selection, Timeline},
};

use crate::{
    Outcome,
    cli::{Command, EventFormat, KnownArgs, LimitArgs, LockEvents, ProbeArgs, TimelineFormat, XaLoadProbe},
    discover::{self, ProbeConfig},
    doctor::{self, DoctorOptions},
    leftovers,
    live::{self, LiveOptions},
};

pub fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Analyze { file, format, limits, report, known, strict, coverage } => analyze(
            &file,
            format,
            limits.into(),
            AnalyzeOptions { fold: !report.no_fold, strict, coverage, known: known.load()? },
        ),
        Command::Print { file, format } => print(&file, format),
        Command::Convert { file, output } => convert(&file, &output),
        Command::Run { format, record, strict, probe, limits, report, known, command } => live::run(LiveOptions {
            format: Some(format),
            record,
            strict,
            probe: probe.try_into()?,
            limits: limits.into(),
            fold: !report.no_fold,
            known: known.load()?,
            command,
        }),
        Command::Record { output, probe, command } => live::run(LiveOptions {
            format: None,
            record: Some(output),
            strict: false,
            probe: probe.try_into()?,
            limits: Limits::default(),
            fold: true,
            known: Known::default(),
            command,
        }),
        Command::Doctor { probe, no_attach } => doctor::run(DoctorOptions { probe: probe.try_into()?, no_attach }),
        Command::Leftovers => leftovers::run(),
        Command::Known { file, output, report } => known(&file, output.as_deref(), !report.no_fold),
        Command::Timeline { file, output, finding, format, report } => {
            timeline(&file, &output, finding, format, !report.no_fold)
        }
    }
}

impl From<LimitArgs> for Limits {
    fn from(args: LimitArgs) -> Limits {
        Limits {
            max_dports: args.max_dports,
            max_freed_dports: args.max_freed_dports,
            max_threads: args.max_threads,
            ..Limits::default()
        }
    }
}

impl TryFrom<ProbeArgs> for ProbeConfig {
    type Error = anyhow::Error;

    fn try_from(args: ProbeArgs) -> anyhow::Result<ProbeConfig> {
        let kib = args.ring_kib;
        if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
            anyhow::bail!("--ring-kib {kib}: the ring buffer size must be a power of two between 4 KiB and 1 GiB");
        }
        Ok(ProbeConfig {
            extra_uses: args.use_sites.iter().map(|s| discover::parse_use_site(s)).collect::<Result<_, _>>()?,
            ring_bytes: kib * 1024,
            btf_dir: args.btf_dir,
            global_lock_hook: args.lock_events == LockEvents::Global,
            direct_xa_load: args.xa_load == XaLoadProbe::Direct,
            wait_for_cxl: args.wait_for_cxl.map(std::time::Duration::from_secs),
            derefs: !args.no_derefs,
            diagnostics: args.verbose,
        })
    }
}

struct AnalyzeOptions {
    fold: bool,
    known: Known,
    strict: bool,
    /// Print the whole coverage table.
    coverage: bool,
}

fn analyze(path: &std::path::Path, format: Format, limits: Limits, options: AnalyzeOptions) -> anyhow::Result<Outcome> {
    let AnalyzeOptions { fold, strict, coverage, known } = options;
    let mut source = FileSource::open(path)?;
    let mut analysis = Analysis::with_folding(limits, fold).with_known(known);
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
    summary.coverage = source.coverage().map(|c| analysis.judge_coverage(c));
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
    sink::write_report(&mut out, format, analysis.groups().iter(), &summary, strict, analysis.known())?;
    out.flush()?;
    if coverage {
        match &summary.coverage {
            // After a text report on stdout; beside a machine-readable one, on stderr.
            Some(table) if format == Format::Text => sink::text::write_coverage_table(&mut out, table)?,
            Some(table) => sink::text::write_coverage_table(&mut io::stderr().lock(), table)?,
            None => anyhow::bail!(
                "{}: no site coverage in this input (only a trace written by `tracer run --record` or `tracer record` has it)",
                path.display()
            ),
        }
        out.flush()?;
    }
    if let Some(err) = failure {
        return Err(err).context("analysis stopped at a bad record; the findings above cover the events before it");
    }
    if let Some(why) = analysis.silence() {
        eprintln!("tracer: warning: {}: {why}: a clean result here proves nothing", path.display());
        if strict {
            anyhow::bail!("{}: nothing to judge (--strict)", path.display());
        }
    }
    if strict && summary.lost_anything() {
        anyhow::bail!("{}: events were lost or state was evicted (--strict): see the summary", path.display());
    }
    Ok(if analysis.has_new_findings() { Outcome::Findings } else { Outcome::Clean })
}

impl KnownArgs {
    fn load(&self) -> anyhow::Result<Known> {
        let known = match &self.known {
            Some(path) => Known::load(path)?,
            None => return Ok(Known::default()),
        };
        // Accepted, so that a starting file gates at once, but never silently.
        for e in known.placeholders() {
            eprintln!(
                "tracer: warning: {}:{}: {:?} is still known for the reason `tracer known` wrote: replace it with why",
                known.path.display(),
                e.line,
                e.title
            );
        }
        Ok(known)
    }
}

/// `tracer known`: a starting known-findings file from a JSON report or from events.
fn known(path: &Path, output: Option<&Path>, fold: bool) -> anyhow::Result<Outcome> {
    let titles = match report_titles(path)? {
        Some(titles) => titles,
        None => {
            let mut source = FileSource::open(path)?;
            let mut analysis = Analysis::with_folding(Limits::default(), fold);
            for event in source.by_ref() {
                analysis.feed(&event.with_context(|| format!("reading {}", path.display()))?, |_| {});
            }
            analysis.groups().iter().map(|g| (g.finding.title(), g.count)).collect()
        }
    };
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let text = known::starting_file(titles.iter().cloned(), &name);
    match output {
        Some(output) => {
            std::fs::write(output, &text).with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "tracer: {} known finding title(s) written to {}",
                text.lines().filter(|l| !l.starts_with('#')).count(),
                output.display()
            );
        }
        None => io::stdout().lock().write_all(text.as_bytes())?,
    }
    if titles.is_empty() {
        eprintln!("tracer: warning: {} has no finding: the file lists nothing", path.display());
    }
    Ok(Outcome::Clean)
}

/// The (title, count) of each finding line when `path` is a JSON report (`--format json`,
/// such as findings.jsonl), `None` when it is anything else (a trace, JSON-lines events).
fn report_titles(path: &Path) -> anyhow::Result<Option<Vec<(String, u64)>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(None) };
    let mut titles = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { return Ok(None) };
        if value.get("kind").is_some() {
            return Ok(None);
        }
        if value.get("summary").is_some() {
            continue;
        }
        let title = known::title_of_report_line(&value).with_context(|| {
            format!("{}:{}: a JSON line that is neither a finding nor an event", path.display(), n + 1)
        })?;
        titles.push((title, value.get("count").and_then(serde_json::Value::as_u64).unwrap_or(1)));
    }
    Ok(Some(titles))
}

fn timeline(
    path: &std::path::Path,
    output: &std::path::Path,
    finding: Option<usize>,
    format: TimelineFormat,
    fold: bool,
) -> anyhow::Result<Outcome> {
    let mut source = FileSource::open(path)?;
    let mut analysis = Analysis::with_folding(Limits::default(), fold);
    let mut events = Vec::new();
    for event in source.by_ref() {
        let event = event.with_context(|| format!("reading {}", path.display()))?;
        analysis.feed(&event, |_| {});
        events.push(event);
    }
    let groups: Vec<_> = analysis.groups().iter().collect();
    let selection = match finding {
        None => Selection::All,
        Some(n) if n >= 1 && n <= groups.len() => Selection::Finding(n - 1),
        Some(n) => anyhow::bail!(
            "--finding {n}: {} has {} finding(s) (numbered from 1 as `tracer analyze` lists them)",
            path.display(),
            groups.len()
        ),
    };
    if let Some(why) = analysis.silence() {
        eprintln!("tracer: warning: {}: {why}: the timeline is empty", path.display());
    }
    let timeline = Timeline::build(&events, &groups, selection);
    let text = match format {
        TimelineFormat::Html => {
            let title = match finding {
                Some(n) => format!("{} finding {n}", path.display()),
                None => path.display().to_string(),
            };
            timeline.html(&title)
        }
        TimelineFormat::ChromeTrace => timeline.chrome_trace().to_string(),
    };
    std::fs::write(output, text).with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "tracer: timeline of {} events, {} lock holds, {} threads, {} finding(s) written to {}",
        timeline.marks.len(),
        timeline.spans.len(),
        timeline.lanes.len(),
        timeline.findings.len(),
        output.display()
    );
    Ok(Outcome::Clean)
}

fn convert(path: &std::path::Path, output: &std::path::Path) -> anyhow::Result<Outcome> {
    let mut source = FileSource::open(path)?;
    let header = source.header().cloned().unwrap_or_else(|| TraceHeader {
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        ..TraceHeader::default()
    });
    let file = std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut writer = TraceWriter::new(BufWriter::new(file), &header)?;
    let mut events = 0u64;
    for event in source.by_ref() {
        writer.write_event(&event?)?;
        events += 1;
    }
    if let Some(coverage) = source.coverage() {
        writer.write_coverage(&coverage)?;
    }
    let counters = source.kernel_counters();
    if !counters.is_empty() {
        let refs: Vec<(&str, u64)> = counters.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        writer.write_counters(&refs)?;
    }
    writer.into_inner()?.flush().with_context(|| format!("writing {}", output.display()))?;
    eprintln!("tracer: {events} events written to {}", output.display());
    Ok(Outcome::Clean)
}

fn print(path: &std::path::Path, format: EventFormat) -> anyhow::Result<Outcome> {
    let source = FileSource::open(path)?;
    let mut out = BufWriter::new(io::stdout().lock());
    if format == EventFormat::Text
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
            EventFormat::Text => writeln!(out, "{event}")?,
            EventFormat::Json => jsonl::write_event(&mut out, &event)?,
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
