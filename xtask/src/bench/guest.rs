//! `bench-guest`: the load programs `cargo xtask bench` runs in the QEMU guest (and, for
//! the calibration, on the host). Built static for musl so it runs in the bare initramfs.
//!
//! - `pipe MS`: a one-byte write and read back on one pipe, for MS milliseconds. Both
//!   `pipe_write` and `pipe_read` take `pipe->mutex`, a mutex no tracer tracks; no
//!   allocation happens in the loop (the pipe keeps its page).
//! - `select MS`: `select` on 1024 descriptors with empty sets and no wait, for MS
//!   milliseconds. Its descriptor bitmaps do not fit the stack buffer, so every call is one
//!   `kvmalloc` (a `kmalloc` at that size) and one `kfree`, on any kernel.
//! - `load MS THREADS RATE`: drives the `cxl_dport_bench` module (tracked dport events)
//!   for MS milliseconds from THREADS threads, writing chunks of iterations to its debugfs
//!   `run` file, paced to RATE iterations per second in all (0: as fast as it goes).
//! - `nice N CMD ARGS`: runs CMD at nice value N (the guest's busybox has no `nice`).
//!
//! The loads print one line of `key=value` figures for the host to parse.
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
        (Some("load"), Some(ms)) => load(ms, num(2).unwrap_or(1), num(3).unwrap_or(0)),
        (Some("nice"), _) if args.len() >= 3 => nice(&args[1], &args[2..]),
        _ => Err("usage: bench-guest pipe MS | select MS | load MS [THREADS [RATE]] | nice N CMD [ARGS]".to_owned()),
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

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Runs `op` in batches until `ms` milliseconds passed; returns (operations, elapsed).
fn timed(ms: u64, mut op: impl FnMut() -> Result<(), String>) -> Result<(u64, Duration), String> {
    const BATCH: u64 = 256;
    let limit = Duration::from_millis(ms);
    let start = Instant::now();
    let mut ops = 0;
    loop {
        for _ in 0..BATCH {
            op()?;
        }
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= limit {
            return Ok((ops, elapsed));
        }
    }
}

fn per_op(name: &str, ops: u64, elapsed: Duration) -> String {
    format!(
        "{name} ops={ops} ns={} ns_per_op={:.1}",
        elapsed.as_nanos(),
        elapsed.as_nanos() as f64 / ops as f64
    )
}

fn pipe(ms: u64) -> Result<String, String> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe() writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(errno("pipe"));
    }
    let mut byte = [0u8; 1];
    let (ops, elapsed) = timed(ms, || {
        // SAFETY: one byte from/to a valid one-byte buffer on descriptors we own.
        let w = unsafe { libc::write(fds[1], byte.as_ptr().cast(), 1) };
        let r = unsafe { libc::read(fds[0], byte.as_mut_ptr().cast(), 1) };
        if w == 1 && r == 1 { Ok(()) } else { Err(errno("pipe write/read")) }
    })?;
    // SAFETY: closing descriptors we own.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    Ok(per_op("pipe", ops, elapsed))
}

fn select(ms: u64) -> Result<String, String> {
    const NFDS: i32 = 1024;
    // The descriptor table must reach NFDS, or select clamps the count to its size.
    // SAFETY: duplicating stdin onto a free descriptor number of this process.
    if unsafe { libc::dup2(0, NFDS - 1) } < 0 {
        return Err(errno("dup2 to descriptor 1023"));
    }
    let (ops, elapsed) = timed(ms, || {
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let null = std::ptr::null_mut();
        // SAFETY: no descriptor sets, a valid zero timeout.
        if unsafe { libc::select(NFDS, null, null, null, &mut tv) } < 0 {
            return Err(errno("select"));
        }
        Ok(())
    })?;
    Ok(per_op("select", ops, elapsed))
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
                    file.write_all(chunk.as_bytes())
                        .map_err(|e| format!("writing {chunk} to {RUN_FILE}: {e}"))?;
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
