//! Time as the records and the journal write it: the kernel audit stamp
//! `SECS.MSEC:SERIAL` and RFC 3339 with milliseconds.

use std::fmt;

/// The kernel's stamp of an audit record: when (Unix seconds and milliseconds), and its event
/// serial number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub secs: u64,
    pub msec: u16,
    pub serial: u64,
}

impl Stamp {
    /// Parses `SECS.MSEC:SERIAL` (the inside of `audit(...)`): digits only, milliseconds
    /// below 1000.
    pub fn parse(s: &str) -> Option<Self> {
        let (time, serial) = s.split_once(':')?;
        let (secs, msec) = time.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !(digits(secs) && digits(msec) && digits(serial)) {
            return None;
        }
        let msec: u16 = msec.parse().ok()?;
        (msec < 1000).then_some(())?;
        Some(Self {
            secs: secs.parse().ok()?,
            msec,
            serial: serial.parse().ok()?,
        })
    }

    /// The stamp's time in Unix nanoseconds (millisecond precision).
    pub fn unix_ns(self) -> u64 {
        self.secs
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(self.msec) * 1_000_000)
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}:{}", self.secs, self.msec, self.serial)
    }
}

/// Unix nanoseconds now (0 if the clock is before 1970).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix time `ns`.
pub fn rfc3339_ms(ns: u64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| format!("@{ns}"))
}

/// Parses an RFC 3339 time (any offset) to Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            parse_rfc3339("2024-06-10T08:13:20.042+02:00"),
            Some(1_718_000_000_042_000_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn stamps_parse_and_print() {
        let s = Stamp::parse("1718000000.042:317").unwrap();
        assert_eq!((s.secs, s.msec, s.serial), (1_718_000_000, 42, 317));
        assert_eq!(s.to_string(), "1718000000.042:317");
        assert_eq!(s.unix_ns(), 1_718_000_000_042_000_000);
        for bad in ["1.2", "1:2", "a.042:1", "1.1000:1", "1.042:", ".042:1"] {
            assert_eq!(Stamp::parse(bad), None, "{bad}");
        }
    }
}
