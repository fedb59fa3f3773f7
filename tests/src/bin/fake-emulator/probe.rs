//! `--mode probe`: what the emulator may do, tried from inside it. Each attempt's result (`ok`
//! or the errno's name) goes on the ready line, for the privilege tests to hold to what they
//! expect: a device the ACL does not allow refused by the cgroup (EPERM), no way out of the
//! cgroup, no capability regained, no uid 0.

use std::io;

fn errno_name(e: &io::Error) -> String {
    e.raw_os_error()
        .map(|n| format!("{:?}", nix::errno::Errno::from_raw(n)))
        .unwrap_or_else(|| e.to_string())
}

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

/// This process's cgroup v2 directory, from /proc/self/cgroup (`0::PATH`).
fn own_cgroup() -> Option<String> {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The cgroup2 mount point.
fn cgroup2_root() -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(str::to_owned))?
        })
}

/// Every attempt, as `KEY=RESULT` words.
pub fn run(device: &str, suid: Option<&str>) -> Vec<String> {
    let mut keys = Vec::new();
    let open = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop);
    keys.push(format!("probe-open={}", outcome(open)));
    let root = cgroup2_root().unwrap_or_else(|| "/sys/fs/cgroup".into());
    let me = std::process::id().to_string();
    // Out of its cgroup: into the hierarchy's root, and into its own cgroup's parent.
    let escape = std::fs::write(format!("{root}/cgroup.procs"), &me);
    keys.push(format!("probe-escape-root={}", outcome(escape)));
    let parent = own_cgroup()
        .and_then(|c| c.rsplit_once('/').map(|(p, _)| p.to_owned()))
        .unwrap_or_default();
    let escape = std::fs::write(format!("{root}{parent}/cgroup.procs"), &me);
    keys.push(format!("probe-escape-parent={}", outcome(escape)));
    let sub = std::fs::create_dir(format!("{root}{}/sub", own_cgroup().unwrap_or_default()));
    keys.push(format!("probe-mkdir-cgroup={}", outcome(sub)));
    // SAFETY: setuid with a plain argument; it fails (as expected) or changes nothing else.
    let setuid = if unsafe { libc::setuid(0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    keys.push(format!("probe-setuid={}", outcome(setuid)));
    // Raise CAP_NET_ADMIN (12) into the ambient set: needs it permitted and inheritable.
    // SAFETY: prctl with integer arguments.
    let ambient = if unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, 12, 0, 0)
    } == 0
    {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    keys.push(format!("probe-ambient={}", outcome(ambient)));
    // A setuid-root program, run from here: with no_new_privs its set-uid bit gives nothing.
    if let Some(suid) = suid {
        keys.push(format!("probe-suid={}", run_whoami(suid)));
    }
    keys
}

/// `whoami` mode: this process's effective uid and capabilities, as the kernel gives them.
pub fn whoami() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    format!("euid={euid},capeff={}", field("CapEff:"))
}

/// Runs `path --mode whoami` and returns what it printed (`euid=N,capeff=HEX`).
fn run_whoami(path: &str) -> String {
    match std::process::Command::new(path)
        .args(["--mode", "whoami"])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => format!("exec-{}", errno_name(&e)),
    }
}
