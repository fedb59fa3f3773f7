//! The journal's hash chain. Every line carries `seq` (1, 2, 3, ... across the whole journal)
//! and `prev`, the SHA-256 (lower-case hex) of the line before it without its newline; the
//! first line of a journal has [`GENESIS`]. A line removed, edited or reordered breaks the chain
//! right there, and [`check`] names the first break.
//!
//! What it shows and what it cannot: it catches whoever edits, removes or reorders lines without
//! rewriting every line after them; it cannot see the journal's last lines removed (nothing
//! follows them) or a journal rewritten whole. Those need an anchor off the host: the kernel
//! audit log's copy of each record, or the lines shipped as they are written.
//!
//! Two cases start a chain without a line before them: a journal written before the chain
//! existed (its old lines are counted as `unchained`, and the first chained line hashes the last
//! of them), and a journal reopened after it was rotated or deleted (its first line is a
//! `journal-reopened` event whose `prev` is the last line of the file that was moved away).

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// `prev` of a journal's first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `type` of vmaudit's own journal events (repairs, reopenings, recovery of a dead run):
/// neither records nor verdicts, chained like them.
pub const EVENT_TYPE: &str = "vmaudit";
/// The event a reopened journal starts with.
pub const REOPENED: &str = "journal-reopened";

/// The hash of one line (without its newline), as the next line's `prev` holds it.
pub fn hash(line: &str) -> String {
    format!("{:x}", Sha256::digest(line.as_bytes()))
}

/// `json` (one JSON object, on one line) with `"seq"` and `"prev"` added at its end, so that
/// readers that know nothing of the chain read the same fields as before.
pub fn seal(json: &str, seq: u64, prev: &str) -> String {
    let body = json.trim_end().strip_suffix('}').unwrap_or(json);
    let sep = if body.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    format!("{body}{sep}\"seq\":{seq},\"prev\":\"{prev}\"}}")
}

/// A journal's text split into its complete lines and a last line cut short (no newline: a
/// write that never finished), which readers count and skip.
pub fn split(text: &str) -> (Vec<&str>, Option<&str>) {
    let (complete, torn) = match text.rfind('\n') {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => ("", text),
    };
    let lines = if complete.is_empty() && !text.starts_with('\n') {
        Vec::new()
    } else {
        complete.split('\n').collect()
    };
    (lines, (!torn.is_empty()).then_some(torn))
}

/// How the chain is broken at a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakKind {
    /// The journal's first lines are gone: it starts in the middle of its chain.
    Missing,
    /// Lines are gone between two lines.
    Removed,
    /// A line is out of its place (or repeated).
    Reordered,
    /// A line's content differs from what the next line's `prev` was computed on.
    Edited,
    /// A line without `seq`/`prev` after the chain began.
    Unchained,
    /// A line that is not a JSON object.
    Garbled,
}

/// The first break, for a person and for scripts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// 1-based line number in the file.
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub kind: BreakKind,
    pub message: String,
}

/// What [`check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Complete lines read.
    pub lines: u64,
    /// Lines with `seq` and `prev`.
    pub chained: u64,
    /// Lines written before the chain began (by a vmaudit without it).
    pub unchained: u64,
    /// A last line cut short, skipped (0 or 1).
    pub torn: u64,
    /// Breaks found (each line that does not follow from the one before counts once).
    pub breaks: u64,
    pub first_break: Option<ChainBreak>,
}

impl ChainReport {
    pub fn intact(&self) -> bool {
        self.breaks == 0
    }
}

struct Line<'a> {
    raw: &'a str,
    value: Option<Value>,
    seq: Option<u64>,
    prev: Option<&'a str>,
}

fn parse(raw: &str) -> Line<'_> {
    let value: Option<Value> = serde_json::from_str(raw).ok().filter(Value::is_object);
    let seq = value.as_ref().and_then(|v| v.get("seq")?.as_u64());
    // `prev` borrowed from the raw text: it is the last field, written by `seal`.
    let prev = raw
        .rfind("\"prev\":\"")
        .map(|i| &raw[i + 8..])
        .and_then(|rest| rest.strip_suffix("\"}"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    Line {
        raw,
        value,
        seq,
        prev,
    }
}

fn starts_segment(v: &Value) -> bool {
    v["type"] == EVENT_TYPE && v["event"] == REOPENED
}

/// Checks the chain of a journal's text (a torn last line is counted, not checked).
pub fn check(text: &str) -> ChainReport {
    let (raw, torn) = split(text);
    let lines: Vec<Line<'_>> = raw.iter().map(|l| parse(l)).collect();
    let mut r = ChainReport {
        lines: lines.len() as u64,
        torn: u64::from(torn.is_some()),
        ..ChainReport::default()
    };
    let mut last_seq: Option<u64> = None;
    let brk = |r: &mut ChainReport, line: usize, seq: Option<u64>, kind, message: String| {
        r.breaks += 1;
        if r.first_break.is_none() {
            r.first_break = Some(ChainBreak {
                line,
                seq,
                kind,
                message,
            });
        }
    };
    for (i, l) in lines.iter().enumerate() {
        let n = i + 1;
        let before = i.checked_sub(1).map(|j| &lines[j]);
        let Some(v) = &l.value else {
            brk(
                &mut r,
                n,
                None,
                BreakKind::Garbled,
                format!("line {n} is not a journal line"),
            );
            continue;
        };
        let (Some(seq), Some(prev)) = (l.seq, l.prev) else {
            if last_seq.is_some() {
                brk(
                    &mut r,
                    n,
                    None,
                    BreakKind::Unchained,
                    format!(
                        "line {n} has no sequence number or hash: written or edited outside vmaudit"
                    ),
                );
            } else {
                r.unchained += 1;
            }
            continue;
        };
        r.chained += 1;
        let expected = before.map_or_else(|| GENESIS.to_owned(), |b| hash(b.raw));
        match last_seq {
            None => {
                let starts = match before {
                    None => (seq == 1 && prev == GENESIS) || starts_segment(v),
                    Some(_) => seq == 1 && prev == expected,
                };
                if !starts {
                    brk(
                        &mut r,
                        n,
                        Some(seq),
                        BreakKind::Missing,
                        format!(
                            "the journal starts at seq {seq} (line {n}): the lines before it are missing"
                        ),
                    );
                }
            }
            Some(last) if seq == last + 1 && prev == expected => {}
            Some(last) if seq == last + 1 => brk(
                &mut r,
                n - 1,
                before.and_then(|b| b.seq),
                BreakKind::Edited,
                format!(
                    "line {} was edited: its hash is not the one line {n} (seq {seq}) holds",
                    n - 1
                ),
            ),
            Some(last) if seq > last + 1 => {
                let later = lines[i + 1..].iter().any(|x| x.seq == Some(last + 1));
                if later {
                    brk(
                        &mut r,
                        n,
                        Some(seq),
                        BreakKind::Reordered,
                        format!(
                            "line {n} (seq {seq}) comes before seq {}: lines were reordered",
                            last + 1
                        ),
                    );
                } else {
                    brk(
                        &mut r,
                        n,
                        Some(seq),
                        BreakKind::Removed,
                        format!(
                            "seq {} to {} are missing before line {n}: {} line(s) removed",
                            last + 1,
                            seq - 1,
                            seq - 1 - last
                        ),
                    );
                }
            }
            Some(last) => brk(
                &mut r,
                n,
                Some(seq),
                BreakKind::Reordered,
                format!(
                    "line {n} (seq {seq}) comes after seq {last}: lines were reordered or repeated"
                ),
            ),
        }
        last_seq = Some(seq);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chained journal of `n` lines, each `{"type":"x","n":i}`.
    fn journal(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let line = seal(&format!("{{\"type\":\"x\",\"n\":{i}}}"), i, &prev);
                prev = hash(&line);
                line
            })
            .collect()
    }

    fn text(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn seal_adds_the_fields_last() {
        let l = seal("{\"type\":\"x\"}", 3, GENESIS);
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["seq"].as_u64()),
            (Some("x"), Some(3))
        );
        assert!(l.ends_with(&format!(",\"prev\":\"{GENESIS}\"}}")));
        assert_eq!(
            seal("{}", 1, GENESIS),
            format!("{{\"seq\":1,\"prev\":\"{GENESIS}\"}}")
        );
    }

    #[test]
    fn an_intact_chain_and_a_torn_last_line() {
        let j = journal(5);
        let r = check(&text(&j));
        assert!(r.intact(), "{r:?}");
        assert_eq!((r.lines, r.chained, r.torn), (5, 5, 0));
        let mut t = text(&j);
        t.push_str("{\"type\":\"x\",\"n\":6,\"se");
        let r = check(&t);
        assert!(r.intact());
        assert_eq!((r.lines, r.torn), (5, 1));
    }

    #[test]
    fn each_break_is_named() {
        let j = journal(6);
        let kind = |lines: Vec<String>| check(&text(&lines)).first_break.unwrap();

        let mut removed = j.clone();
        removed.remove(2);
        let b = kind(removed);
        assert_eq!((b.kind, b.line), (BreakKind::Removed, 3), "{b:?}");
        assert!(b.message.contains("seq 3 to 3 are missing"), "{b:?}");

        let mut edited = j.clone();
        edited[1] = edited[1].replace("\"n\":2", "\"n\":9");
        let b = kind(edited);
        assert_eq!((b.kind, b.line), (BreakKind::Edited, 2), "{b:?}");

        let mut swapped = j.clone();
        swapped.swap(2, 3);
        assert_eq!(kind(swapped).kind, BreakKind::Reordered);

        let b = kind(j[2..].to_vec());
        assert_eq!((b.kind, b.line), (BreakKind::Missing, 1));

        let mut garbled = j.clone();
        garbled[3] = "not json".into();
        assert_eq!(kind(garbled).kind, BreakKind::Garbled);

        let mut stripped = j.clone();
        stripped[4] = "{\"type\":\"x\"}".into();
        assert_eq!(kind(stripped).kind, BreakKind::Unchained);
    }

    #[test]
    fn older_lines_and_a_reopened_file_start_a_chain() {
        let old = "{\"type\":\"x\"}".to_owned();
        let first = seal("{\"type\":\"y\"}", 1, &hash(&old));
        let r = check(&text(&[old, first]));
        assert!(r.intact(), "{r:?}");
        assert_eq!((r.unchained, r.chained), (1, 1));

        let reopened = seal(
            &format!("{{\"type\":\"{EVENT_TYPE}\",\"event\":\"{REOPENED}\"}}"),
            40,
            &hash("a line of the rotated file"),
        );
        let next = seal("{\"type\":\"y\"}", 41, &hash(&reopened));
        assert!(check(&text(&[reopened, next])).intact());
    }

    #[test]
    fn split_keeps_empty_and_torn_apart() {
        assert_eq!(split(""), (vec![], None));
        assert_eq!(split("a\nb\n"), (vec!["a", "b"], None));
        assert_eq!(split("a\nb"), (vec!["a"], Some("b")));
        assert_eq!(split("b"), (vec![], Some("b")));
    }
}
