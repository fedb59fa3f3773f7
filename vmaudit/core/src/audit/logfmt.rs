//! Kernel audit records as auditd writes them to `audit.log` (`log_format = RAW`), and the
//! parts of a kernel record: its stamp and the user text inside `msg='...'`.
//!
//! auditd writes `type=NAME msg=TEXT` where TEXT is the kernel's record as received
//! (`audit(SECS.MSEC:SERIAL): pid=.. uid=.. auid=.. ses=..[ subj=..] msg='...'`) and NAME is
//! libaudit's name of the type, or `UNKNOWN[N]`. With `log_format = ENRICHED` auditd adds a
//! 0x1D separator and resolved names after it; `ausearch` and `aureport` read both forms.

use thiserror::Error;

use super::{KernelRecord, type_name};
use crate::time::Stamp;

/// A kernel record that cannot be written as an audit.log line.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LogFmtError {
    #[error("record of type {kind} has no kernel stamp audit(SECS.MSEC:SERIAL): {text:?}")]
    NotStamped { kind: u16, text: String },
    #[error("record of type {kind} spans lines")]
    Newline { kind: u16 },
}

impl KernelRecord {
    /// The stamp and the rest of the text after `): `.
    pub fn split_stamp(&self) -> Option<(Stamp, &str)> {
        let rest = self.text.strip_prefix("audit(")?;
        let (stamp, body) = rest.split_once("): ")?;
        Some((Stamp::parse(stamp)?, body))
    }

    pub fn stamp(&self) -> Option<Stamp> {
        self.split_stamp().map(|(s, _)| s)
    }

    /// The kernel's fields before the user text (`pid=.. uid=.. auid=.. ses=..[ subj=..]`),
    /// and the user text itself (what was sent), for a user message.
    pub fn user_parts(&self) -> Option<(&str, &str)> {
        let (_, body) = self.split_stamp()?;
        let (head, msg) = body.split_once(" msg='")?;
        Some((head, msg.strip_suffix('\'')?))
    }

    /// The user text inside `msg='...'`: exactly what was sent.
    pub fn user_msg(&self) -> Option<&str> {
        self.user_parts().map(|(_, m)| m)
    }
}

/// The record as one audit.log line (without the newline), as auditd writes it with
/// `log_format = RAW`: `type=VIRT_RESOURCE msg=audit(SECS.MSEC:SERIAL): pid=... msg='...'`.
pub fn auditd_line(rec: &KernelRecord) -> Result<String, LogFmtError> {
    if rec.stamp().is_none() {
        return Err(LogFmtError::NotStamped {
            kind: rec.kind,
            text: rec.text.clone(),
        });
    }
    if rec.text.contains('\n') {
        return Err(LogFmtError::Newline { kind: rec.kind });
    }
    Ok(format!("type={} msg={}", type_name(rec.kind), rec.text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "audit(1718000000.042:317): pid=4242 uid=0 auid=4294967295 \
        ses=4294967295 msg='virt=kvm resrc=net reason=open vm=\"g\" \
        uuid=c7a5fdbd-cdaf-9455-926a-d65c16db1809 net=52:54:00:aa:bb:cc path=\"/dev/net/tun\" \
        rdev=0A:C8 exe=\"/usr/sbin/libvirtd\" hostname=? addr=? terminal=? res=success'";

    fn rec(kind: u16, text: &str) -> KernelRecord {
        KernelRecord {
            kind,
            text: text.to_owned(),
        }
    }

    #[test]
    fn stamp_and_user_text() {
        let r = rec(2501, TEXT);
        let s = r.stamp().unwrap();
        assert_eq!(
            s,
            Stamp {
                secs: 1718000000,
                msec: 42,
                serial: 317
            }
        );
        assert_eq!(s.to_string(), "1718000000.042:317");
        let (head, msg) = r.user_parts().unwrap();
        assert_eq!(head, "pid=4242 uid=0 auid=4294967295 ses=4294967295");
        assert!(msg.starts_with("virt=kvm resrc=net reason=open "));
        assert!(msg.ends_with(" res=success"));
        assert_eq!(rec(1305, "audit(1.x:3): x").stamp(), None);
        assert_eq!(rec(1305, "pid=1").stamp(), None);
    }

    #[test]
    fn auditd_raw_line() {
        assert_eq!(
            auditd_line(&rec(2501, TEXT)).unwrap(),
            format!("type=VIRT_RESOURCE msg={TEXT}")
        );
        let ctl = rec(
            2500,
            "audit(1.000:1): pid=1 uid=0 auid=0 ses=1 msg='virt=kvm op=start'",
        );
        assert!(
            auditd_line(&ctl)
                .unwrap()
                .starts_with("type=VIRT_CONTROL msg=audit(1.000:1): ")
        );
        let odd = rec(2599, "audit(1.000:1): x");
        assert!(
            auditd_line(&odd)
                .unwrap()
                .starts_with("type=UNKNOWN[2599] msg=")
        );
        assert!(matches!(
            auditd_line(&rec(2501, "no stamp")),
            Err(LogFmtError::NotStamped { .. })
        ));
    }
}
