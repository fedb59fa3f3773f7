//! A `vmaudit run` under test: its spec and journal in a temporary directory, its stdout (JSON
//! lines: journal entries and verdicts) and stderr collected as they come, waits on lines,
//! never on time, and the process killed and reaped whatever happens.

use std::{
    io::{BufRead as _, BufReader},
    ops::Deref,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{Receiver, channel},
    thread,
};

use serde_json::Value;

use crate::{Bins, ChildGuard, PATIENCE, TempDir};

pub struct VmRun {
    child: ChildGuard,
    stdout: Receiver<Value>,
    stderr: Receiver<String>,
    /// stdout lines received so far.
    pub seen: Vec<Value>,
    err_seen: Vec<String>,
    emulator: Option<u32>,
    pub journal: PathBuf,
    dir: TempDir,
}

/// A finished run's journal, kept (with its directory) until this is dropped.
pub struct Kept {
    pub journal: PathBuf,
    _dir: TempDir,
}

impl Deref for Kept {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.journal
    }
}

impl Kept {
    /// The run's directory, for a run after it ([`VmRun::start_in`]).
    pub fn into_dir(self) -> TempDir {
        self._dir
    }

    /// Every journal line (records and verdicts).
    pub fn lines(&self) -> Vec<Value> {
        journal_lines(&self.journal)
    }
}

/// Every line of a journal.
pub fn journal_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}")))
        .collect()
}

impl VmRun {
    /// `vmaudit run --audit journal` of the spec `name = NAME`, `uuid = UUID`, then `body`,
    /// with extra `flags`.
    pub fn start(bins: &Bins, name: &str, uuid: &str, body: &str, flags: &[&str]) -> Self {
        Self::start_in(bins, TempDir::new(name), name, uuid, body, flags)
    }

    /// [`VmRun::start`] in `dir` (whose journal, if one is there, is appended to): a VM run
    /// again after an earlier run of it ended or died.
    pub fn start_in(
        bins: &Bins,
        dir: TempDir,
        name: &str,
        uuid: &str,
        body: &str,
        flags: &[&str],
    ) -> Self {
        let spec = dir.0.join("vm.toml");
        std::fs::write(
            &spec,
            format!("name = \"{name}\"\nuuid = \"{uuid}\"\n{body}"),
        )
        .expect("write spec");
        let journal = dir.0.join("journal.jsonl");
        let mut child = Command::new(&bins.vmaudit)
            .arg("run")
            .arg(&spec)
            .args(["--audit", "journal", "--journal"])
            .arg(&journal)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmaudit run");
        let (tx, stdout) = channel();
        let out = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str::<Value>(&l)
                    .unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let (etx, stderr) = channel();
        let err = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[vmaudit run] {l}");
                if etx.send(l).is_err() {
                    return;
                }
            }
        });
        Self {
            child: ChildGuard(child),
            stdout,
            stderr,
            seen: Vec::new(),
            err_seen: Vec::new(),
            emulator: None,
            journal,
            dir,
        }
    }

    /// vmaudit's own pid.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The emulator's pid, from `VM running, emulator pid PID` (waited for once).
    pub fn emulator_pid(&mut self) -> u32 {
        if let Some(p) = self.emulator {
            return p;
        }
        let l = self.stderr_line("`running`", |l| l.contains("emulator pid "));
        let p = l
            .split("emulator pid ")
            .nth(1)
            .expect("pid")
            .trim()
            .parse()
            .expect("numeric pid");
        self.emulator = Some(p);
        p
    }

    /// Waits for a stderr line (vmaudit's or the emulator's) matching `pred`.
    pub fn stderr_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.err_seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        loop {
            let l = self
                .stderr
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("no {what} line ({e:?})"));
            self.err_seen.push(l.clone());
            if pred(&l) {
                return l;
            }
        }
    }

    /// Waits for a stdout line matching `pred`.
    pub fn json(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            match self.stdout.recv_timeout(PATIENCE) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(e) => panic!("no {what} ({e:?}); seen: {:#?}", self.seen),
            }
        }
    }

    /// The journal as it is now.
    pub fn journal_lines(&self) -> Vec<Value> {
        journal_lines(&self.journal)
    }

    /// SIGTERM, then the exit code and the journal.
    pub fn stop(self) -> (i32, Kept) {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        self.wait()
    }

    /// Waits for vmaudit to end by itself.
    pub fn wait(mut self) -> (i32, Kept) {
        let code = self
            .child
            .0
            .wait()
            .expect("wait vmaudit")
            .code()
            .unwrap_or(-1);
        (
            code,
            Kept {
                journal: self.journal.clone(),
                _dir: self.dir,
            },
        )
    }
}
