//! Every dport free still seen: each tracer period of the bench records its events, the
//! hotplug workloads included (each `acpi-unbind` cycle frees every dport and registers new
//! ones, usually at the same addresses), and the host walks each trace's events in order,
//! per dport address.
//!
//! A dport registered at an address whose earlier dport was never seen freed is a missed
//! free (the engine counts the same as `frees_missed`); a tracked dport still alive at the
//! end must be one of the dports the guest's sysfs lists then. With the last workload
//! re-registering every dport, the two counts are equal when no free was missed.
use std::{collections::HashMap, path::Path, process::Command};

use anyhow::Context as _;

use crate::util;

/// What the recorded events say about the dports' lifetimes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeCount {
    /// Dport objects seen (registrations and discoveries; the same object seen twice counts
    /// once).
    pub dports: u64,
    pub frees: u64,
    /// Registrations at the address of a dport that was never seen freed.
    pub missed: u64,
    /// Frees of an address with no live dport (seen twice, or never registered).
    pub stray: u64,
    /// Tracked dports not freed by the end.
    pub live_end: u64,
}

impl FreeCount {
    /// The result line of the trace of the tracer run `tag`.
    pub fn line(&self, tag: &str) -> String {
        format!(
            "freecount tag={tag} dports={} frees={} missed={} stray={} live_end={}\n",
            self.dports, self.frees, self.missed, self.stray, self.live_end
        )
    }
}

/// A dport's identity besides its address: registered again on the same port and xarray
/// while alive, it is the same object seen again (discovery, then registration).
#[derive(PartialEq, Eq)]
struct Owner {
    port: String,
    xa: String,
}

/// Counts over JSON-lines events (`tracer print --format json`), in their order.
pub fn count(events: &str) -> anyhow::Result<FreeCount> {
    let mut live: HashMap<String, Owner> = HashMap::new();
    let mut c = FreeCount::default();
    for (n, line) in events.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("event line {}", n + 1))?;
        let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        match v.get("kind").and_then(serde_json::Value::as_str) {
            Some("dport_add") => {
                let owner = Owner { port: field("port"), xa: field("xa") };
                match live.get(&field("dport")) {
                    Some(old) if *old == owner => continue,
                    Some(_) => c.missed += 1,
                    None => {}
                }
                c.dports += 1;
                live.insert(field("dport"), owner);
            }
            Some("free") => {
                if live.remove(&field("dport")).is_some() {
                    c.frees += 1;
                } else {
                    c.stray += 1;
                }
            }
            _ => {}
        }
    }
    c.live_end = live.len() as u64;
    Ok(c)
}

/// `tracer print --format json TRACE`, counted.
pub fn count_trace(tracer: &Path, trace: &Path) -> anyhow::Result<FreeCount> {
    let events = util::output(Command::new(tracer).args(["print", "--format", "json"]).arg(trace))
        .with_context(|| format!("printing the events of {}", trace.display()))?;
    count(&events).with_context(|| format!("reading the events of {}", trace.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(dport: &str, port: &str) -> String {
        format!(r#"{{"kind":"dport_add","dport":"{dport}","port":"{port}","xa":"{port}8"}}"#)
    }

    fn free(dport: &str) -> String {
        format!(r#"{{"kind":"free","dport":"{dport}"}}"#)
    }

    #[test]
    fn a_freed_and_reused_address_is_two_dports_and_one_free() {
        let events = [add("0xa", "0x1"), free("0xa"), add("0xa", "0x1"), r#"{"kind":"lock","lock":"0x1"}"#.into()];
        let c = count(&events.join("\n")).unwrap();
        assert_eq!(c, FreeCount { dports: 2, frees: 1, missed: 0, stray: 0, live_end: 1 });
    }

    #[test]
    fn discovery_then_registration_is_one_dport() {
        let c = count(&[add("0xa", "0x1"), add("0xa", "0x1"), free("0xa")].join("\n")).unwrap();
        assert_eq!(c, FreeCount { dports: 1, frees: 1, missed: 0, stray: 0, live_end: 0 });
    }

    #[test]
    fn a_registration_over_a_live_dport_is_a_missed_free() {
        // The port is new (acpi-unbind frees ports too): a new object at a live address.
        let c = count(&[add("0xa", "0x1"), add("0xa", "0x2"), free("0xa"), free("0xa")].join("\n")).unwrap();
        assert_eq!(c, FreeCount { dports: 2, frees: 1, missed: 1, stray: 1, live_end: 0 });
    }

    #[test]
    fn bad_json_names_its_line() {
        let err = count("{}\nnot json").unwrap_err();
        assert!(format!("{err:#}").contains("event line 2"), "{err:#}");
    }
}
