//! The toolchain: what building the eBPF programs needs (the nightly toolchain's `rust-src`,
//! bpf-linker), the lints, and the cargo subcommands some commands use (cargo-fuzz, cargo-deb),
//! each in `.tools` with a stamp, so a second run costs nothing.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::write_stamp;
use crate::sh::{self, Workspace};

/// The bpf-linker release built into `.tools/bin`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Toolchain components the lints use: (toolchain, or None for the one `cargo xtask` runs
/// under; component).
const COMPONENTS: &[(Option<&str>, &str)] = &[
    // `cargo xtask test` lints the eBPF crate for its own target.
    (Some("nightly"), "clippy"),
    // `cargo xtask test` lints and format-checks the host crates.
    (None, "clippy"),
    (None, "rustfmt"),
];

/// What every build needs: the nightly toolchain, its `rust-src`, and bpf-linker.
pub fn for_build(ws: &Workspace) -> Result<()> {
    nightly_toolchain(ws)?;
    rustup_component(ws, Some("nightly"), "rust-src")?;
    bpf_linker(ws)
}

/// The components `cargo xtask test` lints and format-checks with.
pub fn lints(ws: &Workspace) -> Result<()> {
    for &(toolchain, component) in COMPONENTS {
        rustup_component(ws, toolchain, component)?;
    }
    Ok(())
}

fn nightly_toolchain(ws: &Workspace) -> Result<()> {
    let list = sh::output(ws.command("rustup").args(["toolchain", "list"]))?;
    if has_nightly(&list) {
        println!("ok: nightly toolchain");
        return Ok(());
    }
    println!("installing: nightly toolchain");
    sh::run(
        ws.command("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"]),
    )
    .context(
        "the nightly toolchain is missing and could not be installed. The eBPF programs are \
             built with `-Z build-std=core`, which needs it: run \
             `rustup toolchain install nightly --profile minimal` where static.rust-lang.org is \
             reachable, then `cargo xtask setup` again",
    )
}

/// Whether `rustup toolchain list` shows the rolling nightly (`nightly-<host>`, not a dated one).
fn has_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("nightly-"))
        .any(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn rustup_component(ws: &Workspace, toolchain: Option<&str>, component: &str) -> Result<()> {
    let with_toolchain = |cmd: &mut Command| {
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
    };
    let label = format!("{component} ({})", toolchain.unwrap_or("active toolchain"));
    let mut list = ws.command("rustup");
    list.args(["component", "list", "--installed"]);
    with_toolchain(&mut list);
    if has_component(&sh::output(&mut list)?, component) {
        println!("ok: {label}");
        return Ok(());
    }
    println!("installing: {label}");
    let mut add = ws.command("rustup");
    add.args(["component", "add", component]);
    with_toolchain(&mut add);
    sh::run(&mut add)
}

/// Whether `rustup component list --installed` shows `component`: bare (`rust-src`) or for a
/// target of this architecture (`clippy-x86_64-unknown-linux-gnu`).
fn has_component(list: &str, component: &str) -> bool {
    let arch = std::env::consts::ARCH;
    list.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|target| target.starts_with(arch))
    })
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (no system LLVM matches), into
/// `.tools/bin`. `.tools/bpf-linker.stamp` records what it was built for, so a new nightly
/// rebuilds it.
fn bpf_linker(ws: &Workspace) -> Result<()> {
    let sysroot = sh::output(ws.command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(&sysroot).join("lib");
    let llvm = LibLlvm::find(&libdir)?;
    let rustc = sh::output(ws.command("rustc").args(["+nightly", "-V"]))?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION}\n{rustc}\n{}\n",
        llvm.file_name()
    );
    let stamp_path = ws.tools().join("bpf-linker.stamp");
    let bin = ws.tools().join("bin").join("bpf-linker");
    let current = fs::read_to_string(&stamp_path).ok();
    if bin.is_file() && current.as_deref() == Some(stamp.as_str()) {
        println!("ok: bpf-linker {BPF_LINKER_VERSION} ({rustc})");
        return Ok(());
    }
    // A build made by hand from the same recipe is kept if it is the right version and loads
    // this nightly's libLLVM; the stamp then records it.
    if bin.is_file() && current.is_none() && fits(&bin, &libdir) {
        write_stamp(&stamp_path, &stamp)?;
        println!(
            "ok: bpf-linker {BPF_LINKER_VERSION} ({rustc}; existing build checked, stamp written)"
        );
        return Ok(());
    }
    println!("installing: bpf-linker {BPF_LINKER_VERSION} against {rustc} (about a minute)");
    sh::run(&mut install_bpf_linker(ws, &libdir, &llvm))?;
    write_stamp(&stamp_path, &stamp)
}

/// A cargo subcommand installed with `cargo install --locked` into `.tools/bin`.
/// `.tools/<name>.stamp` records the version, so a new one reinstalls it.
struct CargoTool {
    name: &'static str,
    version: &'static str,
    /// Built with the nightly toolchain (cargo-fuzz: libFuzzer's sanitizers need it).
    nightly: bool,
    /// How long a build takes here, for the `installing:` line.
    takes: &'static str,
}

/// `cargo xtask fuzz` and `test` run the parser's fuzz targets with it.
const CARGO_FUZZ: CargoTool = CargoTool {
    name: "cargo-fuzz",
    version: "0.13.2",
    nightly: true,
    takes: "about two minutes",
};

/// `cargo xtask dist` (and so `test`, which installs the package it builds) makes the .deb with it.
const CARGO_DEB: CargoTool = CargoTool {
    name: "cargo-deb",
    version: "3.8.0",
    nightly: false,
    takes: "about a minute",
};

pub fn cargo_fuzz(ws: &Workspace) -> Result<()> {
    cargo_tool(ws, &CARGO_FUZZ)
}

pub fn cargo_deb(ws: &Workspace) -> Result<()> {
    cargo_tool(ws, &CARGO_DEB)
}

fn cargo_tool(ws: &Workspace, tool: &CargoTool) -> Result<()> {
    let CargoTool { name, version, .. } = *tool;
    let stamp = format!("{name} {version}\n");
    let stamp_path = ws.tools().join(format!("{name}.stamp"));
    let bin = ws.tools().join("bin").join(name);
    let current = fs::read_to_string(&stamp_path).ok();
    if bin.is_file() && current.as_deref() == Some(stamp.as_str()) {
        println!("ok: {name} {version}");
        return Ok(());
    }
    // One installed by hand with the same version is kept; the stamp then records it.
    let reported = sh::output(Command::new(&bin).arg("--version"));
    if bin.is_file() && reported.is_ok_and(|v| reports_version(&v, version)) {
        write_stamp(&stamp_path, &stamp)?;
        println!("ok: {name} {version} (existing build checked, stamp written)");
        return Ok(());
    }
    println!("installing: {name} {version} ({})", tool.takes);
    let mut cmd = if tool.nightly {
        ws.nightly_cargo()
    } else {
        ws.cargo()
    };
    cmd.args(["install", name, "--version", version, "--locked", "--force"])
        .arg("--root")
        .arg(ws.tools())
        .arg("--target-dir")
        .arg(ws.tools().join("build"));
    sh::run(&mut cmd)?;
    write_stamp(&stamp_path, &stamp)
}

/// Whether a `--version` line names `version` as a word (`cargo-fuzz 0.13.2`, `3.8.0`).
fn reports_version(line: &str, version: &str) -> bool {
    line.split_whitespace().any(|w| w == version)
}

fn install_bpf_linker(ws: &Workspace, libdir: &Path, llvm: &LibLlvm) -> Command {
    let lib = libdir.to_string_lossy();
    // Link against the toolchain's libLLVM and find it there at run time. The encoded form keeps
    // a sysroot path with spaces in one argument.
    let rustflags = [
        "-L".to_owned(),
        lib.to_string(),
        "-C".to_owned(),
        format!("link-arg=-Wl,-rpath,{lib}"),
        "-l".to_owned(),
        format!("dylib={}", llvm.link_name),
    ]
    .join("\x1f");
    let mut cmd = ws.nightly_cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--force",
    ])
    .args(["--no-default-features", "--features"])
    .arg(format!("llvm-{},no-llvm-linking", llvm.major))
    .arg("--root")
    .arg(ws.tools())
    .arg("--target-dir")
    .arg(ws.tools().join("build"))
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    .env_remove("RUSTFLAGS");
    cmd
}

/// Whether an existing bpf-linker is version [`BPF_LINKER_VERSION`] and loads its libLLVM from
/// `libdir`.
fn fits(bin: &Path, libdir: &Path) -> bool {
    let version = sh::output(Command::new(bin).arg("--version"));
    let ldd = sh::output(Command::new("ldd").arg(bin));
    version.is_ok_and(|v| v == format!("bpf-linker {BPF_LINKER_VERSION}"))
        && ldd.is_ok_and(|ldd| loads_llvm_from(&ldd, libdir))
}

/// Whether `ldd` output resolves a libLLVM to a file in `libdir`.
fn loads_llvm_from(ldd: &str, libdir: &Path) -> bool {
    ldd.lines()
        .filter(|line| line.contains("libLLVM"))
        .filter_map(|line| line.split_once("=>")?.1.split_whitespace().next())
        .any(|path| Path::new(path).parent() == Some(libdir))
}

/// The toolchain's `libLLVM-<major>-rust-<version>.so`.
#[derive(Debug, PartialEq)]
struct LibLlvm {
    major: String,
    /// The name for `-l dylib=`: the file name without `lib` and `.so`.
    link_name: String,
}

impl LibLlvm {
    fn find(libdir: &Path) -> Result<Self> {
        let entries =
            fs::read_dir(libdir).with_context(|| format!("reading {}", libdir.display()))?;
        let found = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .find_map(|name| Self::parse(&name));
        match found {
            Some(llvm) => Ok(llvm),
            None => bail!(
                "no libLLVM-<major>-rust-<version>.so in {}: bpf-linker links against the \
                 nightly toolchain's libLLVM (`rustup toolchain install nightly` provides it)",
                libdir.display()
            ),
        }
    }

    fn parse(file_name: &str) -> Option<Self> {
        let link_name = file_name.strip_prefix("lib")?.strip_suffix(".so")?;
        let (major, _) = link_name.strip_prefix("LLVM-")?.split_once("-rust-")?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            major: major.to_owned(),
            link_name: link_name.to_owned(),
        })
    }

    fn file_name(&self) -> String {
        format!("lib{}.so", self.link_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_rolling_nightly_only() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn matches_components_with_and_without_target_suffix() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert!(has_component(list, "rust-src"));
        assert!(has_component(list, "clippy"));
        assert!(!has_component(list, "rustfmt"));
        assert!(!has_component("rust-src\n", "rust"));
    }

    #[test]
    fn parses_the_toolchain_libllvm_name() {
        assert_eq!(
            LibLlvm::parse("libLLVM-22-rust-1.97.0-nightly.so"),
            Some(LibLlvm {
                major: "22".into(),
                link_name: "LLVM-22-rust-1.97.0-nightly".into(),
            })
        );
        assert_eq!(LibLlvm::parse("libLLVM.so.22.1-rust-1.97.0-nightly"), None);
        assert_eq!(LibLlvm::parse("librustc_driver-b5a965480ee51f9a.so"), None);
    }

    #[test]
    fn checks_where_ldd_resolves_libllvm() {
        let libdir = Path::new("/root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib");
        let ldd = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => \
                   /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/\
                   libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f4137400000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4137000000)\n";
        assert!(loads_llvm_from(ldd, libdir));
        assert!(!loads_llvm_from(
            "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found\n",
            libdir
        ));
    }

    #[test]
    fn reads_versions_from_version_lines() {
        assert!(reports_version("cargo-fuzz 0.13.2", "0.13.2"));
        assert!(reports_version("3.8.0", "3.8.0"));
        assert!(!reports_version("cargo-deb 3.8.01", "3.8.0"));
    }
}
