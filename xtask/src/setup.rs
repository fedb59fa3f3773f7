//! `cargo xtask setup`: what building and testing need, each step checked before it acts, so a
//! second run costs nothing. Prints one line per step: `ok: ...` or `installing: ...`.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::sh::{self, Workspace};

/// The bpf-linker release built into `.tools/bin`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Toolchain components the commands use: (toolchain, or None for the one `cargo xtask` runs
/// under; component).
const COMPONENTS: &[(Option<&str>, &str)] = &[
    // `-Z build-std=core` for `bpfel-unknown-none` (vmaudit/build.rs, through aya-build).
    (Some("nightly"), "rust-src"),
    // `cargo xtask test` lints the eBPF crate for its own target.
    (Some("nightly"), "clippy"),
    // `cargo xtask test` lints and format-checks the host crates.
    (None, "clippy"),
    (None, "rustfmt"),
];

/// Debian packages the integration tests run.
const DEBIAN_PACKAGES: &[&str] = &[
    // `ip link add ... type veth` / `type macvtap`: the tap and macvtap devices under test.
    "iproute2",
    // `qemu-system-x86_64`: a real VM process that opens, holds and closes tap fds.
    "qemu-system-x86",
    // `ausearch` / `aureport`: read back the VIRT_RESOURCE audit records the tests check;
    // `auditd -n` captures the real libvirt's records into a log file the tests read.
    "auditd",
    // `libvirtd` and `virtlogd`: the real libvirt 9.0 whose VIRT_* records are the reference.
    "libvirt-daemon",
    // libvirtd's QEMU driver (`qemu:///system`): it starts the VMs, opens /dev/net/tun and
    // loads the cgroup device program that the tests compare with ours.
    "libvirt-daemon-driver-qemu",
    // `virsh`: defines, starts, hot-plugs into and destroys the libvirt test domains.
    "libvirt-clients",
];

/// Groups libvirt's QEMU driver needs (Debian builds it to run qemu as `libvirt-qemu`, and
/// `/dev/kvm` belongs to `kvm`). The package that normally creates them,
/// `libvirt-daemon-system`, needs systemd, which these machines do not run.
const LIBVIRT_GROUPS: &[&str] = &["kvm", "libvirt", "libvirt-qemu"];

/// The system user qemu runs as under libvirt: (name, primary group, supplementary groups,
/// home), as `libvirt-daemon-system` would create it.
const LIBVIRT_USER: (&str, &str, &str, &str) =
    ("libvirt-qemu", "libvirt-qemu", "kvm", "/var/lib/libvirt");

/// KVM's device node. udev gives it `root:kvm 0660`; without udev it is `root:root 0600`.
const KVM_DEVICE: &str = "/dev/kvm";

/// Tracepoints attach through tracefs, which a new machine does not mount.
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run(ws: &Workspace) -> Result<()> {
    nightly_toolchain(ws)?;
    for &(toolchain, component) in COMPONENTS {
        rustup_component(ws, toolchain, component)?;
    }
    bpf_linker(ws)?;
    debian_packages()?;
    libvirt_accounts()?;
    kvm_device()?;
    tracefs()
}

fn nightly_toolchain(ws: &Workspace) -> Result<()> {
    let list = sh::output(ws.command("rustup").args(["toolchain", "list"]))?;
    if has_nightly(&list) {
        println!("ok: nightly toolchain");
        return Ok(());
    }
    println!("installing: nightly toolchain");
    sh::run(
        ws.command("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"]),
    )
    .context(
        "the nightly toolchain is missing and could not be installed. The eBPF programs are \
             built with `-Z build-std=core`, which needs it: run \
             `rustup toolchain install nightly --profile minimal` where static.rust-lang.org is \
             reachable, then `cargo xtask setup` again",
    )
}

/// Whether `rustup toolchain list` shows the rolling nightly (`nightly-<host>`, not a dated one).
fn has_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("nightly-"))
        .any(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn rustup_component(ws: &Workspace, toolchain: Option<&str>, component: &str) -> Result<()> {
    let with_toolchain = |cmd: &mut Command| {
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
    };
    let label = format!("{component} ({})", toolchain.unwrap_or("active toolchain"));
    let mut list = ws.command("rustup");
    list.args(["component", "list", "--installed"]);
    with_toolchain(&mut list);
    if has_component(&sh::output(&mut list)?, component) {
        println!("ok: {label}");
        return Ok(());
    }
    println!("installing: {label}");
    let mut add = ws.command("rustup");
    add.args(["component", "add", component]);
    with_toolchain(&mut add);
    sh::run(&mut add)
}

/// Whether `rustup component list --installed` shows `component`: bare (`rust-src`) or for a
/// target of this architecture (`clippy-x86_64-unknown-linux-gnu`).
fn has_component(list: &str, component: &str) -> bool {
    let arch = std::env::consts::ARCH;
    list.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|target| target.starts_with(arch))
    })
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (no system LLVM matches), into
/// `.tools/bin`. `.tools/bpf-linker.stamp` records what it was built for, so a new nightly
/// rebuilds it.
fn bpf_linker(ws: &Workspace) -> Result<()> {
    let sysroot = sh::output(ws.command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(&sysroot).join("lib");
    let llvm = LibLlvm::find(&libdir)?;
    let rustc = sh::output(ws.command("rustc").args(["+nightly", "-V"]))?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION}\n{rustc}\n{}\n",
        llvm.file_name()
    );
    let stamp_path = ws.tools().join("bpf-linker.stamp");
    let bin = ws.tools().join("bin").join("bpf-linker");
    let current = fs::read_to_string(&stamp_path).ok();
    if bin.is_file() && current.as_deref() == Some(stamp.as_str()) {
        println!("ok: bpf-linker {BPF_LINKER_VERSION} ({rustc})");
        return Ok(());
    }
    // A build made by hand from the same recipe is kept if it is the right version and loads
    // this nightly's libLLVM; the stamp then records it.
    if bin.is_file() && current.is_none() && fits(&bin, &libdir) {
        write_stamp(&stamp_path, &stamp)?;
        println!(
            "ok: bpf-linker {BPF_LINKER_VERSION} ({rustc}; existing build checked, stamp written)"
        );
        return Ok(());
    }
    println!("installing: bpf-linker {BPF_LINKER_VERSION} against {rustc} (about a minute)");
    sh::run(&mut install_bpf_linker(ws, &libdir, &llvm))?;
    write_stamp(&stamp_path, &stamp)
}

fn install_bpf_linker(ws: &Workspace, libdir: &Path, llvm: &LibLlvm) -> Command {
    let lib = libdir.to_string_lossy();
    // Link against the toolchain's libLLVM and find it there at run time. The encoded form keeps
    // a sysroot path with spaces in one argument.
    let rustflags = [
        "-L".to_owned(),
        lib.to_string(),
        "-C".to_owned(),
        format!("link-arg=-Wl,-rpath,{lib}"),
        "-l".to_owned(),
        format!("dylib={}", llvm.link_name),
    ]
    .join("\x1f");
    let mut cmd = ws.nightly_cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--force",
    ])
    .args(["--no-default-features", "--features"])
    .arg(format!("llvm-{},no-llvm-linking", llvm.major))
    .arg("--root")
    .arg(ws.tools())
    .arg("--target-dir")
    .arg(ws.tools().join("build"))
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    .env_remove("RUSTFLAGS");
    cmd
}

/// Whether an existing bpf-linker is version [`BPF_LINKER_VERSION`] and loads its libLLVM from
/// `libdir`.
fn fits(bin: &Path, libdir: &Path) -> bool {
    let version = sh::output(Command::new(bin).arg("--version"));
    let ldd = sh::output(Command::new("ldd").arg(bin));
    version.is_ok_and(|v| v == format!("bpf-linker {BPF_LINKER_VERSION}"))
        && ldd.is_ok_and(|ldd| loads_llvm_from(&ldd, libdir))
}

/// Whether `ldd` output resolves a libLLVM to a file in `libdir`.
fn loads_llvm_from(ldd: &str, libdir: &Path) -> bool {
    ldd.lines()
        .filter(|line| line.contains("libLLVM"))
        .filter_map(|line| line.split_once("=>")?.1.split_whitespace().next())
        .any(|path| Path::new(path).parent() == Some(libdir))
}

fn write_stamp(path: &Path, stamp: &str) -> Result<()> {
    fs::write(path, stamp).with_context(|| format!("writing {}", path.display()))
}

/// The toolchain's `libLLVM-<major>-rust-<version>.so`.
#[derive(Debug, PartialEq)]
struct LibLlvm {
    major: String,
    /// The name for `-l dylib=`: the file name without `lib` and `.so`.
    link_name: String,
}

impl LibLlvm {
    fn find(libdir: &Path) -> Result<Self> {
        let entries =
            fs::read_dir(libdir).with_context(|| format!("reading {}", libdir.display()))?;
        let found = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .find_map(|name| Self::parse(&name));
        match found {
            Some(llvm) => Ok(llvm),
            None => bail!(
                "no libLLVM-<major>-rust-<version>.so in {}: bpf-linker links against the \
                 nightly toolchain's libLLVM (`rustup toolchain install nightly` provides it)",
                libdir.display()
            ),
        }
    }

    fn parse(file_name: &str) -> Option<Self> {
        let link_name = file_name.strip_prefix("lib")?.strip_suffix(".so")?;
        let (major, _) = link_name.strip_prefix("LLVM-")?.split_once("-rust-")?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            major: major.to_owned(),
            link_name: link_name.to_owned(),
        })
    }

    fn file_name(&self) -> String {
        format!("lib{}.so", self.link_name)
    }
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    for pkg in DEBIAN_PACKAGES.iter().filter(|pkg| !missing.contains(pkg)) {
        println!("ok: {pkg} (Debian package)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    println!("installing: {list} (Debian packages)");
    need_root(&format!("`apt-get install --no-install-recommends {list}`"))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    sh::run(&mut apt(&["update"]))?;
    sh::run(apt(&["install", "-y", "--no-install-recommends"]).args(&missing))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"install ok installed")
}

/// The groups and the system user libvirt's QEMU driver runs qemu as, each created if missing.
fn libvirt_accounts() -> Result<()> {
    for &group in LIBVIRT_GROUPS {
        if account_exists("group", group) {
            println!("ok: group {group}");
            continue;
        }
        println!("installing: group {group}");
        need_root(&format!("`groupadd --system {group}`"))?;
        sh::run(Command::new("groupadd").args(["--system", group]))?;
    }
    let (user, group, groups, home) = LIBVIRT_USER;
    if account_exists("passwd", user) {
        println!("ok: user {user}");
        return Ok(());
    }
    println!("installing: user {user}");
    need_root(&format!("`useradd --system {user}`"))?;
    sh::run(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--home-dir",
        home,
        "--shell",
        "/usr/sbin/nologin",
        "--gid",
        group,
        "--groups",
        groups,
        user,
    ]))
}

/// Whether `getent DATABASE NAME` finds the group or user.
fn account_exists(database: &str, name: &str) -> bool {
    Command::new("getent")
        .args([database, name])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// `/dev/kvm` readable and writable by group `kvm`, as udev would leave it. libvirt checks that
/// qemu's user (`libvirt-qemu`, in group `kvm`) can open it; when it cannot, libvirt finds its
/// cached QEMU capabilities stale on every lookup and probes QEMU again (about 4 s each): then
/// defining one domain takes 40 s instead of 30 ms. Without /dev/kvm there is nothing to do:
/// libvirt then probes QEMU once, for TCG only.
fn kvm_device() -> Result<()> {
    let dev = Path::new(KVM_DEVICE);
    let Ok(meta) = fs::metadata(dev) else {
        println!("ok: no {KVM_DEVICE} (libvirt runs TCG only)");
        return Ok(());
    };
    let kvm = group_id("kvm")?;
    if meta.gid() == kvm && meta.mode() & 0o060 == 0o060 {
        println!("ok: {KVM_DEVICE} group kvm, group read-write");
        return Ok(());
    }
    println!("installing: {KVM_DEVICE} group kvm, group read-write (what udev would do)");
    need_root(&format!(
        "`chgrp kvm {KVM_DEVICE} && chmod g+rw {KVM_DEVICE}`"
    ))?;
    std::os::unix::fs::chown(dev, None, Some(kvm))
        .with_context(|| format!("chgrp kvm {KVM_DEVICE}"))?;
    let mode = (meta.mode() & 0o7777) | 0o060;
    fs::set_permissions(dev, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod g+rw {KVM_DEVICE}"))
}

/// The id of a group, from `getent group NAME` (`name:x:gid:members`).
fn group_id(name: &str) -> Result<u32> {
    let entry = sh::output(Command::new("getent").args(["group", name]))?;
    entry
        .split(':')
        .nth(2)
        .and_then(|gid| gid.parse().ok())
        .with_context(|| format!("no group id in `getent group {name}`: {entry:?}"))
}

fn tracefs() -> Result<()> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if is_mounted(&mountinfo, "tracefs", TRACEFS) {
        println!("ok: tracefs mounted at {TRACEFS}");
        return Ok(());
    }
    println!("installing: tracefs mount at {TRACEFS}");
    let mount = format!("`mount -t tracefs nodev {TRACEFS}`");
    need_root(&mount)?;
    sh::run(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
}

/// Whether /proc/self/mountinfo shows a filesystem of type `fstype` mounted at `point`.
fn is_mounted(mountinfo: &str, fstype: &str, point: &str) -> bool {
    mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(mount, source)| {
            mount.split(' ').nth(4) == Some(point) && source.split(' ').next() == Some(fstype)
        })
    })
}

fn need_root(action: &str) -> Result<()> {
    if !sh::is_root()? {
        bail!("{action} needs root: run `cargo xtask setup` as root, or run it yourself");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_rolling_nightly_only() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn matches_components_with_and_without_target_suffix() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert!(has_component(list, "rust-src"));
        assert!(has_component(list, "clippy"));
        assert!(!has_component(list, "rustfmt"));
        assert!(!has_component("rust-src\n", "rust"));
    }

    #[test]
    fn parses_the_toolchain_libllvm_name() {
        assert_eq!(
            LibLlvm::parse("libLLVM-22-rust-1.97.0-nightly.so"),
            Some(LibLlvm {
                major: "22".into(),
                link_name: "LLVM-22-rust-1.97.0-nightly".into(),
            })
        );
        assert_eq!(LibLlvm::parse("libLLVM.so.22.1-rust-1.97.0-nightly"), None);
        assert_eq!(LibLlvm::parse("librustc_driver-b5a965480ee51f9a.so"), None);
    }

    #[test]
    fn checks_where_ldd_resolves_libllvm() {
        let libdir = Path::new("/root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib");
        let ldd = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => \
                   /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/\
                   libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f4137400000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4137000000)\n";
        assert!(loads_llvm_from(ldd, libdir));
        assert!(!loads_llvm_from(
            "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found\n",
            libdir
        ));
    }

    #[test]
    fn finds_tracefs_in_mountinfo() {
        let mountinfo = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                         42 23 0:13 / /sys/kernel/tracing rw,relatime - tracefs nodev rw\n";
        assert!(is_mounted(mountinfo, "tracefs", TRACEFS));
        assert!(!is_mounted(
            mountinfo,
            "tracefs",
            "/sys/kernel/debug/tracing"
        ));
        assert!(!is_mounted(
            "22 1 0:21 / /sys rw - sysfs sysfs rw\n",
            "tracefs",
            TRACEFS
        ));
    }
}
