//! The filters of `vmaudit search`, parsed from what a person types; each parse error names
//! the value.

use thiserror::Error;

use super::Event;
use crate::{procfs::DevNum, verify::Status};

/// A filter value that cannot be what its flag wants.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--mac {0:?} is not a MAC address (six hex octets, like 52:54:00:12:34:56)")]
    Mac(String),
    #[error("--uuid {0:?} is not a uuid")]
    Uuid(String),
    #[error(
        "--device {0:?} is neither a device path (/dev/...) nor MAJ:MIN (10:200, or libvirt's hex 0A:C8)"
    )]
    Device(String),
    #[error("{flag} {value:?} is neither RFC 3339 (2024-06-10T06:13:20Z) nor Unix seconds")]
    Time { flag: &'static str, value: String },
    #[error("--since {since} is after --until {until}")]
    Range { since: String, until: String },
}

/// A device: by path, or by number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Path(String),
    Rdev(DevNum),
}

/// Every filter; an event matches when it passes each one given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Lower case.
    pub mac: Option<String>,
    pub vm: Option<String>,
    /// Lower case, hyphenated.
    pub uuid: Option<String>,
    /// The emulator's pid (or any pid in the kernel's evidence).
    pub pid: Option<u32>,
    pub device: Option<Device>,
    /// Unix ns, inclusive.
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub status: Option<Status>,
}

/// `52:54:00:AA:bb:cc` (or with `-`) as `52:54:00:aa:bb:cc`.
pub fn parse_mac(s: &str) -> Result<String, FilterError> {
    let octets: Vec<&str> = s.split([':', '-']).collect();
    if octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(octets.join(":").to_ascii_lowercase())
    } else {
        Err(FilterError::Mac(s.to_owned()))
    }
}

pub fn parse_uuid(s: &str) -> Result<String, FilterError> {
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| FilterError::Uuid(s.to_owned()))
}

/// A path (`/dev/net/tun`, `/dev/tap12`), or `MAJ:MIN`: decimal (as /proc, `ls -l` and the
/// journal write it) unless a part has a hex letter or a `0x` prefix (libvirt's `0A:C8`).
pub fn parse_device(s: &str) -> Result<Device, FilterError> {
    let bad = || FilterError::Device(s.to_owned());
    if s.starts_with('/') {
        return Ok(Device::Path(s.to_owned()));
    }
    DevNum::parse_either(s).map(Device::Rdev).ok_or_else(bad)
}

/// RFC 3339 (`2024-06-10T06:13:20.042Z`, any offset) or Unix seconds (`1718000000`,
/// `1718000000.5`), as Unix ns.
pub fn parse_time(flag: &'static str, s: &str) -> Result<u64, FilterError> {
    let bad = || FilterError::Time {
        flag,
        value: s.to_owned(),
    };
    if let Some(ns) = vmaudit_core::time::parse_rfc3339(s) {
        return Ok(ns);
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
    {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<9}").parse().map_err(|_| bad())?;
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(frac))
        .ok_or_else(bad)
}

impl Filter {
    /// Checks that the range is a range.
    pub fn check(&self) -> Result<(), FilterError> {
        match (self.since, self.until) {
            (Some(s), Some(u)) if s > u => Err(FilterError::Range {
                since: vmaudit_core::time::rfc3339_ms(s),
                until: vmaudit_core::time::rfc3339_ms(u),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `e` passes every filter given.
    pub fn matches(&self, e: &Event) -> bool {
        self.matches_except_time(e)
            && self.since.is_none_or(|s| e.ts_ns >= s)
            && self.until.is_none_or(|u| e.ts_ns <= u)
    }

    /// Every filter but the time range (the questions search backwards from `--at`).
    pub fn matches_except_time(&self, e: &Event) -> bool {
        let evidence = || e.verdicts.iter().flat_map(|v| &v.evidence);
        self.mac.as_deref().is_none_or(|m| e.mac() == Some(m))
            && self
                .vm
                .as_deref()
                .is_none_or(|vm| e.rec.vm.as_deref() == Some(vm))
            && self.uuid.as_deref().is_none_or(|u| {
                e.rec
                    .uuid
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(u))
            })
            && self
                .pid
                .is_none_or(|p| e.emulator_pid == Some(p) || evidence().any(|ev| ev.pid == p))
            && self.device.as_ref().is_none_or(|d| match d {
                Device::Path(p) => {
                    e.rec.path.as_deref() == Some(p)
                        || evidence().any(|ev| ev.path.as_deref() == Some(p))
                }
                Device::Rdev(r) => {
                    e.rec.rdev == Some(*r)
                        || evidence().any(|ev| ev.rdev.as_deref() == Some(&r.to_string()))
                }
            })
            && self
                .status
                .is_none_or(|s| e.verdicts.iter().any(|v| v.status == s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::virt::VirtRecord,
        verify::{ClaimRef, Evidence, Verdict},
    };

    fn event() -> Event {
        let mut v = Verdict::new(
            ClaimRef {
                id: 1,
                kind: "net-start".into(),
                record_ts_ns: 2_000_000_000,
                text: String::new(),
                mac: Some("52:54:00:00:00:01".into()),
                fd: None,
            },
            Status::Confirmed,
            "held",
            vec![Evidence {
                pid: 77,
                fd: Some(41),
                what: "inherit".into(),
                path: Some("/dev/net/tun".into()),
                rdev: Some("10:200".into()),
                ..Evidence::default()
            }],
        );
        v.ts_ns = 2_100_000_000;
        Event {
            source: "j:1".into(),
            ts: String::new(),
            ts_ns: 2_000_000_000,
            kind: "VIRT_RESOURCE".into(),
            rec: VirtRecord {
                resrc: Some("net".into()),
                reason: Some("start".into()),
                vm: Some("web1".into()),
                uuid: Some("5b0c2a7e-9a55-4d5e-8f0a-2f7e1c3d4b6a".into()),
                mac: Some("52:54:00:00:00:01".into()),
                ..VirtRecord::default()
            },
            emulator_pid: Some(77),
            emulator_fds: vec![41],
            text: String::new(),
            extra: Default::default(),
            verdicts: vec![v],
            from_journal: true,
        }
    }

    fn f(edit: impl FnOnce(&mut Filter)) -> bool {
        let mut f = Filter::default();
        edit(&mut f);
        f.matches(&event())
    }

    #[test]
    fn each_filter_matches_and_refuses() {
        assert!(f(|_| {}));
        assert!(f(|f| f.mac = Some(parse_mac("52:54:00:00:00:01").unwrap())));
        assert!(!f(|f| f.mac = Some(parse_mac("52:54:00:00:00:02").unwrap())));
        assert!(f(|f| f.vm = Some("web1".into())));
        assert!(!f(|f| f.vm = Some("web".into())), "names match whole");
        assert!(f(|f| f.uuid = Some(
            parse_uuid("5B0C2A7E-9A55-4D5E-8F0A-2F7E1C3D4B6A").unwrap()
        )));
        assert!(!f(|f| f.uuid = Some(
            parse_uuid("00000000-9a55-4d5e-8f0a-2f7e1c3d4b6a").unwrap()
        )));
        assert!(f(|f| f.pid = Some(77)));
        assert!(!f(|f| f.pid = Some(78)));
        assert!(f(|f| f.device = Some(parse_device("/dev/net/tun").unwrap())));
        assert!(!f(
            |f| f.device = Some(parse_device("/dev/vhost-net").unwrap())
        ));
        assert!(f(|f| f.device = Some(parse_device("10:200").unwrap())));
        assert!(f(|f| f.device = Some(parse_device("0A:C8").unwrap())));
        assert!(!f(|f| f.device = Some(parse_device("10:238").unwrap())));
        assert!(f(|f| f.status = Some(Status::Confirmed)));
        assert!(!f(|f| f.status = Some(Status::Violated)));
        assert!(f(|f| f.since = Some(2_000_000_000)), "inclusive");
        assert!(f(|f| f.until = Some(2_000_000_000)), "inclusive");
        assert!(!f(|f| f.since = Some(2_000_000_001)));
        assert!(!f(|f| f.until = Some(1_999_999_999)));
        assert!(
            !f(|f| {
                f.mac = Some("52:54:00:00:00:01".into());
                f.vm = Some("other".into());
            }),
            "every filter must pass"
        );
    }

    #[test]
    fn values_are_parsed_or_named_in_the_error() {
        assert_eq!(parse_mac("52-54-00-AA-BB-CC").unwrap(), "52:54:00:aa:bb:cc");
        for bad in [
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:cc:dd",
            "52:54:00:aa:bb:zz",
            "",
        ] {
            assert_eq!(parse_mac(bad), Err(FilterError::Mac(bad.into())));
        }
        assert!(parse_uuid("not-a-uuid").is_err());
        let rdev = |major, minor| Device::Rdev(DevNum { major, minor });
        assert_eq!(parse_device("10:200").unwrap(), rdev(10, 200));
        assert_eq!(parse_device("0A:C8").unwrap(), rdev(10, 200));
        assert_eq!(parse_device("0x88:0").unwrap(), rdev(136, 0));
        assert_eq!(parse_device("01:03").unwrap(), rdev(1, 3));
        for bad in ["tun", "10:", ":200", "10:2x0", "g1:01", "dev/net/tun"] {
            assert_eq!(
                parse_device(bad),
                Err(FilterError::Device(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse_time("--since", "2024-06-10T06:13:20.042Z").unwrap(),
            1_718_000_000_042_000_000
        );
        assert_eq!(
            parse_time("--since", "2024-06-10T08:13:20+02:00").unwrap(),
            1_718_000_000_000_000_000
        );
        assert_eq!(
            parse_time("--until", "1718000000").unwrap(),
            1_718_000_000_000_000_000
        );
        assert_eq!(
            parse_time("--until", "1718000000.5").unwrap(),
            1_718_000_000_500_000_000
        );
        for bad in [
            "yesterday",
            "2024-06-10",
            "-5",
            "1.2.3",
            "",
            "99999999999999999999",
        ] {
            let e = parse_time("--at", bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("--at {bad:?} is neither RFC 3339 (2024-06-10T06:13:20Z) nor Unix seconds")
            );
        }
        let range = Filter {
            since: Some(2),
            until: Some(1),
            ..Filter::default()
        };
        assert!(matches!(range.check(), Err(FilterError::Range { .. })));
    }
}
