//! Writes the trace file on its own thread, so a slow disk (or a 9p share in a guest) never
//! stalls the ring-buffer drain: while the writer waits, events queue in memory instead of
//! overflowing the kernel's ring buffer.
use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Sender, channel},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use tracer::{
    coverage::Coverage,
    event::Event,
    format::tracefile::{TraceHeader, TraceWriter},
};

enum Message {
    Event(Event),
    /// Kernel counters so far; also ends the current chunk (a flush).
    Counters(Vec<(String, u64)>),
    /// Which sites ran, at the end of the run.
    Coverage(Coverage),
}

pub struct Recorder {
    path: PathBuf,
    tx: Option<Sender<Message>>,
    thread: Option<JoinHandle<std::io::Result<u64>>>,
    failed: Arc<AtomicBool>,
}

impl Recorder {
    /// Creates the file and writes its header before returning, so a path that cannot be
    /// written fails the command at once.
    pub fn create(path: &Path, header: &TraceHeader) -> anyhow::Result<Recorder> {
        let file = File::create(path).with_context(|| format!("creating the trace file {}", path.display()))?;
        let mut writer = TraceWriter::new(BufWriter::with_capacity(1 << 16, file), header)
            .with_context(|| format!("writing the trace header to {}", path.display()))?;
        let (tx, rx) = channel();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new().name("trace-writer".into()).spawn(move || {
            let mut written = 0u64;
            let result = rx.iter().try_for_each(|message| match message {
                Message::Event(event) => {
                    written += 1;
                    writer.write_event(&event)
                }
                Message::Counters(counters) => {
                    let refs: Vec<(&str, u64)> = counters.iter().map(|(n, v)| (n.as_str(), *v)).collect();
                    writer.write_counters(&refs)
                }
                Message::Coverage(coverage) => writer.write_coverage(&coverage),
            });
            let result = result.and_then(|()| writer.into_inner()?.flush());
            if result.is_err() {
                flag.store(true, Ordering::Relaxed);
            }
            result.map(|()| written)
        })?;
        Ok(Recorder { path: path.to_owned(), tx: Some(tx), thread: Some(thread), failed })
    }

    pub fn event(&self, event: &Event) {
        if let Some(tx) = &self.tx {
            // A send fails only when the writer stopped on an error, reported by `finish`.
            let _ = tx.send(Message::Event(event.clone()));
        }
    }

    /// Records the kernel counters so far and ends the chunk (the file is then readable up
    /// to here even if the tracer is killed).
    pub fn counters(&self, counters: Vec<(String, u64)>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Message::Counters(counters));
        }
    }

    /// Whether writing failed (the disk is full, ...): the tracer stops and reports it.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes what is queued, then the site coverage and the final counters, and closes the
    /// file.
    pub fn finish(mut self, counters: Vec<(String, u64)>, coverage: Coverage) -> anyhow::Result<u64> {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Message::Coverage(coverage));
        }
        self.counters(counters);
        self.tx = None;
        let thread = self.thread.take().expect("joined once");
        let written = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the trace writer thread panicked"))?
            .with_context(|| format!("writing the trace file {}", self.path.display()))?;
        Ok(written)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
