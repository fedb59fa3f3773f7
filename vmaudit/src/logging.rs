//! vmaudit's stderr: one line per message, `vmaudit: ` then the message, with `warning: `,
//! `error: ` or `debug: ` before it for other levels than info.
//!
//! Under a service manager that connects stderr to the journal (`JOURNAL_STREAM` names
//! stderr's device and inode, as systemd sets it), each line starts with its syslog priority
//! instead (`<3>` error, `<4>` warning, `<5>` notice, `<6>` info, `<7>` debug), so
//! `journalctl -p err` shows the violations and only them. The level is `-v`/`-q`'s when
//! given, else `RUST_LOG`'s, else info. Notices (the ready lines scripts and units wait for,
//! "monitoring manager pid N", "serving http://...", and a command's result) and the one line
//! of a failure are printed whatever the level.

use std::{
    fmt,
    io::Write as _,
    os::fd::AsFd as _,
    sync::atomic::{AtomicBool, Ordering},
};

use log::{Level, LevelFilter};

static UNDER_JOURNAL: AtomicBool = AtomicBool::new(false);

/// Sets the logger up. `level`: the level `-v`/`-q` asked for, if they were given.
pub fn init(level: Option<LevelFilter>) {
    UNDER_JOURNAL.store(stderr_is_journal(), Ordering::Relaxed);
    let mut b = match level {
        Some(l) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(l);
            b
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    b.format(|out, rec| writeln!(out, "{}", Formatted(Some(rec.level()), rec.args())))
        .init();
}

/// A line printed whatever the level: a notice (`None`: a ready line, a result) or a failure
/// (`Some(Error)`).
pub fn always(level: Option<Level>, args: fmt::Arguments<'_>) {
    let line = format!("{}\n", Formatted(level, &args));
    // Nothing to do when stderr is gone; the exit code still says what happened.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// A ready line or a result (notice priority under the journal): printed whatever the level.
#[macro_export]
macro_rules! notice {
    ($($t:tt)*) => { $crate::logging::always(None, format_args!($($t)*)) };
}

/// The one line of a failure: printed whatever the level (error priority).
#[macro_export]
macro_rules! failure {
    ($($t:tt)*) => {
        $crate::logging::always(Some(log::Level::Error), format_args!($($t)*))
    };
}

/// A message at `level` (`None`: a notice), as one line without its newline.
struct Formatted<'a>(Option<Level>, &'a fmt::Arguments<'a>);

impl fmt::Display for Formatted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if UNDER_JOURNAL.load(Ordering::Relaxed) {
            write!(f, "<{}>vmaudit: {}", priority(self.0), self.1)
        } else {
            write!(f, "vmaudit: {}{}", tag(self.0), self.1)
        }
    }
}

/// The syslog priority of a level (sd-daemon(3)'s prefixes).
fn priority(level: Option<Level>) -> u8 {
    match level {
        Some(Level::Error) => 3,
        Some(Level::Warn) => 4,
        None => 5,
        Some(Level::Info) => 6,
        Some(Level::Debug | Level::Trace) => 7,
    }
}

fn tag(level: Option<Level>) -> &'static str {
    match level {
        Some(Level::Error) => "error: ",
        Some(Level::Warn) => "warning: ",
        None | Some(Level::Info) => "",
        Some(Level::Debug) => "debug: ",
        Some(Level::Trace) => "trace: ",
    }
}

/// Whether stderr is the journal stream systemd named in `JOURNAL_STREAM` (`DEV:INODE`): a
/// stderr redirected elsewhere by the unit's command gets no prefixes.
fn stderr_is_journal() -> bool {
    let Ok(named) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    named == format!("{}:{}", st.st_dev, st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_is_an_error_to_the_journal_and_says_so_on_a_terminal() {
        assert_eq!(priority(Some(Level::Error)), 3);
        assert_eq!(priority(None), 5);
        assert_eq!(priority(Some(Level::Debug)), 7);
        let line = Formatted(Some(Level::Error), &format_args!("VIOLATION: x")).to_string();
        assert_eq!(line, "vmaudit: error: VIOLATION: x");
        let line = Formatted(None, &format_args!("serving")).to_string();
        assert_eq!(line, "vmaudit: serving");
    }
}
