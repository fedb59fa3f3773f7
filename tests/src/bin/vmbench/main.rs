//! vmaudit's benchmark suite: each figure measured side by side with its baseline in one run,
//! each section of BENCHMARKS.md rewritten between its markers.
//!
//! Sections (issue 7), run in this order:
//! - `overhead` (a): syscall overhead of an openat+close loop, bare / no-op hook / unwatched /
//!   watched / bpftrace ([`overhead`]);
//! - `throughput` (b): the highest fd-event rate one thread produces, what vmaudit delivers and
//!   loses as its ring buffer shrinks, and bpftrace printing each event ([`throughput`]);
//! - `verdict` (c): claim-to-verdict latency of `vmaudit run` ([`verdict`]);
//! - `scale` (d): monitor mode with 10, 100 and 1000 stand-in emulators ([`scale`]);
//! - `lifecycles` (e): monitor mode over 10,000 VM lifecycles, its memory ([`lifecycles`]);
//! - `soak` (f): 10,000 attach/detach cycles of `vmaudit run` on the stand-in emulator, fds and
//!   RSS sampled ([`soak`]);
//! - `dashboard` (g): the dashboard's update and render time at 1,000 VMs × 4 fds, in headless
//!   Chromium ([`dashboard`]).
//!
//! A new section is a module with a `run(&Bins, &Opts, quick) -> String` and a [`Section`]
//! variant.
//!
//! Usage (as root; `cargo xtask bench -- ARGS` builds and runs it):
//! `vmbench [--quick] [--only SECTION[,SECTION...]] [--write BENCHMARKS.md] [--rounds R]
//! [--iterations N] [--throughput-pairs N] [--throughput-runs R] [--verdict-runs R]
//! [--vms N,N,...] [--cycles N]`.
//! A section that cannot be set up (a tracer that does not attach, a count that does not add
//! up) fails the whole run loudly: no table is written from nonsense.

mod dashboard;
mod lifecycles;
mod overhead;
mod report;
mod scale;
mod soak;
mod throughput;
mod tracers;
mod verdict;

use std::{path::PathBuf, time::Instant};

use vmaudit_tests::{Bins, require_root};

/// The sections, in the order they run; the name is the marker in BENCHMARKS.md.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Section {
    Overhead,
    Throughput,
    Verdict,
    Scale,
    Lifecycles,
    Soak,
    Dashboard,
}

impl Section {
    const ALL: [Section; 7] = [
        Self::Overhead,
        Self::Throughput,
        Self::Verdict,
        Self::Scale,
        Self::Lifecycles,
        Self::Soak,
        Self::Dashboard,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Overhead => "overhead",
            Self::Throughput => "throughput",
            Self::Verdict => "verdict",
            Self::Scale => "scale",
            Self::Lifecycles => "lifecycles",
            Self::Soak => "soak",
            Self::Dashboard => "dashboard",
        }
    }

    fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .unwrap_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|x| x.name()).collect();
                panic!("unknown section {s:?} (sections: {})", names.join(", "))
            })
    }
}

struct Opts {
    quick: bool,
    only: Vec<Section>,
    write: Option<PathBuf>,
    overhead: overhead::Opts,
    throughput: throughput::Opts,
    verdict: verdict::Opts,
    scale: scale::Opts,
    soak: soak::Opts,
}

fn parse() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--quick`: every section, end to end, in about a minute; figures indicative only.
    let mut o = Opts {
        quick,
        only: Section::ALL.to_vec(),
        write: None,
        overhead: overhead::Opts {
            rounds: if quick { 3 } else { 11 },
            iterations: if quick { 50_000 } else { 200_000 },
        },
        throughput: throughput::Opts {
            pairs: if quick { 200_000 } else { 1_000_000 },
            runs: if quick { 1 } else { 3 },
        },
        verdict: verdict::Opts {
            runs: if quick { 5 } else { 20 },
        },
        scale: scale::Opts {
            vms: if quick {
                vec![10, 100]
            } else {
                vec![10, 100, 1000]
            },
        },
        soak: soak::Opts {
            cycles: if quick { 500 } else { 10_000 },
        },
    };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {}
            "--only" => o.only = val().split(',').map(Section::parse).collect(),
            "--write" => o.write = Some(PathBuf::from(val())),
            "--rounds" => o.overhead.rounds = val().parse().expect("--rounds N"),
            "--iterations" => o.overhead.iterations = val().parse().expect("--iterations N"),
            "--throughput-pairs" => {
                o.throughput.pairs = val().parse().expect("--throughput-pairs N")
            }
            "--throughput-runs" => o.throughput.runs = val().parse().expect("--throughput-runs N"),
            "--verdict-runs" => o.verdict.runs = val().parse().expect("--verdict-runs N"),
            "--vms" => {
                o.scale.vms = val()
                    .split(',')
                    .map(|s| s.parse().expect("--vms N,N,..."))
                    .collect()
            }
            "--cycles" => o.soak.cycles = val().parse().expect("--cycles N"),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn main() {
    require_root();
    let o = parse();
    let exe = std::env::current_exe().expect("current exe");
    let helper = exe.parent().expect("bin dir").join("fdhelper");
    let bins = Bins::new(helper.to_str().expect("utf-8 path"));
    let started = Instant::now();
    for section in Section::ALL.into_iter().filter(|s| o.only.contains(s)) {
        eprintln!("== {}", section.name());
        let body = match section {
            Section::Overhead => overhead::run(&bins, &o.overhead, o.quick),
            Section::Throughput => throughput::run(&bins, &o.throughput, o.quick),
            Section::Verdict => verdict::run(&bins, &o.verdict, o.quick),
            Section::Scale => scale::run(&bins, &o.scale, o.quick),
            Section::Lifecycles => lifecycles::run(&bins, o.quick),
            Section::Soak => soak::run(&bins, &o.soak, o.quick),
            Section::Dashboard => dashboard::run(&bins, o.quick),
        };
        // Each section is written as soon as it is measured: a later failure keeps it.
        if let Some(path) = &o.write {
            report::write_section(path, section.name(), &body);
            eprintln!("wrote section {} of {}", section.name(), path.display());
        }
    }
    eprintln!("suite took {:.0?}", started.elapsed());
}
