//! The VM device cgroup against the real kernel: cgroup v2 (vmaudit's device program, its
//! decisions) and the cgroup v1 devices controller. Each test leaves nothing behind: its
//! cgroups are removed, its programs detached, its processes killed, even when it fails.

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _, unix::process::CommandExt as _},
    path::Path,
    time::Instant,
};

use vmaudit::cgroup::{
    Acl, CgroupError, CgroupVersion, Decision, DecisionDev, DevKind, DeviceRule, MatchedEntry,
    PROGRAM, Rule, RuleOutcome, VmCgroup, join_in_child,
};
use vmaudit_tests::{
    CgroupDirGuard, Helper, Hierarchies, PATIENCE, bins, proc_cgroup, programs_named_gone,
    require_root,
};

const EPERM: &str = "Operation not permitted";

fn assert_all_ok(outcomes: &[RuleOutcome]) {
    for (rule, result) in outcomes {
        if let Err(e) = result {
            panic!("rule {rule}: {e}");
        }
    }
}

/// Waits for the decision on `major:minor` by `tgid`, draining the stream into `seen`.
fn wait_decision(
    cg: &mut VmCgroup,
    seen: &mut Vec<Decision>,
    tgid: u32,
    dev: (u32, u32),
) -> Decision {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(i) = seen
            .iter()
            .position(|d| d.tgid == tgid && (d.major, d.minor) == dev)
        {
            return seen.remove(i);
        }
        assert!(
            Instant::now() < deadline,
            "no decision on {}:{} by {tgid}; seen {seen:#?}",
            dev.0,
            dev.1
        );
        cg.decisions()
            .expect("v2 has a decision stream")
            .drain_into(seen);
        std::thread::yield_now();
    }
}

/// After a test: the cgroup directory is gone and no device program is loaded.
fn assert_nothing_left(dir: &Path) {
    assert!(!dir.exists(), "{} left behind", dir.display());
    if let Err(n) = programs_named_gone(PROGRAM) {
        panic!("{n} {} program(s) still loaded", PROGRAM);
    }
}

#[test]
fn v2_program_decides_by_libvirts_map_and_reports_every_decision() {
    require_root();
    let h = Hierarchies::get();
    let root = h.v2.clone();
    let parent = CgroupDirGuard::new(&root, "v2");
    let bins = bins!();
    let mut rules = Rule::defaults();
    let (mut cg, outcomes) = VmCgroup::create_v2(&parent.dir, "vm", &rules).expect("create_v2");
    assert_all_ok(&outcomes);
    assert_eq!(outcomes.len(), rules.len());
    let dir = cg.path().to_owned();
    assert_eq!(cg.version(), CgroupVersion::V2);
    assert_eq!(cg.cgroup_id(), Some(std::fs::metadata(&dir).unwrap().ino()));
    assert_eq!(cg.kernel_rules().unwrap(), DeviceRule::effective(&rules));
    assert_eq!(
        cg.kernel_rules().unwrap().last().unwrap().to_string(),
        "c 136:* rw"
    );

    // The helper joins the cgroup before exec (as the emulator will).
    let procs = cg.procs_fd().try_clone_to_owned().unwrap();
    let mut h = Helper::spawn_with(&bins, move |cmd| {
        // SAFETY: join_in_child is async-signal-safe (one write(2), no allocation).
        unsafe { cmd.pre_exec(move || join_in_child(procs.as_fd())) };
    });
    let pid = h.pid();
    let rel = dir.strip_prefix(&root).unwrap();
    assert_eq!(
        proc_cgroup(pid, "").as_deref(),
        Some(format!("/{}", rel.display()).as_str())
    );
    let id = cg.cgroup_id();
    let mut seen = Vec::new();

    // Allowed: /dev/null (1:3) and /dev/zero (1:5), opened O_RDWR.
    h.fd("open /dev/null");
    let d = wait_decision(&mut cg, &mut seen, pid, (1, 3));
    assert_eq!(
        (d.allowed, d.access, d.dev, d.matched, Some(d.cgroup_id)),
        (
            true,
            Acl::RW,
            DecisionDev::Char,
            Some(MatchedEntry::Exact),
            id
        )
    );
    assert!(d.ts_ns > 0);
    h.fd("open /dev/zero");
    let d = wait_decision(&mut cg, &mut seen, pid, (1, 5));
    assert_eq!((d.allowed, d.access), (true, Acl::RW));

    // Denied: /dev/net/tun (10:200) is not in the default ACL.
    let err = h.try_cmd("open /dev/net/tun").unwrap_err();
    assert!(err.contains(EPERM), "{err}");
    let d = wait_decision(&mut cg, &mut seen, pid, (10, 200));
    assert_eq!(
        (d.allowed, d.access, d.dev, d.matched, Some(d.cgroup_id)),
        (false, Acl::RW, DecisionDev::Char, None, id)
    );

    // A major rule with read only: a read-only open passes by (10, *), a read-write one not.
    let misc = Rule::major(DevKind::Char, 10, "misc", Acl::READ).unwrap();
    cg.apply_rule(&misc).unwrap();
    rules.push(misc);
    h.fd("open_ro /dev/net/tun");
    let d = wait_decision(&mut cg, &mut seen, pid, (10, 200));
    assert_eq!(
        (d.allowed, d.access, d.matched),
        (true, Acl::READ, Some(MatchedEntry::Major))
    );
    let err = h.try_cmd("open /dev/net/tun").unwrap_err();
    assert!(err.contains(EPERM), "{err}");
    assert!(!wait_decision(&mut cg, &mut seen, pid, (10, 200)).allowed);

    // An extra path rule for /dev/net/tun: the open now succeeds.
    let tun = Rule::path("/dev/net/tun", Acl::RW).unwrap();
    assert_eq!(tun.to_string(), "c 10:200 rw");
    let added = cg.apply(std::slice::from_ref(&tun));
    assert_all_ok(&added);
    rules.push(tun);
    h.fd("open /dev/net/tun");
    let d = wait_decision(&mut cg, &mut seen, pid, (10, 200));
    assert_eq!((d.allowed, d.matched), (true, Some(MatchedEntry::Exact)));
    assert_eq!(cg.kernel_rules().unwrap(), DeviceRule::effective(&rules));

    // One entry per major:minor (libvirt's map): a block rule on 10:200 fails on its own.
    let blk = Rule::path_rdev("/dev/fake-blk", DevKind::Block, 10, 200, Acl::READ).unwrap();
    let out = cg.apply(&[blk]);
    assert!(
        matches!(out[0].1, Err(CgroupError::KeyConflict { .. })),
        "{:?}",
        out[0].1
    );
    assert_eq!(cg.kernel_rules().unwrap(), DeviceRule::effective(&rules));

    // A process moved in after it started is confined as well.
    let mut h2 = Helper::spawn(&bins);
    cg.add_process(h2.pid()).unwrap();
    h2.fd("open /dev/full");
    let d = wait_decision(&mut cg, &mut seen, h2.pid(), (1, 7));
    assert!(d.allowed);

    // Deny all again clears the map: even /dev/null is refused.
    cg.apply_rule(&Rule::DenyAll).unwrap();
    assert_eq!(cg.kernel_rules().unwrap(), []);
    let err = h.try_cmd("open /dev/null").unwrap_err();
    assert!(err.contains(EPERM), "{err}");
    assert!(!wait_decision(&mut cg, &mut seen, pid, (1, 3)).allowed);
    assert_eq!(cg.lost_decisions().unwrap(), 0);

    // Removal waits for the processes: refused while they live, then done.
    let busy = cg.remove().unwrap_err();
    assert!(matches!(busy, CgroupError::Busy { .. }), "{busy:?}");
    assert!(dir.exists());
    h.exit();
    h2.exit();
    cg.remove().unwrap();
    assert!(!dir.exists());
    assert!(matches!(
        cg.kernel_rules(),
        Err(CgroupError::Removed { .. })
    ));
    drop(cg);
    assert_nothing_left(&dir);
}

#[test]
fn v2_drop_removes_the_cgroup_and_detaches_the_program() {
    require_root();
    let h = Hierarchies::get();
    let root = h.v2.clone();
    let parent = CgroupDirGuard::new(&root, "v2drop");
    let (cg, outcomes) = VmCgroup::create_v2(&parent.dir, "vm", &Rule::defaults()).unwrap();
    assert_all_ok(&outcomes);
    let dir = cg.path().to_owned();
    assert!(
        vmaudit_tests::loaded_vmaudit_programs()
            .iter()
            .any(|n| n == PROGRAM),
        "the program is loaded while the cgroup lives"
    );
    let again = VmCgroup::create_v2(&parent.dir, "vm", &[]).err().unwrap();
    assert!(matches!(again, CgroupError::Exists { .. }), "{again:?}");
    drop(cg);
    assert_nothing_left(&dir);
}

#[test]
fn v1_devices_controller_round_trips_and_confines() {
    require_root();
    let h = Hierarchies::get();
    let root = h.v1_devices.clone();
    let parent = CgroupDirGuard::new(&root, "v1");
    let bins = bins!();
    let mut rules = Rule::defaults();
    let (mut cg, outcomes) = VmCgroup::create_v1(&parent.dir, "vm", &rules).expect("create_v1");
    assert_all_ok(&outcomes);
    let dir = cg.path().to_owned();
    assert_eq!(cg.version(), CgroupVersion::V1);
    assert_eq!(cg.cgroup_id(), None);
    assert!(cg.decisions().is_none(), "v1 reports no decisions");
    // devices.list round trip.
    let listed = cg.kernel_rules().unwrap();
    assert_eq!(listed, DeviceRule::effective(&rules));
    assert!(listed.iter().any(|r| r.to_string() == "c 136:* rw"));
    assert!(listed.iter().any(|r| r.to_string() == "c 1:3 rw"));

    let mut h = Helper::spawn(&bins);
    cg.add_process(h.pid()).unwrap();
    let rel = dir.strip_prefix(&root).unwrap();
    assert_eq!(
        proc_cgroup(h.pid(), "devices").as_deref(),
        Some(format!("/{}", rel.display()).as_str())
    );
    h.fd("open /dev/null");
    let err = h.try_cmd("open /dev/net/tun").unwrap_err();
    assert!(err.contains(EPERM), "{err}");

    let tun = Rule::path("/dev/net/tun", Acl::RW).unwrap();
    let out = cg.apply(std::slice::from_ref(&tun));
    assert_all_ok(&out);
    rules.push(tun);
    h.fd("open /dev/net/tun");
    assert_eq!(cg.kernel_rules().unwrap(), DeviceRule::effective(&rules));

    let busy = cg.remove().unwrap_err();
    assert!(matches!(busy, CgroupError::Busy { .. }), "{busy:?}");
    h.exit();
    drop(cg);
    assert!(!dir.exists(), "{} left behind", dir.display());
}
