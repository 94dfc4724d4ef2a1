//! `tracer run` and `tracer record`: attach, stream kernel events through the engine (and
//! optionally into a trace file), stop on Ctrl-C, SIGTERM or the traced command's exit.
//!
//! Three steps: `start` (discover, attach, spawn the command), `Session::events` (the loop:
//! ring buffer, ticks for counters, module reloads and exited threads; signals and the
//! command's exit end it), `Session::finish` (drain, detach, report).
use std::{
    io::{self, BufWriter, Write},
    os::fd::AsFd,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};
use tracer::{
    analysis::{Analysis, NewGroup},
    decode,
    engine::Limits,
    format::tracefile::TraceHeader,
    kernel::modules,
    known::Known,
    plan::Plan,
    resolve::{Resolver, SymbolSource},
    sink::{self, Format},
    summary::Summary,
    symbolize::Symbols,
};
use tracer_common::{COUNTERS, Counter};

use crate::{
    Outcome,
    discover::{self, Discovery, ProbeConfig, discover},
    kernel_log::KernelLog,
    preflight,
    probe::{
        programs::{self, Attached, site_names},
        rescan::{ModuleRescan, Rescanned, rescan_module},
    },
    recorder::Recorder,
};

pub struct LiveOptions {
    /// Findings on stdout in this format; `None` for `record` (summary on stderr only).
    pub format: Option<Format>,
    pub record: Option<PathBuf>,
    /// Exit 2 when events were lost.
    pub strict: bool,
    pub probe: ProbeConfig,
    pub limits: Limits,
    /// One finding per root cause (`--no-fold` turns it off).
    pub fold: bool,
    /// Findings known not to be new (`--known`).
    pub known: Known,
    pub command: Vec<String>,
}

/// How often the trace file is flushed and the kernel counters are read.
const TICK: Duration = Duration::from_millis(500);

/// Ticks between two looks for exited threads, and how long a thread must have been quiet
/// to be forgotten: its last events may still be in the ring buffer behind the tick.
const EXITED_EVERY: u32 = 10;
const EXITED_QUIET: Duration = Duration::from_secs(5);

pub fn run(options: LiveOptions) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut session = start(&options)?;
        session.events().await?;
        session.finish(&options).await
    })
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The running kernel's symbols, for the resolver to read again.
struct ProcSymbols;

impl SymbolSource for ProcSymbols {
    fn reread(&mut self, old: &Symbols) -> Option<Symbols> {
        old.reload_modules().inspect_err(|err| eprintln!("tracer: warning: re-reading kernel symbols: {err}")).ok()
    }

    fn module_ranges(&mut self) -> Vec<std::ops::Range<u64>> {
        modules::ranges()
    }

    fn now_ns(&self) -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }
}

fn clock_base_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC))
}

/// Whether `/proc/TID` names the kernel's thread TID: not so in a nested pid namespace.
fn proc_shows_kernel_tids() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().find_map(|l| l.strip_prefix("NSpid:")).is_some_and(|ids| ids.split_whitespace().count() == 1)
    })
}

fn thread_exited(tid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{tid}")).exists()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn counters_named(counts: &[u64; COUNTERS]) -> Vec<(String, u64)> {
    Counter::ALL.iter().map(|c| (c.name().to_owned(), counts[*c as usize])).collect()
}

/// Everything one event goes through after the ring buffer.
struct Pipeline {
    resolver: Resolver,
    analysis: Analysis,
    recorder: Option<Recorder>,
    live_text: bool,
    undecodable: u64,
}

impl Pipeline {
    fn handle(&mut self, bytes: &[u8]) {
        let raw = match decode::decode(bytes) {
            Ok(raw) => raw,
            Err(err) => {
                self.undecodable += 1;
                if self.undecodable <= 5 {
                    eprintln!("tracer: warning: undecodable kernel record ({} bytes): {err}", bytes.len());
                }
                return;
            }
        };
        let event = self.resolver.resolve(&raw);
        if let Some(recorder) = &self.recorder {
            recorder.event(&event);
        }
        let live_text = self.live_text;
        self.analysis.feed(&event, |new: NewGroup| {
            let group = new.group;
            if live_text {
                let mut out = io::stdout().lock();
                let _ = sink::text::write_group(&mut out, group, new.known);
                let _ = out.flush();
            } else {
                eprintln!("tracer: {} (tid {} {})", group.finding.title(), group.finding.tid, group.finding.comm);
            }
        });
    }
}

/// A live tracing session: attached, events flowing.
struct Session {
    attached: Attached,
    ring: AsyncFd<RingBuf<MapData>>,
    /// The kernel side's diagnostics, with `-v`.
    kernel_log: Option<KernelLog>,
    pipeline: Pipeline,
    plan: Plan,
    rescan: ModuleRescan,
    child: Option<tokio::process::Child>,
    child_status: Option<ExitStatus>,
    sigterm: Signal,
    sigint: Signal,
    started: Instant,
    /// Threads whose state was forgotten after they exited.
    forgotten: usize,
}

/// Checks, discovers, attaches and starts the traced command.
fn start(options: &LiveOptions) -> anyhow::Result<Session> {
    if let Some(problem) = preflight::privilege_problem() {
        bail!(problem);
    }
    // Caught from here on, so a Ctrl-C during the (slow) attach still detaches cleanly.
    let sigterm = signal(SignalKind::terminate())?;
    let sigint = signal(SignalKind::interrupt())?;
    let discovery = discover(&options.probe, true)?;
    report_discovery(&discovery);
    // Before attaching: a trace path that cannot be written fails at once.
    let recorder = match &options.record {
        Some(path) => {
            let header = TraceHeader {
                tool_version: env!("CARGO_PKG_VERSION").to_owned(),
                kernel_release: kernel_release(),
                clock_base_ns: clock_base_ns(),
                offsets: discovery.profile.named_offsets(),
            };
            Some(Recorder::create(path, &header)?)
        }
        None => None,
    };
    let mut attached = programs::load(&discovery, options.probe.ring_bytes, options.probe.diagnostics)?;
    for warning in &attached.warnings {
        eprintln!("tracer: warning: {warning}");
    }
    if options.strict && !attached.warnings.is_empty() {
        bail!("{} probe(s) not attached, see the warnings above (--strict)", attached.warnings.len());
    }
    eprintln!(
        "tracer: {} kprobes attached in {:.1?} ({} sites)",
        attached.kprobe_count(),
        attached.took,
        attached.sites_attached
    );
    let ring = attached.take_ring_buffer()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // AsyncFd (and the RingBuf inside it) is dropped.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .context("polling the ring buffer")?;
    let kernel_log = if options.probe.diagnostics { Some(KernelLog::open(&mut attached.ebpf)?) } else { None };
    let Discovery { symbols, plan, rescan, .. } = discovery;
    let pipeline = Pipeline {
        resolver: Resolver::new(symbols, site_names(&plan)).with_reload(Box::new(ProcSymbols)),
        analysis: Analysis::with_folding(options.limits, options.fold).with_known(options.known.clone()),
        recorder,
        live_text: options.format == Some(Format::Text),
        undecodable: 0,
    };
    let child = match options.command.split_first() {
        Some((program, args)) => {
            let stdout = io::stderr().as_fd().try_clone_to_owned()?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args).stdout(Stdio::from(stdout));
            preflight::restore_open_files_in(&mut cmd);
            Some(cmd.spawn().with_context(|| format!("cannot run {program:?}"))?)
        }
        None => None,
    };
    Ok(Session {
        attached,
        ring,
        kernel_log,
        pipeline,
        plan,
        rescan,
        child,
        child_status: None,
        sigterm,
        sigint,
        started: Instant::now(),
        forgotten: 0,
    })
}

impl Session {
    /// Feeds events until a signal, the command's exit, or a failed trace file.
    async fn events(&mut self) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        // A module reloaded between two ticks shows as a new load address.
        let mut layout = modules::cxl_layout();
        // Modules loaded again whose code could not be read yet, with the ticks tried.
        let mut unsettled = std::collections::BTreeMap::<String, u32>::new();
        // Exited threads' state is forgotten (every short-lived modprobe of a hotplug loop
        // would otherwise stay until the thread cap), where /proc can tell.
        let forget_exited = proc_shows_kernel_tids();
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        self.pipeline.handle(&item);
                    }
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    if let Some(recorder) = &self.pipeline.recorder {
                        recorder.counters(counters_named(&self.attached.counters()?));
                    }
                    let now = modules::cxl_layout();
                    if now != layout || !unsettled.is_empty() {
                        self.modules_changed(&now, &layout, &mut unsettled);
                        layout = now;
                    }
                    ticks = ticks.wrapping_add(1);
                    if forget_exited && ticks.is_multiple_of(EXITED_EVERY) {
                        let quiet_since = clock_ns(libc::CLOCK_MONOTONIC).saturating_sub(EXITED_QUIET.as_nanos() as u64);
                        self.forgotten += self.pipeline.analysis.engine_mut().forget_exited_threads(quiet_since, thread_exited);
                    }
                    if self.pipeline.recorder.as_ref().is_some_and(Recorder::failed) {
                        return Ok(());
                    }
                }
                printed = async { self.kernel_log.as_mut().expect("guarded").print_next().await }, if self.kernel_log.is_some() => {
                    printed?;
                }
                status = async { self.child.as_mut().expect("guarded").wait().await }, if self.child.is_some() => {
                    self.child_status = Some(status?);
                    return Ok(());
                }
                _ = self.sigterm.recv() => return Ok(()),
                _ = self.sigint.recv() => return Ok(()),
            }
        }
    }

    /// A module loaded since the last tick (again, or for the first time): find its sites
    /// where its code has them now. One that could not be read (unloaded again, or still
    /// loading) is tried again while loaded.
    fn modules_changed(
        &mut self,
        now: &[(String, String)],
        before: &[(String, String)],
        unsettled: &mut std::collections::BTreeMap<String, u32>,
    ) {
        self.pipeline.resolver.reread_symbols();
        for (name, _) in now.iter().filter(|entry| !before.contains(entry)) {
            unsettled.insert(name.clone(), 0);
        }
        unsettled.retain(|module, _| now.iter().any(|(name, _)| name == module));
        for (module, tries) in unsettled.clone() {
            let symbols = self.pipeline.resolver.symbols();
            match rescan_module(&mut self.attached, &mut self.plan, &mut self.rescan, symbols, &module, tries) {
                Rescanned::NotYet => {
                    unsettled.insert(module, tries + 1);
                }
                Rescanned::Kept => {
                    unsettled.remove(&module);
                }
                Rescanned::NewSites => {
                    self.pipeline.resolver.set_sites(site_names(&self.plan));
                    unsettled.remove(&module);
                }
            }
        }
    }

    /// Drains what the kernel side submitted, stops the command, detaches, and reports.
    async fn finish(mut self, options: &LiveOptions) -> anyhow::Result<Outcome> {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.pipeline.handle(&item);
        }
        if let Some(log) = &mut self.kernel_log {
            log.drain();
        }
        if let Some(child) = &mut self.child
            && self.child_status.is_none()
        {
            let _ = child.start_kill();
            self.child_status = child.wait().await.ok();
        }
        let counts = self.attached.counters()?;
        let coverage = self.attached.coverage(&self.plan)?;
        drop(self.attached);

        let mut pipeline = self.pipeline;
        let mut summary: Summary = pipeline.analysis.summary();
        summary.undecodable = pipeline.undecodable;
        summary.kernel = counters_named(&counts);
        summary.coverage = Some(pipeline.analysis.judge_coverage(coverage.clone()));
        let mut write_error = None;
        if let Some(recorder) = pipeline.recorder.take() {
            let path = recorder.path().to_owned();
            match recorder.finish(summary.kernel.clone(), coverage) {
                Ok(events) => eprintln!("tracer: trace of {events} events written to {}", path.display()),
                Err(err) => write_error = Some(err),
            }
        }
        if let Some(status) = self.child_status {
            eprintln!("tracer: traced command exited: {status}");
        }
        eprintln!("tracer: traced for {:.1?}", self.started.elapsed());
        if self.forgotten > 0 {
            eprintln!("tracer: forgot the state of {} threads after they exited", self.forgotten);
        }
        let mut out = BufWriter::new(io::stdout().lock());
        match options.format {
            Some(format @ (Format::Json | Format::Ktap)) => {
                let known = pipeline.analysis.known();
                sink::write_report(
                    &mut out,
                    format,
                    pipeline.analysis.groups().iter(),
                    &summary,
                    options.strict,
                    known,
                )?;
            }
            Some(Format::Text) => {
                for group in pipeline.analysis.groups().iter() {
                    let known = match pipeline.analysis.known_reason(group) {
                        Some(reason) => format!(" (known: {reason})"),
                        None => String::new(),
                    };
                    writeln!(out, "tracer: {}: {} occurrence(s){known}", group.finding.title(), group.count)?;
                }
                sink::text::write_summary(&mut out, &summary)?;
            }
            None => sink::text::write_summary(&mut io::stderr().lock(), &summary)?,
        }
        out.flush()?;
        let lost = summary.dropped() + summary.undecodable;
        if lost > 0 {
            eprintln!(
                "tracer: WARNING: {} events were dropped in the kernel and {} were undecodable; findings may be incomplete (a larger --ring-kib helps with ring_buffer_full; ring_buffer_busy is contention between CPUs, see the README)",
                summary.dropped(),
                summary.undecodable
            );
        }
        if let Some(err) = write_error {
            return Err(err.context("the trace file is complete up to its last whole chunk; `tracer analyze` reads it"));
        }
        if let Some(why) = pipeline.analysis.silence() {
            eprintln!(
                "tracer: warning: this run saw {why}: a clean result proves nothing (did the workload reach CXL code?)"
            );
            if options.strict {
                bail!("the run saw no CXL activity (--strict)");
            }
        }
        if options.strict && lost > 0 {
            bail!("{lost} events lost (--strict)");
        }
        let clean = !pipeline.analysis.has_new_findings() || options.format.is_none();
        Ok(if clean { Outcome::Clean } else { Outcome::Findings })
    }
}

fn report_discovery(d: &Discovery) {
    let frees = match &d.profile.free {
        tracer::kernel::profile::FreePath::DevresKfree { sites } => sites.len(),
        _ => 0,
    };
    eprintln!(
        "tracer: {} call sites in CXL code ({} modules: {}), {} use sites, {} deref sites in {} functions ({} after a dport lookup), {} devres kfree sites; planned {} sites in {:.1?}",
        d.calls.len(),
        d.cxl_modules.len(),
        d.cxl_modules.join(" "),
        d.plan.uses.iter().filter(|u| u.probed.is_some()).count(),
        d.derefs.sites,
        d.derefs.functions,
        d.derefs.dport_sites,
        frees,
        d.plan.sites.len(),
        d.took
    );
    eprintln!("tracer: kernel profile: {:?} lifetime, frees seen by {}", d.profile.lifetime, d.profile.free.describe());
    for point in discover::hot_attach_points(d) {
        eprintln!("tracer: attach point outside CXL and devres code: {point}");
    }
    if !discover::has_cxl_code(d) {
        eprintln!(
            "tracer: warning: no CXL code in this kernel (no cxl_core symbols, no cxl_* module): nothing to trace"
        );
    }
}
