//! `vmaudit noop-hook`: attach a program that does nothing to every syscall's exit, until
//! SIGINT/SIGTERM. What that costs is the floor under `vmaudit watch` on this kernel; the
//! benchmark measures it side by side with the real tracker.

use vmaudit::{exit, observe};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> u8 {
    if let Err(e) = observe::preflight::check_caps() {
        return super::fail(&e, e.exit_code());
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, exit::INTERNAL),
    };
    rt.block_on(async {
        let shutdown = super::watch::shutdown_signal();
        let hook = match observe::loader::attach_noop_hook() {
            Ok(h) => h,
            Err(e) => return super::fail(&e, e.exit_code()),
        };
        vmaudit::notice!("no-op hook attached to raw_syscalls/sys_exit");
        shutdown.await;
        drop(hook);
        exit::OK
    })
}
