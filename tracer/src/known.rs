//! Known findings: a file of finding titles, each with the reason it is known, so that a gate
//! fails only on new ones (`--known FILE`). Known findings are still reported, apart.
//!
//! The file is text, one title per line and its reason after `#`, as `tracer known` writes
//! it; a line starting with `#` is a comment:
//!
//! ```text
//! # Debian 7.2.13: the CXL core is built in, a module cannot fix these
//! unlocked-use in cxl_add_ep  # devm_cxl_enumerate_ports() passes a lockless dport (core)
//! ```
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use crate::engine::{Class, Group};

/// One entry: a title and why it is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    pub reason: String,
    /// Its line in the file, from 1.
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KnownError {
    #[error("cannot read the known-findings file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {title:?} has no reason: write why it is known after a `#` (`TITLE  # REASON`)")]
    NoReason { path: PathBuf, line: usize, title: String },
    #[error(
        "{path}:{line}: {title:?} is not a finding title: a title is CLASS in FUNCTION (CLASS one of {}), as `tracer known` writes them",
        Class::ALL.map(Class::name).join(", ")
    )]
    NotATitle { path: PathBuf, line: usize, title: String },
    #[error("{path}:{line}: {title:?} is listed twice (first at line {first})")]
    Duplicate { path: PathBuf, line: usize, first: usize, title: String },
}

/// The known findings of one file (empty: nothing is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl Known {
    /// Reads and checks a known-findings file.
    pub fn load(path: &Path) -> Result<Known, KnownError> {
        let text = std::fs::read_to_string(path).map_err(|source| KnownError::Io { path: path.to_owned(), source })?;
        Known::parse(&text, path)
    }

    /// Parses the text of a known-findings file read from `path` (for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Known, KnownError> {
        let path = path.to_owned();
        let mut entries: Vec<Entry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (title, reason) = match trimmed.split_once('#') {
                Some((title, reason)) => (title.trim(), reason.trim()),
                None => (trimmed, ""),
            };
            if !is_title(title) {
                return Err(KnownError::NotATitle { path, line, title: title.to_owned() });
            }
            if reason.is_empty() {
                return Err(KnownError::NoReason { path, line, title: title.to_owned() });
            }
            if let Some(first) = entries.iter().find(|e| e.title == title) {
                return Err(KnownError::Duplicate { path, line, first: first.line, title: title.to_owned() });
            }
            entries.push(Entry { title: title.to_owned(), reason: reason.to_owned(), line });
        }
        Ok(Known { path, entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries whose reason is still the one `tracer known` wrote to be replaced.
    pub fn placeholders(&self) -> Vec<&Entry> {
        self.entries.iter().filter(|e| e.reason.ends_with(PLACEHOLDER)).collect()
    }

    /// Why `group` is known, if it is.
    pub fn reason(&self, group: &Group) -> Option<&str> {
        let title = group.finding.title();
        self.entries.iter().find(|e| e.title == title).map(|e| e.reason.as_str())
    }

    /// The entries no group matched: stale, or a workload that no longer reaches them.
    pub fn unseen<'a>(&'a self, groups: impl IntoIterator<Item = &'a Group>) -> Vec<&'a Entry> {
        let seen: Vec<String> = groups.into_iter().map(|g| g.finding.title()).collect();
        self.entries.iter().filter(|e| !seen.contains(&e.title)).collect()
    }
}

/// Whether `title` has the shape `Finding::title` gives: `CLASS in FUNCTION[ (...)]`.
fn is_title(title: &str) -> bool {
    let Some((class, rest)) = title.split_once(" in ") else { return false };
    class.parse::<Class>().is_ok() && !rest.trim().is_empty()
}

/// How the reasons of a starting file end: what the user must replace.
const PLACEHOLDER: &str = ": say why it is known";

/// A starting known-findings file for these (title, occurrences): each title once, with
/// how often it was seen and a reason to replace (`source` names where they come from).
pub fn starting_file(titles: impl IntoIterator<Item = (String, u64)>, source: &str) -> String {
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for (title, count) in titles {
        *counted.entry(title).or_default() += count;
    }
    let mut out = format!(
        "# Known findings, from {source}. One title per line, then `#` and why it is known:\n\
         # replace each reason below with the real one (the source line that makes it safe, or\n\
         # the fix it waits for). `tracer run/analyze --known FILE` fail only on findings not listed.\n"
    );
    for (title, count) in counted {
        let _ = writeln!(out, "{title}  # seen {count} time(s) in {source}{PLACEHOLDER}");
    }
    out
}

/// The title of a finding line of a JSON report (`--format json`): its `title`, or, from a
/// report of a tracer before titles, made from its class, site and access as
/// `Finding::title` makes it.
pub fn title_of_report_line(line: &serde_json::Value) -> Option<String> {
    if let Some(title) = line.get("title").and_then(|t| t.as_str()) {
        return Some(title.to_owned());
    }
    let class = line.get("class")?.as_str()?;
    let site = line.get("site")?.as_str()?;
    Some(match line.get("access") {
        Some(access) => {
            let verb = if access.get("write")?.as_bool()? { "write" } else { "read" };
            format!("{class} in {site} ({verb} of dport->{})", access.get("member")?.as_str()?)
        }
        None => format!("{class} in {site}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Known, KnownError> {
        Known::parse(text, Path::new("7.2.known"))
    }

    #[test]
    fn titles_and_reasons_are_read_with_comments_and_blank_lines() {
        let known = parse(
            "# the core's findings\n\nunlocked-use in cxl_add_ep  # core: a module cannot fix it\n\
             unlocked-use in cxl_mem_probe (read of dport->rch)# the seed's read\n",
        )
        .unwrap();
        assert_eq!(
            known.entries,
            [
                Entry {
                    title: "unlocked-use in cxl_add_ep".into(),
                    reason: "core: a module cannot fix it".into(),
                    line: 3
                },
                Entry {
                    title: "unlocked-use in cxl_mem_probe (read of dport->rch)".into(),
                    reason: "the seed's read".into(),
                    line: 4
                },
            ]
        );
    }

    #[test]
    fn bad_lines_are_errors_with_their_line_number() {
        let err = parse("# x\nunlocked-use in cxl_add_ep\n").unwrap_err().to_string();
        assert!(err.starts_with("7.2.known:2: ") && err.contains("has no reason"), "{err}");
        let err = parse("unlocked-use in cxl_add_ep #   \n").unwrap_err().to_string();
        assert!(err.contains(":1: ") && err.contains("no reason"), "{err}");
        let err = parse("  # fine\n #\n   # reason only\nunlocked use in x # y\n").unwrap_err().to_string();
        assert!(err.contains(":4: ") && err.contains("not a finding title"), "{err}");
        let err = parse("cxl_add_ep # why\n").unwrap_err().to_string();
        assert!(err.contains("not a finding title") && err.contains("unlocked-use, stale-use"), "{err}");
        let err = parse("stale-use in f # a\nstale-use in f # b\n").unwrap_err().to_string();
        assert!(err.contains(":2: ") && err.contains("first at line 1"), "{err}");
        let err = Known::load(Path::new("/nonexistent/known")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/known"), "{err}");
    }
}

#[cfg(test)]
mod starting {
    use super::*;

    #[test]
    fn a_starting_file_parses_back_with_every_title_once() {
        let titles = [
            ("unlocked-use in cxl_add_ep".to_owned(), 18),
            ("unlocked-erase in cxl_dport_remove".to_owned(), 3),
            ("unlocked-use in cxl_add_ep".to_owned(), 2),
        ];
        let text = starting_file(titles, "findings.jsonl");
        let known = Known::parse(&text, Path::new("k")).unwrap();
        let got: Vec<(&str, &str)> = known.entries.iter().map(|e| (e.title.as_str(), e.reason.as_str())).collect();
        assert_eq!(
            got,
            [
                ("unlocked-erase in cxl_dport_remove", "seen 3 time(s) in findings.jsonl: say why it is known"),
                ("unlocked-use in cxl_add_ep", "seen 20 time(s) in findings.jsonl: say why it is known"),
            ]
        );
    }

    #[test]
    fn report_lines_give_their_title_or_one_made_like_it() {
        let line = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let titled = line(r#"{"title":"stale-use in devm_cxl_add_endpoint","class":"stale-use"}"#);
        assert_eq!(title_of_report_line(&titled).unwrap(), "stale-use in devm_cxl_add_endpoint");
        let old = line(
            r#"{"class":"unlocked-use","site":"cxl_mem_probe","access":{"member":"rch","offset":144,"size":1,"write":false}}"#,
        );
        assert_eq!(title_of_report_line(&old).unwrap(), "unlocked-use in cxl_mem_probe (read of dport->rch)");
        assert_eq!(title_of_report_line(&line(r#"{"summary":{}}"#)), None);
    }
}
