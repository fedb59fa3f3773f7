//! `vmaudit verify JOURNAL`: the claims of a journal and their verdicts.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

use super::{Status, Totals, Verdict};
use crate::{audit::journal::Line, exit};

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
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading journal {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path}, line {line}: not a journal line")]
    Parse {
        path: std::path::PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a journal: records in order, verdicts joined to them by the record's `ts_ns`.
pub fn build(path: &Path) -> Result<Report, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut rows: Vec<Row> = Vec::new();
    let mut index: BTreeMap<u64, usize> = BTreeMap::new();
    let mut by_claim = crate::search::load::ClaimLines::default();
    let mut verdicts = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed = Line::parse(line).map_err(|source| ReportError::Parse {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        match parsed {
            Line::Verdict(v) => verdicts.push((i + 1, *v)),
            Line::Run(_) => {}
            Line::Record(e) => {
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
        }
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
    })
}

impl Report {
    /// 0 when every claim is confirmed; [`exit::VIOLATED`] when anything is violated;
    /// [`exit::UNCONFIRMED`] when something is unconfirmed, unknown or unverified.
    pub fn exit_code(&self) -> u8 {
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
