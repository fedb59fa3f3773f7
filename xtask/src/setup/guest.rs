//! The test guest (`.tools/guest`): Debian's cloud kernel and busybox in an initramfs, for the
//! hot-unplug tests and the demo.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::{need_root, write_stamp};
use crate::sh::{self, Workspace};

/// The Debian metapackage whose dependency names the cloud kernel the test guest boots.
const GUEST_KERNEL_META: &str = "linux-image-cloud-amd64";

/// The Debian package whose statically linked busybox is the guest's whole userland.
const GUEST_BUSYBOX: &str = "busybox-static";

/// The guest's `/init`: mount what the kernel offers, say so on the console, then idle as
/// PID 1 (which must never exit) while the kernel itself answers ACPI PCI hot-plug. The ready
/// line is what `tests/src/guest.rs` (`READY_LINE`) waits for on the serial log.
const GUEST_INIT: &str = "#!/bin/busybox sh
# vmaudit's test guest, made by `cargo xtask setup`.
export PATH=/bin
busybox mount -t devtmpfs devtmpfs /dev
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1
echo 'vmaudit-guest: ready'
while :; do busybox sleep 3600; done
";

/// A tiny real guest for the hot-unplug tests, from Debian packages only: the cloud kernel as
/// `.tools/guest/vmlinuz`, and `.tools/guest/initrd.gz` (busybox and [`GUEST_INIT`]).
/// `.tools/guest/stamp` records the package versions and the init script it was built from; a
/// new kernel in the apt lists, or a changed init script, rebuilds it.
pub fn run(ws: &Workspace) -> Result<()> {
    let dir = ws.tools().join("guest");
    let stamp_path = dir.join("stamp");
    let built = dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file();
    let stamped = fs::read_to_string(&stamp_path).ok().filter(|_| built);
    // apt-cache reads every list on each call here (these images keep no pkgcache.bin): about
    // a second. Lists older than the stamp cannot offer anything newer, so skip asking them.
    if let Some(stamp) = &stamped
        && apt_lists_older_than(&stamp_path)
    {
        let what = stamp.lines().next().unwrap_or_default();
        println!("ok: guest ({what}) in {}", dir.display());
        return Ok(());
    }
    let offered = GuestPackages::offered();
    match (&stamped, &offered) {
        (Some(stamp), Ok(packages)) if *stamp == packages.stamp() => {
            // Rewritten to date it after the lists: the next run skips apt-cache.
            write_stamp(&stamp_path, stamp)?;
            println!("ok: guest ({packages}) in {}", dir.display());
            return Ok(());
        }
        (Some(stamp), Err(_)) => {
            // No apt lists to compare with: what was built stays (updating the lists to find
            // out would cost far more than it could save).
            let what = stamp.lines().next().unwrap_or_default();
            println!("ok: guest ({what}; the apt lists cannot say whether it is current)");
            return Ok(());
        }
        _ => {}
    }
    let build = ScratchDir::create(ws.tools().join("guest.build"))?;
    let fetch = |offered: Result<GuestPackages>| -> Result<(GuestPackages, GuestDebs)> {
        let packages = offered?;
        println!("installing: guest ({packages}) into {}", dir.display());
        let debs = guest_download(&build.0, &packages)?;
        Ok((packages, debs))
    };
    let (packages, debs) = match fetch(offered) {
        Ok(fetched) => fetched,
        // No lists, or lists so old that the mirror no longer has the versions they name.
        Err(e) => {
            println!("installing: apt lists (`apt-get update`; {e:#})");
            need_root("`apt-get update`")?;
            sh::run(
                Command::new("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            fetch(GuestPackages::offered())?
        }
    };
    let kernel_tree = build.0.join("kernel");
    sh::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&debs.kernel)
            .arg(&kernel_tree),
    )?;
    let boot = kernel_tree.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", debs.kernel.display()))?;
    let busybox_tree = build.0.join("busybox");
    sh::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&debs.busybox)
            .arg(&busybox_tree),
    )?;
    let busybox_path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| busybox_tree.join(p))
        .find(|p| p.is_file())
        .with_context(|| format!("no busybox in {}", debs.busybox.display()))?;
    let busybox =
        fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;

    let mut cpio = Newc::default();
    for dir in ["bin", "dev", "proc", "sys"] {
        cpio.add(dir, 0o040_755, (0, 0), &[])?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    cpio.add("dev/console", 0o020_600, (5, 1), &[])?;
    cpio.add("bin/busybox", 0o100_755, (0, 0), &busybox)?;
    cpio.add("init", 0o100_755, (0, 0), GUEST_INIT.as_bytes())?;
    let initrd = build.0.join("initrd");
    fs::write(&initrd, cpio.finish()?).with_context(|| format!("writing {}", initrd.display()))?;
    // `-n`: no name or time in the header, so the same inputs give the same file.
    sh::run(Command::new("gzip").args(["-9", "-n"]).arg(&initrd))?;

    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // No stamp while the files change: an interrupted run is redone next time.
    match fs::remove_file(&stamp_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", stamp_path.display()));
        }
        _ => {}
    }
    for (from, to) in [
        (vmlinuz, "vmlinuz"),
        (build.0.join("initrd.gz"), "initrd.gz"),
    ] {
        fs::rename(&from, dir.join(to))
            .with_context(|| format!("moving {} to {}", from.display(), dir.display()))?;
    }
    write_stamp(&stamp_path, &packages.stamp())
}

/// The package versions the guest is built from: what the apt lists offer now.
struct GuestPackages {
    /// `linux-image-<version>-cloud-amd64`, the package [`GUEST_KERNEL_META`] depends on.
    kernel: String,
    kernel_version: String,
    busybox_version: String,
}

impl GuestPackages {
    /// Reads the apt lists (`apt-cache show`, once when the metapackage pins its kernel's
    /// version, as Debian's do); fails when they are missing or do not have the packages.
    fn offered() -> Result<Self> {
        let records = apt_cache_show(&[GUEST_KERNEL_META, GUEST_BUSYBOX])?;
        let record = |records: &str, pkg: &str| -> Result<String> {
            records
                .split("\n\n")
                .find(|r| field(r, "Package") == Some(pkg))
                .map(str::to_owned)
                .with_context(|| format!("`apt-cache show {pkg}` has no record of {pkg}"))
        };
        let version = |record: &str, pkg: &str| -> Result<String> {
            field(record, "Version")
                .map(str::to_owned)
                .with_context(|| format!("`apt-cache show {pkg}` gives no Version"))
        };
        let meta = record(&records, GUEST_KERNEL_META)?;
        let (kernel, pinned) = field(&meta, "Depends")
            .and_then(cloud_kernel_dependency)
            .with_context(|| {
                format!("`apt-cache show {GUEST_KERNEL_META}` names no linux-image-*-cloud-amd64")
            })?;
        let kernel_version = match pinned {
            Some(v) => v,
            None => version(&record(&apt_cache_show(&[&kernel])?, &kernel)?, &kernel)?,
        };
        Ok(Self {
            busybox_version: version(&record(&records, GUEST_BUSYBOX)?, GUEST_BUSYBOX)?,
            kernel_version,
            kernel,
        })
    }

    /// What `.tools/guest/stamp` holds for a guest built from these packages and [`GUEST_INIT`].
    fn stamp(&self) -> String {
        format!(
            "{self}\ninit fnv1a64 {:016x}\n",
            fnv1a64(GUEST_INIT.as_bytes())
        )
    }
}

impl std::fmt::Display for GuestPackages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}, {GUEST_BUSYBOX} {}",
            self.kernel, self.kernel_version, self.busybox_version
        )
    }
}

/// The downloaded `.deb` files.
struct GuestDebs {
    kernel: std::path::PathBuf,
    busybox: std::path::PathBuf,
}

/// `apt-get download`s both packages, each into its own folder under `dir`.
fn guest_download(dir: &Path, packages: &GuestPackages) -> Result<GuestDebs> {
    let get = |pkg: &str, version: &str, sub: &str| -> Result<std::path::PathBuf> {
        let into = dir.join(sub);
        fs::create_dir_all(&into).with_context(|| format!("creating {}", into.display()))?;
        sh::output(
            Command::new("apt-get")
                .arg("download")
                .arg(format!("{pkg}={version}"))
                .current_dir(&into),
        )?;
        let deb = fs::read_dir(&into)
            .with_context(|| format!("reading {}", into.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"));
        deb.with_context(|| format!("`apt-get download {pkg}` left no .deb"))
    };
    Ok(GuestDebs {
        kernel: get(&packages.kernel, &packages.kernel_version, "kernel-deb")?,
        busybox: get(GUEST_BUSYBOX, &packages.busybox_version, "busybox-deb")?,
    })
}

/// `apt-cache show --no-all-versions PKG...`: the candidate versions' records, separated by
/// blank lines.
fn apt_cache_show(pkgs: &[&str]) -> Result<String> {
    sh::output(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(pkgs),
    )
}

/// Whether `/var/lib/apt/lists` and every list in it were last changed before `stamp` was
/// written. False when anything cannot be read: then apt-cache is asked.
fn apt_lists_older_than(stamp: &Path) -> bool {
    const LISTS: &str = "/var/lib/apt/lists";
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(stamped) = modified(stamp) else {
        return false;
    };
    let Ok(entries) = fs::read_dir(LISTS) else {
        return false;
    };
    let lists: Option<Vec<_>> = std::iter::once(Path::new(LISTS).to_path_buf())
        .chain(entries.filter_map(|e| e.ok().map(|e| e.path())))
        .map(|p| modified(&p))
        .collect();
    lists.is_some_and(|times| times.iter().all(|t| *t < stamped))
}

/// The value of the first `Name:` field of a Debian control record.
fn field<'a>(record: &'a str, name: &str) -> Option<&'a str> {
    record.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim())
    })
}

/// The `linux-image-<version>-cloud-amd64` package in a `Depends` field, and the version it
/// is pinned to if it is (`linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`).
fn cloud_kernel_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends.split([',', '|']).find_map(|dep| {
        let (name, constraint) = dep
            .trim()
            .split_once(' ')
            .map_or((dep.trim(), ""), |(n, c)| (n, c.trim()));
        let is_kernel = name
            .strip_prefix("linux-image-")
            .and_then(|rest| rest.strip_suffix("-cloud-amd64"))
            .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()));
        let pinned = constraint
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_owned());
        is_kernel.then(|| (name.to_owned(), pinned))
    })
}

/// A stable 64-bit FNV-1a hash (std's hashers may change between releases; a stamp must not).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A folder for a step's intermediate files, emptied when made and removed on drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn create(path: std::path::PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A cpio archive in the "new ASCII" format (`newc`), the one the kernel unpacks as an
/// initramfs. Every entry belongs to root and has time 0, so the archive depends on its
/// contents only; no root privilege is needed to put a device node in it.
#[derive(Default)]
struct Newc {
    out: Vec<u8>,
    inodes: u32,
}

impl Newc {
    /// Adds `name` (relative, no leading `/`) with `mode` (file type and permissions),
    /// `rdev` (major, minor) for device nodes, and `data` for regular files.
    fn add(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        self.inodes += 1;
        let ino = self.inodes;
        self.entry(ino, name, mode, rdev, data)
    }

    fn entry(
        &mut self,
        ino: u32,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let size =
            u32::try_from(data.len()).with_context(|| format!("{name}: too large for cpio"))?;
        let name_size = u32::try_from(name.len() + 1).context("cpio name too long")?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize
        // check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        self.out.extend_from_slice(b"070701");
        for value in fields {
            self.out
                .extend_from_slice(format!("{value:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// Header plus name, and data, each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        self.out.resize(self.out.len().next_multiple_of(4), 0);
    }

    /// The archive, closed by its trailer entry.
    fn finish(mut self) -> Result<Vec<u8>> {
        self.entry(0, "TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cloud_kernel_the_metapackage_depends_on() {
        assert_eq!(
            cloud_kernel_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            cloud_kernel_dependency(
                "initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-cloud-amd64 (>= 6.12)"
            ),
            Some(("linux-image-6.12.9-cloud-amd64".into(), None))
        );
        assert_eq!(cloud_kernel_dependency("linux-image-cloud-amd64"), None);
        assert_eq!(cloud_kernel_dependency("linux-image-6.1.0-56-amd64"), None);
    }

    #[test]
    fn reads_control_fields() {
        let record = "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nDepends: x\n";
        assert_eq!(field(record, "Version"), Some("1:1.35.0-4+deb12u1+b1"));
        assert_eq!(field(record, "Pre-Depends"), None);
    }

    #[test]
    fn writes_padded_newc_entries_and_a_trailer() {
        let mut cpio = Newc::default();
        cpio.add("init", 0o100_755, (0, 0), b"#!\n").unwrap();
        cpio.add("dev/console", 0o020_600, (5, 1), &[]).unwrap();
        let out = cpio.finish().unwrap();
        let header = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(
            header,
            "070701\
             00000001000081ED000000000000000000000001000000000000000300000000\
             00000000000000000000000000000005\
             00000000"
        );
        // 110 + "init\0" = 115, padded to 116; 3 bytes of data padded to 4.
        assert_eq!(&out[110..116], b"init\0\0");
        assert_eq!(&out[116..120], b"#!\n\0");
        let console = std::str::from_utf8(&out[120..230]).unwrap();
        assert_eq!(&console[6 + 8..6 + 16], "00002180");
        assert_eq!(&console[6 + 9 * 8..6 + 11 * 8], "0000000500000001");
        assert!(out.len().is_multiple_of(4));
        assert!(out.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }

    #[test]
    fn stamps_change_with_the_kernel() {
        let a = GuestPackages {
            kernel: "linux-image-6.1.0-56-cloud-amd64".into(),
            kernel_version: "6.1.192-2".into(),
            busybox_version: "1:1.35.0-4+deb12u1+b1".into(),
        };
        let stamp = a.stamp();
        assert_eq!(stamp, a.stamp());
        let b = GuestPackages {
            kernel_version: "6.1.192-3".into(),
            ..a
        };
        assert_ne!(stamp, b.stamp());
    }
}
