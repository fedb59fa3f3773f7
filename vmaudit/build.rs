//! Builds the eBPF programs (`vmaudit-ebpf`) for the BPF target and leaves the object in
//! OUT_DIR, where `src/observe/loader.rs` embeds it.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?;
    // `cargo xtask setup` installs bpf-linker into the project's own .tools/bin.
    let tools = root.join(".tools").join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools.clone()];
    dirs.extend(env::split_paths(&path));
    let joined = env::join_paths(dirs).context("PATH")?;
    // SAFETY: no other thread runs in this build script.
    unsafe { env::set_var("PATH", &joined) };
    println!(
        "cargo:rerun-if-changed={}",
        tools.join("bpf-linker").display()
    );
    if which_in(&joined, "bpf-linker").is_none() {
        return Err(anyhow!(
            "bpf-linker not found in {} or PATH: run `cargo xtask setup` (the README's commands do)",
            tools.display()
        ));
    }
    let ebpf_dir = root.join("vmaudit-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "vmaudit-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which_in(path: &std::ffi::OsStr, exe: &str) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}
