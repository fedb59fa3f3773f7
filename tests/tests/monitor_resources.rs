//! `vmaudit monitor` against the real libvirt 9.0 for the resources besides the network: a
//! domain with a qcow2 disk, a virtio RNG on /dev/urandom and three chardevs (a serial port to
//! a file, a pty channel, a unix socket channel), every claim confirmed from qemu's fds, and
//! the summary counting each resrc.
//!
//! Runs as root, one test at a time:
//! `cargo test -p vmaudit-tests --test monitor_resources -- --test-threads=1`.

use std::{fs, os::unix::fs::MetadataExt as _, path::Path, process::Command};

use serde_json::Value;
use vmaudit_tests::{
    TempDir, Watch, bins,
    libvirt::{AuditCapture, Domain, Libvirt},
    require_root,
};

fn monitor(lv_pid: u32, journal: &Path) -> Watch {
    let bins = bins!();
    let pid = lv_pid.to_string();
    let args = [
        "--manager",
        &pid,
        "--journal",
        journal.to_str().unwrap(),
        "--deadline-ms",
        "3000",
    ];
    Watch::start_sub(&bins, "monitor", &args, "monitoring manager pid")
}

/// qemu's fd whose target /proc names `path`.
fn fd_on(pid: u32, path: &Path) -> Option<i64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

#[test]
fn a_domains_disk_rng_and_chardevs_are_confirmed_from_qemus_fds() {
    require_root();
    const NAME: &str = "vmres0";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000c001";
    let tmp = TempDir::new("monitor-resources");
    let disk = tmp.0.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .output()
        .expect("qemu-img (run `cargo xtask setup`: it installs qemu-utils)");
    assert!(out.status.success(), "qemu-img: {out:?}");
    let serial = tmp.0.join("serial.log");
    let socket = tmp.0.join("channel.sock");
    let _audit = AuditCapture::start();
    let lv = Libvirt::start();
    let journal = tmp.0.join("j.jsonl");
    let mut m = monitor(lv.libvirtd_pid(), &journal);
    let mut dom = Domain::build(&lv, NAME, UUID)
        .device(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            disk.display()
        ))
        .device("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>")
        .device(&format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>",
            serial.display()
        ))
        .device("<channel type='pty'><target type='virtio' name='org.vmaudit.pty'/></channel>")
        .device(&format!(
            "<channel type='unix'><source mode='bind' path='{}'/>\
             <target type='virtio' name='org.vmaudit.unix'/></channel>",
            socket.display()
        ))
        .start();
    let qemu = dom.pid();
    let start = m.wait_any("vm-start", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "vm-start"
    });
    assert_eq!(start["status"], "confirmed", "{start:#}");
    let verdict = |m: &mut Watch, kind: &str, needle: &str| -> Value {
        let needle = needle.to_owned();
        m.wait_any(&format!("{kind} {needle}"), |v| {
            v["type"] == "verdict"
                && v["claim"]["kind"] == kind
                && v["claim"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&needle))
        })
    };

    // The disk: qemu's fd on the image, the image's own device and inode.
    let v = verdict(&mut m, "disk", "disk.qcow2");
    assert_eq!(v["status"], "confirmed", "{v:#}");
    let e = &v["evidence"][0];
    assert_eq!(e["pid"], qemu, "{v:#}");
    assert_eq!(e["fd"].as_i64(), fd_on(qemu, &disk), "{v:#}");
    let image = fs::metadata(&disk).unwrap();
    let held = fs::metadata(format!("/proc/{qemu}/fd/{}", e["fd"])).unwrap();
    assert_eq!((held.dev(), held.ino()), (image.dev(), image.ino()));

    // The RNG: qemu opened /dev/urandom itself, which libvirt's cgroup allows.
    let v = verdict(&mut m, "rng", "/dev/urandom");
    assert_eq!(v["status"], "confirmed", "{v:#}");
    assert_eq!(v["evidence"][0]["rdev"], "1:9", "{v:#}");
    assert_eq!(
        v["evidence"][0]["fd"].as_i64(),
        fd_on(qemu, Path::new("/dev/urandom"))
    );
    let map = v["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["what"] == "map")
        .unwrap_or_else(|| panic!("the cgroup claim allowing it: {v:#}"));
    assert!(
        map["detail"].as_str().unwrap().contains("cgroup claim"),
        "{v:#}"
    );

    // The serial port's file: written by virtlogd through a pipe qemu holds.
    let v = verdict(&mut m, "chardev", "serial.log");
    assert_eq!(v["status"], "confirmed", "{v:#}");
    let d = v["evidence"][0]["detail"].as_str().unwrap();
    assert!(d.contains("inferred: written through virtlogd"), "{v:#}");
    // The pty channel: qemu holds the master of the pty the record names.
    let v = verdict(&mut m, "chardev", "/dev/pts/");
    assert_eq!(v["status"], "confirmed", "{v:#}");
    assert_eq!(
        v["evidence"][0]["fd"].as_i64(),
        fd_on(qemu, Path::new("/dev/ptmx")),
        "{v:#}"
    );
    // The unix channel: qemu holds the socket bound to its path.
    let v = verdict(&mut m, "chardev", "channel.sock");
    assert_eq!(v["status"], "confirmed", "{v:#}");
    assert!(
        v["evidence"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("socket:["),
        "{v:#}"
    );

    dom.destroy();
    m.wait_any("vm-stop", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "vm-stop"
    });
    let (code, seen) = m.stop();
    let bad: Vec<&Value> = seen
        .iter()
        .filter(|v| v["type"] == "verdict" && v["status"] != "confirmed")
        .collect();
    assert!(
        bad.is_empty(),
        "every claim confirmed, no release at the stop taken for one without a detach: {bad:#?}"
    );
    assert_eq!(code, 0);
    let summary: Value = fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["type"] == "monitor-summary")
        .expect("a summary line");
    let r = &summary["stats"]["resources"];
    let count = |resrc: &str| {
        let c = &r[resrc];
        (
            c["records"].as_u64().unwrap_or(0),
            c["claims"].as_u64().unwrap_or(0),
            c["not_verifiable"].as_u64().unwrap_or(0),
        )
    };
    assert_eq!(count("disk"), (1, 1, 0), "{r:#}");
    assert_eq!(count("rng"), (1, 1, 0), "{r:#}");
    assert_eq!(count("chardev"), (3, 3, 0), "{r:#}");
    assert_eq!(count("mem"), (1, 0, 1), "{r:#}");
    assert_eq!(count("vcpu"), (1, 0, 1), "{r:#}");
}
