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

/// The cargo-fuzz release installed into `.tools/bin` (`cargo xtask fuzz`, and `test`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

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

/// Debian packages the integration tests and the benchmarks run.
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
    // Headless Chromium: the dashboard of `vmaudit run --serve`, driven and screenshotted by
    // tests/tests/serve.rs over the DevTools protocol.
    "chromium",
    // `bpftrace`: `cargo xtask bench`'s reference tracer, on the same tracepoint as vmaudit, so
    // vmaudit is measured beside the tool an admin would otherwise reach for.
    "bpftrace",
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
    cargo_fuzz(ws)?;
    debian_packages()?;
    guest(ws)?;
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

/// cargo-fuzz, built with the nightly toolchain (libFuzzer's sanitizers need nightly) into
/// `.tools/bin`. `.tools/cargo-fuzz.stamp` records the version, so a new one reinstalls it.
fn cargo_fuzz(ws: &Workspace) -> Result<()> {
    let stamp = format!("cargo-fuzz {CARGO_FUZZ_VERSION}\n");
    let stamp_path = ws.tools().join("cargo-fuzz.stamp");
    let bin = ws.tools().join("bin").join("cargo-fuzz");
    let current = fs::read_to_string(&stamp_path).ok();
    if bin.is_file() && current.as_deref() == Some(stamp.as_str()) {
        println!("ok: cargo-fuzz {CARGO_FUZZ_VERSION}");
        return Ok(());
    }
    // One installed by hand with the same version is kept; the stamp then records it.
    let version = sh::output(Command::new(&bin).arg("--version"));
    if bin.is_file() && version.is_ok_and(|v| v == format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        write_stamp(&stamp_path, &stamp)?;
        println!("ok: cargo-fuzz {CARGO_FUZZ_VERSION} (existing build checked, stamp written)");
        return Ok(());
    }
    println!("installing: cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes)");
    let mut cmd = ws.nightly_cargo();
    cmd.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ])
    .arg("--root")
    .arg(ws.tools())
    .arg("--target-dir")
    .arg(ws.tools().join("build"));
    sh::run(&mut cmd)?;
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

// ---- The test guest (`.tools/guest`) ----

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
fn guest(ws: &Workspace) -> Result<()> {
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
mod guest_tests {
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
