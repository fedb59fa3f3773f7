//! What vmaudit says on stderr, as an operator's log sees it: under a service manager whose
//! journal reads stderr, each line carries its syslog priority (a violation is an error); the
//! ready line and the failure line print whatever the level; `-q` and `-v` set it.

use std::{fs, io::Write as _, process::Command};

use vmaudit_tests::{TempDir, Watch, bins, manager::record, require_root, run_vmaudit};

/// `vmaudit monitor` under `sh`, with `JOURNAL_STREAM` naming its stderr as systemd does for a
/// unit whose stderr is the journal.
#[test]
fn under_the_journal_a_violation_is_an_error_and_the_ready_line_a_notice() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("logs");
    let log = tmp.0.join("audit.log");
    fs::write(&log, "").unwrap();
    let me = std::process::id().to_string();
    let journal = tmp.0.join("j.jsonl");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec \"$0\" \"$@\"",
    ])
    .arg(&bins.vmaudit)
    .args(["monitor", "--manager", &me, "--journal"])
    .arg(&journal)
    .arg("--audit-log")
    .arg(&log)
    .args(["--deadline", "1s"]);
    let m = Watch::start_command(cmd, "<5>vmaudit: monitoring manager pid");
    // This process, a manager, says it started a VM whose emulator is pid 1: no process it
    // started, a violation.
    let mut serial = 0;
    let text = record(
        "VIRT_CONTROL",
        &mut serial,
        "op=start reason=booted vm=\"vmlog\" uuid=7e57c0de-0000-4000-8000-00000000f0a1 vm-pid=1",
    );
    fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let line = m.wait_stderr(|l| l.contains("VIOLATION"));
    assert!(
        line.starts_with("<3>vmaudit: VIOLATION: ") && line.contains("no process the manager"),
        "error priority, no other prefix: {line:?}"
    );
    let (code, _) = m.stop();
    assert_eq!(code, 7);
}

#[test]
fn the_ready_line_prints_at_any_level_and_the_failure_line_under_quiet() {
    require_root();
    let bins = bins!();
    let tmp = TempDir::new("logs-ready");
    fs::write(tmp.0.join("empty.log"), "").unwrap();
    let mut cmd = Command::new(&bins.vmaudit);
    cmd.env("RUST_LOG", "off")
        .env_remove("JOURNAL_STREAM")
        .args(["monitor", "--manager", &std::process::id().to_string()])
        .arg("--journal")
        .arg(tmp.0.join("j.jsonl"))
        .arg("--audit-log")
        .arg(tmp.0.join("empty.log"));
    let m = Watch::start_command(cmd, "monitoring manager pid");
    // Not under the journal: no priority before the line; and nothing else at level off.
    assert_eq!(
        m.stderr_before_ready,
        [format!(
            "vmaudit: monitoring manager pid {}",
            std::process::id()
        )]
    );
    let (code, _) = m.stop();
    assert_eq!(code, 0);

    // The failure line prints under -q, and says it is an error.
    let (code, out, err) = run_vmaudit(&bins, &["-q", "fds", "--pid", "999999999"]);
    assert_eq!(code, 3, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err, "vmaudit: error: no such process: 999999999\n");
    // -v and -q together are a malformed command line.
    let (code, _, err) = run_vmaudit(&bins, &["-q", "-v", "fds", "--pid", "1"]);
    assert_eq!(code, 2, "{err}");
}
