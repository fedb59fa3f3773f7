//! One line of the journal: the record's text, the kernel's verdict, and the record's facts.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{record::Record, sink::KernelOutcome};

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub ts: String,
    pub ts_ns: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub type_id: u16,
    pub result: String,
    pub text: String,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resrc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maj: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_pid: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl JournalEntry {
    /// The line for `record` now, with `kernel: "not-requested"`. Prefer the line
    /// [`AuditSink::emit`](super::AuditSink::emit) returns, which has the kernel's verdict.
    pub fn from_record(record: &Record) -> Self {
        Self::new(record, &KernelOutcome::NotRequested, SystemTime::now())
    }

    /// The line for `record`, sent to the kernel with outcome `kernel`, at `at`.
    pub fn new(record: &Record, kernel: &KernelOutcome, at: SystemTime) -> Self {
        let ts_ns = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let f = &record.fields;
        Self {
            ts: rfc3339_ms(ts_ns),
            ts_ns,
            kind: record.kind.name().to_owned(),
            type_id: record.kind.id(),
            result: if record.success { "success" } else { "failed" }.to_owned(),
            text: record.text.clone(),
            kernel: kernel.to_string(),
            virt: Some(f.virt.clone()),
            vm: Some(f.vm.clone()),
            uuid: Some(f.uuid.hyphenated().to_string()),
            resrc: f.resrc.clone(),
            op: f.op.clone(),
            reason: Some(f.reason.clone()),
            mac: f.mac.clone(),
            path: f.path.clone(),
            rdev: f.rdev.map(|d| d.to_string()),
            fd: f.fd,
            emulator_fd: f.emulator_fd,
            cgroup: f.cgroup.clone(),
            class: f.class.clone(),
            category: f.category.clone(),
            maj: f.maj,
            acl: f.acl.clone(),
            vm_pid: f.vm_pid,
            extra: f.extra.iter().cloned().collect(),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix time `ns`.
pub fn rfc3339_ms(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// The proleptic Gregorian date of day `z` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::rfc3339_ms;

    #[test]
    fn rfc3339_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_ms(951_782_400_123_456_789),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_ms(1_718_000_000_042_000_000),
            "2024-06-10T06:13:20.042Z"
        );
        assert_eq!(
            rfc3339_ms(4_102_444_799_999_000_000),
            "2099-12-31T23:59:59.999Z"
        );
    }
}
