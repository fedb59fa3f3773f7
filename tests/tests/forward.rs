//! `vmaudit forward` to Debian's rsyslog: the journal of a real `vmaudit run` (on the stand-in
//! emulator, which closes its passed tap fd on purpose for a violation) arrives over UDP, TCP
//! and a unix datagram socket as RFC 5424 messages, each journal line exactly once, across a
//! rotation of the journal; a forwarder restarted with its state resumes in the rotated file,
//! and over TCP waits for a receiver that is down.
//!
//! rsyslog runs in the foreground with a configuration of the test's own, and writes every
//! message it receives with its RFC 5424 template into a file, which the test reads back with
//! an RFC 5424 parser of its own. rsyslog says nothing when a message is written: the test
//! polls that file (with backoff, within [`PATIENCE`]) until every line has arrived.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use syslog_rfc5424::{SyslogMessage, SyslogSeverity, message::ProcId, parse_message};
use vmaudit_tests::{
    Bins, ChildGuard, PATIENCE, TempDir, Watch, bins, require_root, run_vmaudit, vmrun::VmRun,
};

const UUID_A: &str = "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e41";
const UUID_B: &str = "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e42";
const SD_ID: &str = "vmaudit@32473";

/// Debian's rsyslog listening on a free UDP and TCP port of 127.0.0.1 and on a unix datagram
/// socket, writing every message in RFC 5424 to `messages`; killed on drop.
struct Rsyslog {
    child: Option<ChildGuard>,
    dir: PathBuf,
    udp: u16,
    tcp: u16,
}

impl Rsyslog {
    fn start(dir: &Path) -> Self {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port")
            .port();
        let tcp = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free TCP port")
            .port();
        let d = dir.display();
        // The socket input parses RFC 5424 only with its special parser off (that parser
        // expects the traditional format).
        std::fs::write(
            dir.join("rsyslog.conf"),
            format!(
                "global(workDirectory=\"{d}\" maxMessageSize=\"64k\")\n\
                 module(load=\"imudp\")\n\
                 module(load=\"imtcp\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\")\n\
                 input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\")\n\
                 input(type=\"imuxsock\" Socket=\"{d}/log.sock\" UseSpecialParser=\"off\" ParseHostname=\"on\")\n\
                 action(type=\"omfile\" file=\"{d}/messages\" template=\"RSYSLOG_SyslogProtocol23Format\")\n"
            ),
        )
        .expect("write rsyslog.conf");
        let mut rs = Self {
            child: None,
            dir: dir.to_owned(),
            udp,
            tcp,
        };
        rs.restart();
        rs
    }

    /// Starts rsyslogd (again, on the same ports and files) and returns once it listens.
    fn restart(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("log.sock"));
        let mut child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rsyslogd (cargo xtask setup installs Debian's rsyslog)");
        let err = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[rsyslogd] {l}");
            }
        });
        self.child = Some(ChildGuard(child));
        // It says nothing when it is ready: its sockets in the kernel's tables say it.
        poll("rsyslogd listening", || {
            (listens("/proc/net/udp", self.udp, "07")
                && listens("/proc/net/tcp", self.tcp, "0A")
                && self.dir.join("log.sock").exists())
            .then_some(())
        });
    }

    /// Kills rsyslogd and waits for its end.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.0.kill().expect("kill rsyslogd");
            c.0.wait().expect("wait rsyslogd");
        }
    }

    fn addrs(&self) -> [String; 3] {
        [
            format!("udp://127.0.0.1:{}", self.udp),
            format!("tcp://127.0.0.1:{}", self.tcp),
            format!("unix://{}/log.sock", self.dir.display()),
        ]
    }

    /// Every whole message written so far.
    fn messages(&self) -> Vec<SyslogMessage> {
        let text = std::fs::read_to_string(self.dir.join("messages")).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| parse_message(l).unwrap_or_else(|e| panic!("not RFC 5424: {l:?}: {e}")))
            .collect()
    }

    /// Waits until the forwarders `from` (by pid) have delivered every line of `lines`, and
    /// returns their messages, one per line.
    fn arrived(&self, from: &[u32], lines: &[String]) -> Vec<SyslogMessage> {
        poll("every journal line at rsyslog", || {
            let got: Vec<SyslogMessage> = self
                .messages()
                .into_iter()
                .filter(|m| matches!(m.procid, Some(ProcId::PID(p)) if from.contains(&(p as u32))))
                .collect();
            (got.len() >= lines.len()).then_some(got)
        })
    }
}

/// Whether a socket of `table` (/proc/net/udp or tcp) is bound to 127.0.0.1:`port` in state
/// `st` (07 unconnected UDP, 0A listening TCP).
fn listens(table: &str, port: u16, st: &str) -> bool {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string(table)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .any(|f| f.len() > 3 && f[1] == local && f[3] == st)
}

/// Asks until `ask` answers, with backoff; fails after [`PATIENCE`].
fn poll<T>(what: &str, mut ask: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    let mut wait = Duration::from_millis(10);
    loop {
        if let Some(t) = ask() {
            return t;
        }
        assert!(Instant::now() < deadline, "no {what} within {PATIENCE:?}");
        thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// The journal's lines as written.
fn raw_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Each journal line arrived exactly once as its own MSG, with the severity, MSGID and
/// structured data the line calls for.
fn check(messages: &[SyslogMessage], lines: &[String]) {
    let mut by_msg: BTreeMap<&str, Vec<&SyslogMessage>> = BTreeMap::new();
    for m in messages {
        by_msg.entry(m.msg.as_str()).or_default().push(m);
    }
    for line in lines {
        let got = by_msg.get(line.as_str()).map_or(0, Vec::len);
        assert_eq!(got, 1, "journal line received {got} times: {line}");
        check_one(by_msg[line.as_str()][0], line);
    }
    assert_eq!(
        messages.len(),
        lines.len(),
        "messages that are no journal line"
    );
}

fn check_one(m: &SyslogMessage, line: &str) {
    let v: Value = serde_json::from_str(&m.msg).expect("MSG is the JSON line");
    let param = |name: &str| m.sd.find_tuple(SD_ID, name).map(String::as_str);
    let text = |x: &Value| match x {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    assert_eq!(m.appname.as_deref(), Some("vmaudit"), "{line}");
    assert_eq!(m.msgid.as_deref(), v["type"].as_str(), "{line}");
    assert_eq!(
        m.facility,
        syslog_rfc5424::SyslogFacility::LOG_DAEMON,
        "{line}"
    );
    if v["type"] == "verdict" {
        let expected = match v["status"].as_str().unwrap() {
            "violated" => SyslogSeverity::SEV_ERR,
            "confirmed" => SyslogSeverity::SEV_INFO,
            _ => SyslogSeverity::SEV_WARNING,
        };
        assert_eq!(m.severity, expected, "{line}");
        assert_eq!(param("status"), v["status"].as_str(), "{line}");
        assert_eq!(param("kind"), v["claim"]["kind"].as_str(), "{line}");
        assert_eq!(
            param("claim_id"),
            Some(text(&v["claim"]["id"]).as_str()),
            "{line}"
        );
        if let Some(e) = v["evidence"].get(0) {
            assert_eq!(param("pid"), Some(text(&e["pid"]).as_str()), "{line}");
        }
        if v["claim"]["kind"] != "unclaimed" {
            assert!(
                param("vm").is_some_and(|n| n.starts_with("vmaudit-fwd")),
                "{line}"
            );
            assert!(
                param("uuid").is_some_and(|u| u.starts_with("7c1d2e3f")),
                "{line}"
            );
        }
    } else if v["type"] == "vmaudit" {
        // vmaudit's own events in the journal (a journal reopened after its rotation, ...).
        assert!(v["event"].is_string(), "{line}");
        assert_eq!(m.severity, SyslogSeverity::SEV_NOTICE, "{line}");
    } else {
        assert!(v.get("type_id").is_some(), "a record: {line}");
        let expected = if v["result"] == "failed" {
            SyslogSeverity::SEV_NOTICE
        } else {
            SyslogSeverity::SEV_INFO
        };
        assert_eq!(m.severity, expected, "{line}");
        for name in ["vm", "uuid", "result", "claim_id", "vm_pid"] {
            let want = v.get(name).map(text);
            assert_eq!(param(name), want.as_deref(), "{name}: {line}");
        }
    }
}

/// The `[emulator]` table of the stand-in emulator in `mode`, and one tap.
fn spec(bins: &Bins, mode: &str, ifname: &str) -> String {
    format!(
        "[emulator]\npath = \"{}\"\nargs = [\"--mode\", \"{mode}\"]\n\
         [[interface]]\nmac = \"52:54:00:00:5f:01\"\nifname = \"{ifname}\"\n",
        bins.fake_emulator.display()
    )
}

fn forwarder(bins: &Bins, journal: &Path, to: &str, more: &[&str]) -> Watch {
    let mut args = vec![journal.to_str().unwrap(), "--to", to];
    args.extend(more);
    Watch::start_sub(bins, "forward", &args, "vmaudit: forwarding ")
}

fn stopped(f: Watch) {
    let (code, _) = f.stop();
    assert_eq!(code, 0, "vmaudit forward ends with 0 on SIGTERM");
}

#[test]
fn a_run_journal_arrives_over_udp_tcp_and_a_unix_socket_across_a_rotation() {
    require_root();
    let bins = bins!();
    let logs = TempDir::new("vmaudit-fwd-rsyslog");
    let rs = Rsyslog::start(&logs.0);
    let dir = TempDir::new("vmaudit-fwd-live");
    let journal = dir.0.join("journal.jsonl");
    std::fs::write(&journal, "").unwrap();
    let fwds: Vec<Watch> = rs
        .addrs()
        .iter()
        .map(|to| forwarder(&bins, &journal, to, &[]))
        .collect();
    let pids: Vec<u32> = fwds.iter().map(Watch::pid).collect();

    // A VM whose emulator closes its passed tap fd at once: a violation.
    let mut vm = VmRun::start_in(
        &bins,
        dir,
        "vmaudit-fwd-a",
        UUID_A,
        &spec(&bins, "close-passed", "vmfwd-a0"),
        &[],
    );
    vm.json("a violated verdict", |v| {
        v["type"] == "verdict" && v["status"] == "violated"
    });
    let (code, kept) = vm.stop();
    assert_eq!(code, 7, "vmaudit run found the violation");
    let first = raw_lines(&journal);
    for pid in &pids {
        let got = rs.arrived(&[*pid], &first);
        check(&got, &first);
        let violated = got
            .iter()
            .find(|m| m.msg.contains("\"status\":\"violated\""))
            .expect("the violated verdict arrived");
        assert_eq!(violated.severity, SyslogSeverity::SEV_ERR);
    }

    // Rotated as logrotate does (moved, a new file at the path); a second VM writes the new one.
    std::fs::rename(&journal, journal.with_extension("jsonl.1")).unwrap();
    let mut vm = VmRun::start_in(
        &bins,
        kept.into_dir(),
        "vmaudit-fwd-b",
        UUID_B,
        &spec(&bins, "hold", "vmfwd-b0"),
        &[],
    );
    vm.json("a confirmed vm-start", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "vm-start" && v["status"] == "confirmed"
    });
    let (code, _kept) = vm.stop();
    assert_eq!(code, 0, "a clean run");
    let both: Vec<String> = first.iter().cloned().chain(raw_lines(&journal)).collect();
    assert!(both.len() > first.len() + 3, "the second run journaled");
    for pid in &pids {
        check(&rs.arrived(&[*pid], &both), &both);
    }
    for f in fwds {
        stopped(f);
    }
}

#[test]
fn a_restarted_forwarder_resumes_in_the_rotated_journal_and_waits_for_rsyslog_over_tcp() {
    require_root();
    let bins = bins!();
    let logs = TempDir::new("vmaudit-fwd-rsyslog2");
    let mut rs = Rsyslog::start(&logs.0);
    let tcp = rs.addrs()[1].clone();
    let dir = TempDir::new("vmaudit-fwd-state");
    let journal = dir.0.join("journal.jsonl");
    let rotated = journal.with_extension("jsonl.1");
    let state = logs.0.join("forward.state");
    std::fs::write(&journal, "").unwrap();
    let state_arg = ["--state", state.to_str().unwrap()];
    let first = forwarder(&bins, &journal, &tcp, &state_arg);

    let mut vm = VmRun::start_in(
        &bins,
        dir,
        "vmaudit-fwd-c",
        UUID_A,
        &spec(&bins, "hold", "vmfwd-c0"),
        &[],
    );
    vm.json("a confirmed net-start", |v| {
        v["type"] == "verdict" && v["claim"]["kind"] == "net-start" && v["status"] == "confirmed"
    });
    // The forwarder is stopped while the VM runs, and the journal rotated: the VM's last lines
    // go to the moved file (its writer has not reopened), the next VM's to a new one.
    let first_pid = first.pid();
    stopped(first);
    std::fs::rename(&journal, &rotated).unwrap();
    let (code, kept) = vm.stop();
    assert_eq!(code, 0);
    // The receiver goes down too.
    rs.stop();
    let mut vm = VmRun::start_in(
        &bins,
        kept.into_dir(),
        "vmaudit-fwd-d",
        UUID_B,
        &spec(&bins, "close-passed", "vmfwd-d0"),
        &[],
    );
    vm.json("a violated verdict", |v| {
        v["type"] == "verdict" && v["status"] == "violated"
    });
    let (code, _kept) = vm.stop();
    assert_eq!(code, 7);

    let second = forwarder(&bins, &journal, &tcp, &state_arg);
    let resumed = second.stderr_before_ready.join("\n");
    assert!(
        resumed.contains(&format!("resuming in {} (rotated)", rotated.display())),
        "{resumed}"
    );
    second.wait_stderr(|l| l.contains("trying again"));
    rs.restart();
    let all: Vec<String> = raw_lines(&rotated)
        .into_iter()
        .chain(raw_lines(&journal))
        .collect();
    let got = rs.arrived(&[first_pid, second.pid()], &all);
    check(&got, &all);
    stopped(second);
}

#[test]
fn a_bad_address_is_one_line_and_exit_22() {
    let bins = bins!();
    let dir = TempDir::new("vmaudit-fwd-bad");
    let journal = dir.0.join("journal.jsonl");
    std::fs::write(&journal, "").unwrap();
    for to in [
        "127.0.0.1:514",
        "udp://127.0.0.1",
        "tcp://no-such-host.invalid:514",
    ] {
        let (code, out, err) =
            run_vmaudit(&bins, &["forward", journal.to_str().unwrap(), "--to", to]);
        assert_eq!(code, 22, "{to}: {err}");
        assert_eq!(err.lines().count(), 1, "{to}: one line: {err}");
        assert!(err.contains(to), "{to}: names the address: {err}");
        assert!(out.is_empty());
    }
    let missing = dir.0.join("missing.jsonl");
    let (code, _, err) = run_vmaudit(
        &bins,
        &[
            "forward",
            missing.to_str().unwrap(),
            "--to",
            "udp://127.0.0.1:514",
        ],
    );
    assert_eq!(code, 11, "an unreadable journal: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
