//! `vmaudit verify JOURNAL`: the claims of a journal and their verdicts.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

use super::{Status, Totals, Verdict};
use crate::{
    audit::{
        chain::{self, ChainReport, EVENT_TYPE},
        journal::Line,
    },
    exit,
};

/// One record of the journal and the verdicts on it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub ts_ns: u64,
    pub kind: String,
    pub text: String,
    /// The worst verdict it got (violated > unknown > unconfirmed > confirmed); None: no verdict.
    pub status: Option<Status>,
    /// Why the record is no claim (`monitor`: its sender is no manager); such a row expects no
    /// verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_a_claim: Option<String>,
    pub reasons: Vec<String>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// What no claim accounts for.
    pub unclaimed: Vec<Verdict>,
    pub totals: Totals,
    /// Records without any verdict (journals written with `--no-verify`, or cut short).
    pub unverified: u64,
    /// The hash chain: intact, or its first break (a violation of its own).
    pub chain: ChainReport,
    /// vmaudit's own events in the journal (repairs, reopenings, a dead run's recovery).
    pub events: Vec<EventRow>,
    /// Lines that are JSON but neither a record, a verdict nor an event (skipped).
    pub skipped: u64,
}

/// One of vmaudit's own journal events.
#[derive(Clone, Debug, Serialize)]
pub struct EventRow {
    pub line: usize,
    pub event: String,
    pub ts: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading journal {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a vmaudit journal: no line of it is a journal line")]
    NotJournal { path: std::path::PathBuf },
}

impl ReportError {
    pub fn exit_code(&self) -> u8 {
        exit::JOURNAL
    }
}

/// Reads a journal: records in order, verdicts joined to them by the record's `ts_ns`, the hash
/// chain checked. A torn last line is counted and skipped; a line that is not a journal line is
/// a break of the chain, not a failure to read.
pub fn build(path: &Path) -> Result<Report, ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let chain = chain::check(&text);
    let (lines, _torn) = chain::split(&text);
    let mut rows: Vec<Row> = Vec::new();
    let mut index: BTreeMap<u64, usize> = BTreeMap::new();
    let mut by_claim = crate::search::load::ClaimLines::default();
    let mut verdicts = Vec::new();
    let mut events = Vec::new();
    let mut skipped = 0;
    for (i, line) in lines.iter().enumerate() {
        // A line that is not JSON is a break of the chain (counted there), not a failure.
        if serde_json::from_str::<serde_json::Value>(line).is_err() {
            continue;
        }
        match Line::parse(line) {
            Ok(Line::Verdict(v)) => verdicts.push((i + 1, *v)),
            Ok(Line::Run(v)) if v["type"] == EVENT_TYPE => events.push(EventRow {
                line: i + 1,
                event: v["event"].as_str().unwrap_or("?").to_owned(),
                ts: v["ts"].as_str().unwrap_or_default().to_owned(),
            }),
            Ok(Line::Run(_)) => {}
            Ok(Line::Record(e)) => {
                index.insert(e.ts_ns, rows.len());
                by_claim.add(e.claim_id, i + 1, rows.len());
                rows.push(Row {
                    ts_ns: e.ts_ns,
                    not_a_claim: e.extra.get("vmaudit-not-a-claim").cloned(),
                    kind: e.kind,
                    text: e.text,
                    status: None,
                    reasons: Vec::new(),
                });
            }
            // JSON that is no journal line: skipped, and counted.
            Err(_) => skipped += 1,
        }
    }
    if rows.is_empty() && verdicts.is_empty() && events.is_empty() && chain.lines > 0 {
        return Err(ReportError::NotJournal {
            path: path.to_owned(),
        });
    }
    let mut totals = Totals::default();
    let mut unclaimed = Vec::new();
    for (line, v) in verdicts {
        totals.add(v.status);
        let by_id = by_claim.before(v.claim.id, line);
        match by_id.or_else(|| {
            index
                .get(&v.claim.record_ts_ns)
                .copied()
                .filter(|_| v.claim.record_ts_ns != 0)
        }) {
            Some(i) => {
                let row = &mut rows[i];
                if row
                    .status
                    .is_none_or(|s| v.status.severity() > s.severity())
                {
                    row.status = Some(v.status);
                }
                row.reasons.push(format!("{}: {}", v.status, v.reason));
            }
            None => unclaimed.push(v),
        }
    }
    let unverified = rows
        .iter()
        .filter(|r| r.status.is_none() && r.not_a_claim.is_none())
        .count() as u64;
    Ok(Report {
        rows,
        unclaimed,
        totals,
        unverified,
        chain,
        events,
        skipped,
    })
}

impl Report {
    /// 0 when every claim is confirmed; [`exit::VIOLATED`] when anything is violated or the
    /// chain is broken; [`exit::UNCONFIRMED`] when something is unconfirmed, unknown or
    /// unverified.
    pub fn exit_code(&self) -> u8 {
        if !self.chain.intact() {
            return exit::VIOLATED;
        }
        match self.totals.exit_code() {
            exit::OK if self.unverified > 0 => exit::UNCONFIRMED,
            code => code,
        }
    }

    /// The table for a terminal.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("{:<12} {:<14} CLAIM / REASON\n", "STATUS", "TYPE"));
        for r in &self.rows {
            let status = r.status.map_or("unverified", Status::as_str);
            let text: String = r
                .text
                .split(" exe=")
                .next()
                .unwrap_or_default()
                .chars()
                .take(110)
                .collect();
            s.push_str(&format!("{status:<12} {:<14} {text}\n", r.kind));
            for reason in &r.reasons {
                s.push_str(&format!("{:<27}   {reason}\n", ""));
            }
        }
        for v in &self.unclaimed {
            s.push_str(&format!(
                "{:<12} {:<14} {}\n{:<27}   {}\n",
                v.status.as_str(),
                "unclaimed",
                v.claim.text,
                "",
                v.reason
            ));
        }
        for e in &self.events {
            s.push_str(&format!(
                "{:<12} {:<14} {} (line {})\n",
                "event", "vmaudit", e.event, e.line
            ));
        }
        let c = &self.chain;
        match &c.first_break {
            None => s.push_str(&format!(
                "\nchain intact: {} lines chained{}{}\n",
                c.chained,
                if c.unchained > 0 {
                    format!(", {} written before the chain began", c.unchained)
                } else {
                    String::new()
                },
                if c.torn > 0 {
                    ", a torn last line skipped"
                } else {
                    ""
                }
            )),
            Some(b) => s.push_str(&format!(
                "\nCHAIN BROKEN ({} break(s)); first: {}\n",
                c.breaks, b.message
            )),
        }
        let t = &self.totals;
        s.push_str(&format!(
            "\n{} records; verdicts: {} confirmed, {} violated, {} unconfirmed, {} unknown; {} records unverified\n",
            self.rows.len(),
            t.confirmed,
            t.violated,
            t.unconfirmed,
            t.unknown,
            self.unverified
        ));
        s
    }
}
