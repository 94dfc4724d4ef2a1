//! A writer for the `newc` cpio format, the one the kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`, v6.12).
//!
//! Every entry is a 110-byte ASCII header (the magic `070701` and 13 fields of 8 hex digits),
//! the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The kernel
//! creates entries in order and does not create missing parents, so the writer emits each
//! parent directory once before the first entry below it. Several archives may be
//! concatenated into one initrd: later entries replace earlier files of the same name.
use std::{collections::HashSet, io::Write};

use anyhow::{Context as _, bail};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 6 + 13 * 8;
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

pub struct Writer<W: Write> {
    out: W,
    next_inode: u32,
    dirs: HashSet<String>,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self { out, next_inode: 1, dirs: HashSet::new() }
    }

    /// A directory (and its missing parents). `path` is relative to the root: `lib/modules`.
    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, S_IFDIR | 0o755, 2, &[])?;
        }
        Ok(())
    }

    /// A regular file with `mode` permission bits (0o644, 0o755).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// A character device node (`dev/console` is 5:1): init needs it before devtmpfs is up.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> anyhow::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry_with_rdev(&path, S_IFCHR | (mode & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> anyhow::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        self.out.flush().context("flushing the cpio archive")?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> anyhow::Result<()> {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            let parent = &path[..end + slash];
            if self.dirs.insert(parent.to_owned()) {
                self.entry(parent, S_IFDIR | 0o755, 2, &[])?;
            }
            end += slash + 1;
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> anyhow::Result<()> {
        self.entry_full(name, mode, nlink, (0, 0), data)
    }

    fn entry_with_rdev(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> anyhow::Result<()> {
        self.entry_full(name, mode, 1, rdev, data)
    }

    fn entry_full(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> anyhow::Result<()> {
        let size = u32::try_from(data.len())
            .with_context(|| format!("{name} is {} bytes: newc holds at most 4 GiB per file", data.len()))?;
        let name_size = u32::try_from(name.len() + 1).context("cpio entry name too long")?;
        let inode = self.next_inode;
        self.next_inode += 1;
        // inode, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check: all zero where the kernel does not care. A fixed mtime
        // keeps the archive reproducible.
        let fields = [inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            write!(header, "{field:08x}").expect("writing to a Vec cannot fail");
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len().next_multiple_of(4), 0);
        self.out.write_all(&header).with_context(|| format!("writing the cpio header of {name}"))?;
        self.out.write_all(data).with_context(|| format!("writing {name} into the cpio archive"))?;
        let pad = data.len().next_multiple_of(4) - data.len();
        self.out.write_all(&[0; 3][..pad]).context("writing cpio padding")?;
        Ok(())
    }
}

fn normalize(path: &str) -> anyhow::Result<String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("invalid initramfs path {path:?}: expected a relative path without . or .. components");
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(entry: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        u32::from_str_radix(std::str::from_utf8(&entry[start..start + 8]).unwrap(), 16).unwrap()
    }

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut w = Writer::new(Vec::new());
        w.file("a/b/c", 0o644, b"hello").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let mut names = Vec::new();
        let mut at = 0;
        loop {
            let entry = &archive[at..];
            assert_eq!(&entry[..6], MAGIC);
            let size = field(entry, 6) as usize;
            let name_size = field(entry, 11) as usize;
            let name = std::str::from_utf8(&entry[HEADER_LEN..HEADER_LEN + name_size - 1]).unwrap();
            let data_at = (HEADER_LEN + name_size).next_multiple_of(4);
            names.push((name.to_owned(), field(entry, 1), entry[data_at..data_at + size].to_vec()));
            at += (data_at + size).next_multiple_of(4);
            if name == TRAILER {
                break;
            }
        }
        assert_eq!(at, archive.len());
        let summary: Vec<(&str, u32)> = names.iter().map(|(n, m, _)| (n.as_str(), *m)).collect();
        assert_eq!(
            summary,
            [
                ("a", S_IFDIR | 0o755),
                ("a/b", S_IFDIR | 0o755),
                ("a/b/c", S_IFREG | 0o644),
                ("bin", S_IFDIR | 0o755),
                ("bin/sh", S_IFLNK | 0o777),
                (TRAILER, 0),
            ]
        );
        assert_eq!(names[2].2, b"hello");
        assert_eq!(names[4].2, b"busybox");
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
        assert!(w.dir("a//b").is_err());
    }
}
