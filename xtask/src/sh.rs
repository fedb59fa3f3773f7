//! Running commands: the workspace's paths, a cargo that finds the project's tools, and
//! error messages that name the command that failed.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus},
};

use anyhow::{Context as _, Result, bail};

/// The workspace this xtask belongs to, and the PATH every command it starts gets.
pub struct Workspace {
    root: PathBuf,
    /// `<root>/.tools/bin` first, then the caller's PATH: `vmaudit/build.rs` and the tests find
    /// bpf-linker there.
    path: OsString,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let mut dirs = vec![root.join(".tools").join("bin")];
        dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let path = env::join_paths(dirs).context("a PATH entry contains ':'")?;
        Ok(Self { root, path })
    }

    /// The workspace's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The project-owned folder for tools (gitignored).
    pub fn tools(&self) -> PathBuf {
        self.root.join(".tools")
    }

    /// `cargo` with the toolchain `cargo xtask` runs under (rustup passes it on in
    /// RUSTUP_TOOLCHAIN), in the workspace root.
    pub fn cargo(&self) -> Command {
        self.command("cargo")
    }

    /// `cargo +nightly`, for what needs unstable features (`-Z build-std`).
    pub fn nightly_cargo(&self) -> Command {
        let mut cmd = self.cargo();
        cmd.arg("+nightly")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC");
        cmd
    }

    /// Any program, in the workspace root, with the project's PATH.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    /// Where cargo builds (`target`, or `CARGO_TARGET_DIR`).
    pub fn target(&self) -> PathBuf {
        env::var_os("CARGO_TARGET_DIR").map_or_else(|| self.root.join("target"), PathBuf::from)
    }

    /// Where cargo puts a profile's binaries.
    pub fn bin(&self, profile: &str, name: &str) -> PathBuf {
        self.target().join(profile).join(name)
    }
}

/// Runs `cmd` with inherited stdio; fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns how it ended, for passing on as our own exit code.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs `cmd` and returns its trimmed stdout; fails unless it exits with 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Prints `==> <command>`, then runs it like [`run`].
pub fn step(cmd: &mut Command) -> Result<()> {
    header(cmd);
    run(cmd)
}

/// The `==> <command>` line each step of a command starts with.
pub fn header(cmd: &Command) {
    println!("==> {}", describe(cmd));
}

/// `cmd` as a shell-like line, for headers and errors.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether this process runs with effective uid 0 (from /proc/self/status: no unsafe, no libc).
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(euid == "0")
}
