//! The host: the Debian packages the tests, the demo and the benchmarks run, the accounts
//! libvirt's package would have made under systemd, `/dev/kvm` as udev would leave it, and
//! tracefs. Each checked before it acts.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result};

use super::need_root;
use crate::sh;

/// Debian packages the integration tests and the benchmarks run.
const DEBIAN_PACKAGES: &[&str] = &[
    // `ip link add ... type veth` / `type macvtap`: the tap and macvtap devices under test.
    "iproute2",
    // `qemu-system-x86_64`: a real VM process that opens, holds and closes tap fds.
    "qemu-system-x86",
    // `qemu-img`: the disk images of the libvirt domains whose disk claims monitor mode judges.
    "qemu-utils",
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
    // Headless Chromium: the dashboard of `vmaudit run --serve`, driven and screenshotted by
    // tests/tests/serve.rs over the DevTools protocol.
    "chromium",
    // `bpftrace`: `cargo xtask bench`'s reference tracer, on the same tracepoint as vmaudit, so
    // vmaudit is measured beside the tool an admin would otherwise reach for.
    "bpftrace",
    // `systemd-analyze verify`: the package's units are checked as installed (tests/tests/
    // package.rs). No systemd runs here; the tool works without it.
    "systemd",
    // `promtool test rules` on the shipped alert rules, and a real Prometheus scraping
    // `--serve` with them loaded (tests/tests/package.rs, tests/tests/prometheus.rs).
    "prometheus",
    // `logrotate --debug` reads the package's logrotate file as logrotate itself would.
    "logrotate",
    // `setpriv`: the installed monitor runs with exactly the capabilities its unit grants.
    "util-linux",
    // `rsyslogd`: the receiver `vmaudit forward` is tested against, over UDP, TCP and a unix
    // socket (tests/tests/forward.rs).
    "rsyslog",
];

/// Groups libvirt's QEMU driver needs (Debian builds it to run qemu as `libvirt-qemu`, and
/// `/dev/kvm` belongs to `kvm`). The package that normally creates them,
/// `libvirt-daemon-system`, needs systemd, which these machines do not run.
const LIBVIRT_GROUPS: &[&str] = &["kvm", "libvirt", "libvirt-qemu"];

/// A system user to create: name, primary group, supplementary groups, home.
type SystemUser = (&'static str, &'static str, &'static str, &'static str);

/// The system user qemu runs as under libvirt, as `libvirt-daemon-system` would create it.
const LIBVIRT_USER: SystemUser = ("libvirt-qemu", "libvirt-qemu", "kvm", "/var/lib/libvirt");

/// The unprivileged user `vmaudit run` runs the emulator as unless a spec names another
/// (`vmaudit::runtime::identity::DEFAULT_USER`): in group `kvm` for /dev/kvm; it needs no
/// access to /dev/net/tun, whose fds it is handed.
const EMULATOR_USER: SystemUser = ("vmaudit-qemu", "vmaudit-qemu", "kvm", "/nonexistent");

/// KVM's device node. udev gives it `root:kvm 0660`; without udev it is `root:root 0600`.
const KVM_DEVICE: &str = "/dev/kvm";

/// Tracepoints attach through tracefs, which a new machine does not mount.
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run() -> Result<()> {
    debian_packages()?;
    libvirt_accounts()?;
    system_user(EMULATOR_USER)?;
    kvm_device()?;
    tracefs()
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
    system_user(LIBVIRT_USER)
}

/// Creates a system user (and its primary group) when missing.
fn system_user((user, group, groups, home): SystemUser) -> Result<()> {
    if !account_exists("group", group) {
        println!("installing: group {group}");
        need_root(&format!("`groupadd --system {group}`"))?;
        sh::run(Command::new("groupadd").args(["--system", group]))?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
