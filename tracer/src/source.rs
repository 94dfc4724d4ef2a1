//! Event sources for replay: a binary trace file or JSON-lines events, told apart by
//! content. (The live ring buffer is in `live`.)
use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use crate::{
    coverage::Coverage,
    event::Event,
    format::{
        jsonl::{JsonlError, JsonlReader},
        tracefile::{self, TraceError, TraceHeader, TraceReader, Truncation},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: neither a tracer trace file (magic \"CXLTRACE\") nor JSON-lines events (first byte {first:#04x})")]
    UnknownFormat { path: PathBuf, first: u8 },
    #[error("{path}: {source}")]
    Trace { path: PathBuf, source: TraceError },
    #[error("{path}: {source}")]
    Jsonl { path: PathBuf, source: JsonlError },
}

enum Reader {
    Trace(TraceReader<BufReader<File>>),
    Jsonl(JsonlReader<BufReader<File>>),
}

/// Events from a file, whichever format it is in.
pub struct FileSource {
    path: PathBuf,
    reader: Reader,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource, SourceError> {
        let open_err = |source| SourceError::Open { path: path.to_owned(), source };
        let mut input = BufReader::with_capacity(1 << 16, File::open(path).map_err(open_err)?);
        let prefix = input.fill_buf().map_err(open_err)?;
        let first = prefix.iter().copied().find(|b| !b.is_ascii_whitespace());
        let reader = if tracefile::is_trace(prefix) {
            let reader =
                TraceReader::new(input).map_err(|source| SourceError::Trace { path: path.to_owned(), source })?;
            Reader::Trace(reader)
        } else if first == Some(b'{') || first.is_none() {
            Reader::Jsonl(JsonlReader::new(input))
        } else {
            return Err(SourceError::UnknownFormat { path: path.to_owned(), first: first.unwrap_or(0) });
        };
        Ok(FileSource { path: path.to_owned(), reader })
    }

    /// The trace header, for a binary trace.
    pub fn header(&self) -> Option<&TraceHeader> {
        match &self.reader {
            Reader::Trace(r) => Some(r.header()),
            Reader::Jsonl(_) => None,
        }
    }

    /// Kernel counters recorded in a binary trace.
    pub fn kernel_counters(&self) -> Vec<(String, u64)> {
        match &self.reader {
            Reader::Trace(r) => r.counters().to_vec(),
            Reader::Jsonl(_) => Vec::new(),
        }
    }

    /// The site coverage a binary trace recorded at its end.
    pub fn coverage(&self) -> Option<Coverage> {
        match &self.reader {
            Reader::Trace(r) => r.coverage().cloned(),
            Reader::Jsonl(_) => None,
        }
    }

    /// Set when a binary trace ends inside a record.
    pub fn truncation(&self) -> Option<Truncation> {
        match &self.reader {
            Reader::Trace(r) => r.truncation(),
            Reader::Jsonl(_) => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for FileSource {
    type Item = Result<Event, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = &self.path;
        match &mut self.reader {
            Reader::Trace(r) => r.next().map(|e| e.map_err(|source| SourceError::Trace { path: path.clone(), source })),
            Reader::Jsonl(r) => r.next().map(|e| e.map_err(|source| SourceError::Jsonl { path: path.clone(), source })),
        }
    }
}
