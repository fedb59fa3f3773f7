//! The journal under a running VM: rotated (moved and replaced, as logrotate does it) and
//! deleted, it is noticed before the next write, reopened by name and said so; a torn last line
//! is cut back by the next run and the repair journaled; every file keeps an intact chain.

use std::path::Path;

use serde_json::Value;
use vmaudit_tests::{Bins, bins, require_root, run_vmaudit, vmrun::VmRun};

const UUID: &str = "6b5a4c3d-2e1f-4a0b-9c8d-7e6f5a4b3c2d";

fn body(bins: &Bins) -> String {
    format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--qmp-fd\", \"{{qmp-fd}}\"]\n\
         [[interface]]\nmac = \"52:54:00:00:d0:01\"\nifname = \"vmjr-t\"\n",
        bins.fake_emulator.display()
    )
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `verify --json`: the exit code and the chain.
fn chain(bins: &Bins, path: &Path) -> (i32, Value) {
    let (code, out, err) = run_vmaudit(bins, &["verify", path.to_str().unwrap(), "--json"]);
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
    (code, r["chain"].clone())
}

fn attach(bins: &Bins, vm: &str, mac: &str) {
    let (code, _, err) = run_vmaudit(bins, &["attach-net", vm, "--mac", mac]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_journal_rotated_or_deleted_under_a_run_is_reopened_and_said() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-jr1";
    let mut vm = VmRun::start(&bins, name, UUID, &body(&bins), &[]);
    vm.emulator_pid();
    let journal = vm.journal.clone();
    let rotated = journal.with_extension("jsonl.1");
    // Rotated as logrotate does it: moved aside, a new file created in its place.
    std::fs::rename(&journal, &rotated).unwrap();
    std::fs::write(&journal, "").unwrap();
    attach(&bins, name, "52:54:00:00:d0:02");
    let new = lines(&journal);
    assert_eq!(new[0]["type"], "vmaudit", "{:#}", new[0]);
    assert_eq!(new[0]["event"], "journal-reopened");
    assert_eq!(new[0]["reason"], "replaced");
    let old = lines(&rotated);
    assert_eq!(
        new[0]["previous_seq"],
        old.last().unwrap()["seq"],
        "the new file goes on from the old one's last line"
    );
    assert!(
        new.iter().any(|v| v["reason"] == "attach"),
        "the attach went to the new file"
    );
    // Deleted.
    std::fs::remove_file(&journal).unwrap();
    attach(&bins, name, "52:54:00:00:d0:03");
    let after = lines(&journal);
    assert_eq!(after[0]["event"], "journal-reopened");
    assert_eq!(after[0]["reason"], "gone");
    let (code, kept) = vm.stop();
    assert!(matches!(code, 0 | 8), "{code}");
    for f in [&rotated, &kept.journal] {
        let (vcode, c) = chain(&bins, f);
        assert!(matches!(vcode, 0 | 8), "{}: {vcode} {c:#}", f.display());
        assert_eq!(c["breaks"], 0, "{}: {c:#}", f.display());
    }
}

#[test]
fn a_torn_last_line_is_cut_back_by_the_next_run_and_the_repair_journaled() {
    require_root();
    let bins = bins!();
    let name = "vmaudit-jr2";
    let mut vm = VmRun::start(&bins, name, UUID, &body(&bins), &[]);
    vm.emulator_pid();
    let (code, kept) = vm.stop();
    assert!(matches!(code, 0 | 8), "{code}");
    // A write cut short (a crash, a full disk): half a line, no newline.
    let torn = b"{\"ts\":\"2026-01-01T00:00:00.000Z\",\"ts_ns\":17";
    std::fs::OpenOptions::new()
        .append(true)
        .open(&kept.journal)
        .and_then(|mut f| std::io::Write::write_all(&mut f, torn))
        .unwrap();
    let (vcode, c) = chain(&bins, &kept.journal);
    assert!(matches!(vcode, 0 | 8), "a torn line is no failure: {vcode}");
    assert_eq!(
        (c["torn"].as_u64(), c["breaks"].as_u64()),
        (Some(1), Some(0))
    );
    let journal = kept.journal.clone();
    let mut again = VmRun::start_in(&bins, kept.into_dir(), name, UUID, &body(&bins), &[]);
    again.emulator_pid();
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(
        !text.contains("\"ts_ns\":17{"),
        "nothing glued onto the torn line"
    );
    let repaired = lines(&journal)
        .into_iter()
        .find(|v| v["event"] == "journal-repaired")
        .expect("the repair is journaled");
    assert_eq!(repaired["cut_bytes"], torn.len());
    let (code, kept) = again.stop();
    assert!(matches!(code, 0 | 8), "{code}");
    let (vcode, c) = chain(&bins, &kept.journal);
    assert!(matches!(vcode, 0 | 8), "{vcode}");
    assert_eq!(
        (c["torn"].as_u64(), c["breaks"].as_u64()),
        (Some(0), Some(0)),
        "{c:#}"
    );
}
