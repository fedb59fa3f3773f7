//! Least privilege: the emulator runs as the configured unprivileged user with no capability,
//! no_new_privs, `PATH` for its whole environment, only the claimed fds, in a cgroup it cannot
//! leave; and what vmaudit makes on disk has its mode whatever the umask. Each claim is proved
//! by trying: from inside the emulator (the stand-in's probe) and from outside (/proc).

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt as _, path::Path};

use vmaudit_tests::{
    Bins, TempDir, bins,
    hardening::{EMULATOR_USER, emulator_uid},
    require_root, sh,
    vmrun::VmRun,
};

const UUID: &str = "2c1b0a9f-8e7d-4c6b-9a59-48372615a4b3";

/// The keys of the stand-in's ready line (`KEY=VALUE` words).
fn ready_keys(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// A set-uid-root copy of the stand-in, shown to work: an unprivileged process without
/// no_new_privs gets euid 0 from it.
fn setuid_copy(bins: &Bins, dir: &Path) -> String {
    let copy = dir.join("suid-fake");
    std::fs::copy(&bins.fake_emulator, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let copy = copy.to_str().unwrap().to_owned();
    let out = sh(
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=65534",
            "--clear-groups",
            &copy,
            "--mode",
            "whoami",
        ],
    );
    assert!(
        out.starts_with("euid=0,"),
        "the set-uid copy gives root to a process without no_new_privs: {out}"
    );
    copy
}

#[test]
fn the_emulator_runs_unprivileged_confined_and_with_only_its_fds() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("priv-suid");
    let suid = setuid_copy(&bins, &tmp.0);
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"probe\", \"--suid\", \"{suid}\"]\n\
         [[interface]]\nmac = \"52:54:00:00:b0:01\"\nifname = \"vmpr-t\"\nqueues = 2\n",
        bins.fake_emulator.display()
    );
    // Without the verifier: the probe forks (its set-uid child), which the verifier would
    // rightly call a leak of the passed fds.
    let mut vm = VmRun::start(&bins, "vmaudit-pr1", UUID, &body, &["--no-verify"]);
    let line = vm.stderr_line("the probe's ready line", |l| {
        l.contains("fake-emulator: ready")
    });
    let emu = vm.emulator_pid();
    let k = ready_keys(&line);
    // From inside.
    assert_eq!(
        k["probe-open"], "EPERM",
        "/dev/tty, not in the ACL: the cgroup refuses: {line}"
    );
    assert_eq!(k["probe-escape-root"], "EACCES", "{line}");
    assert_eq!(k["probe-escape-parent"], "EACCES", "{line}");
    assert_eq!(k["probe-mkdir-cgroup"], "EACCES", "{line}");
    assert_eq!(k["probe-setuid"], "EPERM", "{line}");
    assert_eq!(k["probe-ambient"], "EPERM", "{line}");
    assert_eq!(
        k["probe-suid"],
        format!("euid={},capeff=0000000000000000", emulator_uid()),
        "no_new_privs: the set-uid bit gives nothing"
    );
    // Only stdin, stdout, stderr and the claimed fds.
    let claimed: Vec<i64> = vm
        .journal_lines()
        .iter()
        .filter(|r| r["reason"] == "open")
        .map(|r| r["emulator_fd"].as_i64().unwrap())
        .collect();
    assert_eq!(claimed.len(), 2, "two queues");
    let mut want: Vec<String> = ["0", "1", "2"].map(str::to_owned).to_vec();
    want.extend(claimed.iter().map(i64::to_string));
    want.sort_by_key(|f| f.parse::<i32>().unwrap());
    assert_eq!(k["open"], want.join(","), "{line}");
    // From outside.
    let u = nix::unistd::User::from_name(EMULATOR_USER)
        .unwrap()
        .unwrap();
    let kvm = nix::unistd::Group::from_name("kvm").unwrap().unwrap();
    assert_eq!(
        status_field(emu, "Uid:"),
        format!("{0}\t{0}\t{0}\t{0}", u.uid)
    );
    assert_eq!(
        status_field(emu, "Gid:"),
        format!("{0}\t{0}\t{0}\t{0}", u.gid)
    );
    let groups = status_field(emu, "Groups:");
    assert!(
        groups.split_whitespace().any(|g| g == kvm.gid.to_string()),
        "in group kvm for /dev/kvm: {groups}"
    );
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(emu, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(emu, "NoNewPrivs:"), "1");
    let environ = std::fs::read(format!("/proc/{emu}/environ")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&environ),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\0"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{emu}/cwd")).unwrap(),
        Path::new("/")
    );
    let cg = std::fs::read_to_string(format!("/proc/{emu}/cgroup")).unwrap();
    assert!(cg.lines().any(|l| l == "0::/vmaudit/vmaudit-pr1"), "{cg}");
    let (code, _) = vm.stop();
    assert_eq!(code, 0);
}

/// RAII: the process umask set for a test, put back on drop.
struct Umask(libc::mode_t);

impl Umask {
    fn set(m: libc::mode_t) -> Self {
        // SAFETY: umask only swaps the mask; the tests run one at a time.
        Self(unsafe { libc::umask(m) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn what_vmaudit_makes_has_its_mode_whatever_the_umask() {
    require_root();
    let bins = bins!();
    let body = format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--qmp-fd\", \"{{qmp-fd}}\"]\n\
         [[interface]]\nmac = \"52:54:00:00:b1:01\"\nifname = \"vmpr-u\"\n",
        bins.fake_emulator.display()
    );
    let mut vm = {
        // vmaudit inherits the mask: nothing it makes may be open to others anyway.
        let _mask = Umask::set(0);
        VmRun::start(&bins, "vmaudit-pr2", UUID, &body, &[])
    };
    vm.emulator_pid();
    let run = Path::new("/run/vmaudit/vmaudit-pr2");
    assert_eq!(mode(run), 0o700, "run directory");
    for f in ["control.sock", "qmp.sock", "state.json"] {
        assert_eq!(mode(&run.join(f)), 0o600, "{f}");
    }
    assert_eq!(
        mode(Path::new("/run/vmaudit/.lock")),
        0o700,
        "lock directory"
    );
    assert_eq!(
        mode(Path::new("/run/vmaudit/.lock/vmaudit-pr2")),
        0o600,
        "lock"
    );
    assert_eq!(mode(&vm.journal), 0o600, "journal");
    let (code, _) = vm.stop();
    assert!(matches!(code, 0 | 8), "{code}");
}
