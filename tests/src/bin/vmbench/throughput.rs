//! (b) Throughput: one thread gaining and losing fds as fast as it can (`dup(0)` + `close`, the
//! cheapest fd-creating syscall pair: no path lookup), watched by vmaudit at its default ring
//! buffer size and at smaller ones, to find where loss begins; and the same load under
//! bpftrace printing one line per event. Each run counts the events the load generated, those
//! the tracer delivered, and those it reported lost.

use std::{fmt::Write as _, time::Instant};

use vmaudit_tests::{Bins, Helper};

use crate::{
    overhead::{MARK, poke},
    report::{header, machine, median},
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

/// Events per second of one `flood_dup` of `pairs` pairs.
fn flood(h: &mut Helper, pairs: u64) -> f64 {
    let t = Instant::now();
    h.fd(&format!("flood_dup {pairs}"));
    (2 * pairs) as f64 / t.elapsed().as_secs_f64()
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
    let generated = 2 * o.pairs;
    let mut h = Helper::spawn(bins);
    flood(&mut h, o.pairs / 10);
    let mut bare = Runs::default();
    let mut vmaudit: Vec<Runs> = RING_SIZES.iter().map(|_| Runs::default()).collect();
    let mut bpftrace = Runs::default();
    let pid = h.pid();
    let program = format!(
        "tracepoint:raw_syscalls:sys_exit /pid == {pid} && (args->id == {dup} || args->id == \
         {close})/ {{ if (args->id == {close} && args->ret == -9) {{ printf(\"{MARK}\\n\"); }} \
         else {{ printf(\"%d %d %d\\n\", pid, args->id, args->ret); }} }}",
        dup = libc::SYS_dup,
        close = libc::SYS_close,
    );
    for run in 0..o.runs {
        let rate = flood(&mut h, o.pairs);
        bare.add(rate, generated, generated, 0);
        for (i, &ring) in RING_SIZES.iter().enumerate() {
            let w = tracers::watch(bins, pid, Some(ring));
            let rate = flood(&mut h, o.pairs);
            // vmaudit drains what is left in the ring when it stops.
            let s = WatchSummary::parse(&w.stop().last);
            assert!(
                s.events + s.lost >= generated,
                "vmaudit (ring {ring}) received {} and reported {} lost of {generated} events: \
                 the count is wrong, not the tracker",
                s.events,
                s.lost
            );
            eprintln!(
                "throughput run {}: vmaudit ring {}: {:.2} M events/s, {} delivered, {} lost, {} gaps",
                run + 1,
                human_bytes(ring),
                rate / 1e6,
                s.events,
                s.lost,
                s.gaps
            );
            vmaudit[i].add(rate, generated, s.events.min(generated), s.lost);
        }
        let mut bt = Bpftrace::start(&program, MARK, || poke(&mut h));
        let rate = flood(&mut h, o.pairs);
        // Every event before the poke has been printed or reported lost once its mark shows.
        bt.sync(|| poke(&mut h));
        let out = bt.stop();
        eprintln!(
            "throughput run {}: bpftrace printf: {:.2} M events/s, {} lines, {} lost",
            run + 1,
            rate / 1e6,
            out.lines,
            out.lost
        );
        assert!(
            out.lines > 0,
            "bpftrace printed no event line: its program did not run ({out:?})"
        );
        bpftrace.add(rate, generated, out.lines.min(generated), out.lost);
    }
    let mut s = header(
        &format!(
            "{} run(s) per configuration, interleaved; each run {} dup+close pairs ({} fd events) by one thread; rates are medians, counts are totals over the runs",
            o.runs, o.pairs, generated
        ),
        &machine,
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        s,
        "| tracer | buffer | M fd events/s generated | delivered | reported lost | worst run: not delivered | goal |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let mut row = |what: &str, buffer: &str, r: &Runs, goal: &str| {
        let _ = writeln!(
            s,
            "| {what} | {buffer} | {:.2} | {} / {} | {} | {:.2} % | {goal} |",
            median(&r.rates) / 1e6,
            r.delivered,
            r.generated,
            r.lost,
            100.0 * r.worst_loss
        );
    };
    row("none (bare)", "", &bare, "");
    for (i, &ring) in RING_SIZES.iter().enumerate() {
        let default = if ring == vmaudit_common::DEFAULT_RING_BYTES {
            " (default)"
        } else {
            ""
        };
        let goal = if default.is_empty() { "" } else { "0 lost" };
        row(
            &format!("vmaudit watch{default}"),
            &human_bytes(ring),
            &vmaudit[i],
            goal,
        );
    }
    row(
        "bpftrace, one printf line per event",
        "perf buffer, 64 pages per CPU",
        &bpftrace,
        "",
    );
    let first_loss = RING_SIZES
        .iter()
        .zip(&vmaudit)
        .find(|(_, r)| r.worst_loss > 0.0 || r.lost > 0)
        .map(|(ring, _)| human_bytes(*ring));
    let _ = writeln!(
        s,
        "\nLoss begins at: {}.",
        first_loss
            .as_deref()
            .unwrap_or("no size measured (no loss down to 4 KiB)")
    );
    print!("{s}");
    s
}
