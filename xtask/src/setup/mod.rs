//! `cargo xtask setup`: what building and testing need, each step checked before it acts, so a
//! second run costs nothing. Prints one line per step: `ok: ...` or `installing: ...`.
//!
//! Three parts: the toolchain (what building needs, and the cargo subcommands some commands
//! use), the host (Debian packages, accounts, devices and tracefs the tests use) and the test
//! guest. Each command sets up only what it uses: see [`Scope`].

mod guest;
mod host;
mod toolchain;

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::sh::{self, Workspace};

/// What a command needs set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Building: the nightly toolchain's `rust-src` and bpf-linker.
    Build,
    /// Building the .deb: [`Scope::Build`] and cargo-deb.
    Dist,
    /// Fuzzing: [`Scope::Build`] and cargo-fuzz.
    Fuzz,
    /// `setup`, `test`, `demo` and `bench`: the whole toolchain, the host and the test guest.
    Everything,
}

pub fn run(ws: &Workspace, scope: Scope) -> Result<()> {
    toolchain::for_build(ws)?;
    match scope {
        Scope::Build => Ok(()),
        Scope::Dist => toolchain::cargo_deb(ws),
        Scope::Fuzz => toolchain::cargo_fuzz(ws),
        Scope::Everything => {
            toolchain::lints(ws)?;
            toolchain::cargo_fuzz(ws)?;
            toolchain::cargo_deb(ws)?;
            host::run()?;
            guest::run(ws)
        }
    }
}

fn write_stamp(path: &Path, stamp: &str) -> Result<()> {
    std::fs::write(path, stamp).with_context(|| format!("writing {}", path.display()))
}

fn need_root(action: &str) -> Result<()> {
    if !sh::is_root()? {
        bail!("{action} needs root: run `cargo xtask setup` as root, or run it yourself");
    }
    Ok(())
}
