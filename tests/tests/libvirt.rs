//! The real libvirt 9.0 (Debian) against the real kernel audit subsystem: what libvirt writes
//! when it starts a QEMU domain with ethernet (tap) NICs, hot-plugs one and destroys it. These
//! records are the reference our runtime's records must match byte for byte, and
//! `tests/fixtures/libvirt-9.0-audit.log` keeps one run of them
//! (`VMAUDIT_REGENERATE_FIXTURES=1` rewrites it from a new run).
//!
//! Runs as root, one test at a time:
//! `cargo test -p vmaudit-tests --test libvirt -- --test-threads=1`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use vmaudit_tests::libvirt::{AuditCapture, Domain, Libvirt, Nic, Record, rdev_of, tun_fds};
use vmaudit_tests::require_root;

/// The devices libvirt allows qemu by default (deny all, then one `class=path` allow each).
const DEFAULT_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/full",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/dev/ptmx",
    "/dev/kvm",
];

/// The environment variable that makes the first test rewrite its fixture from this run.
const REGENERATE: &str = "VMAUDIT_REGENERATE_FIXTURES";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libvirt-9.0-audit.log")
}

/// `"value"`, as audit writes a value that needs no hex encoding.
fn q(value: &str) -> String {
    format!("\"{value}\"")
}

/// The records of `records` that have every `key=value` of `fields` (values as written).
fn matching<'r>(records: &'r [Record], kind: &str, fields: &[(&str, &str)]) -> Vec<&'r Record> {
    records
        .iter()
        .filter(|r| r.kind == kind && r.has_all(fields))
        .collect()
}

/// The one record of `records` with every `key=value` of `fields`.
fn one<'r>(records: &'r [Record], kind: &str, fields: &[(&str, &str)]) -> &'r Record {
    let found = matching(records, kind, fields);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} with {fields:?}, found {}:\n{}",
        found.len(),
        records
            .iter()
            .map(|r| r.line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    found[0]
}

/// Position of a record in `records` (its line).
fn index_of(records: &[Record], r: &Record) -> usize {
    records
        .iter()
        .position(|x| x.line == r.line)
        .expect("record in list")
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo (`/sys/fs/cgroup/unified` on hybrid
/// hosts, `/sys/fs/cgroup` on pure v2 ones).
fn cgroup2_mount() -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (mount, source) = l.split_once(" - ")?;
            (source.split(' ').next()? == "cgroup2").then(|| mount.split(' ').nth(4))?
        })
        .expect("cgroup2 mounted")
        .to_owned()
}

/// `pid`'s cgroup v2 path (the `0::PATH` line of /proc/PID/cgroup).
fn cgroup2_of(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/PID/cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_owned()
}

#[test]
fn libvirt_audits_ethernet_nics_at_start_hotplug_and_stop() {
    const NAME: &str = "vmlv0";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000a001";
    let began = Instant::now();
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let ready = began.elapsed();
    let nics = [
        Nic::new("52:54:00:1b:00:01", "vmlv0n0"),
        Nic::new("52:54:00:1b:00:02", "vmlv0n1"),
    ];
    let hot = Nic::new("52:54:00:1b:00:03", "vmlv0n2");

    let mut dom = Domain::start(&lv, NAME, UUID, &nics);
    let pid = dom.pid();
    let started = audit.wait_record("VIRT_CONTROL", UUID, &[("op", "start")]);
    assert_eq!(started.get("vm-pid"), Some(pid.to_string().as_str()));
    assert_eq!(started.get("reason"), Some("booted"));
    assert_eq!(
        tun_fds(pid),
        nics.len(),
        "qemu holds one /dev/net/tun fd per NIC"
    );
    // The cgroup libvirt audited is qemu's own, and exists while it runs.
    let records = audit.virt_records(UUID);
    let deny = one(
        &records,
        "VIRT_RESOURCE",
        &[("resrc", "cgroup"), ("reason", "deny"), ("class", "all")],
    );
    let cgroup = deny.get("cgroup").expect("cgroup field").to_owned();
    assert!(Path::new(&cgroup).is_dir(), "{cgroup} is not a directory");
    let qemu_cgroup = format!("{}{}/", cgroup2_mount(), cgroup2_of(pid));
    assert!(
        qemu_cgroup.starts_with(&cgroup),
        "qemu runs in {qemu_cgroup}, outside the audited {cgroup}"
    );
    assert!(
        cgroup.ends_with(&format!("-{NAME}.libvirt-qemu/")),
        "{cgroup}"
    );

    assert_eq!(dom.attach(&hot).trim(), "Device attached successfully");
    audit.wait_record(
        "VIRT_RESOURCE",
        UUID,
        &[("reason", "attach"), ("new-net", &q(&hot.mac))],
    );
    assert_eq!(tun_fds(pid), nics.len() + 1, "the hot-plugged tap fd too");

    dom.destroy();
    audit.wait_record(
        "VIRT_CONTROL",
        UUID,
        &[("op", "stop"), ("reason", "destroyed")],
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} still there after virsh destroy"
    );
    for nic in nics.iter().chain([&hot]) {
        assert!(
            !Path::new("/sys/class/net").join(&nic.dev).exists(),
            "libvirt left tap {}",
            nic.dev
        );
    }
    let cycle = began.elapsed() - ready;

    let records = audit.virt_records(UUID);
    let libvirtd = lv.libvirtd_pid().to_string();
    for r in &records {
        assert!(
            r.has_all(&[
                ("pid", &libvirtd),
                ("uid", "0"),
                ("virt", "qemu"),
                ("vm", &q(NAME)),
                ("exe", &q("/usr/sbin/libvirtd")),
                ("res", "success"),
            ]),
            "{}",
            r.line
        );
    }
    let tun = rdev_of("/dev/net/tun");
    assert_eq!(tun, "0A:C8");
    let mut opens = Vec::new();
    for nic in nics.iter().chain([&hot]) {
        let open = one(
            &records,
            "VIRT_RESOURCE",
            &[
                ("resrc", "net"),
                ("reason", "open"),
                ("net", &nic.mac),
                ("path", &q("/dev/net/tun")),
                ("rdev", &tun),
            ],
        );
        opens.push(index_of(&records, open));
    }
    let mut starts = Vec::new();
    for nic in &nics {
        let start = one(
            &records,
            "VIRT_RESOURCE",
            &[
                ("resrc", "net"),
                ("reason", "start"),
                ("old-net", &q("?")),
                ("new-net", &q(&nic.mac)),
            ],
        );
        starts.push(index_of(&records, start));
    }
    let attach = one(
        &records,
        "VIRT_RESOURCE",
        &[
            ("resrc", "net"),
            ("reason", "attach"),
            ("old-net", &q("?")),
            ("new-net", &q(&hot.mac)),
        ],
    );
    assert!(matching(&records, "VIRT_RESOURCE", &[("reason", "detach")]).is_empty());
    for dev in DEFAULT_DEVICES {
        one(
            &records,
            "VIRT_RESOURCE",
            &[
                ("resrc", "cgroup"),
                ("reason", "allow"),
                ("cgroup", &q(&cgroup)),
                ("class", "path"),
                ("path", &q(dev)),
                ("rdev", &rdev_of(dev)),
                ("acl", "rw"),
            ],
        );
    }
    one(
        &records,
        "VIRT_RESOURCE",
        &[
            ("resrc", "cgroup"),
            ("reason", "allow"),
            ("cgroup", &q(&cgroup)),
            ("class", "major"),
            ("category", "pty"),
            ("maj", "88"),
            ("acl", "rw"),
        ],
    );
    let cgroup_records = matching(&records, "VIRT_RESOURCE", &[("resrc", "cgroup")]);
    assert_eq!(cgroup_records.len(), 1 + DEFAULT_DEVICES.len() + 1);
    let start = one(&records, "VIRT_CONTROL", &[("op", "start")]);
    let stop = one(
        &records,
        "VIRT_CONTROL",
        &[("op", "stop"), ("reason", "destroyed"), ("vm-pid", "0")],
    );
    // The order libvirt follows: open the taps, start qemu, then hot-plug (open, attach).
    let start = index_of(&records, start);
    let attach = index_of(&records, attach);
    assert!(opens[..2].iter().chain(&starts).all(|&i| i < start));
    assert!(start < opens[2] && opens[2] < attach);
    assert_eq!(index_of(&records, stop), records.len() - 1);

    // ausearch, which SIEM pipelines use, finds exactly these records in the same log.
    let found = vmaudit_tests::sh(
        "ausearch",
        &[
            "-if",
            audit.log().to_str().expect("UTF-8"),
            "-m",
            "VIRT_CONTROL,VIRT_RESOURCE,VIRT_MACHINE_ID",
            "--uuid",
            UUID,
            "--raw",
        ],
    );
    let found: Vec<&str> = found.lines().filter(|l| l.starts_with("type=")).collect();
    let lines: Vec<&str> = records.iter().map(|r| r.line.as_str()).collect();
    assert_eq!(found, lines, "ausearch --uuid finds other records");

    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    if std::env::var_os(REGENERATE).is_some_and(|v| v == "1") {
        fs::create_dir_all(fixture().parent().expect("dir")).expect("mkdir fixtures");
        fs::write(fixture(), &text).expect("write fixture");
        eprintln!("rewrote {} ({} records)", fixture().display(), lines.len());
    } else {
        let saved = fs::read_to_string(fixture()).unwrap_or_else(|e| {
            panic!("{}: {e}; make it with {REGENERATE}=1", fixture().display())
        });
        let saved: Vec<String> = saved
            .lines()
            .map(|l| Record::parse(l).expect("fixture line").normalized())
            .collect();
        let now: Vec<String> = records.iter().map(Record::normalized).collect();
        assert_eq!(
            now,
            saved,
            "libvirt now writes other records than {} (apart from stamps, pids, cgroup and \
             login); if that is expected, rewrite it with {REGENERATE}=1",
            fixture().display()
        );
    }
    eprintln!(
        "libvirt + auditd ready in {ready:?}; start, attach, destroy in {cycle:?}; {} records",
        records.len()
    );
}

#[test]
fn detach_without_a_guest_is_reported_done_yet_nothing_is_released() {
    const NAME: &str = "vmlv1";
    const UUID: &str = "7e57c0de-0000-4000-8000-00000000a002";
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let nic = Nic::new("52:54:00:1b:01:01", "vmlv1n0");
    let hot = Nic::new("52:54:00:1b:01:02", "vmlv1n1");

    let mut dom = Domain::start(&lv, NAME, UUID, std::slice::from_ref(&nic));
    let pid = dom.pid();
    audit.wait_record("VIRT_CONTROL", UUID, &[("op", "start")]);
    dom.attach(&hot);
    audit.wait_record(
        "VIRT_RESOURCE",
        UUID,
        &[("reason", "attach"), ("new-net", &q(&hot.mac))],
    );
    assert_eq!(tun_fds(pid), 2);

    // No guest OS acknowledges the unplug: libvirt waits its 5 s, then says it is done.
    let said = dom.detach(&hot);
    assert_eq!(said.trim(), "Device detached successfully");
    // Everything libvirt sent before the marker is in the log once the marker is.
    audit.sync();
    let records = audit.virt_records(UUID);
    assert!(
        matching(&records, "VIRT_RESOURCE", &[("reason", "detach")]).is_empty(),
        "libvirt audited a detach"
    );
    assert_eq!(tun_fds(pid), 2, "qemu still holds the 'detached' tap fd");
    let list = lv.virsh_ok(&["domiflist", NAME]);
    assert!(
        list.contains(&hot.dev),
        "the interface is still in the domain:\n{list}"
    );

    dom.destroy();
    audit.wait_record("VIRT_CONTROL", UUID, &[("op", "stop")]);
    let records = audit.virt_records(UUID);
    assert!(
        matching(&records, "VIRT_RESOURCE", &[("reason", "detach")]).is_empty(),
        "no detach record at stop either"
    );
}

/// How a value is written in an audit record: quoted, hex-encoded, or raw.
fn form(v: &str) -> &'static str {
    if v.starts_with('"') {
        "quoted"
    } else if v == "?" {
        "?"
    } else if v.len() >= 2
        && v.len().is_multiple_of(2)
        && v.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
        && v.contains(|c: char| c.is_ascii_alphabetic())
    {
        "hex"
    } else {
        "raw"
    }
}

/// The text fields of a record (after the kernel's pid/uid/auid/ses), as (name, form).
fn shape(r: &Record) -> Vec<(String, &'static str)> {
    r.fields
        .iter()
        .skip(4)
        .map(|(k, v)| (k.clone(), form(v)))
        .collect()
}

/// vmaudit's records for an equivalent VM against libvirt's, on the same machine: for each
/// record shape, libvirt's fields in libvirt's order with the same encodings, then only
/// vmaudit's `vmaudit-*` fields; and equal values where the facts are equal.
#[test]
fn vmaudit_records_match_libvirts_field_by_field() {
    const LV_UUID: &str = "7e57c0de-0000-4000-8000-00000000b001";
    const VA_UUID: &str = "7e57c0de-0000-4000-8000-00000000b002";
    require_root();
    let bins = vmaudit_tests::bins!();
    let mut audit = AuditCapture::start();
    let lv = Libvirt::start();
    let nics = [
        Nic::new("52:54:00:1c:00:01", "vmlv1n0"),
        Nic::new("52:54:00:1c:00:02", "vmlv1n1"),
    ];
    let mut dom = Domain::start(&lv, "vmlv1", LV_UUID, &nics);
    audit.wait_record("VIRT_CONTROL", LV_UUID, &[("op", "start")]);
    dom.destroy();
    audit.wait_record("VIRT_CONTROL", LV_UUID, &[("op", "stop")]);

    // The same VM under vmaudit (the capture sees its kernel records too).
    let tmp = vmaudit_tests::TempDir::new("lv-compare");
    let spec = tmp.0.join("vm.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"vmva1\"\nuuid = \"{VA_UUID}\"\n[[interface]]\nmac = \"52:54:00:1c:00:03\"\nifname = \"vmva1n0\"\n[[interface]]\nmac = \"52:54:00:1c:00:04\"\nifname = \"vmva1n1\"\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(&bins.vmaudit)
        .arg("run")
        .arg(&spec)
        .args(["--audit", "kernel"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let output = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    audit.wait_record("VIRT_CONTROL", VA_UUID, &[("op", "start")]);
    // SAFETY: kill with our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap().code();
    let output = output.join().unwrap();
    let violations: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("\"violated\""))
        .collect();
    assert_eq!(code, Some(0), "{violations:#?}");
    audit.wait_record("VIRT_CONTROL", VA_UUID, &[("op", "stop")]);

    let theirs = audit.virt_records(LV_UUID);
    let ours = audit.virt_records(VA_UUID);
    let shapes: &[(&str, &[(&str, &str)])] = &[
        ("VIRT_RESOURCE", &[("resrc", "net"), ("reason", "open")]),
        (
            "VIRT_RESOURCE",
            &[("resrc", "cgroup"), ("reason", "deny"), ("class", "all")],
        ),
        (
            "VIRT_RESOURCE",
            &[
                ("resrc", "cgroup"),
                ("reason", "allow"),
                ("class", "path"),
                ("path", "\"/dev/null\""),
            ],
        ),
        (
            "VIRT_RESOURCE",
            &[("resrc", "cgroup"), ("reason", "allow"), ("class", "major")],
        ),
        ("VIRT_RESOURCE", &[("resrc", "net"), ("reason", "start")]),
        ("VIRT_CONTROL", &[("op", "start")]),
        ("VIRT_CONTROL", &[("op", "stop")]),
    ];
    for (kind, fields) in shapes {
        let l = matching(&theirs, kind, fields);
        let o = matching(&ours, kind, fields);
        assert!(
            !l.is_empty() && !o.is_empty(),
            "{kind} {fields:?}: libvirt {} vmaudit {}",
            l.len(),
            o.len()
        );
        let (ls, os) = (shape(l[0]), shape(o[0]));
        assert_eq!(
            &os[..ls.len()],
            &ls[..],
            "{kind} {fields:?}\nlibvirt: {}\nvmaudit: {}",
            l[0].line,
            o[0].line
        );
        assert!(
            os[ls.len()..]
                .iter()
                .all(|(k, _)| k.starts_with("vmaudit-")),
            "only vmaudit's fields after libvirt's: {}",
            o[0].line
        );
        for k in [
            "virt", "resrc", "reason", "class", "category", "maj", "acl", "rdev", "path",
            "old-net", "hostname", "addr", "terminal", "res",
        ] {
            assert_eq!(l[0].raw(k), o[0].raw(k), "{k} of {kind} {fields:?}");
        }
    }
    // One open record per tap and one start per interface, as libvirt writes.
    for (reason, n) in [("open", 2), ("start", 2)] {
        assert_eq!(
            matching(
                &ours,
                "VIRT_RESOURCE",
                &[("resrc", "net"), ("reason", reason)]
            )
            .len(),
            n
        );
        assert_eq!(
            matching(
                &theirs,
                "VIRT_RESOURCE",
                &[("resrc", "net"), ("reason", reason)]
            )
            .len(),
            n
        );
    }
    // The same default device ACL, in the same order.
    let acl = |rs: &[Record]| -> Vec<String> {
        rs.iter()
            .filter(|r| r.get("resrc") == Some("cgroup"))
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.get("reason").unwrap(),
                    r.get("class").unwrap(),
                    r.get("path").or(r.get("category")).unwrap_or("-"),
                    r.get("acl").unwrap_or("-")
                )
            })
            .collect()
    };
    assert_eq!(acl(&ours), acl(&theirs));
}
