//! A text file followed by name, like `tail -F`: when the file at the path is replaced
//! (rotated) or truncated, the rest of the old one is read, then the new one from its start.
//! `vmaudit monitor --audit-log` follows auditd's log with it, `vmaudit forward` the journals.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A followed file, read line by line.
pub struct Follow {
    path: PathBuf,
    reader: BufReader<File>,
    ino: u64,
    /// Bytes of the current file consumed, the partial line's included.
    pos: u64,
    partial: Vec<u8>,
    /// Skipping the rest of a line longer than `max_line`.
    too_long: bool,
    max_line: usize,
}

/// A line longer than the follower keeps, skipped.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

/// Where the next whole line starts: the file (by inode) and the byte in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub ino: u64,
    pub offset: u64,
}

/// How a follower resumed at a saved [`Position`].
#[derive(Debug, PartialEq, Eq)]
pub enum Resumed {
    /// At the position, in the file now at the path.
    InPlace,
    /// The file was rotated: the rest of it is read under its new name first, then the file
    /// now at the path from its start.
    Rotated(PathBuf),
    /// The file at the path is shorter than the position (truncated): read from its start.
    Truncated,
    /// The file is no longer in the directory (rotated away, compressed, deleted): what it held
    /// after the position is not read; the file now at the path is read from its start.
    Gone,
}

impl Follow {
    /// Follows the file at `path` from its end, or its start with `from_start`. Lines longer
    /// than `max_line` bytes are skipped (the memory a line takes is bounded).
    pub fn open(path: PathBuf, from_start: bool, max_line: usize) -> io::Result<Self> {
        let mut file = open_regular(&path)?;
        let pos = if from_start {
            0
        } else {
            file.seek(SeekFrom::End(0))?
        };
        Self::at(path, file, pos, max_line)
    }

    /// Follows the file at `path` from a position saved earlier ([`Follow::position`]), in
    /// the file it was taken in when that is still in the same directory.
    pub fn resume(path: PathBuf, at: Position, max_line: usize) -> io::Result<(Self, Resumed)> {
        let file = open_regular(&path)?;
        let meta = file.metadata()?;
        if meta.ino() == at.ino {
            if meta.len() < at.offset {
                return Ok((Self::at(path, file, 0, max_line)?, Resumed::Truncated));
            }
            return Ok((Self::at(path, file, at.offset, max_line)?, Resumed::InPlace));
        }
        match renamed(&path, meta.dev(), at.ino) {
            Some(old) => {
                let file = open_regular(&old)?;
                Ok((
                    Self::at(path, file, at.offset, max_line)?,
                    Resumed::Rotated(old),
                ))
            }
            None => Ok((Self::at(path, file, 0, max_line)?, Resumed::Gone)),
        }
    }

    fn at(path: PathBuf, mut file: File, pos: u64, max_line: usize) -> io::Result<Self> {
        let ino = file.metadata()?.ino();
        file.seek(SeekFrom::Start(pos))?;
        Ok(Self {
            path,
            reader: BufReader::new(file),
            ino,
            pos,
            partial: Vec::new(),
            too_long: false,
            max_line,
        })
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the next whole line starts (after every line returned so far).
    pub fn position(&self) -> Position {
        Position {
            ino: self.ino,
            offset: self.pos - self.partial.len() as u64,
        }
    }

    /// The next whole line (or that it was too long), or None when there is none yet.
    pub fn next_line(&mut self) -> io::Result<Option<Result<String, TooLong>>> {
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.reader)
                .take(self.max_line as u64 + 1)
                .read_until(b'\n', &mut buf)?;
            self.pos += n as u64;
            if n > 0 {
                let whole = buf.ends_with(b"\n");
                if self.too_long || self.partial.len() + buf.len() > self.max_line {
                    self.partial.clear();
                    self.too_long = !whole;
                    if whole {
                        return Ok(Some(Err(TooLong)));
                    }
                    continue;
                }
                self.partial.extend_from_slice(&buf);
                if whole {
                    self.partial.pop();
                    return Ok(Some(Ok(self.take_partial())));
                }
                continue;
            }
            // At the end: has the path moved on (rotation) or been truncated?
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != self.ino => {
                    let file = File::open(&self.path)?;
                    self.ino = file.metadata()?.ino();
                    self.reader = BufReader::new(file);
                    self.pos = 0;
                    if !self.partial.is_empty() {
                        // The old file ended without a newline: that line is whole.
                        return Ok(Some(Ok(self.take_partial())));
                    }
                    continue;
                }
                Ok(m) if m.len() < self.pos => {
                    self.reader.seek(SeekFrom::Start(0))?;
                    self.pos = 0;
                    self.partial.clear();
                    continue;
                }
                // Gone for now (between a rename and the new file's creation): wait.
                _ => return Ok(None),
            }
        }
    }

    fn take_partial(&mut self) -> String {
        let line = std::mem::take(&mut self.partial);
        String::from_utf8_lossy(&line).into_owned()
    }
}

fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// The file with inode `ino` on device `dev` in `path`'s directory (where logrotate and
/// auditd move a rotated file), if any.
fn renamed(path: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_file() && m.dev() == dev && m.ino() == ino)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const MAX: usize = 1024;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmaudit-follow-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn a_followed_file_is_read_across_rotation_and_truncation() {
        let dir = scratch("rotation");
        let log = dir.join("audit.log");
        std::fs::write(&log, "old\n").unwrap();
        let mut f = Follow::open(log.clone(), false, MAX).unwrap();
        assert_eq!(f.next_line().unwrap(), None, "starts at the end");
        append(&log, b"one\ntw");
        assert_eq!(f.next_line().unwrap(), Some(Ok("one".into())));
        assert_eq!(f.next_line().unwrap(), None, "a partial line waits");
        assert_eq!(
            f.position().offset,
            8,
            "after `one`, before the partial line"
        );
        append(&log, b"o\n");
        assert_eq!(f.next_line().unwrap(), Some(Ok("two".into())));
        // Rotation: the old file renamed, a new one created at the path.
        append(&log, b"three\n");
        std::fs::rename(&log, dir.join("audit.log.1")).unwrap();
        std::fs::write(&log, "four\n").unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("three".into())));
        assert_eq!(f.next_line().unwrap(), Some(Ok("four".into())));
        // Truncation in place.
        std::fs::write(&log, "").unwrap();
        append(&log, b"5\n");
        assert_eq!(f.next_line().unwrap(), Some(Ok("5".into())));
        // A line longer than the limit is skipped, and the next one read.
        append(&log, &vec![b'x'; 3 * MAX]);
        append(&log, b"\nsix\n");
        assert_eq!(f.next_line().unwrap(), Some(Err(TooLong)));
        assert_eq!(f.next_line().unwrap(), Some(Ok("six".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_saved_position_resumes_in_place_in_the_rotated_file_or_says_it_is_gone() {
        let dir = scratch("resume");
        let log = dir.join("j.jsonl");
        std::fs::write(&log, "a\nb\n").unwrap();
        let mut f = Follow::open(log.clone(), true, MAX).unwrap();
        assert_eq!(f.next_line().unwrap(), Some(Ok("a".into())));
        let at = f.position();
        drop(f);

        let (mut f, how) = Follow::resume(log.clone(), at, MAX).unwrap();
        assert_eq!(how, Resumed::InPlace);
        assert_eq!(f.next_line().unwrap(), Some(Ok("b".into())));

        // Rotated while stopped: the rest of the old file under its new name, then the new.
        std::fs::rename(&log, dir.join("j.jsonl.1")).unwrap();
        std::fs::write(&log, "c\n").unwrap();
        let (mut f, how) = Follow::resume(log.clone(), at, MAX).unwrap();
        assert_eq!(how, Resumed::Rotated(dir.join("j.jsonl.1")));
        assert_eq!(f.next_line().unwrap(), Some(Ok("b".into())));
        assert_eq!(f.next_line().unwrap(), Some(Ok("c".into())));
        assert_eq!(f.next_line().unwrap(), None);

        // The old file gone: the new one from its start, and the caller is told.
        std::fs::remove_file(dir.join("j.jsonl.1")).unwrap();
        let (mut f, how) = Follow::resume(log.clone(), at, MAX).unwrap();
        assert_eq!(how, Resumed::Gone);
        assert_eq!(f.next_line().unwrap(), Some(Ok("c".into())));

        // Truncated below the position: from its start.
        let at = f.position();
        std::fs::write(&log, "").unwrap();
        let (_, how) = Follow::resume(log.clone(), at, MAX).unwrap();
        assert_eq!(how, Resumed::Truncated);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
