//! (b) Throughput: one thread gaining and losing fds as fast as it can (`dup(0)` + `close`, the
//! cheapest fd-creating syscall pair: no path lookup), watched by vmaudit at its default ring
//! buffer size and at smaller ones, to find where loss begins; and the same load under
//! bpftrace sending what vmaudit's event carries. Each run counts the events the load
//! generated (the helper counts the syscalls that succeeded), those the tracer delivered and
//! those it reported lost, which must add up; and vmaudit's CPU time, which gives the rate its
//! consumer can take.

use std::{fmt::Write as _, time::Instant};

use vmaudit_tests::{Bins, Helper};

use crate::{
    overhead::{MARK, poke},
    report::{goal, header, machine, median},
    tracers::{self, Bpftrace, WatchSummary},
};

pub struct Opts {
    /// dup+close pairs per run (each pair is two fd events).
    pub pairs: u64,
    /// Runs of each configuration, interleaved.
    pub runs: usize,
}

/// vmaudit's ring sizes, from the default (16 MiB) down to the smallest it accepts.
const RING_SIZES: [u32; 7] = [
    vmaudit_common::DEFAULT_RING_BYTES,
    4 << 20,
    1 << 20,
    256 << 10,
    64 << 10,
    16 << 10,
    4 << 10,
];

/// One configuration's runs.
#[derive(Default)]
struct Runs {
    /// Events generated per second, per run.
    rates: Vec<f64>,
    generated: u64,
    delivered: u64,
    /// Reported lost by the tracer.
    lost: u64,
    /// The highest share of generated events not delivered in any run.
    worst_loss: f64,
    /// The tracer's CPU time over the runs (vmaudit: from just before the load to its exit).
    cpu_ns: u64,
}

impl Runs {
    fn add(&mut self, rate: f64, generated: u64, delivered: u64, lost: u64) {
        self.rates.push(rate);
        self.generated += generated;
        self.delivered += delivered;
        self.lost += lost;
        let missing = generated.saturating_sub(delivered) as f64 / generated as f64;
        self.worst_loss = self.worst_loss.max(missing);
    }
}

/// One `flood_dup` of `pairs` pairs: (events per second, events made).
fn flood(h: &mut Helper, pairs: u64) -> (f64, u64) {
    let t = Instant::now();
    let made = h.fd(&format!("flood_dup {pairs}")) as u64;
    (made as f64 / t.elapsed().as_secs_f64(), made)
}

/// `delivered + lost` must be what the load made: otherwise the count is wrong, not the
/// tracer.
fn check(what: &str, generated: u64, delivered: u64, lost: u64) {
    assert_eq!(
        delivered + lost,
        generated,
        "{what}: {delivered} delivered + {lost} lost is not the {generated} events generated"
    );
}

fn human_bytes(n: u32) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n => format!("{} KiB", n >> 10),
    }
}

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
    let machine = machine();
    let started = Instant::now();
    let mut h = Helper::spawn(bins);
    flood(&mut h, o.pairs / 10);
    let mut bare = Runs::default();
    let mut vmaudit: Vec<Runs> = RING_SIZES.iter().map(|_| Runs::default()).collect();
    let mut bpftrace = Runs::default();
    let program = tracers::bpftrace_emit(h.pid(), libc::SYS_dup, libc::SYS_close, MARK);
    for run in 0..o.runs {
        let (rate, made) = flood(&mut h, o.pairs);
        bare.add(rate, made, made, 0);
        for (i, &ring) in RING_SIZES.iter().enumerate() {
            let w = tracers::watch(bins, h.pid(), Some(ring));
            let cpu0 = tracers::cpu_ns(w.pid());
            let (rate, made) = flood(&mut h, o.pairs);
            // vmaudit drains what is left in the ring when it stops.
            let out = w.stop();
            let s = WatchSummary::parse(&out.last);
            check(&format!("vmaudit (ring {ring})"), made, s.events, s.lost);
            eprintln!(
                "throughput run {}: vmaudit ring {}: {:.2} M events/s, {} delivered, {} lost, {} gaps",
                run + 1,
                human_bytes(ring),
                rate / 1e6,
                s.events,
                s.lost,
                s.gaps
            );
            vmaudit[i].add(rate, made, s.events, s.lost);
            vmaudit[i].cpu_ns += out.cpu_ns.saturating_sub(cpu0);
        }
        let mut bt = Bpftrace::start(&program, MARK, || poke(&mut h));
        let (rate, made) = flood(&mut h, o.pairs);
        // Every event before the poke has been printed or reported lost once its mark shows.
        bt.sync(|| poke(&mut h));
        let out = bt.stop();
        eprintln!(
            "throughput run {}: bpftrace emitting: {:.2} M events/s, {} lines, {} lost",
            run + 1,
            rate / 1e6,
            out.lines,
            out.lost
        );
        check("bpftrace emitting", made, out.lines, out.lost);
        bpftrace.add(rate, made, out.lines, out.lost);
    }
    let mut s = header(
        &format!(
            "{} run(s) per configuration, interleaved; each run {} dup+close pairs ({} fd events) by one thread; rates are medians, counts are totals over the runs",
            o.runs,
            o.pairs,
            2 * o.pairs
        ),
        &machine,
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        s,
        "| tracer | buffer | M fd events/s generated | delivered / generated | reported lost | worst run: not delivered | consumer CPU per event | consumer capacity, M events/s | goal |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut row = |what: &str, buffer: &str, r: &Runs, counted: bool, goal: &str| {
        let (delivered, lost, worst) = if counted {
            (
                format!("{} / {}", r.delivered, r.generated),
                r.lost.to_string(),
                format!("{:.2} %", 100.0 * r.worst_loss),
            )
        } else {
            (
                format!("(no tracer) / {}", r.generated),
                String::new(),
                String::new(),
            )
        };
        let (per_event, capacity) = if r.cpu_ns > 0 {
            let per = r.cpu_ns as f64 / r.delivered.max(1) as f64;
            (format!("{per:.0} ns"), format!("{:.2}", 1e3 / per))
        } else {
            (String::new(), String::new())
        };
        let _ = writeln!(
            s,
            "| {what} | {buffer} | {:.2} | {delivered} | {lost} | {worst} | {per_event} | {capacity} | {goal} |",
            median(&r.rates) / 1e6,
        );
    };
    row("none (bare)", "", &bare, false, "");
    for (i, &ring) in RING_SIZES.iter().enumerate() {
        let default = ring == vmaudit_common::DEFAULT_RING_BYTES;
        row(
            &format!("vmaudit watch{}", if default { " (default)" } else { "" }),
            &human_bytes(ring),
            &vmaudit[i],
            true,
            if default {
                "0 lost, ≥ 5 M events/s"
            } else {
                ""
            },
        );
    }
    row(
        "bpftrace emitting the same fields per event (`printf`, read and discarded)",
        "perf buffer, 64 pages per CPU",
        &bpftrace,
        true,
        "",
    );
    let first_loss = RING_SIZES
        .iter()
        .zip(&vmaudit)
        .find(|(_, r)| r.worst_loss > 0.0 || r.lost > 0)
        .map(|(ring, _)| human_bytes(*ring));
    let d = &vmaudit[0];
    let capacity = d.delivered as f64 / (d.cpu_ns.max(1) as f64 / 1e9);
    let _ = writeln!(
        s,
        "\nLoss begins at: {}.\n\nGoal in this run (default ring): {} of {} events lost, the \
         consumer taking {:.2} M events per CPU-second: {}.",
        first_loss
            .as_deref()
            .unwrap_or("no size measured (no loss down to 4 KiB)"),
        d.lost,
        d.generated,
        capacity / 1e6,
        goal(d.lost == 0 && d.worst_loss == 0.0 && capacity >= 5e6)
    );
    print!("{s}");
    s
}
