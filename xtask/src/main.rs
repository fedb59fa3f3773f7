//! `cargo xtask <cmd>`: vmaudit's developer commands. Each one first sets up what it uses
//! (`setup`, which checks before it acts and so costs nothing once done).

mod dist;
mod setup;
mod sh;

use std::{
    ffi::OsString,
    process::{Command, ExitCode},
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    setup::Scope,
    sh::{Workspace, step},
};

/// Built for `bpfel-unknown-none` by `vmaudit/build.rs` (aya-build): its binary cannot be built
/// for the host, so host cargo commands leave it out and `test` lints it for its own target.
const EBPF_PACKAGE: &str = "vmaudit-ebpf";
/// The eBPF crate's target.
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Clippy arguments: any warning fails the step.
const DENY_WARNINGS: [&str; 3] = ["--", "-D", "warnings"];
/// The fuzz targets (`fuzz/fuzz_targets/*.rs`), each with a seed corpus in `fuzz/corpus/`.
const FUZZ_TARGETS: &[&str] = &["parse_line", "parse_text"];
/// Inputs per target that `cargo xtask test` runs: a count, not a time, so every run does the
/// same work.
const TEST_FUZZ_RUNS: u64 = 20_000;
/// The integration tests: real kernel, real devices, root only.
const PRIVILEGED_TESTS: &str = "vmaudit-tests";

#[derive(Parser)]
#[command(about = "vmaudit's developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, cargo-fuzz and
    /// cargo-deb in .tools, Debian packages, the test guest) and mount tracefs; does nothing
    /// when all is in place.
    Setup,
    /// Set up the toolchain, then build the workspace's host binaries.
    Build,
    /// Set up the toolchain and cargo-deb, then build the Debian package (release binary, man
    /// pages, completions, systemd units, logrotate file, alert rules, Grafana dashboard) into
    /// target/debian.
    Dist,
    /// Set up, then fmt, clippy, build, unit tests, the package (dist) and the privileged
    /// integration tests (root).
    Test,
    /// Set up, then run every fuzz target (cargo fuzz, nightly) for a number of inputs, from
    /// its seed corpus in fuzz/corpus; a crash fails it and leaves the input in fuzz/artifacts.
    Fuzz {
        /// Inputs per target.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
    },
    /// Set up, build, then run `vmaudit demo`.
    Demo,
    /// Set up, build in release mode, then run the benchmark suite `vmbench` (with the
    /// arguments after `--`, e.g. `--quick` or `--only throughput`) and rewrite its tables in
    /// BENCHMARKS.md.
    Bench {
        /// Passed on to vmbench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let ws = Workspace::locate()?;
    setup::run(&ws, cli.cmd.scope())?;
    match cli.cmd {
        Cmd::Setup => {}
        Cmd::Build => sh::run(&mut build(&ws, Profile::Debug))?,
        Cmd::Dist => {
            dist::dist(&ws)?;
        }
        Cmd::Test => test(&ws)?,
        Cmd::Fuzz { runs } => fuzz(&ws, runs)?,
        Cmd::Demo => {
            sh::run(&mut build(&ws, Profile::Debug))?;
            let mut demo = ws.command(ws.bin("debug", "vmaudit"));
            return sh::status(demo.arg("demo")).map(sh::exit_code);
        }
        Cmd::Bench { args } => {
            sh::run(&mut build(&ws, Profile::Release))?;
            // The figures land in BENCHMARKS.md, between each section's markers.
            let mut bench = ws.command(ws.bin("release", "vmbench"));
            bench.arg("--write").arg(ws.root().join("BENCHMARKS.md"));
            return sh::status(bench.args(args)).map(sh::exit_code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl Cmd {
    /// What the command uses, so what it sets up.
    fn scope(&self) -> Scope {
        match self {
            Cmd::Build => Scope::Build,
            Cmd::Dist => Scope::Dist,
            Cmd::Fuzz { .. } => Scope::Fuzz,
            Cmd::Setup | Cmd::Test | Cmd::Demo | Cmd::Bench { .. } => Scope::Everything,
        }
    }
}

#[derive(Clone, Copy)]
enum Profile {
    Debug,
    Release,
}

/// `cargo build` of every host binary (the tests crate has some too).
fn build(ws: &Workspace, profile: Profile) -> Command {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--workspace", "--exclude", EBPF_PACKAGE, "--bins"]);
    if let Profile::Release = profile {
        cmd.arg("--release");
    }
    cmd
}

/// The README's test command. Each step prints `==> <command>`; the first failure stops it.
fn test(ws: &Workspace) -> Result<()> {
    step(ws.cargo().args(["fmt", "--all", "--check"]))?;
    step(
        ws.cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_PACKAGE,
                "--all-targets",
            ])
            .args(DENY_WARNINGS),
    )?;
    step(
        ws.nightly_cargo()
            .args(["clippy", "--package", EBPF_PACKAGE, "--target", BPF_TARGET])
            .args(["-Z", "build-std=core"])
            .args(DENY_WARNINGS),
    )?;
    step(&mut build(ws, Profile::Debug))?;
    step(
        ws.cargo()
            .args(["test", "--workspace", "--exclude", EBPF_PACKAGE])
            .args(["--exclude", PRIVILEGED_TESTS]),
    )?;
    fuzz(ws, TEST_FUZZ_RUNS)?;
    // tests/tests/package.rs installs this package.
    dist::dist(ws)?;
    let mut privileged = ws.cargo();
    privileged.args([
        "test",
        "--package",
        PRIVILEGED_TESTS,
        "--",
        "--test-threads=1",
    ]);
    sh::header(&privileged);
    if !sh::is_root()? {
        bail!(
            "the privileged integration tests ({PRIVILEGED_TESTS}) load eBPF programs and create \
             devices, so they need root: run `cargo xtask test` as root (they are never skipped)"
        );
    }
    sh::run(&mut privileged)
}

/// Each fuzz target for `runs` inputs. New inputs go to `target/fuzz-corpus/<target>` (the
/// checked-in seeds in `fuzz/corpus/<target>` are only read).
fn fuzz(ws: &Workspace, runs: u64) -> Result<()> {
    for target in FUZZ_TARGETS {
        let scratch = ws.root().join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        step(
            ws.nightly_cargo()
                .args(["fuzz", "run", "--fuzz-dir", "fuzz", target])
                .arg(&scratch)
                .arg(ws.root().join("fuzz").join("corpus").join(target))
                .arg("--")
                .arg(format!("-runs={runs}")),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(argv: &[&str]) -> Vec<OsString> {
        match Cli::try_parse_from(argv).map(|cli| cli.cmd) {
            Ok(Cmd::Bench { args }) => args,
            _ => panic!("{argv:?} is not a bench command"),
        }
    }

    #[test]
    fn bench_passes_on_what_follows_the_separator() {
        assert_eq!(
            bench_args(&["xtask", "bench", "--", "--fds", "1000", "-v"]),
            ["--fds", "1000", "-v"]
        );
        assert!(bench_args(&["xtask", "bench"]).is_empty());
    }

    #[test]
    fn build_and_dist_set_up_the_toolchain_only() {
        let scope = |argv: &[&str]| Cli::try_parse_from(argv).unwrap().cmd.scope();
        assert_eq!(scope(&["xtask", "build"]), Scope::Build);
        assert_eq!(scope(&["xtask", "dist"]), Scope::Dist);
        assert_eq!(scope(&["xtask", "fuzz"]), Scope::Fuzz);
        for cmd in ["setup", "test", "demo", "bench"] {
            assert_eq!(scope(&["xtask", cmd]), Scope::Everything, "{cmd}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
