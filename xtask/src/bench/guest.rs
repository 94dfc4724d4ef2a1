//! `bench-guest`: the load programs `cargo xtask bench` runs in the QEMU guest (and, for
//! the calibration, on the host). Built static for musl so it runs in the bare initramfs.
//!
//! - `pipe MS`: a one-byte write and read back on one pipe, for MS milliseconds. Both
//!   `pipe_write` and `pipe_read` take `pipe->mutex`, a mutex no tracer tracks; no
//!   allocation happens in the loop (the pipe keeps its page).
//! - `select MS`: `select` on 1024 descriptors with empty sets and no wait, for MS
//!   milliseconds. Its descriptor bitmaps do not fit the stack buffer, so every call is one
//!   `kvmalloc` (a `kmalloc` at that size) and one `kfree`, on any kernel.
//! - `control MS`: `getppid` alone, for MS milliseconds (to count the calls it makes).
//!
//!   Both loops alternate blocks of their operation with blocks of `getppid` (the control),
//!   and print the time per operation of each and their ratio (`rel`).
//! - `load MS THREADS RATE`: drives the `cxl_dport_bench` module (tracked dport events)
//!   for MS milliseconds from THREADS threads, writing chunks of iterations to its debugfs
//!   `run` file, paced to RATE iterations per second in all (0: as fast as it goes).
//! - `nice N CMD ARGS`: runs CMD at nice value N (the guest's busybox has no `nice`).
//! - `decide RESULTS REPS MAX_REPS EXTRA_SECS BUDGET_SECS LAST_SECS LAST_MODES`: whether
//!   the loops' figures so far (the `loop` lines of RESULTS) resolve the targets, and if
//!   not, which modes one more repetition should run: a line `more MODE...` or
//!   `enough WHY`, then a line with the figures behind it.
//!   The guest asks this after each repetition: the statistics are the host report's own
//!   (`stats.rs`, compiled into both; `decide.rs` only here).
//!
//! The loads print one line of `key=value` figures for the host to parse.
#[path = "decide.rs"]
mod decide;
#[path = "stats.rs"]
mod stats;

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::process::CommandExt as _,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

const RUN_FILE: &str = "/sys/kernel/debug/cxl_dport_bench/run";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let result = match (args.first().map(String::as_str), num(1)) {
        (Some("pipe"), Some(ms)) => pipe(ms),
        (Some("select"), Some(ms)) => select(ms),
        (Some("control"), Some(ms)) => control(ms),
        (Some("load"), Some(ms)) => load(ms, num(2).unwrap_or(1), num(3).unwrap_or(0)),
        (Some("nice"), _) if args.len() >= 3 => nice(&args[1], &args[2..]),
        (Some("decide"), _) if args.len() == 8 => decide(&args[1..]),
        _ => Err("usage: bench-guest pipe MS | select MS | control MS | load MS [THREADS [RATE]] | nice N CMD [ARGS] \
             | decide RESULTS REPS MAX_REPS EXTRA_SECS BUDGET_SECS LAST_SECS LAST_MODES"
            .to_owned()),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-guest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets this process's nice value and becomes `command` (returns only on failure).
fn nice(value: &str, command: &[String]) -> Result<String, String> {
    let value: i32 = value.parse().map_err(|_| format!("nice value {value:?} is not a number"))?;
    // SAFETY: setpriority has no memory preconditions; 0 names this process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) } != 0 {
        return Err(errno("setpriority"));
    }
    let err = Command::new(&command[0]).args(&command[1..]).exec();
    Err(format!("cannot run {}: {err}", command[0]))
}

/// `more MODE...` or `enough WHY`, from the results so far (see `decide.rs`).
fn decide(args: &[String]) -> Result<String, String> {
    let text = std::fs::read_to_string(&args[0]).map_err(|e| format!("reading {}: {e}", args[0]))?;
    let num = |i: usize| args[i].parse::<f64>().map_err(|_| format!("decide: {:?} is not a number", args[i]));
    let progress = decide::Progress {
        reps_done: num(1)? as u32,
        max_reps: num(2)? as u32,
        extra_secs: num(3)?,
        budget_secs: num(4)?,
        last_rep_secs: num(5)?,
        last_rep_modes: num(6)? as usize,
    };
    let loops = stats::all_loops(&stats::samples(&text));
    let decision = match decide::decide(&loops, progress) {
        decide::Decision::More(modes) => format!("more {}", modes.join(" ")),
        decide::Decision::Enough(why) => format!("enough {why}"),
    };
    // The decision first (the script reads that line), then the figures behind it.
    Ok(format!("{decision}\n{}", decide::state(&loops)))
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// One operation of a hot-path loop, repeated.
trait Op {
    fn op(&mut self) -> Result<(), String>;
}

/// A one-byte write and read back on one pipe: `pipe_write` and `pipe_read` each take
/// `pipe->mutex`.
struct Pipe {
    fds: [i32; 2],
    byte: [u8; 1],
}

impl Pipe {
    fn new() -> Result<Pipe, String> {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(errno("pipe"));
        }
        Ok(Pipe { fds, byte: [0] })
    }
}

impl Op for Pipe {
    fn op(&mut self) -> Result<(), String> {
        // SAFETY: one byte from/to a valid one-byte buffer on descriptors we own.
        let w = unsafe { libc::write(self.fds[1], self.byte.as_ptr().cast(), 1) };
        let r = unsafe { libc::read(self.fds[0], self.byte.as_mut_ptr().cast(), 1) };
        if w == 1 && r == 1 { Ok(()) } else { Err(errno("pipe write/read")) }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: closing descriptors we own.
        unsafe {
            libc::close(self.fds[0]);
            libc::close(self.fds[1]);
        }
    }
}

/// `select` on 1024 descriptors with empty sets and no wait: its bitmaps do not fit the
/// stack buffer, so each call is one `kvmalloc` and one `kfree`.
struct Select;

const NFDS: i32 = 1024;

impl Select {
    fn new() -> Result<Select, String> {
        // The descriptor table must reach NFDS, or select clamps the count to its size.
        // SAFETY: duplicating stdin onto a free descriptor number of this process.
        if unsafe { libc::dup2(0, NFDS - 1) } < 0 {
            return Err(errno("dup2 to descriptor 1023"));
        }
        Ok(Select)
    }
}

impl Op for Select {
    fn op(&mut self) -> Result<(), String> {
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let null = std::ptr::null_mut();
        // SAFETY: no descriptor sets, a valid zero timeout.
        if unsafe { libc::select(NFDS, null, null, null, &mut tv) } < 0 {
            return Err(errno("select"));
        }
        Ok(())
    }
}

/// The control: `getppid`, a system call that takes no mutex and frees nothing, so no hook
/// of any mode runs in it; only how fast the vCPU runs at that moment shows in its time.
struct Control;

impl Op for Control {
    fn op(&mut self) -> Result<(), String> {
        // SAFETY: no arguments, no memory.
        unsafe { libc::getppid() };
        Ok(())
    }
}

/// Operations per timed block.
const BATCH: u64 = 16;

/// Runs `op` for `ms` milliseconds in blocks of BATCH, each followed by a block of the
/// control of about the same duration. Under TCG the guest's clock runs while its vCPU
/// waits for a host CPU, so the loop's time alone follows whatever else the host runs; the
/// control, timed in the same milliseconds, slows down with it, and the loop's time over
/// the control's is what a hook adds. Prints both times per operation and that ratio.
fn timed(name: &str, ms: u64, op: &mut impl Op) -> Result<String, String> {
    let limit = Duration::from_millis(ms);
    let start = Instant::now();
    let (mut ops, mut ns) = (0u64, 0u128);
    let (mut control_ops, mut control_ns) = (0u64, 0u128);
    let mut control_batch = BATCH;
    while start.elapsed() < limit {
        let t0 = Instant::now();
        for _ in 0..BATCH {
            op.op()?;
        }
        let t1 = Instant::now();
        for _ in 0..control_batch {
            Control.op()?;
        }
        let t2 = Instant::now();
        let (block, control) = ((t1 - t0).as_nanos(), (t2 - t1).as_nanos());
        (ops, ns, control_ops, control_ns) =
            (ops + BATCH, ns + block, control_ops + control_batch, control_ns + control);
        // Size the next control block to last about as long as the loop's block.
        control_batch = ((control_batch as u128 * block / control.max(1)) as u64).clamp(16, 1 << 20);
    }
    let per = ns as f64 / ops as f64;
    let control_per = control_ns as f64 / control_ops as f64;
    Ok(format!(
        "{name} ops={ops} ns={ns} ns_per_op={per:.1} control_ops={control_ops} control_ns_per_op={control_per:.2} rel={:.5}",
        per / control_per
    ))
}

fn pipe(ms: u64) -> Result<String, String> {
    timed("pipe", ms, &mut Pipe::new()?)
}

fn control(ms: u64) -> Result<String, String> {
    let limit = Duration::from_millis(ms);
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < limit {
        for _ in 0..BATCH {
            Control.op()?;
        }
        ops += BATCH;
    }
    let ns = start.elapsed().as_nanos();
    Ok(format!("control ops={ops} ns={ns} ns_per_op={:.2}", ns as f64 / ops as f64))
}

fn select(ms: u64) -> Result<String, String> {
    timed("select", ms, &mut Select::new()?)
}

/// Iterations per write to the module: small enough to pace finely and to let the port
/// lock go between writes, large enough that the write itself costs little.
const CHUNK: u64 = 64;

fn load(ms: u64, threads: u64, rate: u64) -> Result<String, String> {
    let threads = threads.max(1);
    let limit = Duration::from_millis(ms);
    let per_thread_rate = rate as f64 / threads as f64;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(RUN_FILE)
                    .map_err(|e| format!("{RUN_FILE}: {e} (is cxl_dport_bench loaded?)"))?;
                let chunk = CHUNK.to_string();
                let mut done = 0;
                while start.elapsed() < limit {
                    file.write_all(chunk.as_bytes()).map_err(|e| format!("writing {chunk} to {RUN_FILE}: {e}"))?;
                    done += CHUNK;
                    if per_thread_rate > 0.0 {
                        let due = Duration::from_secs_f64(done as f64 / per_thread_rate);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                Ok(done)
            })
        })
        .collect();
    let mut done = 0;
    for w in workers {
        done += w.join().map_err(|_| "a load thread panicked".to_owned())??;
    }
    let elapsed = start.elapsed();
    Ok(format!(
        "load iterations={done} threads={threads} target_rate={rate} ns={} rate={:.0}",
        elapsed.as_nanos(),
        done as f64 / elapsed.as_secs_f64()
    ))
}
