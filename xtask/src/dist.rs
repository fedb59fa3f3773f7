//! `cargo xtask dist`: the Debian package. The release binary writes its own man pages and
//! completions (`vmaudit generate`, hidden), then cargo-deb packs them with the units, the
//! logrotate file, the alert rules and the dashboard (`[package.metadata.deb]` in
//! vmaudit/Cargo.toml; the files in vmaudit/packaging).

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};

use crate::sh::{self, Workspace, header, step};

/// The package's crate and binary.
const PACKAGE: &str = "vmaudit";

/// The shells whose completions the package installs (clap_complete's names).
const SHELLS: [&str; 3] = ["bash", "zsh", "fish"];

/// Builds the .deb into `target/debian/` and returns its path.
pub fn dist(ws: &Workspace) -> Result<PathBuf> {
    step(
        ws.cargo()
            .args(["build", "--release", "--package", PACKAGE, "--bin", PACKAGE]),
    )?;
    // cargo-deb finds assets under `target/release/` wherever the target folder really is.
    let release = ws.target().join("release");
    let generated = release.join("dist");
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
    }
    let vmaudit = release.join(PACKAGE);
    let man = generated.join("man");
    step(ws.command(&vmaudit).arg("generate").arg("man").arg(&man))?;
    let pages = man_pages(&man)?;
    // Debian installs man pages compressed; `-n` keeps names and times out, so the same pages
    // give the same files.
    step(ws.command("gzip").args(["-9", "-n", "--"]).args(&pages))?;
    for shell in SHELLS {
        step(
            ws.command(&vmaudit)
                .args(["generate", "completions", shell])
                .arg(generated.join("completions")),
        )?;
    }
    let out = ws.target().join("debian");
    let mut deb = ws.cargo();
    deb.args(["deb", "--package", PACKAGE, "--no-build", "--output"])
        .arg(&out);
    header(&deb);
    // cargo-deb prints the package's path as its last line.
    let printed = sh::output(&mut deb)?;
    let path = printed
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.extension().is_some_and(|e| e == "deb") && p.is_file())
        .with_context(|| format!("cargo deb printed no .deb path: {printed:?}"))?;
    println!("{}", path.display());
    Ok(path)
}

/// The `.1` pages in `dir`, sorted.
fn man_pages(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    anyhow::ensure!(!pages.is_empty(), "`vmaudit generate man` wrote no page");
    Ok(pages)
}
