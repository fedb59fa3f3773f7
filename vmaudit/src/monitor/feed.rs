//! From the source's lines to the verifier's claims, watching the audit stream itself: every
//! record is counted and its serial number checked (a skipped serial is a record lost), the
//! socket's overruns and the kernel's lost counter are records lost too, and each loss is a
//! window in which what rests on a record not arriving is `unknown`. With the kernel as
//! source, a heartbeat record through the kernel every [`HEARTBEAT`] shows the stream alive.

use std::{collections::HashMap, future::Future, time::Duration};

use tokio::sync::mpsc;
use vmaudit_core::{
    audit::{JournalEntry, parse::parse_line},
    claim::{NotAClaim, claim_of},
};

use super::{MonitorError, Stats, source::Line};
use crate::{
    audit::KernelAudit,
    observe::monotonic_ns,
    verify::{
        engine::{Engine, Msg},
        observer::{AuditEvent, Observer, Observers},
    },
};

/// How often the kernel's audit status (lost counter, enabled, backlog) is read.
const STATUS: Duration = Duration::from_secs(1);
/// How often the monitor sends its heartbeat through the kernel.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// The heartbeat's text (an AUDIT_USER record).
const HEARTBEAT_TEXT: &str = "vmaudit-monitor heartbeat";
/// A backlog limit below this drops records in a VM start's burst.
const SMALL_BACKLOG: u32 = 1024;

/// The feed's state.
pub struct Feed<'a> {
    engine: &'a Engine,
    obs: Observers,
    stats: Stats,
    /// Journal each record beside its verdicts.
    records: bool,
    next_id: u64,
    caught_up: bool,
    start_wall: u64,
    /// The last serial number seen, per node (`""` without `node=`).
    serials: HashMap<String, u64>,
    /// The arrival of the last record with nothing lost before it.
    clean_ns: u64,
    kernel: Option<KernelAudit>,
    last_lost: Option<u32>,
    enabled: Option<bool>,
    heartbeat: bool,
}

impl<'a> Feed<'a> {
    /// `kernel`: the audit subsystem, to read its status and (`heartbeat`) send heartbeats.
    pub fn new(
        engine: &'a Engine,
        obs: Observers,
        records: bool,
        kernel: Option<KernelAudit>,
        heartbeat: bool,
    ) -> Self {
        Self {
            engine,
            obs,
            stats: Stats::default(),
            records,
            next_id: 1,
            caught_up: false,
            start_wall: vmaudit_core::time::unix_now_ns(),
            serials: HashMap::new(),
            clean_ns: monotonic_ns(),
            heartbeat: heartbeat && kernel.is_some(),
            kernel,
            last_lost: None,
            enabled: None,
        }
    }

    /// Feeds until the source ends or `shutdown`; the counts.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Line>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Stats, MonitorError> {
        tokio::pin!(shutdown);
        let mut status = tokio::time::interval(STATUS);
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                l = rx.recv() => match l {
                    None => break,
                    Some(Line::Record(text)) => self.record(&text)?,
                    Some(Line::CaughtUp) => {
                        self.caught_up = true;
                        self.engine.send(Msg::CaughtUp)?;
                    }
                    Some(Line::Lost(cause)) => self.lost(cause, 1)?,
                    Some(Line::Failed(e)) => return Err(MonitorError::SourceFailed(e)),
                },
                _ = status.tick() => self.check_kernel()?,
                _ = beat.tick(), if self.heartbeat => self.beat(),
                () = &mut shutdown => break,
            }
        }
        Ok(self.stats)
    }

    fn record(&mut self, text: &str) -> Result<(), MonitorError> {
        self.stats.records += 1;
        let p = match parse_line(text) {
            Ok(p) => p,
            Err(e) => {
                self.stats.malformed += 1;
                log::debug!("skipping a line that does not parse ({e}): {text}");
                return Ok(());
            }
        };
        self.obs.audit(&AuditEvent::Record {
            stamp: p.stamp.unix_ns() as f64 / 1e9,
        });
        self.check_serial(&p)?;
        if p.text == HEARTBEAT_TEXT {
            return Ok(());
        }
        let claimed = claim_of(&p);
        self.stats.count_resrc(&p, &claimed);
        match claimed {
            Ok(rc) => {
                self.stats.claims += 1;
                let id = self.next_id;
                self.next_id += 1;
                let historic = !self.caught_up && rc.record_ts_ns < self.start_wall;
                let claim = rc.into_claim(id, monotonic_ns(), historic);
                let entry = self.records.then(|| Box::new(JournalEntry::of_record(&p)));
                self.engine.send(Msg::Claim(Box::new(claim), entry))?;
            }
            Err(NotAClaim::OtherType) => self.stats.other_types += 1,
            Err(NotAClaim::OtherResource(_)) => self.stats.other_resources += 1,
            Err(e @ NotAClaim::Malformed { .. }) => {
                self.stats.malformed += 1;
                log::warn!("{e}: {text}");
            }
        }
        Ok(())
    }

    /// A serial number past the next one (per node) means records between were lost. auditd's
    /// own DAEMON_* records number themselves apart, and are left out.
    fn check_serial(&mut self, p: &vmaudit_core::audit::parse::Parsed) -> Result<(), MonitorError> {
        if p.type_id().is_some_and(|t| (1200..1300).contains(&t)) {
            return Ok(());
        }
        let serial = p.stamp.serial;
        let node = p.node().unwrap_or_default().to_owned();
        let last = self.serials.insert(node.clone(), serial);
        match last {
            Some(last) if serial > last + 1 => self.lost("serial_gap", serial - last - 1)?,
            // The same event's next record, or an older line: the last stays the highest.
            Some(last) if serial <= last => {
                self.serials.insert(node, last);
            }
            _ => self.clean_ns = monotonic_ns(),
        }
        Ok(())
    }

    /// Records lost (or, `queue_wait`, delayed): counted, and a window for the verifier.
    fn lost(&mut self, cause: &'static str, count: u64) -> Result<(), MonitorError> {
        self.obs.audit(&AuditEvent::Lost { cause, count });
        let now = monotonic_ns();
        self.stats.records_lost += count;
        log::warn!(
            "audit records lost ({count}, {cause}): verdicts that rest on a record not arriving are unknown in this window"
        );
        self.engine.send(Msg::RecordLoss {
            from_ns: self.clean_ns,
            to_ns: now,
            lost: count,
        })?;
        self.clean_ns = now;
        Ok(())
    }

    /// The kernel's audit status: its lost counter, whether auditing is on, its backlog.
    fn check_kernel(&mut self) -> Result<(), MonitorError> {
        let Some(k) = self.kernel.as_mut() else {
            return Ok(());
        };
        let s = match k.status() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot read the kernel's audit status any more: {e}");
                self.kernel = None;
                return Ok(());
            }
        };
        self.obs.audit(&AuditEvent::Status {
            enabled: s.is_enabled(),
            backlog_limit: s.backlog_limit,
        });
        if self.enabled != Some(s.is_enabled()) {
            self.enabled = Some(s.is_enabled());
            if !s.is_enabled() {
                log::warn!(
                    "the kernel's auditing is off: libvirt's records are dropped, and nothing can be judged (auditctl -e 1)"
                );
            } else if s.backlog_limit < SMALL_BACKLOG {
                log::warn!(
                    "the kernel's audit backlog limit is {}: a VM's start can overflow it (auditctl -b 8192)",
                    s.backlog_limit
                );
            }
        }
        let grew = self.last_lost.map(|l| s.lost.wrapping_sub(l));
        self.last_lost = Some(s.lost);
        match grew {
            Some(n) if n > 0 => self.lost("kernel", u64::from(n)),
            _ => Ok(()),
        }
    }

    fn beat(&mut self) {
        if let Some(k) = self.kernel.as_mut()
            && let Err(e) = k.send_user(HEARTBEAT_TEXT)
        {
            log::warn!("no heartbeat through the audit stream (needs CAP_AUDIT_WRITE): {e}");
            self.heartbeat = false;
        }
    }
}
