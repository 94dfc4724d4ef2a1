//! Running the long steps of a kernel build: every line of their output goes to the build
//! log, and the terminal gets the step, the time it has taken and make's latest line every
//! little while, so a newcomer sees the build move without reading thousands of lines.
use std::{
    collections::VecDeque,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How often a running step prints where it is.
const EVERY: Duration = Duration::from_secs(30);
/// Lines of a failed step's output the error shows (the whole output is in the log).
const TAIL: usize = 25;

/// The build log: one file for all steps of a build, named in every error.
pub struct BuildLog {
    pub path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl BuildLog {
    pub fn create(path: &Path) -> anyhow::Result<BuildLog> {
        let file = File::create(path).with_context(|| format!("creating the build log {}", path.display()))?;
        Ok(BuildLog { path: path.to_owned(), file: Arc::new(Mutex::new(file)) })
    }

    /// A line of the build's own (what step starts, with which command).
    pub fn note(&self, line: &str) {
        let mut file = self.file.lock().expect("log lock");
        let _ = writeln!(file, "{line}");
    }

    /// Runs `cmd` as the build step `step` (`[2/5] the kernel`): output to the log, a
    /// progress line every 30 s, and on failure an error with the error lines and the end of
    /// its output, naming the log.
    pub fn run(&self, step: &str, cmd: &mut Command) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.note(&format!("==> {step}: {cmd:?}"));
        println!("kernel: {step}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let recent: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let readers: Vec<_> = [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let (file, recent, errors) = (self.file.clone(), recent.clone(), errors.clone());
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(file.lock().expect("log lock"), "{line}");
                    if is_error(&line) {
                        let mut errors = errors.lock().expect("errors lock");
                        if errors.len() < TAIL {
                            errors.push(line.clone());
                        }
                    }
                    let mut recent = recent.lock().expect("recent lock");
                    if recent.len() == TAIL {
                        recent.pop_front();
                    }
                    recent.push_back(line);
                }
            })
        })
        .collect();
        let mut next_report = started + EVERY;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for the build")? {
                break status;
            }
            if Instant::now() >= next_report {
                let latest = recent.lock().expect("recent lock").back().cloned().unwrap_or_default();
                println!("kernel: {step}: {} so far: {}", minutes(started.elapsed()), latest.trim());
                next_report += EVERY;
            }
            thread::sleep(Duration::from_millis(250));
        };
        for reader in readers {
            let _ = reader.join();
        }
        let took = started.elapsed();
        self.note(&format!("==> {step}: {status} after {}", minutes(took)));
        if !status.success() {
            let errors = errors.lock().expect("errors lock").join("\n");
            let tail = recent.lock().expect("recent lock").iter().cloned().collect::<Vec<_>>().join("\n");
            let errors = if errors.is_empty() { String::new() } else { format!("errors:\n{errors}\n") };
            bail!(
                "{step} failed ({status}) after {}; the whole output is in {}\n{errors}last lines:\n{tail}",
                minutes(took),
                self.path.display()
            );
        }
        println!("kernel: {step}: done in {}", minutes(took));
        Ok(took)
    }
}

/// Whether a line of make's output reports an error (a compiler's `error:`, make's `***`).
fn is_error(line: &str) -> bool {
    line.contains("error:") || line.contains("Error ") || line.starts_with("make: ***") || line.contains("*** ")
}

/// `13m05s`, or `42s` under a minute.
pub fn minutes(took: Duration) -> String {
    let secs = took.as_secs();
    if secs < 60 { format!("{secs}s") } else { format!("{}m{:02}s", secs / 60, secs % 60) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_logs_everything_and_a_failure_names_the_log_and_the_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = BuildLog::create(&dir.path().join("build.log")).unwrap();
        log.run("[1/2] ok", Command::new("sh").args(["-c", "echo one; echo two >&2"])).unwrap();
        let failing = "echo 'CC drivers/cxl/mem.o'; echo 'mem.c:3:1: error: expected ;' >&2; exit 2";
        let err = log.run("[2/2] broken", Command::new("sh").args(["-c", failing])).unwrap_err().to_string();
        assert!(err.contains("[2/2] broken failed") && err.contains(&log.path.display().to_string()), "{err}");
        assert!(err.contains("errors:\nmem.c:3:1: error: expected ;"), "{err}");
        let text = std::fs::read_to_string(&log.path).unwrap();
        for line in ["==> [1/2] ok", "one", "two", "CC drivers/cxl/mem.o", "==> [2/2] broken"] {
            assert!(text.contains(line), "{line:?} missing from the log:\n{text}");
        }
    }

    #[test]
    fn durations_read_as_minutes_and_seconds() {
        assert_eq!(minutes(Duration::from_secs(42)), "42s");
        assert_eq!(minutes(Duration::from_secs(785)), "13m05s");
    }
}
