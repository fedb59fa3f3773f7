//! This process's mounts (proc(5) mountinfo), to find tracefs, bpffs and the cgroup layout.
//!
//! The procfs crate splits each line into its fields. The text is read here and handed to the
//! crate line by line, so that an error names the bad line's number; the crate keeps the
//! kernel's octal escapes (`\040` for a space) in paths, so they are undone here.

use std::path::{Path, PathBuf};

use ::procfs::process::MountInfo;
use thiserror::Error;

/// A mountinfo line that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct MountinfoError {
    /// 1-based.
    pub line: usize,
    pub reason: &'static str,
}

/// One mount, its paths unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem that is the root of this mount (`/` for the whole).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The super options' names (`devices`, `name=systemd` gives `name`).
    pub super_options: Vec<String>,
}

impl Mount {
    /// Whether `option` is among the super options (a name, not `name=value`).
    pub fn has_super_option(&self, option: &str) -> bool {
        self.super_options.iter().any(|o| o == option)
    }
}

/// Reads a mountinfo file: an I/O error, or the first line that does not parse.
pub fn read(path: &Path) -> std::io::Result<Result<Vec<Mount>, MountinfoError>> {
    std::fs::read_to_string(path).map(|text| parse(&text).collect())
}

/// Reads the mounts of every line of a mountinfo file that parses: to find a filesystem, where
/// a bad line hides only its own mount.
pub fn read_lenient(path: &Path) -> std::io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse(&text).filter_map(Result::ok).collect())
}

/// The mounts of mountinfo text, one result per line that is not blank.
pub fn parse(text: &str) -> impl Iterator<Item = Result<Mount, MountinfoError>> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).map_err(|reason| MountinfoError {
                line: i + 1,
                reason,
            })
        })
}

/// The mount points of filesystems of type `fs_type`, in mountinfo order.
pub fn mount_points<'a>(
    mounts: &'a [Mount],
    fs_type: &'a str,
) -> impl Iterator<Item = &'a Path> + 'a {
    mounts
        .iter()
        .filter(move |m| m.fs_type == fs_type)
        .map(|m| m.mount_point.as_path())
}

fn parse_line(line: &str) -> Result<Mount, &'static str> {
    let m = MountInfo::from_line(line).map_err(|_| "not a mountinfo line (see proc(5))")?;
    Ok(Mount {
        root: unescape(&m.root)?,
        mount_point: PathBuf::from(unescape(&m.mount_point.to_string_lossy())?),
        fs_type: m.fs_type,
        super_options: m.super_options.into_keys().collect(),
    })
}

/// Undoes the kernel's `\ooo` octal escapes (space, tab, newline, backslash) in a path field.
fn unescape(field: &str) -> Result<String, &'static str> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let oct = bytes.get(i + 1..i + 4).ok_or("truncated escape")?;
            let s = std::str::from_utf8(oct).map_err(|_| "bad escape")?;
            out.push(u8::from_str_radix(s, 8).map_err(|_| "bad escape")?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "path is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_escapes() {
        let text = "22 1 0:20 / /sys rw - sysfs sysfs rw\n\
                    \n\
                    41 22 0:13 /sub /mnt/with\\040space rw shared:5 - tracefs nodev rw,mode=700\n";
        let mounts: Vec<Mount> = parse(text).collect::<Result<_, _>>().unwrap();
        assert_eq!(mounts.len(), 2);
        let t = &mounts[1];
        assert_eq!(t.root, "/sub");
        assert_eq!(t.mount_point, Path::new("/mnt/with space"));
        assert_eq!(t.fs_type, "tracefs");
        assert!(t.has_super_option("mode") && t.has_super_option("rw"));
        assert_eq!(
            mount_points(&mounts, "tracefs").collect::<Vec<_>>(),
            vec![Path::new("/mnt/with space")]
        );
        assert_eq!(mount_points(&mounts, "bpf").count(), 0);
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let text = "22 1 0:20 / /sys rw - sysfs sysfs rw\n1 2 0:1 / /x rw cgroup2 cgroup2 rw\n";
        let err = parse(text).find_map(Result::err).unwrap();
        assert_eq!(err.line, 2);
        assert_eq!(
            err.to_string(),
            "line 2: not a mountinfo line (see proc(5))"
        );
        let err = parse("1 2 0:1 / /x\\04 rw - cgroup2 c rw\n")
            .find_map(Result::err)
            .unwrap();
        assert_eq!(err.to_string(), "line 1: truncated escape");
    }

    #[test]
    fn this_process_mounts_parse() {
        let mounts: Vec<Mount> = read(Path::new(crate::paths::SELF_MOUNTINFO))
            .unwrap()
            .unwrap();
        assert!(mount_points(&mounts, "proc").any(|p| p == Path::new("/proc")));
    }
}
