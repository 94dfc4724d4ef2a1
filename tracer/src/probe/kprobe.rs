//! Kprobes defined through tracefs (`kprobe_events`) and attached to the site programs
//! through perf links that carry a cookie (the site's index in `SITES`).
//!
//! Why tracefs and not the kprobe PMU: a tracefs probe on `MODULE:function+offset` survives
//! the module being unloaded and is re-armed when it is loaded again, before the module's
//! init runs, so `rmmod cxl_mem; modprobe cxl_mem` keeps being traced from its first probe.
use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    io::Write,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use tracer::plan::ProbePoint;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "tracefs is not mounted (looked for /sys/kernel/tracing and /sys/kernel/debug/tracing): mount -t tracefs nodev /sys/kernel/tracing"
    )]
    NoTracefs,
    #[error(
        "this kernel has no kprobe events ({0}/kprobe_events is missing: CONFIG_KPROBE_EVENTS is off), so its CXL call sites cannot be probed"
    )]
    NoKprobes(String),
    #[error("the kernel refused kprobe {spec:?}: {source}")]
    Define { spec: String, source: std::io::Error },
    #[error("cannot read the id of kprobe event {path}: {source}")]
    Id { path: PathBuf, source: std::io::Error },
    #[error("perf_event_open for kprobe {spec:?} failed: {source}")]
    PerfOpen { spec: String, source: std::io::Error },
    #[error("attaching the BPF program to kprobe {spec:?} failed: {source}")]
    Link { spec: String, source: std::io::Error },
}

/// The tracefs mount, which must offer kprobe events.
pub fn tracefs() -> Result<PathBuf, AttachError> {
    let mount = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("available_events").exists())
        .ok_or(AttachError::NoTracefs)?;
    if !mount.join("kprobe_events").exists() {
        return Err(AttachError::NoKprobes(mount.display().to_string()));
    }
    Ok(mount)
}

/// Whether tracefs lists `function` as traceable (ftrace can patch it; kprobe events refuse
/// notrace functions).
pub fn traceable(tracefs: &Path, function: &str) -> bool {
    fs::read_to_string(tracefs.join("available_filter_functions"))
        .is_ok_and(|list| list.lines().any(|l| l.split_whitespace().next() == Some(function)))
}

/// Kprobe events of this process (group `tracer_<pid>`), removed on drop.
///
/// Sites at the same point share its event: each opens its own perf event on it and links
/// its program with its own cookie, and the kernel runs every program linked to the event,
/// in link order, on one hit of one kprobe.
pub struct Kprobes {
    tracefs: PathBuf,
    group: String,
    /// Every event defined and not yet removed, by the point it probes.
    events: HashMap<(char, String), Event>,
    /// The attached sites: the perf event and the link holding the program on it, by cookie.
    attached: Vec<Attachment>,
    next: usize,
}

struct Event {
    name: String,
    /// Sites attached to it.
    users: usize,
}

struct Attachment {
    cookie: u64,
    point: (char, String),
    // Dropped link first, then the perf event (field order).
    _link: OwnedFd,
    _perf: OwnedFd,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;

impl Kprobes {
    pub fn new() -> Result<Kprobes, AttachError> {
        let tracefs = tracefs()?;
        remove_stale_groups(&tracefs);
        Ok(Kprobes {
            tracefs,
            group: format!("tracer_{}", std::process::id()),
            events: HashMap::new(),
            attached: Vec::new(),
            next: 0,
        })
    }

    fn write_events(&self, line: &str) -> std::io::Result<()> {
        let mut file = OpenOptions::new().append(true).open(self.tracefs.join("kprobe_events"))?;
        file.write_all(line.as_bytes())
    }

    /// The event probing `key`'s point, defined unless it already is.
    fn event(&mut self, key: &(char, String)) -> Result<String, AttachError> {
        if let Some(event) = self.events.get(key) {
            return Ok(event.name.clone());
        }
        let name = format!("s{}", self.next);
        self.next += 1;
        self.write_events(&format!("{}:{}/{name} {}\n", key.0, self.group, key.1))
            .map_err(|source| AttachError::Define { spec: key.1.clone(), source })?;
        self.events.insert(key.clone(), Event { name: name.clone(), users: 0 });
        Ok(name)
    }

    /// Removes the event of `key` once no site is attached to it.
    fn release(&mut self, key: &(char, String)) {
        let Some(event) = self.events.get(key) else { return };
        if event.users > 0 {
            return;
        }
        let line = format!("-:{}/{}\n", self.group, event.name);
        let _ = self.write_events(&line);
        self.events.remove(key);
    }

    /// Links `prog` with `cookie` to the kprobe at `point`, defining it unless another
    /// site already did.
    pub fn attach(&mut self, prog: impl AsFd, point: &ProbePoint, cookie: u64) -> Result<(), AttachError> {
        let key = (point.kind(), point.spec());
        let event = self.event(&key)?;
        match self.link(prog, &key, &event, cookie) {
            Ok(attachment) => {
                self.attached.push(attachment);
                if let Some(event) = self.events.get_mut(&key) {
                    event.users += 1;
                }
                Ok(())
            }
            Err(err) => {
                self.release(&key);
                Err(err)
            }
        }
    }

    fn link(&self, prog: impl AsFd, key: &(char, String), event: &str, cookie: u64) -> Result<Attachment, AttachError> {
        let spec = &key.1;
        let id_path = self.tracefs.join("events").join(&self.group).join(event).join("id");
        let id: u64 = fs::read_to_string(&id_path)
            .and_then(|s| s.trim().parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
            .map_err(|source| AttachError::Id { path: id_path, source })?;
        let perf =
            perf_event_open_tracepoint(id).map_err(|source| AttachError::PerfOpen { spec: spec.clone(), source })?;
        let link = link_create(prog.as_fd(), perf.as_fd(), cookie)
            .map_err(|source| AttachError::Link { spec: spec.clone(), source })?;
        Ok(Attachment { cookie, point: key.clone(), _link: link, _perf: perf })
    }

    /// Detaches the site with `cookie`, and removes its event if no other site is on it.
    /// Returns whether it was attached.
    pub fn detach(&mut self, cookie: u64) -> bool {
        let Some(i) = self.attached.iter().position(|a| a.cookie == cookie) else { return false };
        let attachment = self.attached.swap_remove(i);
        let key = attachment.point.clone();
        drop(attachment);
        if let Some(event) = self.events.get_mut(&key) {
            event.users -= 1;
        }
        self.release(&key);
        true
    }

    /// Kprobes defined: one per point, however many sites are on it.
    pub fn probes(&self) -> usize {
        self.events.len()
    }
}

impl Drop for Kprobes {
    fn drop(&mut self) {
        // Links and perf events first: an event in use cannot be removed.
        self.attached.clear();
        for event in self.events.values() {
            let _ = self.write_events(&format!("-:{}/{}\n", self.group, event.name));
        }
    }
}

/// Kprobe event names of tracer instances (`tracer_<pid>/...`) with their pid.
pub fn tracer_events(tracefs: &Path) -> Vec<(u32, String)> {
    let Ok(events) = fs::read_to_string(tracefs.join("kprobe_events")) else { return Vec::new() };
    events
        .lines()
        .filter_map(|line| {
            // "p:tracer_123/s0 match_port_by_dport+0x42"
            let name = line.split_whitespace().next()?.split_once(':')?.1;
            let pid = name.split_once('/')?.0.strip_prefix("tracer_")?.parse().ok()?;
            Some((pid, name.to_owned()))
        })
        .collect()
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes kprobe events left by a tracer that was killed (its process is gone).
pub fn remove_stale_groups(tracefs: &Path) {
    let stale: Vec<String> = tracer_events(tracefs)
        .into_iter()
        .filter(|(pid, _)| !alive(*pid))
        .map(|(_, name)| format!("-:{name}\n"))
        .collect();
    if stale.is_empty() {
        return;
    }
    if let Ok(mut file) = OpenOptions::new().append(true).open(tracefs.join("kprobe_events")) {
        for line in stale {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// Other tracer processes with kprobes attached right now. Their probes patch the very call
/// instructions this one looks for in /proc/kcore, so two cannot run at once.
pub fn other_tracers(tracefs: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = tracer_events(tracefs)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| pid != std::process::id() && alive(pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn perf_event_open_tracepoint(id: u64) -> std::io::Result<OwnedFd> {
    // struct perf_event_attr (PERF_ATTR_SIZE_VER7 = 128 bytes): type, size, config,
    // sample_period, ... wakeup_events at 48; everything else zero (enabled, no sampling).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&id.to_ne_bytes());
    attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
    attr[48..52].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr is a valid perf_event_attr of the size it declares.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_create(
    prog: std::os::fd::BorrowedFd<'_>,
    perf: std::os::fd::BorrowedFd<'_>,
    cookie: u64,
) -> std::io::Result<OwnedFd> {
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags, perf_event.bpf_cookie.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(perf.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_PERF_EVENT.to_ne_bytes());
    attr[16..24].copy_from_slice(&cookie.to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
