//! (a) Syscall overhead: an openat+close loop in an `fdhelper` process, timed by the helper's
//! own round trip, in five configurations interleaved round by round, so that drift on the
//! machine hits all of them alike:
//! - `bare`: nothing attached;
//! - `no-op hook`: a program that returns at once on `raw_syscalls/sys_exit`;
//! - `floor`: a program that sends a bare 64-byte event per syscall exit of the loop (nothing
//!   read), drained by vmaudit as its tracker's events are: the floor of any tracer that sends
//!   an event per fd change;
//! - `pid filter`: the same program sending for another process (the `watched` helper, idle):
//!   what asking the kernel for the current pid and comparing it costs, the floor under any
//!   program that filters by process;
//! - `unwatched`: `vmaudit watch` running, watching another process;
//! - `watched`: the looping process is the one watched;
//! - `bpftrace`: Debian's bpftrace on the same tracepoint, counting the looping process's
//!   syscalls per pid;
//! - `bpftrace emitting`: bpftrace sending, per event, what vmaudit's event carries (time, pid,
//!   tid, syscall, result, and for the new fd the file read from the task's fd table), read
//!   and discarded by this process: the like-for-like comparison.
//!
//! vmaudit's summary after each watched loop says what it delivered and lost of the loop's
//! events; bpftrace's printed lines and loss reports likewise: each must add up to the loop.
//!
//! Then a profile pass (not timed in the table): with the kernel's BPF run-time statistics on,
//! the programs' own time per run and vmaudit's CPU time per event.

use std::{fmt::Write as _, time::Instant};

use vmaudit_tests::{Bins, Helper};

use crate::{
    report::{goal, header, machine, median},
    tracers::{self, Bpftrace, ProgStats, WatchSummary, prog_stats},
};

pub struct Opts {
    pub rounds: usize,
    pub iterations: u64,
}

/// The text bpftrace's programs print for the benchmark's poke (`close(-1)` by the loop).
pub const MARK: &str = "vmbench-mark";

/// ns per openat+close pair, timed around one `flood` command.
fn time_loop(h: &mut Helper, n: u64) -> f64 {
    let t = Instant::now();
    h.fd(&format!("flood {n}"));
    t.elapsed().as_nanos() as f64 / n as f64
}

/// `close(-1)` in the helper: a syscall the loops never make, which bpftrace's programs answer
/// with [`MARK`].
pub fn poke(h: &mut Helper) {
    // It fails (EBADF) by design.
    let _ = h.try_cmd("close -1");
}

/// bpftrace counting one process's syscalls per pid, on the tracepoint vmaudit uses.
fn bpftrace_count(h: &mut Helper) -> Bpftrace {
    let pid = h.pid();
    let program = format!(
        "tracepoint:raw_syscalls:sys_exit /pid == {pid}/ {{ @[pid] = count(); \
         if (args->id == {close} && args->ret == -9) {{ printf(\"{MARK}\\n\"); }} }}",
        close = libc::SYS_close,
    );
    Bpftrace::start(&program, MARK, || poke(h))
}

/// bpftrace sending what vmaudit's event carries for each openat and close of the looping
/// process (see [`tracers::bpftrace_emit`]).
fn bpftrace_emit(h: &mut Helper) -> Bpftrace {
    let program = tracers::bpftrace_emit(h.pid(), libc::SYS_openat, libc::SYS_close, MARK);
    Bpftrace::start(&program, MARK, || poke(h))
}

/// Delivered and lost events of a tracer over the rounds.
#[derive(Default)]
struct Counts {
    generated: u64,
    delivered: u64,
    lost: u64,
}

impl Counts {
    /// Adds one loop's counts; they must add up to what the loop generated.
    fn add(&mut self, what: &str, generated: u64, delivered: u64, lost: u64) {
        assert_eq!(
            delivered + lost,
            generated,
            "{what}: {delivered} delivered + {lost} lost is not the loop's {generated} events"
        );
        self.generated += generated;
        self.delivered += delivered;
        self.lost += lost;
    }

    fn cell(&self) -> String {
        format!(
            "{} / {}, {} lost",
            self.delivered, self.generated, self.lost
        )
    }
}

/// Stops bpftrace and checks that it counted at least the loop's syscalls: a bpftrace that
/// saw nothing would make it look free.
fn stop_bpftrace(bt: Bpftrace, pid: u32, at_least: u64) {
    let out = bt.stop();
    let counted = out
        .map
        .iter()
        .find(|(k, _)| *k == pid.to_string())
        .map(|(_, n)| *n);
    match counted {
        Some(n) if n >= at_least => {}
        _ => panic!(
            "bpftrace counted {counted:?} syscalls of pid {pid}, expected ≥ {at_least}: {out:?}"
        ),
    }
}

pub fn run(bins: &Bins, o: &Opts, quick: bool) -> String {
    let machine = machine();
    let started = Instant::now();
    let mut watched = Helper::spawn(bins);
    let mut looper = Helper::spawn(bins);
    // bpftrace emitting slows the loop tenfold or more: fewer pairs, the same per-pair time.
    let emit_n = (o.iterations / 10).max(1000);
    // Warm up caches and the dentry of /dev/null.
    time_loop(&mut looper, o.iterations / 10);
    let mut t: [Vec<f64>; 8] = Default::default();
    let (mut vm_counts, mut emit_counts) = (Counts::default(), Counts::default());
    for round in 0..o.rounds {
        let [bare, noop, filter, floor, unw, wat, bpf, emit] = &mut t;
        bare.push(time_loop(&mut looper, o.iterations));
        let g = tracers::noop_hook(bins);
        noop.push(time_loop(&mut looper, o.iterations));
        g.stop();
        let g = tracers::emit_floor(bins, watched.pid());
        filter.push(time_loop(&mut looper, o.iterations));
        g.stop();
        let g = tracers::emit_floor(bins, looper.pid());
        floor.push(time_loop(&mut looper, o.iterations));
        g.stop();
        let g = tracers::watch(bins, watched.pid(), None);
        // Alternate which goes first, so neither always follows vmaudit's start-up.
        if round % 2 == 0 {
            unw.push(time_loop(&mut looper, o.iterations));
            wat.push(time_loop(&mut watched, o.iterations));
        } else {
            wat.push(time_loop(&mut watched, o.iterations));
            unw.push(time_loop(&mut looper, o.iterations));
        }
        let s = WatchSummary::parse(&g.stop().last);
        vm_counts.add("vmaudit watched", 2 * o.iterations, s.events, s.lost);
        let bt = bpftrace_count(&mut looper);
        bpf.push(time_loop(&mut looper, o.iterations));
        stop_bpftrace(bt, looper.pid(), 2 * o.iterations);
        let mut bt = bpftrace_emit(&mut looper);
        emit.push(time_loop(&mut looper, emit_n));
        // Every event before the poke has been printed or reported lost once its mark shows.
        bt.sync(|| poke(&mut looper));
        let out = bt.stop();
        emit_counts.add("bpftrace emitting", 2 * emit_n, out.lines, out.lost);
        eprintln!(
            "overhead round {}: bare {:.0} ns, no-op hook {:.0} ns, pid filter {:.0} ns, floor \
             {:.0} ns, unwatched {:.0} ns, watched {:.0} ns, bpftrace {:.0} ns, bpftrace \
             emitting {:.0} ns",
            round + 1,
            bare[round],
            noop[round],
            filter[round],
            floor[round],
            unw[round],
            wat[round],
            bpf[round],
            emit[round]
        );
    }
    let [b, n, pf, f, u, w, bt, be] = t.map(|v| median(&v));
    let profile = profile(bins, &mut looper, &mut watched, o.iterations);
    let mut s = header(
        &format!(
            "{} rounds × {} openat+close pairs per configuration ({emit_n} under bpftrace \
             emitting), interleaved; medians",
            o.rounds, o.iterations
        ),
        &machine,
        started.elapsed(),
        quick,
    );
    let _ = writeln!(
        s,
        "| configuration | ns per openat+close | ratio to bare | events delivered / generated | goal |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let mut row = |what: &str, ns: f64, counts: &str, goal: &str| {
        let _ = writeln!(
            s,
            "| {what} | {ns:.0} | {:.3} | {counts} | {goal} |",
            ns / b
        );
    };
    row("bare (nothing attached)", b, "", "");
    row(
        "no-op program on raw_syscalls/sys_exit (the floor of any syscall hook)",
        n,
        "",
        "",
    );
    row(
        "pid filter: the floor program below, sending for another process (the pid read and compared)",
        pf,
        "",
        "",
    );
    row(
        "floor: a bare 64-byte event per syscall of the loop, nothing read (`noop-hook --emit-for`)",
        f,
        "",
        "",
    );
    row(
        "unwatched (vmaudit attached, another pid watched)",
        u,
        "",
        "≤ no-op + 0.01",
    );
    row(
        "watched (vmaudit's JSON read and discarded)",
        w,
        &vm_counts.cell(),
        "≤ 1.20, < both bpftrace rows",
    );
    row(
        "bpftrace counting: `@[pid] = count()` for this pid",
        bt,
        "",
        "",
    );
    row(
        "bpftrace emitting the same fields per event (`printf`, read and discarded)",
        be,
        &emit_counts.cell(),
        "",
    );
    let watched_met = w / b <= 1.20 && w < bt && w < be;
    let unwatched_met = u / b <= n / b + 0.01;
    let _ = writeln!(
        s,
        "\nGoals in this run: watched {:.3}× ({} bpftrace counting at {:.3}×, {} bpftrace \
         emitting at {:.3}×; the floor of sending an event per syscall is {:.3}×): {}; \
         unwatched {:.3}× against the no-op hook's {:.3}× (a bare pid filter: {:.3}×): {}.\n",
        w / b,
        if w < bt { "below" } else { "above" },
        bt / b,
        if w < be { "below" } else { "above" },
        be / b,
        f / b,
        goal(watched_met),
        u / b,
        n / b,
        pf / b,
        goal(unwatched_met),
    );
    s.push_str(&profile);
    print!("{s}");
    s
}

/// The programs' own cost with the kernel's run-time statistics on (they add two clock reads
/// per run, so this pass is not part of the table), and vmaudit's CPU time per event.
fn profile(bins: &Bins, looper: &mut Helper, watched: &mut Helper, n: u64) -> String {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .expect("BPF_ENABLE_STATS (kernel.bpf_stats_enabled) for the profile pass");
    let vmaudit_progs =
        |_: u32, name: Option<&str>| name.is_some_and(|n| n.starts_with("vmaudit_"));
    let per_run = |d: ProgStats| d.run_ns as f64 / d.runs.max(1) as f64;

    let g = tracers::watch(bins, watched.pid(), None);
    let s0 = prog_stats(vmaudit_progs);
    time_loop(looper, n);
    let s1 = prog_stats(vmaudit_progs);
    let c1 = tracers::cpu_ns(g.pid());
    let ns_watched = time_loop(watched, n);
    let s2 = prog_stats(vmaudit_progs);
    let c2 = tracers::cpu_ns(g.pid());
    g.stop();
    let unwatched = s1 - s0;
    let watched_d = s2 - s1;
    // Runs during the watched loop that were not the loop's two syscalls per pair: other
    // processes' syscalls, at the unwatched cost.
    let others = watched_d.runs.saturating_sub(2 * n) as f64;
    let watched_prog_per_pair =
        (watched_d.run_ns as f64 - others * per_run(unwatched)).max(0.0) / n as f64;
    let consumer_per_pair = (c2 - c1) as f64 / n as f64;

    let bt = bpftrace_count(looper);
    let ids = bt.programs.clone();
    let b0 = prog_stats(|id, _| ids.contains(&id));
    let ns_bpftrace = time_loop(looper, n);
    let b1 = prog_stats(|id, _| ids.contains(&id));
    stop_bpftrace(bt, looper.pid(), 2 * n);
    let bpf_d = b1 - b0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "Profile pass (kernel.bpf_stats_enabled on, {n} pairs each; not part of the table):\n"
    );
    let _ = writeln!(s, "| what | ns |");
    let _ = writeln!(s, "|---|---:|");
    let _ = writeln!(
        s,
        "| vmaudit's programs, mean per run while the process is unwatched (every syscall on the host) | {:.0} |",
        per_run(unwatched)
    );
    let _ = writeln!(
        s,
        "| vmaudit's programs per watched openat+close pair (2 runs; estimate: others' runs at the unwatched cost removed) | {watched_prog_per_pair:.0} |"
    );
    let _ = writeln!(
        s,
        "| vmaudit's process (consumer: ring buffer, tables, JSON), CPU time per watched pair | {consumer_per_pair:.0} |"
    );
    let _ = writeln!(
        s,
        "| watched loop in this pass, per pair (stats on) | {ns_watched:.0} |"
    );
    let _ = writeln!(
        s,
        "| bpftrace's program, mean per run (this pid's and every other syscall) | {:.0} |",
        per_run(bpf_d)
    );
    let _ = writeln!(
        s,
        "| bpftrace loop in this pass, per pair (stats on) | {ns_bpftrace:.0} |"
    );
    s
}
