//! The tracer's last-resort free hook, measured natively on the host, whose kernel runs raw
//! tracepoints and tracepoints (but no kprobes or fentry). The tracer sees frees at
//! `free_dport()` or at the devres core's kfree call sites; only a kernel with neither gets
//! a raw tracepoint on `kfree`, whose untracked path is this shape: read the freed pointer,
//! one LRU-hash lookup, return. Measured here: that program, the same with an empty body
//! (the attach point's own cost), and bpftrace's tracepoint with a hash lookup, each against
//! the `select` loop (one `kfree` per call) with nothing attached, twice (an A/A pair).
//!
//! The programs are a few instructions, loaded with bpf(2) directly: the xtask does not
//! link aya for them.
use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::util;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// The size of the tracer's BLOCKS map (tracer-ebpf/src/main.rs).
const BLOCKS_ENTRIES: u32 = 65_536;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn { code, regs: (src << 4) | dst, off, imm }
    }

    fn bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = self.regs;
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

/// `r0 = 0; exit`.
fn empty_program() -> Vec<Insn> {
    vec![Insn::new(0xb7, 0, 0, 0, 0), Insn::new(0x95, 0, 0, 0, 0)]
}

/// `key = ctx->args[1]` (kfree's pointer); `bpf_map_lookup_elem(map, &key)`; `return 0`.
fn lookup_program(map_fd: i32) -> Vec<Insn> {
    vec![
        Insn::new(0x79, 2, 1, 8, 0),                        // r2 = *(u64 *)(r1 + 8)
        Insn::new(0x7b, 10, 2, -8, 0),                      // *(u64 *)(r10 - 8) = r2
        Insn::new(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),   // r1 = map (ld_imm64, first half)
        Insn::new(0x00, 0, 0, 0, 0),                        //      (second half)
        Insn::new(0xbf, 2, 10, 0, 0),                       // r2 = r10
        Insn::new(0x07, 2, 0, 0, -8),                       // r2 += -8
        Insn::new(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // call bpf_map_lookup_elem
        Insn::new(0xb7, 0, 0, 0, 0),                        // r0 = 0
        Insn::new(0x95, 0, 0, 0, 0),                        // exit
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded `union bpf_attr` of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: bpf(2) returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put_u32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A raw tracepoint program on `kfree`, attached while the returned descriptors live.
struct Attached {
    _map: Option<OwnedFd>,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// `map_type`: the hash map type the program looks the pointer up in, or None for the
/// empty program.
fn attach_kfree(map_type: Option<u32>) -> anyhow::Result<Attached> {
    use std::os::fd::AsRawFd as _;
    let map = if let Some(map_type) = map_type {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, map_type);
        put_u32(&mut attr, 4, 8);
        put_u32(&mut attr, 8, 8);
        put_u32(&mut attr, 12, BLOCKS_ENTRIES);
        Some(bpf(BPF_MAP_CREATE, &mut attr).context("creating a hash map (bpf BPF_MAP_CREATE)")?)
    } else {
        None
    };
    let insns: Vec<u8> = match &map {
        Some(m) => lookup_program(m.as_raw_fd()),
        None => empty_program(),
    }
    .into_iter()
    .flat_map(Insn::bytes)
    .collect();
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_RAW_TRACEPOINT);
    put_u32(&mut attr, 4, (insns.len() / 8) as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1);
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let text = String::from_utf8_lossy(&log);
        anyhow::anyhow!("loading a raw tracepoint program (bpf BPF_PROG_LOAD): {e}\n{}", text.trim_end_matches('\0'))
    })?;
    let name = CString::new("kfree").expect("no NUL");
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, name.as_ptr() as u64);
    put_u32(&mut attr, 8, prog.as_raw_fd() as u32);
    let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).context("attaching to the kfree raw tracepoint")?;
    Ok(Attached { _map: map, _prog: prog, _link: link })
}

/// What bpftrace runs on the host (no fentry there: only the kfree half of bench.bt).
const BPFTRACE_KFREE: &str = r#"BEGIN { @blocks[0] = 1; printf("bench: bpftrace attached\n"); }
tracepoint:kmem:kfree /@blocks[(uint64)args->ptr]/ { @frees = count(); }
"#;

/// bpftrace running `script`, attached; its output is collected until it exits.
struct Bpftrace {
    child: Child,
    output: std::thread::JoinHandle<String>,
}

fn start_bpftrace(script: &Path) -> anyhow::Result<Bpftrace> {
    // Its errors go to a file next to the script, quoted when it does not attach.
    let errors = script.with_extension("err");
    let mut child = Command::new("bpftrace")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&errors).with_context(|| format!("creating {}", errors.display()))?)
        .spawn()
        .context("cannot run bpftrace")?;
    let mut out = child.stdout.take().expect("piped");
    let (attached, seen) = std::sync::mpsc::channel();
    // Read its output to the end (so that it never blocks on a full pipe), saying when it
    // printed the line that means it is attached.
    let output = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        while let Ok(n) = io::Read::read(&mut out, &mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&text).contains("bench: bpftrace attached") {
                told = attached.send(()).is_ok();
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    if seen.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let text = output.join().unwrap_or_default();
        let err = std::fs::read_to_string(&errors).unwrap_or_default();
        bail!("bpftrace did not attach on the host (it exited, or 120 s passed):\n{text}{err}");
    }
    Ok(Bpftrace { child, output })
}

impl Bpftrace {
    /// Stops it (SIGINT, as Ctrl-C) and returns what it printed, its maps included. bpftrace
    /// now and then misses a SIGINT (seen: it stayed in its poll loop): it gets one every
    /// second, and SIGKILL after ten.
    fn stop(mut self) -> anyhow::Result<String> {
        for _ in 0..10 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            for _ in 0..10 {
                if self.child.try_wait()?.is_some() {
                    return Ok(self.output.join().unwrap_or_default());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        self.child.wait()?;
        bail!("bpftrace did not exit on SIGINT within 10 s on the host; killed it")
    }
}

/// Counts the host kernel's kfree calls per `select` operation (bpftrace, by comm).
fn kfree_per_op(helper: &Path, loop_ms: u64, out: &Path) -> anyhow::Result<String> {
    let script = out.join("host-kfree-count.bt");
    std::fs::write(
        &script,
        "BEGIN { printf(\"bench: bpftrace attached\\n\"); }\ntracepoint:kmem:kfree /comm == \"bench-guest\"/ { @kfree = count(); }\n",
    )?;
    let bpftrace = start_bpftrace(&script)?;
    let line = util::output(Command::new(helper).args(["select", &loop_ms.to_string()]))?;
    let text = bpftrace.stop()?;
    let kfree = text
        .lines()
        .find_map(|l| l.strip_prefix("@kfree:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("bpftrace printed no kfree count")?;
    Ok(format!("hostcalls loop=select {} kfree={kfree}\n", line.trim()))
}

/// bpftrace reads tracepoint formats from tracefs, which a fresh machine may not have
/// mounted: mount it at its usual place when it is missing.
fn ensure_tracefs() -> anyhow::Result<()> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").is_dir() {
        return Ok(());
    }
    println!("bench: mounting tracefs on {} (bpftrace needs it)", dir.display());
    util::run(Command::new("mount").args(["-t", "tracefs", "tracefs"]).arg(dir))
        .context("cannot mount tracefs on /sys/kernel/tracing (bpftrace needs it on the host)")
}

/// The modes of the host run, in the order of the first repetition: the fallback's
/// program between the two halves of the A/A pair.
pub const MODES: [&str; 5] = ["none", "rawtp-lru", "none-b", "rawtp-empty", "bpftrace"];

/// Runs the `select` loop `loops` times in each mode, the mode order rotated
/// each of `reps` repetitions; returns `hostkfree mode= rep= select ...` lines.
pub fn measure(helper: &Path, reps: u32, loops: u32, loop_ms: u64, out: &Path) -> anyhow::Result<String> {
    ensure_tracefs()?;
    let script = out.join("host-kfree.bt");
    std::fs::write(&script, BPFTRACE_KFREE)?;
    let mut lines = kfree_per_op(helper, loop_ms, out)?;
    for rep in 0..reps as usize {
        for i in 0..MODES.len() {
            let mode = MODES[(i + rep) % MODES.len()];
            let (bpftrace, attached) = match mode {
                "none" | "none-b" => (None, None),
                "rawtp-lru" => (None, Some(attach_kfree(Some(BPF_MAP_TYPE_LRU_HASH))?)),
                "rawtp-empty" => (None, Some(attach_kfree(None)?)),
                _ => (Some(start_bpftrace(&script)?), None),
            };
            for _ in 0..loops {
                let text = util::output(Command::new(helper).args(["select", &loop_ms.to_string()]))?;
                for l in text.lines() {
                    lines.push_str(&format!("hostkfree mode={mode} rep={} {l}\n", rep + 1));
                }
            }
            drop(attached);
            if let Some(b) = bpftrace {
                b.stop()?;
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r2 = *(u64 *)(r1 + 8): opcode 0x79, dst 2 in the low nibble, src 1 in the high one.
        assert_eq!(Insn::new(0x79, 2, 1, 8, 0).bytes(), [0x79, 0x12, 8, 0, 0, 0, 0, 0]);
        assert_eq!(Insn::new(0x07, 2, 0, 0, -8).bytes(), [0x07, 0x02, 0, 0, 0xf8, 0xff, 0xff, 0xff]);
        assert_eq!(lookup_program(3).len(), 9);
    }
}
