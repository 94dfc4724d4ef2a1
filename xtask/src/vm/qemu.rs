//! QEMU: the command line for each CXL topology, the accelerator choice, and the console
//! monitor that turns a guest run into an honest outcome.
use std::{
    fmt,
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::Topology;

/// How QEMU executes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when the probe boots a guest with it, TCG otherwise.
    Auto,
    /// KVM, `-cpu host`; fails the run when the host cannot do it.
    Kvm,
    /// QEMU's emulator, `-cpu max`: works anywhere, guest kernel paths run about 8 times slower.
    Tcg,
}

impl Accel {
    /// The virtual CPUs a guest gets unless `--cpus` says otherwise: two with KVM, one with
    /// TCG. QEMU 7.2's multi-threaded TCG does not honour the kernel's cross-modifying-code
    /// protocol: while `text_poke_bp` flips a static key (a tracepoint or a BPF link being
    /// attached or detached, ftrace patching a function entry), the other vCPU can still run
    /// the `int3` after it was removed, and the kernel dies with `Oops: int3`. Measured on
    /// this machine: flipping the `kmem/kfree` tracepoint under load oopses a 2-vCPU TCG
    /// guest within the first 300 flips (in `kfree`, `__schedule`), a 1-vCPU one never; one
    /// CI run died this way when the suite's kretprobes were disabled.
    pub fn default_cpus(self) -> u32 {
        match self {
            Accel::Kvm => 2,
            Accel::Auto | Accel::Tcg => 1,
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Everything one boot needs.
pub struct Machine<'a> {
    pub accel: Accel,
    /// Virtual CPUs (`-smp`).
    pub cpus: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// The host directory the guest mounts at /share; `None` for no share.
    pub share: Option<&'a Path>,
    /// The Debian userland (vm/userland.rs), shared read-only with the mount tag `debian`.
    pub userland: Option<&'a Path>,
    /// Where CXL backing files go; `None` for a machine without CXL (the KVM probe).
    pub cxl: Option<(Topology, &'a Path)>,
}

impl Machine<'_> {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        let cpus = self.cpus.to_string();
        let machine = if self.cxl.is_some_and(|(t, _)| t.emulated()) { "q35,cxl=on" } else { "q35" };
        cmd.args(["-machine", machine, "-smp", cpus.as_str(), "-m", "2G,maxmem=4G,slots=4"]);
        cmd.args(["-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none", "-nic", "none"]);
        cmd.arg("-no-reboot");
        cmd.arg("-kernel").arg(self.kernel).arg("-initrd").arg(self.initrd);
        cmd.arg("-append").arg(self.cmdline);
        if let Some(share) = self.share {
            let mut fsdev = std::ffi::OsString::from("local,id=fs0,security_model=none,path=");
            fsdev.push(share);
            cmd.arg("-fsdev").arg(fsdev);
            cmd.args(["-device", "virtio-9p-pci,fsdev=fs0,mount_tag=share"]);
        }
        if let Some(root) = self.userland {
            // Read-only: every run of every kernel shares the one cached root.
            let mut fsdev = std::ffi::OsString::from("local,id=fs1,security_model=none,readonly=on,path=");
            fsdev.push(root);
            cmd.arg("-fsdev").arg(fsdev);
            cmd.args(["-device", "virtio-9p-pci,fsdev=fs1,mount_tag=debian"]);
        }
        if let Some((topology, dir)) = self.cxl {
            cxl_args(&mut cmd, topology, dir);
        }
        cmd
    }
}

/// The CXL side of the machine for `topology`.
fn cxl_args(cmd: &mut Command, topology: Topology, dir: &Path) {
    match topology {
        Topology::Rp => emulated_cxl(cmd, 1, None, dir),
        Topology::Switch => emulated_cxl(cmd, 2, Some("us0"), dir),
        Topology::CxlTest => {
            // No CXL device: cxl_test mocks them all. It puts its memdevs on NUMA nodes 0 and
            // 1 alternately (set_dev_node(dev, i % 2)) and allocates their state there: a
            // guest with one node oopses in the page allocator on the first memdev of node 1.
            cmd.args([
                "-object",
                "memory-backend-ram,id=node0,size=1G",
                "-object",
                "memory-backend-ram,id=node1,size=1G",
            ]);
            cmd.args(["-numa", "node,nodeid=0,memdev=node0", "-numa", "node,nodeid=1,memdev=node1"]);
        }
    }
}

/// QEMU's CXL devices: a CXL host bridge with one root port, and below it either one type3
/// device or a switch (upstream port `switch`) with `memdevs` of them. Each type3 has a
/// 256 MiB volatile memory backend and a label storage area, both sparse files in `dir`.
fn emulated_cxl(cmd: &mut Command, memdevs: usize, switch: Option<&str>, dir: &Path) {
    let backend = |cmd: &mut Command, id: &str| {
        let mut arg = std::ffi::OsString::from(format!("memory-backend-file,id={id},share=on,size=256M,mem-path="));
        arg.push(dir.join(format!("{id}.raw")));
        cmd.arg("-object").arg(arg);
    };
    cmd.args(["-device", "pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1"]);
    cmd.args(["-device", "cxl-rp,port=0,bus=cxl.1,id=root_port13,chassis=0,slot=2"]);
    match switch {
        None => {
            backend(cmd, "cxl-mem0");
            backend(cmd, "cxl-lsa0");
            cmd.args(["-device", "cxl-type3,bus=root_port13,memdev=cxl-mem0,lsa=cxl-lsa0,id=cxl-pmem0"]);
        }
        Some(us) => {
            cmd.args(["-device".to_owned(), format!("cxl-upstream,bus=root_port13,id={us}")]);
            for i in 0..memdevs {
                backend(cmd, &format!("cxl-mem{i}"));
                backend(cmd, &format!("cxl-lsa{i}"));
                cmd.args([
                    "-device".to_owned(),
                    format!("cxl-downstream,port={i},bus={us},id=swport{i},chassis=0,slot={}", 4 + i),
                ]);
                cmd.args([
                    "-device".to_owned(),
                    format!("cxl-type3,bus=swport{i},memdev=cxl-mem{i},lsa=cxl-lsa{i},id=cxl-pmem{i}"),
                ]);
            }
        }
    }
    cmd.args(["-M", "cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G"]);
}

/// A kernel failure seen on the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    Panic,
    Oops,
    Bug,
    SoftLockup,
    HardLockup,
    RcuStall,
    HungTask,
    Warning,
    AccelFailure,
}

impl Crash {
    /// Classifies one console (or dmesg) line. Only what the kernel printed counts (the text
    /// after a printk timestamp, which the guest's `printk.time=1` guarantees, even in the
    /// middle of a line a workload was writing), so a script that prints "BUG:" is no crash;
    /// and QEMU's own errors. Most specific markers first: a soft lockup line also contains
    /// "BUG:".
    pub fn detect(line: &str) -> Option<Crash> {
        if let Some(qemu) = line.strip_prefix("qemu: ") {
            return qemu.contains("KVM internal error").then_some(Crash::AccelFailure);
        }
        let text = kernel_part(line)?;
        const MARKERS: &[(&str, Crash)] = &[
            ("Kernel panic - not syncing", Crash::Panic),
            ("BUG: soft lockup", Crash::SoftLockup),
            ("Watchdog detected hard LOCKUP", Crash::HardLockup),
            ("detected stall", Crash::RcuStall),
            ("detected expedited stall", Crash::RcuStall),
            ("blocked for more than", Crash::HungTask),
            ("Oops:", Crash::Oops),
            ("general protection fault", Crash::Oops),
            ("kernel BUG at", Crash::Bug),
            ("BUG:", Crash::Bug),
            ("WARNING: CPU:", Crash::Warning),
        ];
        MARKERS.iter().find(|(marker, _)| text.contains(marker)).map(|(_, crash)| *crash)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Crash::Panic => "kernel panic",
            Crash::Oops => "kernel oops",
            Crash::Bug => "kernel BUG",
            Crash::SoftLockup => "soft lockup",
            Crash::HardLockup => "hard lockup",
            Crash::RcuStall => "RCU stall",
            Crash::HungTask => "hung task",
            Crash::Warning => "kernel warning",
            Crash::AccelFailure => "KVM failure (try --accel tcg)",
        }
    }
}

/// The text after the first printk timestamp (`[   12.345678] `) in `line`, if any.
fn kernel_part(line: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(open) = line[from..].find('[').map(|i| i + from) {
        let rest = &line[open + 1..];
        if let Some(close) = rest.find(']') {
            let is_time = rest[..close].trim_start().split_once('.').is_some_and(|(secs, frac)| {
                !secs.is_empty()
                    && !frac.is_empty()
                    && secs.bytes().all(|b| b.is_ascii_digit())
                    && frac.bytes().all(|b| b.is_ascii_digit())
            });
            if is_time {
                return Some(&rest[close + 1..]);
            }
        }
        from = open + 1;
    }
    None
}

/// What the console showed by the end of a boot.
pub struct Session {
    pub lines: Vec<String>,
    /// The first failure seen and the index of its line.
    pub crash: Option<(Crash, usize)>,
    /// The exit value of the guest's result line, when it was printed.
    pub result: Option<i32>,
    pub timed_out: bool,
    pub status: Option<ExitStatus>,
    /// When each `tracer-vm:` marker (init started, topology ready) appeared, from spawn.
    pub marks: Vec<(String, Duration)>,
    pub elapsed: Duration,
}

impl Session {
    /// Lines around `at`: some context before, the whole trace after.
    pub fn excerpt(&self, at: usize) -> String {
        let start = at.saturating_sub(8);
        let end = (at + 45).min(self.lines.len());
        self.lines[start..end].join("\n")
    }

    pub fn tail(&self, n: usize) -> String {
        self.lines[self.lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn mark(&self, name: &str) -> Option<Duration> {
        self.marks.iter().find(|(m, _)| m == name).map(|(_, t)| *t)
    }
}

/// How to watch a boot.
pub struct Watch<'a> {
    /// The guest's result line starts with this (it carries a per-run nonce, so no workload
    /// output can fake it), followed by `exit=N`.
    pub result_prefix: &'a str,
    pub timeout: Duration,
    pub log: Option<&'a Path>,
    pub echo: bool,
}

enum Event {
    Line(String),
    Stderr(String),
    Closed,
}

/// How long to keep reading after a failure is seen, to get the whole trace.
const CRASH_GRACE: Duration = Duration::from_secs(5);
/// How long the guest may take from its result line to power off.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// Lines that mark boot progress, timed from QEMU's start.
const MARKS: &[&str] = &["tracer-vm: init started", "tracer-vm: topology ready"];

/// Boots `cmd` and watches its serial console until the guest powers off, a failure is
/// seen (then a few more seconds for the trace), or the wall-clock bound passes. QEMU is
/// always gone when this returns.
pub fn boot(mut cmd: Command, watch: &Watch<'_>) -> anyhow::Result<Session> {
    let mut log = match watch.log {
        Some(path) => Some(File::create(path).with_context(|| format!("creating {}", path.display()))?),
        None => None,
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .context("cannot start qemu-system-x86_64 (the qemu-system-x86 package; cargo xtask setup installs it)")?,
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().expect("stdout is piped");
    let stderr = child.0.stderr.take().expect("stderr is piped");
    let out_tx = tx.clone();
    thread::spawn(move || read_lines(stdout, &out_tx, Event::Line));
    thread::spawn(move || read_lines(stderr, &tx, Event::Stderr));

    let mut session = Session {
        lines: Vec::new(),
        crash: None,
        result: None,
        timed_out: false,
        status: None,
        marks: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let hard_deadline = start + watch.timeout;
    let mut deadline = hard_deadline;
    let mut open = 2;
    while open > 0 {
        let now = Instant::now();
        if now >= deadline {
            session.timed_out = session.crash.is_none() && session.result.is_none();
            break;
        }
        let line = match rx.recv_timeout(deadline - now) {
            Ok(Event::Line(line)) => line,
            Ok(Event::Stderr(line)) => format!("qemu: {line}"),
            Ok(Event::Closed) => {
                open -= 1;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(log) = &mut log {
            writeln!(log, "{line}").context("writing the console log")?;
        }
        if watch.echo {
            println!("guest| {line}");
        }
        if let Some(mark) = MARKS.iter().find(|m| line.starts_with(**m)) {
            session.marks.push(((*mark).to_owned(), start.elapsed()));
        }
        if session.crash.is_none()
            && let Some(crash) = Crash::detect(&line)
        {
            session.crash = Some((crash, session.lines.len()));
            // A warning does not stop the guest: let the run finish and fail it afterwards.
            if crash != Crash::Warning {
                deadline = deadline.min(Instant::now() + CRASH_GRACE);
            }
        }
        if session.result.is_none()
            && let Some(rest) = line.strip_prefix(watch.result_prefix)
            && let Some(value) = rest.trim().strip_prefix("exit=")
        {
            session.result = Some(value.trim().parse().unwrap_or(-1));
            deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
        }
        session.lines.push(line);
    }
    session.elapsed = start.elapsed();
    // Ends QEMU if it is still running (timeout, or a guest that did not power off).
    let _ = child.0.kill();
    session.status = child.0.wait().ok();
    Ok(session)
}

fn read_lines<R: Read>(reader: R, tx: &mpsc::Sender<Event>, wrap: fn(String) -> Event) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = clean(&buf);
                if tx.send(wrap(line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Event::Closed);
}

/// A console line as text: no line ending, no terminal escape sequences (the firmware
/// clears the screen), other control bytes dropped.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte; other escapes: ESC and one character.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// QEMU, killed if `boot` returns early on an error or unwinds.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Whether KVM can run this kernel here: `/dev/kvm` must open, and a guest must boot with it
/// to a marker line. Nested setups often pass the first test and then fail on the first
/// emulated instruction ("KVM internal error"), leaving QEMU paused forever: the probe has
/// its own short bound. The answer is cached per host boot, kernel and QEMU.
pub fn kvm_works(
    kernel: &Path,
    probe_initrd: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<(bool, String)> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Ok((false, format!("/dev/kvm cannot be opened: {e}")));
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let qemu = crate::util::output(Command::new("qemu-system-x86_64").arg("--version")).unwrap_or_default();
    let key = super::kernel::fnv1a(
        format!("{}\n{}\n{}", boot_id.trim(), qemu.lines().next().unwrap_or(""), kernel.display()).as_bytes(),
    );
    let cache = crate::util::cache_dir().join(format!("kvm-probe-{key:016x}"));
    if let Ok(answer) = std::fs::read_to_string(&cache)
        && let Some((verdict, reason)) = answer.split_once('\n')
    {
        return Ok((verdict == "yes", reason.trim().to_owned()));
    }
    println!("vm: probing KVM (a short boot, cached until the host reboots)");
    let initrd = probe_initrd()?;
    let mut cmd = Machine {
        accel: Accel::Kvm,
        cpus: 1,
        kernel,
        initrd: &initrd,
        cmdline: "console=ttyS0 quiet panic=-1",
        share: None,
        userland: None,
        cxl: None,
    }
    .command();
    cmd.args(["-m", "512M"]);
    let session = boot(
        cmd,
        &Watch { result_prefix: "tracer-vm: kvm-probe", timeout: Duration::from_secs(30), log: None, echo: false },
    )?;
    let (works, reason) = if session.result == Some(0) {
        (true, format!("a probe guest booted with KVM in {:.1} s", session.elapsed.as_secs_f64()))
    } else if let Some((crash, at)) = session.crash {
        (false, format!("the probe guest failed with KVM ({}): {}", crash.describe(), session.lines[at]))
    } else if session.timed_out {
        (false, "the probe guest did not boot with KVM within 30 s".to_owned())
    } else {
        let why = session.lines.iter().find(|l| l.starts_with("qemu: ")).cloned().unwrap_or_else(|| session.tail(1));
        (false, format!("the probe guest did not boot with KVM ({why})"))
    };
    std::fs::create_dir_all(crate::util::cache_dir())?;
    std::fs::write(&cache, format!("{}\n{reason}\n", if works { "yes" } else { "no" }))
        .with_context(|| format!("writing {}", cache.display()))?;
    Ok((works, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_kernel_failures() {
        let cases = [
            ("[   12.3] Kernel panic - not syncing: sysrq triggered crash", Crash::Panic),
            ("[ 1.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!", Crash::SoftLockup),
            ("[ 1.0] BUG: kernel NULL pointer dereference, address: 0000000000000368", Crash::Bug),
            ("[ 1.0] Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI", Crash::Oops),
            ("[ 1.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", Crash::RcuStall),
            ("[ 1.0] INFO: task modprobe:123 blocked for more than 60 seconds.", Crash::HungTask),
            ("[ 1.0] WARNING: CPU: 1 PID: 31 at drivers/cxl/core/port.c:12", Crash::Warning),
            ("qemu: KVM internal error. Suberror: 1", Crash::AccelFailure),
        ];
        for (line, crash) in cases {
            assert_eq!(Crash::detect(line), Some(crash), "{line}");
        }
        assert_eq!(Crash::detect("tracer-vm: cycle memdev-bind 1/3 ms=420"), None);
        assert_eq!(Crash::detect("[    1.57] ACPI BIOS Error (bug): Failure creating named object"), None);
    }

    #[test]
    fn only_kernel_text_counts() {
        // A script's own output is not a kernel failure...
        assert_eq!(Crash::detect("BUG: this is my script talking"), None);
        assert_eq!(Crash::detect("grep found [x] Oops: in a file"), None);
        // ...but a kernel message that landed in the middle of a workload's line is.
        assert_eq!(Crash::detect("tracer-vm: cycle mix[  148.838075] Oops: 0000 [#1] PREEMPT SMP"), Some(Crash::Oops));
    }

    #[test]
    fn strips_terminal_escapes() {
        assert_eq!(clean(b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)\r\n"), "SeaBIOS (version 1.16)");
    }
}
