//! Reads kernel text through /proc/kcore (an ELF core image of the running kernel, root
//! only), to find call sites in the code the kernel actually runs.
use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum KcoreError {
    #[error("cannot open {path}: {source} (needs root and CONFIG_PROC_KCORE)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an ELF64 little-endian core image")]
    NotElf { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("kernel address {addr:#x} (+{len}) is not mapped in {path}")]
    Unmapped { path: PathBuf, addr: u64, len: usize },
}

struct Segment {
    vaddr: u64,
    offset: u64,
    size: u64,
}

pub struct Kcore {
    path: PathBuf,
    file: File,
    segments: Vec<Segment>,
}

const PT_LOAD: u32 = 1;

impl Kcore {
    pub fn open() -> Result<Kcore, KcoreError> {
        Kcore::open_path(Path::new("/proc/kcore"))
    }

    pub fn open_path(path: &Path) -> Result<Kcore, KcoreError> {
        let file = File::open(path).map_err(|source| KcoreError::Open { path: path.to_owned(), source })?;
        let read_err = |source| KcoreError::Read { path: path.to_owned(), source };
        let mut ehdr = [0u8; 64];
        file.read_exact_at(&mut ehdr, 0).map_err(read_err)?;
        // ELFCLASS64, ELFDATA2LSB.
        if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
            return Err(KcoreError::NotElf { path: path.to_owned() });
        }
        let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
        let phentsize = u64::from(u16::from_le_bytes([ehdr[54], ehdr[55]]));
        let phnum = u64::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
        if phentsize < 56 {
            return Err(KcoreError::NotElf { path: path.to_owned() });
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let mut ph = [0u8; 56];
            file.read_exact_at(&mut ph, phoff + i * phentsize).map_err(read_err)?;
            let word = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().expect("8 bytes"));
            if u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes")) == PT_LOAD {
                segments.push(Segment { offset: word(8), vaddr: word(16), size: word(32) });
            }
        }
        Ok(Kcore { path: path.to_owned(), file, segments })
    }

    /// `len` bytes of kernel memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, KcoreError> {
        let unmapped = || KcoreError::Unmapped { path: self.path.clone(), addr, len };
        let seg = self.segments.iter().find(|s| addr >= s.vaddr && addr - s.vaddr < s.size).ok_or_else(unmapped)?;
        if addr - seg.vaddr + len as u64 > seg.size {
            return Err(unmapped());
        }
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, seg.offset + (addr - seg.vaddr))
            .map_err(|source| KcoreError::Read { path: self.path.clone(), source })?;
        Ok(buf)
    }
}
