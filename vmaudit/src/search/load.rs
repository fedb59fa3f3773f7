//! Journals and audit.log files read into [`Event`]s: verdicts joined to their records (by the
//! record's `ts_ns`), findings no record accounts for as events of their own, and each VM
//! run's emulator pid given to every record of that run.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{Event, libvirt_part};
use crate::{
    audit::{
        chain,
        journal::Line,
        parse::{LogScan, Parsed, Stamp, parse_text},
        virt::VirtRecord,
    },
    verify::Verdict,
};

/// An input that cannot be read at all.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a vmaudit journal: line {line} is not a journal line")]
    NotJournal {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not an audit.log: no line of it is an audit record")]
    NotAuditLog { path: PathBuf },
}

/// What was read, and what was skipped (one line per input for a person).
#[derive(Debug, Default)]
pub struct Loaded {
    pub events: Vec<Event>,
    /// `FILE: what was skipped`, for inputs where something was.
    pub notes: Vec<String>,
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })
}

/// The extra `vmaudit-*` fields and the emulator fds they name.
fn vmaudit_fields(p: &Parsed) -> (BTreeMap<String, String>, Vec<i32>) {
    let extra: BTreeMap<String, String> = p
        .fields
        .iter()
        .filter(|(k, _)| k.starts_with("vmaudit-"))
        .filter_map(|(k, v)| Some((k.clone(), v.text()?.to_owned())))
        .collect();
    let fds = extra
        .get("vmaudit-emulator-fds")
        .or_else(|| extra.get("vmaudit-emulator-fd"))
        .map(|l| l.split(',').filter_map(|f| f.trim().parse().ok()).collect())
        .unwrap_or_default();
    (extra, fds)
}

fn event_of(p: &Parsed, source: String, ts_ns: u64, text: &str, journal: bool) -> Event {
    let (extra, emulator_fds) = vmaudit_fields(p);
    let rec = VirtRecord::of(p);
    Event {
        source,
        ts: vmaudit_core::time::rfc3339_ms(ts_ns),
        ts_ns,
        kind: p.kind.clone(),
        emulator_pid: rec
            .vm_pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0),
        rec,
        emulator_fds,
        text: libvirt_part(text).to_owned(),
        extra,
        verdicts: Vec::new(),
        from_journal: journal,
    }
}

/// The record lines of a journal that name their claim (`monitor` writes them): a verdict
/// belongs to the last record with its claim id before it (ids start again at each run).
#[derive(Default)]
pub struct ClaimLines(BTreeMap<u64, Vec<(usize, usize)>>);

impl ClaimLines {
    /// Record line `line`, at index `at`, made claim `id`.
    pub fn add(&mut self, id: Option<u64>, line: usize, at: usize) {
        if let Some(id) = id {
            self.0.entry(id).or_default().push((line, at));
        }
    }

    /// The index of the last record of claim `id` before line `line`.
    pub fn before(&self, id: u64, line: usize) -> Option<usize> {
        self.0
            .get(&id)?
            .iter()
            .rev()
            .find(|(l, _)| *l < line)
            .map(|(_, at)| *at)
    }
}

/// A journal of `vmaudit run` or `vmaudit monitor`: records and verdicts. A last line cut short
/// (no newline) is a write that never completed: it is counted in a note and left out, as
/// `vmaudit verify` does. Lines about the run (vmaudit's own events, summaries) are not records
/// and are left out; any other line that is not a journal line makes the file unreadable as a
/// journal.
pub fn journal(path: &Path) -> Result<Loaded, LoadError> {
    let text = read(path)?;
    let (lines, torn) = chain::split(&text);
    let name = path.display();
    let mut events: Vec<Event> = Vec::new();
    let mut by_ts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut by_claim = ClaimLines::default();
    let mut verdicts: Vec<(usize, Verdict)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |source| LoadError::NotJournal {
            path: path.to_owned(),
            line: i + 1,
            source,
        };
        let entry = match Line::parse(line).map_err(bad)? {
            Line::Verdict(v) => {
                verdicts.push((i + 1, *v));
                continue;
            }
            Line::Run(_) => continue,
            Line::Record(entry) => entry,
        };
        // The text is the exact audit text: the same parser as for audit.log reads it.
        let fields = parse_text(&entry.text).unwrap_or_default();
        let p = Parsed {
            kind: entry.kind.clone(),
            stamp: Stamp {
                secs: entry.ts_ns / 1_000_000_000,
                msec: (entry.ts_ns / 1_000_000 % 1000) as u16,
                serial: 0,
            },
            sender: Vec::new(),
            fields,
            text: entry.text.clone(),
        };
        by_ts.insert(entry.ts_ns, events.len());
        by_claim.add(entry.claim_id, i + 1, events.len());
        events.push(event_of(
            &p,
            format!("{name}:{}", i + 1),
            entry.ts_ns,
            &entry.text,
            true,
        ));
    }
    for (line, v) in verdicts {
        let by_id = by_claim.before(v.claim.id, line);
        match by_id.or_else(|| {
            by_ts
                .get(&v.claim.record_ts_ns)
                .copied()
                .filter(|_| v.claim.record_ts_ns != 0)
        }) {
            Some(i) => events[i].verdicts.push(v),
            None => events.push(Event {
                source: format!("{name}:{line}"),
                ts: v.ts.clone(),
                ts_ns: v.ts_ns,
                kind: "unclaimed".to_owned(),
                rec: VirtRecord {
                    mac: v.claim.mac.clone(),
                    ..VirtRecord::default()
                },
                emulator_pid: None,
                emulator_fds: v.claim.fd.into_iter().collect(),
                text: v.claim.text.clone(),
                extra: BTreeMap::new(),
                verdicts: vec![v],
                from_journal: true,
            }),
        }
    }
    events.sort_by_key(|e| e.ts_ns);
    give_emulator_pids(&mut events);
    Ok(Loaded {
        events,
        notes: torn
            .map(|t| {
                format!(
                    "{name}: 1 torn last line skipped ({} bytes: a write cut short)",
                    t.len()
                )
            })
            .into_iter()
            .collect(),
    })
}

/// An audit.log (auditd's format, raw or enriched, any mix of types): the VIRT_* records;
/// other types and lines that are not records are counted in a note. A file with lines but
/// not one audit record is refused.
pub fn audit_log(path: &Path) -> Result<Loaded, LoadError> {
    let text = read(path)?;
    let scan = LogScan::scan(&text);
    if scan.records.is_empty() && scan.other_types.is_empty() && !scan.errors.is_empty() {
        return Err(LoadError::NotAuditLog {
            path: path.to_owned(),
        });
    }
    let lines: Vec<&str> = text.lines().collect();
    let name = path.display();
    let mut events: Vec<Event> = scan
        .records
        .iter()
        .map(|(n, p)| {
            let line = lines.get(n - 1).copied().unwrap_or_default();
            let msg = line
                .split('\u{1d}')
                .next()
                .and_then(|l| l.split_once(" msg='"))
                .map_or("", |(_, t)| t.trim_end().trim_end_matches('\''));
            event_of(p, format!("{name}:{n}"), p.unix_ns(), msg, false)
        })
        .collect();
    events.sort_by_key(|e| e.ts_ns);
    give_emulator_pids(&mut events);
    let skipped = !scan.errors.is_empty() || !scan.other_types.is_empty();
    Ok(Loaded {
        events,
        notes: if skipped {
            vec![format!("{name}: {}", scan.summary())]
        } else {
            Vec::new()
        },
    })
}

/// Each VM run's emulator pid (its start record's `vm-pid`) on every record of that run: from
/// the run's first record to its stop record, per VM.
fn give_emulator_pids(events: &mut [Event]) {
    let key = |e: &Event| e.rec.uuid.clone().or_else(|| e.rec.vm.clone());
    let mut open: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let finish = |events: &mut [Event], run: Vec<usize>| {
        let pid = run.iter().find_map(|&i| {
            let e = &events[i];
            (e.is_op("start"))
                .then_some(e.emulator_pid)
                .flatten()
                .or_else(|| {
                    e.extra
                        .get("vmaudit-vm-pid")
                        .and_then(|p| p.parse::<u32>().ok())
                })
        });
        if let Some(pid) = pid {
            for i in run {
                events[i].emulator_pid.get_or_insert(pid);
            }
        }
    };
    for i in 0..events.len() {
        let Some(k) = key(&events[i]) else { continue };
        open.entry(k.clone()).or_default().push(i);
        if events[i].is_op("stop") {
            let run = open.remove(&k).unwrap_or_default();
            finish(events, run);
        }
    }
    for (_, run) in std::mem::take(&mut open) {
        finish(events, run);
    }
    // A finding no record accounts for: the pid the kernel names.
    for e in events.iter_mut().filter(|e| e.emulator_pid.is_none()) {
        e.emulator_pid = e
            .verdicts
            .iter()
            .flat_map(|v| &v.evidence)
            .map(|ev| ev.pid)
            .find(|p| *p > 0);
    }
}

/// Every input, merged in time order.
pub fn all(journals: &[PathBuf], audit_logs: &[PathBuf]) -> Result<Loaded, LoadError> {
    let mut out = Loaded::default();
    for j in journals {
        let l = journal(j)?;
        out.events.extend(l.events);
        out.notes.extend(l.notes);
    }
    for a in audit_logs {
        let l = audit_log(a)?;
        out.events.extend(l.events);
        out.notes.extend(l.notes);
    }
    out.events.sort_by_key(|e| e.ts_ns);
    Ok(out)
}
