//! What every section of BENCHMARKS.md states beside its table (the machine, the command, the
//! run time), the statistics, and rewriting a section between its markers.

use std::{fmt::Write as _, path::Path, time::Duration};

/// CPUs, their model and the kernel, e.g. `2 CPUs (Intel(R) Xeon(R) Processor), kernel 6.18`.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load1 = load.split_whitespace().next().unwrap_or("?");
    format!(
        "{} CPUs ({cpu}), kernel {}; load average {load1} when the section started",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// The header of a section: command, what it ran, machine, run time.
pub fn header(what: &str, machine: &str, took: Duration, quick: bool) -> String {
    let mut t = String::new();
    let command = if quick {
        "`cargo xtask bench -- --quick` (a short run: figures are indicative only)"
    } else {
        "`cargo xtask bench`"
    };
    let _ = writeln!(t, "Command: {command}; {what}.");
    let _ = writeln!(
        t,
        "Machine: {machine}. Section took {:.0?}.\n",
        Duration::from_secs(took.as_secs())
    );
    t
}

/// How a goal came out in this run.
pub fn goal(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0)
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (appends both
/// markers and the text when they are missing).
pub fn write_section(path: &Path, name: &str, body: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, replace_section(&text, name, body)).expect("write benchmarks file");
}

fn replace_section(text: &str, name: &str, body: &str) -> String {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(z)) if a < z => format!("{}{begin}\n{body}{}", &text[..a], &text[z..]),
        _ => format!("{text}\n{begin}\n{body}{end}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_the_markers() {
        let text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n";
        assert_eq!(
            replace_section(text, "x", "new\n"),
            "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb\n"
        );
        assert_eq!(
            replace_section("a\n", "y", "t\n"),
            "a\n\n<!-- y:begin -->\nt\n<!-- y:end -->\n"
        );
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(quantile(&v, 0.5), 6);
        assert_eq!(quantile(&v, 1.0), 10);
        assert_eq!(quantile(&[], 0.99), 0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
