//! The kernel side's diagnostics (`-v`): aya-log records from the eBPF programs' log ring
//! buffer, printed on stderr as they arrive. Only failures are logged (tracer-ebpf's
//! `diag.rs`); each is also counted in the summary, with or without `-v`.
use std::io;

use anyhow::Context as _;
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracer_common::EventKind;

/// Prints aya-log records as `tracer: kernel: LEVEL: message`.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let message = with_kind_names(&record.args().to_string());
        eprintln!("tracer: kernel: {}: {message}", record.level().as_str().to_ascii_lowercase());
    }

    fn flush(&self) {}
}

/// `kind 5` becomes `kind 5 (lock)`: the kernel side sends an event kind as its number
/// (a name would be a string to copy per record), the reader wants the name.
fn with_kind_names(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 16);
    let mut rest = message;
    while let Some(at) = rest.find("kind ") {
        let (before, after) = rest.split_at(at + "kind ".len());
        out.push_str(before);
        let digits = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
        out.push_str(&after[..digits]);
        if let Some(kind) = after[..digits].parse().ok().and_then(EventKind::from_u32) {
            out.push_str(&format!(" ({})", kind.name()));
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

pub struct KernelLog(AsyncFd<EbpfLogger<Stderr>>);

impl KernelLog {
    /// Takes the log ring buffer out of `ebpf`, whose programs were loaded with logging on.
    pub fn open(ebpf: &mut Ebpf) -> anyhow::Result<KernelLog> {
        let logger = EbpfLogger::init_with_logger(ebpf, Stderr).context("opening the kernel side's log")?;
        // SAFETY: the logger owns the ring buffer's map fd, which stays open and unchanged
        // until the AsyncFd (and the logger inside it) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        Ok(KernelLog(fd.context("polling the kernel log")?))
    }

    /// Waits for records and prints them.
    pub async fn print_next(&mut self) -> io::Result<()> {
        let mut guard = self.0.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }

    /// Prints what is there now.
    pub fn drain(&mut self) {
        self.0.get_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_named() {
        assert_eq!(
            with_kind_names("ring buffer full: event of kind 5 lost"),
            "ring buffer full: event of kind 5 (lock) lost"
        );
        assert_eq!(with_kind_names("kind 99 and kind 9"), "kind 99 and kind 9 (deref)");
        assert_eq!(
            with_kind_names("map LOCKS full: mutex ffff8880 not tracked"),
            "map LOCKS full: mutex ffff8880 not tracked"
        );
    }
}
