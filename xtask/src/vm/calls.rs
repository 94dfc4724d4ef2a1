//! `--count-calls`: what the guest's kretprobes saw, read back on the host.
//!
//! The guest saves the tracefs trace buffer (`calls.txt`: one line per return, with the
//! task, the caller's return address and the value) and, in `calls-profile.txt`, each
//! event's hit and miss counts from `kprobe_profile` and each CPU's buffer overruns. A count
//! is only exact when nothing was missed or overwritten: `Calls::read` checks that, so a
//! caller can compare the counts with the tracer's findings as ground truth.
use std::{fs, path::Path};

use anyhow::{Context as _, bail, ensure};

/// One return of a counted function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Return {
    pub comm: String,
    pub pid: u32,
    /// The counted function.
    pub function: String,
    /// The function the call returned to (the caller), without offset or module.
    pub caller: String,
    /// The return value as the kernel's unsigned long: 0 is success, errors are -errno.
    pub value: u64,
}

impl Return {
    pub fn succeeded(&self) -> bool {
        self.value == 0
    }
}

pub struct Calls {
    pub returns: Vec<Return>,
}

impl Calls {
    /// Reads `calls.txt` and `calls-profile.txt` from a run's results, checking that every
    /// counted function's hits were all recorded: no kretprobe miss, no buffer overrun.
    pub fn read(out: &Path, functions: &[&str]) -> anyhow::Result<Calls> {
        let path = out.join("calls.txt");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {} (the guest saves it when --count-calls is given)", path.display()))?;
        let returns = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_return(l).with_context(|| format!("{}: bad line {l:?}", path.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let profile_path = out.join("calls-profile.txt");
        let profile =
            fs::read_to_string(&profile_path).with_context(|| format!("reading {}", profile_path.display()))?;
        for function in functions {
            let (hits, missed) = profile
                .lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next()? == "profile" && w.next()? == *function)
                        .then(|| Some((w.next()?.parse::<u64>().ok()?, w.next()?.parse::<u64>().ok()?)))
                        .flatten()
                })
                .with_context(|| format!("{} has no kprobe_profile line for {function}", profile_path.display()))?;
            let recorded = returns.iter().filter(|r| r.function == *function).count() as u64;
            ensure!(missed == 0, "the kretprobe on {function} missed {missed} return(s): its count is not exact");
            ensure!(
                hits == recorded,
                "{function} was entered {hits} times but {recorded} returns were recorded \
                 (a call still running when counting stopped, or a lost trace line)"
            );
        }
        for l in profile.lines().filter(|l| l.contains("overrun:")) {
            let lost: u64 = l
                .rsplit(':')
                .next()
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("{}: bad line {l:?}", profile_path.display()))?;
            ensure!(lost == 0, "the guest's trace buffer overran ({l}): call counts are not exact");
        }
        Ok(Calls { returns })
    }

    /// For each return of `outer`, the last return of `inner` in the same task since that
    /// task's previous return of `outer` (none when `outer` called no `inner`): the inner
    /// call `outer` made last. Found by task and order alone, never by the symbolized
    /// caller, which 6.1 can misname for a module (`_note_9`).
    pub fn last_inner<'a>(&'a self, outer: &str, inner: &str) -> Vec<Option<&'a Return>> {
        let mut last: std::collections::HashMap<u32, &'a Return> = std::collections::HashMap::new();
        let mut found = Vec::new();
        for r in &self.returns {
            if r.function == inner {
                last.insert(r.pid, r);
            } else if r.function == outer {
                found.push(last.remove(&r.pid));
            }
        }
        found
    }

    /// Returns of `function` to `caller` (any caller when `None`).
    pub fn of<'a>(&'a self, function: &'a str, caller: Option<&'a str>) -> impl Iterator<Item = &'a Return> + 'a {
        self.returns.iter().filter(move |r| r.function == function && caller.is_none_or(|c| r.caller == c))
    }
}

/// Parses one tracefs line of a kretprobe event:
/// `  run-workloads-190  [001] d..2.   18.281: cxl_mem_probe: (cxl_bus_probe+0x1b/0x50 <- cxl_mem_probe) ret=0x0`.
fn parse_return(line: &str) -> anyhow::Result<Return> {
    let (head, body) = line.split_once(": (").context("no \": (\" before the return address")?;
    let task = head.find(" [").map(|at| head[..at].trim()).context("no [cpu] field")?;
    let (comm, pid) = task.rsplit_once('-').context("no COMM-PID")?;
    let pid = pid.parse().context("bad pid")?;
    let (caller, rest) = body.split_once(" <- ").context("no \" <- \"")?;
    let caller = caller.split(['+', ' ']).next().filter(|c| !c.is_empty()).context("no caller symbol")?;
    // The function is the event's own name (the probe was defined on it): the kernel's
    // `<- FUNCTION` symbolization is not always right (6.1 printed `_note_9` for a module's
    // function until the module was first reloaded).
    let function = head.rsplit(' ').next().unwrap_or_default();
    let (_, rest) = rest.split_once(')').context("no \")\" after the function")?;
    let value = rest.trim().strip_prefix("ret=").context("no ret=")?;
    let value = u64::from_str_radix(value.trim_start_matches("0x"), 16).context("bad ret value")?;
    if function.is_empty() {
        bail!("no function name");
    }
    Ok(Return { comm: comm.to_owned(), pid, function: function.to_owned(), caller: caller.to_owned(), value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kretprobe_lines() {
        let r = parse_return(
            " kworker/u8:0-11      [000] d..2.    20.527: devm_cxl_add_port: (cxl_mem_probe+0x27e/0x370 [cxl_mem] <- devm_cxl_add_port) ret=0xff35e2888756d000",
        )
        .unwrap();
        assert_eq!(r.comm, "kworker/u8:0");
        assert_eq!(r.pid, 11);
        assert_eq!(r.caller, "cxl_mem_probe");
        assert_eq!(r.function, "devm_cxl_add_port");
        assert_eq!(r.value, 0xff35e2888756d000);
        let r = parse_return(
            "   run-workloads-190     [001] d..2.    18.281292: cxl_mem_probe: (cxl_bus_probe+0x1b/0x50 <- cxl_mem_probe) ret=0x0",
        )
        .unwrap();
        assert!(r.succeeded());
        assert_eq!(r.caller, "cxl_bus_probe");
        // With record-cmd off (count_calls_start) the task name is not saved.
        let r = parse_return(
            "           <...>-190     [001] d..2.    18.281292: cxl_mem_probe: (cxl_bus_probe+0x1b/0x50 <- cxl_mem_probe) ret=0x0",
        )
        .unwrap();
        assert_eq!((r.comm.as_str(), r.pid), ("<...>", 190));
        // 6.1 before the module's first reload: the function is the event's name.
        let r = parse_return(
            "           <...>-139     [000] .....    26.672455: cxl_mem_probe: (cxl_bus_probe+0x17/0x50 <- _note_9) ret=0x0",
        )
        .unwrap();
        assert_eq!((r.function.as_str(), r.caller.as_str()), ("cxl_mem_probe", "cxl_bus_probe"));
        assert!(parse_return("# tracer: nop").is_err());
    }

    #[test]
    fn the_last_inner_call_is_found_by_task_and_order() {
        let line = |pid: u32, f: &str, caller: &str, ret: &str| {
            format!("  sh-{pid}  [000] d..2.  1.0: {f}: ({caller}+0x1/0x2 [m] <- {f}) ret={ret}")
        };
        let text = [
            // Task 7: a switch port, then its endpoint (misnamed caller), then the probe.
            line(7, "add", "enumerate", "0xffff888000001000"),
            line(9, "add", "other", "0xffff888000002000"),
            line(7, "add", "_note_9", "0xffff888000003000"),
            line(7, "probe", "bus", "0x0"),
            // Task 9's probe returns after its own add; task 7 probes again, adding nothing.
            line(9, "probe", "bus", "0x0"),
            line(7, "probe", "bus", "0x0"),
        ]
        .join("\n");
        let calls = Calls { returns: text.lines().map(|l| parse_return(l).unwrap()).collect() };
        let values: Vec<Option<u64>> =
            calls.last_inner("probe", "add").into_iter().map(|r| r.map(|r| r.value)).collect();
        assert_eq!(values, [Some(0xffff888000003000), Some(0xffff888000002000), None]);
    }

    #[test]
    fn counts_must_be_complete() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("calls.txt"), "  sh-1  [000] d..2.  1.0: f: (g+0x1/0x2 <- f) ret=0x0\n").unwrap();
        fs::write(dir.path().join("calls-profile.txt"), "profile f 1 0\ncpu0 overrun: 0\n").unwrap();
        let calls = Calls::read(dir.path(), &["f"]).unwrap();
        assert_eq!(calls.of("f", Some("g")).count(), 1);
        assert_eq!(calls.of("f", Some("h")).count(), 0);
        // A hit without its recorded return, a miss, an overrun: each makes counts inexact.
        for profile in [
            "profile f 2 0\ncpu0 overrun: 0\n",
            "profile f 1 1\ncpu0 overrun: 0\n",
            "profile f 1 0\ncpu0 overrun: 3\n",
            "cpu0 overrun: 0\n",
        ] {
            fs::write(dir.path().join("calls-profile.txt"), profile).unwrap();
            assert!(Calls::read(dir.path(), &["f"]).is_err(), "{profile}");
        }
    }
}
