//! A tiny real guest for the hot-unplug tests: Debian's cloud kernel and a busybox initramfs,
//! built by `cargo xtask setup` (its `guest` step) into `<workspace>/.tools/guest`. Booted
//! under qemu's TCG on a `pc` machine, its kernel answers ACPI PCI hot-unplug by itself, so
//! a `device_del` completes (`DEVICE_DELETED`) as it would with a real VM.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// What the guest's `/init` prints on its console (ttyS0) once devtmpfs, proc and sysfs are
/// mounted. Must match `GUEST_INIT` in xtask/src/setup.rs.
pub const READY_LINE: &str = "vmaudit-guest: ready";

/// How long a boot may take before [`wait_ready`] gives up. A bound on a hang, not a
/// synchronisation: the wait returns as soon as the line is there. A boot takes about 3-5 s
/// here under TCG (`-accel kvm` hangs at "Probing EDD" on these nested machines).
pub const BOOT_PATIENCE: Duration = Duration::from_secs(60);

/// The guest's files.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// `vmlinuz`, from `linux-image-<version>-cloud-amd64`.
    pub kernel: PathBuf,
    /// `initrd.gz`: busybox and `/init` (cpio newc, gzip).
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The guest `cargo xtask setup` built in `<workspace>/.tools/guest`; panics, saying so,
    /// when it is not there.
    pub fn find() -> Self {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate sits in the workspace");
        Self::in_dir(&workspace.join(".tools").join("guest")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The guest in `dir` (`vmlinuz` and `initrd.gz`).
    pub fn in_dir(dir: &Path) -> Result<Self, String> {
        let image = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
        };
        for file in [&image.kernel, &image.initrd] {
            if !file.is_file() {
                return Err(format!(
                    "no test guest: {} is missing: run `cargo xtask setup` (as root), which \
                     builds it from Debian packages",
                    file.display()
                ));
            }
        }
        Ok(image)
    }

    /// qemu's arguments (without the program) that boot the guest: TCG, a `pc` machine (ACPI
    /// PCI hot-plug), 128 MiB, no default devices, the console on ttyS0 written to
    /// `serial_log`, QMP listening on `qmp` without waiting for a client: qemu run directly.
    /// Under `vmaudit run` see [`GuestImage::emulator_toml`] (vmaudit binds QMP's socket).
    ///
    /// Panics if a path holds a comma: qemu would split `-serial` or `-qmp` there.
    pub fn qemu_args(&self, serial_log: &Path, qmp: &Path) -> Vec<String> {
        let text = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        let mut args = self.boot_args(serial_log);
        assert!(
            !text(qmp).contains(','),
            "{}: qemu option values cannot hold a comma",
            qmp.display()
        );
        args.extend([
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", text(qmp)),
        ]);
        args
    }

    /// Everything but QMP: the machine, the guest, its console written to `serial_log`.
    fn boot_args(&self, serial_log: &Path) -> Vec<String> {
        let text = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        assert!(
            !text(serial_log).contains(','),
            "{}: qemu option values cannot hold a comma",
            serial_log.display()
        );
        [
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            &text(&self.kernel),
            "-initrd",
            &text(&self.initrd),
            "-append",
            "console=ttyS0",
            "-serial",
            &format!("file:{}", text(serial_log)),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// A spec's `[emulator]` table that boots the guest under `vmaudit run` (qemu from PATH):
    /// the boot arguments, and QMP on the socket vmaudit hands over (`{qmp-fd}`).
    pub fn emulator_toml(&self, serial_log: &Path) -> String {
        let mut args = self.boot_args(serial_log);
        args.extend(
            [
                "-chardev",
                "socket,id=qmp,fd={qmp-fd},server=on,wait=off",
                "-mon",
                "chardev=qmp,mode=control",
            ]
            .map(str::to_owned),
        );
        // A JSON string is a TOML basic string for everything a path holds.
        let args: Vec<String> = args
            .iter()
            .map(|a| serde_json::to_string(a).expect("a string"))
            .collect();
        format!("[emulator]\nargs = [{}]\n", args.join(", "))
    }
}

/// Waits until the guest's serial log holds [`READY_LINE`]; returns how long it waited.
/// Panics with the end of the log after [`BOOT_PATIENCE`].
///
/// A boot signals nothing but its console output, and qemu writes that to a plain file that
/// gives no event to wait on (inotify would add a dependency to save a few milliseconds), so
/// this polls the file, with a short backoff from 10 ms up to 200 ms.
pub fn wait_ready(serial_log: &Path) -> Duration {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        // The file may not exist yet: qemu creates it once it starts.
        let log = std::fs::read(serial_log).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(READY_LINE) {
            return start.elapsed();
        }
        if start.elapsed() > BOOT_PATIENCE {
            let text = String::from_utf8_lossy(&log);
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            panic!(
                "the guest did not print {READY_LINE:?} within {BOOT_PATIENCE:?}; the end of \
                 {}:\n{}",
                serial_log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> GuestImage {
        GuestImage {
            kernel: "/w/.tools/guest/vmlinuz".into(),
            initrd: "/w/.tools/guest/initrd.gz".into(),
        }
    }

    #[test]
    fn boots_from_the_kernel_and_initrd_with_qmp_and_a_serial_log() {
        let args = image().qemu_args(Path::new("/t/serial.log"), Path::new("/t/qmp.sock"));
        assert_eq!(
            args.join(" "),
            "-accel tcg -M pc -m 128 -nodefaults -display none \
             -kernel /w/.tools/guest/vmlinuz -initrd /w/.tools/guest/initrd.gz \
             -append console=ttyS0 -serial file:/t/serial.log \
             -qmp unix:/t/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn gives_a_spec_emulator_table() {
        let toml = image().emulator_toml(Path::new("/t/s.log"));
        let text = format!("name = \"g\"\nuuid = \"0b0b0b0b-1c1c-4d2d-8e3e-4f4f4f4f4f4f\"\n{toml}");
        let spec = vmaudit::runtime::spec::Spec::parse(Path::new("g.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(spec.has_qmp());
        let args = spec.emulator.args.unwrap();
        let direct = image().qemu_args(Path::new("/t/s.log"), Path::new("/t/q.sock"));
        // The same boot arguments; QMP on vmaudit's socket instead of a path.
        assert_eq!(args[..17], direct[..17]);
        assert_eq!(
            args[17..],
            [
                "-chardev",
                "socket,id=qmp,fd={qmp-fd},server=on,wait=off",
                "-mon",
                "chardev=qmp,mode=control"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "comma")]
    fn refuses_a_comma_in_an_option_value() {
        image().qemu_args(Path::new("/t/a,b.log"), Path::new("/t/q.sock"));
    }

    #[test]
    fn says_how_to_get_a_missing_guest() {
        let e = GuestImage::in_dir(Path::new("/nonexistent")).unwrap_err();
        assert!(e.contains("run `cargo xtask setup`"), "{e}");
    }
}
