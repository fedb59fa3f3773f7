//! Aligned lines for a terminal (JSON lines are the answers' and events' serde form).

use std::fmt::Write as _;

use super::{
    Event,
    answer::{ClaimSummary, FdsAnswer, KernelFd, ReleasedAnswer, VerdictSummary},
};
use crate::verify::Status;

/// The worst verdict on an event, as a word; `-` when it has none.
fn status(e: &Event) -> &'static str {
    Status::worst(e.verdicts.iter().map(|v| v.status)).map_or("-", Status::as_str)
}

fn what(e: &Event) -> String {
    let r = &e.rec;
    let mut s = match (e.kind.as_str(), &r.resrc, &r.op) {
        ("unclaimed", _, _) => "unclaimed".to_owned(),
        (_, Some(resrc), _) => format!("{resrc} {}", r.reason.as_deref().unwrap_or("?")),
        (_, _, Some(op)) => format!("vm {op} {}", r.reason.as_deref().unwrap_or("?")),
        (kind, _, _) => kind.to_ascii_lowercase(),
    };
    if r.success == Some(false) {
        s.push_str(" FAILED");
    }
    s
}

fn detail(e: &Event) -> String {
    let r = &e.rec;
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = e.mac() {
        parts.push(m.to_owned());
    }
    if let Some(p) = &r.path {
        parts.push(match r.rdev {
            Some(d) => format!("{p} ({d})"),
            None => p.clone(),
        });
    }
    match (r.class.as_deref(), r.category.as_deref(), r.maj) {
        (Some("major"), cat, Some(maj)) => {
            parts.push(format!("major {maj} ({})", cat.unwrap_or("?")));
        }
        (Some("all"), _, _) => parts.push("all devices".to_owned()),
        _ => {}
    }
    if let Some(acl) = &r.acl {
        parts.push(acl.clone());
    }
    if let (Some(old), Some(new)) = (&r.old, &r.new)
        && r.resrc.as_deref() != Some("net")
    {
        parts.push(format!("{old} -> {new}"));
    }
    if let Some(p) = e.emulator_pid {
        parts.push(format!("pid {p}"));
    }
    if !e.emulator_fds.is_empty() {
        let fds: Vec<String> = e.emulator_fds.iter().map(i32::to_string).collect();
        parts.push(format!("fd {}", fds.join(",")));
    }
    parts.join("  ")
}

/// The matching events as a table, each verdict's reason under its record.
pub fn events(events: &[&Event]) -> String {
    let rows: Vec<[String; 6]> = events
        .iter()
        .map(|e| {
            [
                e.ts.clone(),
                status(e).to_owned(),
                what(e),
                e.rec.vm.clone().unwrap_or_else(|| "-".to_owned()),
                detail(e),
                e.source.clone(),
            ]
        })
        .collect();
    let header = ["TIME", "STATUS", "RECORD", "VM", "DETAIL", "SOURCE"].map(str::to_owned);
    let mut width = [0usize; 6];
    for r in rows.iter().chain(std::iter::once(&header)) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in r.iter().zip(width).enumerate() {
            if i == 5 {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header);
    let indent = width[0] + 2;
    for (e, r) in events.iter().zip(&rows) {
        out.push_str(&line(r));
        for v in &e.verdicts {
            let _ = writeln!(
                out,
                "{:indent$}{}: {}",
                "",
                Status::as_str(v.status),
                v.reason
            );
        }
    }
    let _ = writeln!(out, "\n{} matching", events.len());
    out
}

fn claim_line(label: &str, c: &ClaimSummary) -> String {
    format!(
        "  {label:<10}{} at {}{}  ({})\n",
        c.reason,
        c.ts,
        c.result
            .as_deref()
            .map(|r| format!(", {r}"))
            .unwrap_or_default(),
        c.source
    )
}

fn fd_list(fds: &[KernelFd]) -> String {
    fds.iter()
        .map(|f| {
            let mut s = format!("{}", f.fd);
            if let Some(p) = &f.path {
                let _ = write!(s, " {p}");
            }
            if let Some(r) = &f.rdev {
                let _ = write!(s, " {r}");
            }
            let _ = write!(s, " ({})", f.what);
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn verdict_lines(vs: &[VerdictSummary]) -> String {
    let mut out = String::new();
    if vs.is_empty() {
        out.push_str("  verdict   none\n");
    }
    for v in vs {
        let _ = writeln!(
            out,
            "  verdict   {} at {}: {}",
            Status::as_str(v.status),
            v.ts,
            v.reason
        );
    }
    out
}

fn head(mac: &str, vm: &Option<String>, uuid: &Option<String>) -> String {
    format!(
        "{mac}  vm {}  uuid {}\n",
        vm.as_deref().unwrap_or("?"),
        uuid.as_deref().unwrap_or("?")
    )
}

pub fn fds(a: &FdsAnswer) -> String {
    let mut out = head(&a.mac, &a.vm, &a.uuid);
    out.push_str(&claim_line("claim", &a.claim));
    if !a.opened.is_empty() {
        let _ = writeln!(out, "  {:<10}{}", "opened", a.opened.join(", "));
    }
    if let Some(p) = a.emulator_pid {
        let _ = writeln!(out, "  {:<10}pid {p}", "emulator");
    }
    let fds = if a.fds.is_empty() {
        "none shown by the kernel".to_owned()
    } else {
        fd_list(&a.fds)
    };
    let _ = writeln!(out, "  {:<10}{fds}", "fds");
    out.push_str(&verdict_lines(&a.verdicts));
    for l in &a.since {
        let _ = writeln!(
            out,
            "  {:<10}{} at {}: {}  ({})",
            "since", l.what, l.ts, l.detail, l.source
        );
    }
    let _ = writeln!(out, "  {:<10}{}", "state", a.state);
    let _ = writeln!(out, "  {:<10}{}", "answer", a.summary);
    out
}

pub fn released(a: &ReleasedAnswer) -> String {
    let mut out = head(&a.mac, &a.vm, &a.uuid);
    out.push_str(&claim_line("detach", &a.detach));
    if let Some(p) = a.emulator_pid {
        let _ = writeln!(out, "  {:<10}pid {p}", "emulator");
    }
    if !a.claimed_fds.is_empty() {
        let l: Vec<String> = a.claimed_fds.iter().map(i32::to_string).collect();
        let _ = writeln!(out, "  {:<10}fd {}", "claimed", l.join(", "));
    }
    let closed = if a.closed.is_empty() {
        "none seen by the kernel".to_owned()
    } else {
        fd_list(&a.closed)
    };
    let _ = writeln!(out, "  {:<10}{closed}", "closed");
    if !a.not_closed.is_empty() {
        let l: Vec<String> = a.not_closed.iter().map(i32::to_string).collect();
        let _ = writeln!(out, "  {:<10}fd {}", "not closed", l.join(", "));
    }
    out.push_str(&verdict_lines(&a.verdicts));
    let _ = writeln!(out, "  {:<10}{}", "answer", a.summary);
    out
}
