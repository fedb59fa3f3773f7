//! The two questions, asked backwards from a moment (the end of the inputs, or `--at`):
//! [`fds`]: which fds the emulator holds for a MAC, from its latest start or attach claim and
//! the kernel's evidence on it, and what happened to them since; [`released`]: which fds it
//! released at the latest detach of that MAC, from the kernel's closes.

use serde::Serialize;

use super::{Event, filter::Filter};
use crate::verify::{Status, Verdict};

/// The claim an answer rests on.
#[derive(Clone, Debug, Serialize)]
pub struct ClaimSummary {
    pub ts: String,
    pub ts_ns: u64,
    /// `start`, `attach`, `detach`.
    pub reason: String,
    /// `success` or `failed` (None: the record has no `res=`).
    pub result: Option<String>,
    /// `FILE:LINE`.
    pub source: String,
    pub text: String,
}

/// One fd as the kernel showed it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelFd {
    pub pid: u32,
    pub fd: i32,
    /// `inherit`, `recv_fd` (arrived), `close`, `exit`, ... (released).
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    /// Kernel CLOCK_MONOTONIC ns of the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_ts: Option<u64>,
}

/// A verdict, short.
#[derive(Clone, Debug, Serialize)]
pub struct VerdictSummary {
    pub ts: String,
    pub status: Status,
    pub reason: String,
}

/// Something that happened to the fds after the claim.
#[derive(Clone, Debug, Serialize)]
pub struct Later {
    pub ts: String,
    /// `detach`, `detach-failed`, `released-without-detach`, `vm-stop`.
    pub what: String,
    pub detail: String,
    pub source: String,
}

/// `vmaudit search fds --mac MAC`.
#[derive(Clone, Debug, Serialize)]
pub struct FdsAnswer {
    pub question: &'static str,
    pub mac: String,
    pub vm: Option<String>,
    pub uuid: Option<String>,
    pub claim: ClaimSummary,
    pub emulator_pid: Option<u32>,
    /// The fds the kernel showed the emulator holding for it (the verdict's evidence).
    pub fds: Vec<KernelFd>,
    /// The fds the record names (vmaudit's records; libvirt's name none).
    pub claimed_fds: Vec<i32>,
    /// The devices opened for it (`reason=open` records): what libvirt's records do say.
    pub opened: Vec<String>,
    /// The verdict on the claim (the first one; None: no verdict in the inputs).
    pub status: Option<Status>,
    pub verdicts: Vec<VerdictSummary>,
    /// What happened since, up to the moment asked about.
    pub since: Vec<Later>,
    /// `held`, `released` (a detach claimed it), `released-without-detach`, `vm-stopped`.
    pub state: String,
    /// The answer in one sentence.
    pub summary: String,
}

/// `vmaudit search released --mac MAC`.
#[derive(Clone, Debug, Serialize)]
pub struct ReleasedAnswer {
    pub question: &'static str,
    pub mac: String,
    pub vm: Option<String>,
    pub uuid: Option<String>,
    pub detach: ClaimSummary,
    pub emulator_pid: Option<u32>,
    /// The fds the record says were released.
    pub claimed_fds: Vec<i32>,
    /// The releases the kernel saw (the verdict's evidence).
    pub closed: Vec<KernelFd>,
    /// Claimed fds the kernel did not see closed.
    pub not_closed: Vec<i32>,
    pub status: Option<Status>,
    pub verdicts: Vec<VerdictSummary>,
    /// vmaudit's reason for a failed detach (`vmaudit-why`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    pub summary: String,
}

fn claim_summary(e: &Event) -> ClaimSummary {
    ClaimSummary {
        ts: e.ts.clone(),
        ts_ns: e.ts_ns,
        reason: e.rec.reason.clone().unwrap_or_default(),
        result: e
            .rec
            .success
            .map(|s| if s { "success" } else { "failed" }.to_owned()),
        source: e.source.clone(),
        text: e.text.clone(),
    }
}

fn verdicts(e: &Event, until: u64) -> Vec<VerdictSummary> {
    in_time(e, until)
        .map(|v| VerdictSummary {
            ts: v.ts.clone(),
            status: v.status,
            reason: v.reason.clone(),
        })
        .collect()
}

/// The verdicts given by the moment asked about.
fn in_time(e: &Event, until: u64) -> impl Iterator<Item = &Verdict> {
    e.verdicts.iter().filter(move |v| v.ts_ns <= until)
}

fn kernel_fds<'a>(vs: impl Iterator<Item = &'a Verdict>) -> Vec<KernelFd> {
    let mut out: Vec<KernelFd> = Vec::new();
    for ev in vs.flat_map(|v| &v.evidence) {
        let Some(fd) = ev.fd else { continue };
        let k = KernelFd {
            pid: ev.pid,
            fd,
            what: ev.what.clone(),
            path: ev.path.clone(),
            rdev: ev.rdev.clone(),
            kernel_ts: ev.ts,
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn list(fds: impl IntoIterator<Item = i32>) -> String {
    fds.into_iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The events the question looks at: every filter but time, and nothing after `until`.
fn candidates<'a>(
    events: &'a [Event],
    filter: &'a Filter,
    until: u64,
) -> impl DoubleEndedIterator<Item = &'a Event> {
    events
        .iter()
        .filter(move |e| e.ts_ns <= until && filter.matches_except_time(e))
}

/// Which fds the emulator holds for `filter.mac` at `filter.until` (or the end). None: no
/// start or attach of that MAC (with the other filters) by then.
pub fn fds(events: &[Event], filter: &Filter) -> Option<FdsAnswer> {
    let mac = filter.mac.clone()?;
    let until = filter.until.unwrap_or(u64::MAX);
    let claim = candidates(events, filter, until)
        .rev()
        .find(|e| (e.is_net("start") || e.is_net("attach")) && e.rec.success != Some(false))?;
    let held: Vec<&Verdict> = in_time(claim, until)
        .filter(|v| v.status == Status::Confirmed)
        .collect();
    let fds = kernel_fds(held.iter().copied());
    // The opens for this handover: back to the MAC's previous handover or the VM's stop.
    let mut opened: Vec<String> = events
        .iter()
        .filter(|e| e.ts_ns < claim.ts_ns && e.same_vm(claim))
        .rev()
        .take_while(|e| {
            let same_mac = e.mac() == Some(mac.as_str());
            !(e.is_op("stop")
                || same_mac && (e.is_net("start") || e.is_net("attach") || e.is_net("detach")))
        })
        .filter(|e| e.is_net("open") && e.mac() == Some(mac.as_str()))
        .map(|e| {
            let dev = e.rec.rdev.map(|r| format!(" ({r})")).unwrap_or_default();
            format!("{}{dev}", e.rec.path.as_deref().unwrap_or("?"))
        })
        .collect();
    opened.reverse();
    let emulator_pid = fds.first().map(|f| f.pid).or(claim.emulator_pid);
    let mut since = Vec::new();
    let mut state = "held";
    for v in in_time(claim, until).filter(|v| v.status == Status::Violated) {
        if v.evidence
            .iter()
            .any(|e| e.what == "close" || e.what == "exit")
        {
            since.push(Later {
                ts: v.ts.clone(),
                what: "released-without-detach".into(),
                detail: v.reason.clone(),
                source: claim.source.clone(),
            });
            state = "released-without-detach";
        }
    }
    let after = events
        .iter()
        .filter(|e| e.ts_ns > claim.ts_ns && e.ts_ns <= until && e.same_vm(claim));
    for e in after {
        if e.is_net("detach") && e.mac() == Some(mac.as_str()) {
            if e.rec.success == Some(false) {
                let why = e.extra.get("vmaudit-why").cloned().unwrap_or_default();
                since.push(Later {
                    ts: e.ts.clone(),
                    what: "detach-failed".into(),
                    detail: format!("no detach claimed: {why}"),
                    source: e.source.clone(),
                });
                continue;
            }
            let status = in_time(e, until).next().map(|v| v.status);
            since.push(Later {
                ts: e.ts.clone(),
                what: "detach".into(),
                detail: match status {
                    Some(Status::Confirmed) => "the kernel saw the emulator close them".into(),
                    Some(s) => format!("verdict {}", Status::as_str(s)),
                    None => "no verdict".into(),
                },
                source: e.source.clone(),
            });
            state = "released";
            break;
        }
        if e.is_op("stop") {
            since.push(Later {
                ts: e.ts.clone(),
                what: "vm-stop".into(),
                detail: format!(
                    "the VM stopped ({})",
                    e.rec.reason.as_deref().unwrap_or("?")
                ),
                source: e.source.clone(),
            });
            state = "vm-stopped";
            break;
        }
    }
    let status = in_time(claim, until).next().map(|v| v.status);
    let who = emulator_pid.map_or("the emulator".to_owned(), |p| {
        format!("the emulator (pid {p})")
    });
    let mut summary = match (&status, fds.is_empty()) {
        (Some(Status::Confirmed), false) => format!(
            "the kernel showed {who} holding fd {} for {mac}",
            list(fds.iter().map(|f| f.fd))
        ),
        (Some(s), _) => format!(
            "{mac} was handed over ({}), verdict {}: {}",
            claim.rec.reason.as_deref().unwrap_or("?"),
            Status::as_str(*s),
            in_time(claim, until)
                .next()
                .map(|v| v.reason.as_str())
                .unwrap_or_default()
        ),
        (None, _) if claim.from_journal => format!(
            "{mac} was handed over as fd {} with no verdict: nothing from the kernel confirms it",
            list(claim.emulator_fds.iter().copied())
        ),
        (None, _) => format!(
            "libvirt claims {mac} was handed over to {who}; its records name no fds and an audit.log holds no kernel evidence"
        ),
    };
    if let Some(l) = since.iter().rfind(|l| l.what != "detach-failed") {
        summary.push_str(&format!("; {} at {}: {}", l.what, l.ts, l.detail));
    } else if let Some(l) = since.last() {
        summary.push_str(&format!("; still held: {} at {}", l.detail, l.ts));
    }
    Some(FdsAnswer {
        question: "fds",
        vm: claim.rec.vm.clone(),
        uuid: claim.rec.uuid.clone(),
        claim: claim_summary(claim),
        emulator_pid,
        fds,
        claimed_fds: claim.emulator_fds.clone(),
        opened,
        status,
        verdicts: verdicts(claim, until),
        since,
        state: state.to_owned(),
        summary,
        mac,
    })
}

/// The fds released at the latest detach of `filter.mac` by `filter.until` (or the end).
/// None: no detach of that MAC (with the other filters) by then.
pub fn released(events: &[Event], filter: &Filter) -> Option<ReleasedAnswer> {
    let mac = filter.mac.clone()?;
    let until = filter.until.unwrap_or(u64::MAX);
    let d = candidates(events, filter, until)
        .rev()
        .find(|e| e.is_net("detach"))?;
    let status = in_time(d, until).next().map(|v| v.status);
    let closed = kernel_fds(in_time(d, until).filter(|v| v.status == Status::Confirmed));
    let not_closed: Vec<i32> = d
        .emulator_fds
        .iter()
        .copied()
        .filter(|f| !closed.iter().any(|c| c.fd == *f))
        .collect();
    let why = d.extra.get("vmaudit-why").cloned();
    let who = d.emulator_pid.map_or("the emulator".to_owned(), |p| {
        format!("the emulator (pid {p})")
    });
    let first_reason = in_time(d, until)
        .next()
        .map(|v| v.reason.clone())
        .unwrap_or_default();
    let summary = if d.rec.success == Some(false) {
        format!(
            "no detach was claimed (res=failed{}); {who} still holds fd {}",
            why.as_deref().map(|w| format!(": {w}")).unwrap_or_default(),
            list(d.emulator_fds.iter().copied())
        )
    } else {
        match status {
            Some(Status::Confirmed) => format!(
                "the kernel saw {who} close fd {} for this detach",
                list(closed.iter().map(|c| c.fd))
            ),
            Some(Status::Unconfirmed) => format!(
                "the detach was claimed, but the kernel shows no close of fd {}: {first_reason}",
                list(not_closed.iter().copied())
            ),
            Some(s) => format!("verdict {}: {first_reason}", Status::as_str(s)),
            None if d.from_journal => format!(
                "the detach claims fd {} released; no verdict in the journal: nothing from the kernel confirms it",
                list(d.emulator_fds.iter().copied())
            ),
            None => "libvirt claims the detach; its record names no fds and an audit.log holds no kernel evidence".to_owned(),
        }
    };
    Some(ReleasedAnswer {
        question: "released",
        vm: d.rec.vm.clone(),
        uuid: d.rec.uuid.clone(),
        detach: claim_summary(d),
        emulator_pid: closed.first().map(|c| c.pid).or(d.emulator_pid),
        claimed_fds: d.emulator_fds.clone(),
        closed,
        not_closed,
        status,
        verdicts: verdicts(d, until),
        why,
        summary,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::virt::VirtRecord,
        verify::{ClaimRef, Evidence},
    };

    const MAC: &str = "52:54:00:00:00:09";

    fn detach(verdicts: Vec<Verdict>, from_journal: bool) -> Event {
        Event {
            source: "j:9".into(),
            ts: "t".into(),
            ts_ns: 10,
            kind: "VIRT_RESOURCE".into(),
            rec: VirtRecord {
                resrc: Some("net".into()),
                reason: Some("detach".into()),
                mac: Some(MAC.into()),
                uuid: Some("u".into()),
                success: Some(true),
                ..VirtRecord::default()
            },
            emulator_pid: Some(50),
            emulator_fds: if from_journal { vec![7, 8] } else { vec![] },
            text: String::new(),
            extra: Default::default(),
            verdicts,
            from_journal,
        }
    }

    fn verdict(status: Status, reason: &str, closed: &[i32]) -> Verdict {
        let claim = ClaimRef {
            kind: "net-detach".into(),
            mac: Some(MAC.into()),
            ..ClaimRef::default()
        };
        let ev = closed
            .iter()
            .map(|fd| Evidence {
                pid: 50,
                fd: Some(*fd),
                what: "close".into(),
                ..Evidence::default()
            })
            .collect();
        let mut v = Verdict::new(claim, status, reason, ev);
        v.ts_ns = 20;
        v
    }

    fn ask(e: Event) -> ReleasedAnswer {
        let f = Filter {
            mac: Some(MAC.into()),
            ..Filter::default()
        };
        released(&[e], &f).expect("a detach")
    }

    #[test]
    fn a_claimed_detach_without_a_close_is_said_plainly() {
        let a = ask(detach(
            vec![verdict(
                Status::Unconfirmed,
                "the deadline passed without kernel evidence; the emulator still holds fd 8",
                &[],
            )],
            true,
        ));
        assert_eq!(a.not_closed, [7, 8]);
        assert!(a.closed.is_empty());
        assert_eq!(
            a.summary,
            "the detach was claimed, but the kernel shows no close of fd 7, 8: the deadline passed without kernel evidence; the emulator still holds fd 8"
        );
        let a = ask(detach(
            vec![verdict(Status::Confirmed, "ok", &[7, 8])],
            true,
        ));
        assert_eq!(
            a.summary,
            "the kernel saw the emulator (pid 50) close fd 7, 8 for this detach"
        );
        assert!(a.not_closed.is_empty());
        let a = ask(detach(vec![], true));
        assert!(
            a.summary.contains("no verdict in the journal"),
            "{}",
            a.summary
        );
        let a = ask(detach(vec![], false));
        assert!(
            a.summary.starts_with("libvirt claims the detach"),
            "{}",
            a.summary
        );
        // Asked before the verdict was given: not yet known.
        let f = Filter {
            mac: Some(MAC.into()),
            until: Some(15),
            ..Filter::default()
        };
        let e = detach(vec![verdict(Status::Confirmed, "ok", &[7, 8])], true);
        let a = released(&[e], &f).unwrap();
        assert_eq!(a.status, None);
        assert!(
            released(
                &[detach(vec![], true)],
                &Filter {
                    until: Some(5),
                    ..f
                }
            )
            .is_none()
        );
    }
}
