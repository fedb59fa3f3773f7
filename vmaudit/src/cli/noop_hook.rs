//! `vmaudit noop-hook`: attach a program that does nothing to every syscall's exit, until
//! SIGINT/SIGTERM. What that costs is the floor under `vmaudit watch` on this kernel; the
//! benchmark measures it side by side with the real tracker. With `--emit-for PID`, the program
//! instead sends a bare event per syscall exit of that process, drained and discarded here: the
//! floor under any tracer that reports every fd change.

use std::{
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmaudit::{
    exit,
    observe::{self, ObserveError, loader::EmitFloor},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Send a 64-byte event per syscall exit of this process (nothing read) instead of
    /// returning at once; vmaudit drains and counts them.
    #[arg(long, value_name = "PID")]
    emit_for: Option<u32>,
}

pub fn run(args: Args) -> u8 {
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
        let Some(pid) = args.emit_for else {
            let hook = match observe::loader::attach_noop_hook() {
                Ok(h) => h,
                Err(e) => return super::fail(&e, e.exit_code()),
            };
            vmaudit::notice!("no-op hook attached to raw_syscalls/sys_exit");
            shutdown.await;
            drop(hook);
            return exit::OK;
        };
        let floor = match EmitFloor::attach(pid) {
            Ok(f) => f,
            Err(e) => return super::fail(&e, e.exit_code()),
        };
        vmaudit::notice!("floor hook attached to raw_syscalls/sys_exit for pid {pid}");
        let stop = Arc::new(AtomicBool::new(false));
        let drainer = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || drain(floor, &stop)
        });
        shutdown.await;
        stop.store(true, Ordering::Relaxed);
        match drainer.await {
            Ok(Ok(events)) => {
                vmaudit::notice!("floor hook: {events} events drained");
                exit::OK
            }
            Ok(Err(e)) => super::fail(&e, e.exit_code()),
            Err(e) => super::fail(&e, exit::INTERNAL),
        }
    })
}

/// Drains the floor's ring until `stop`, as the tracker's consumer does (after a drain that
/// found events it lets more gather for a moment; then it says it is about to wait, looks
/// again, and waits), and returns how many events it took.
fn drain(mut floor: EmitFloor, stop: &AtomicBool) -> Result<u64, ObserveError> {
    let mut events = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let before = events;
        while floor.ring.next().is_some() {
            events += 1;
        }
        if events > before {
            std::thread::sleep(observe::LINGER);
            continue;
        }
        floor.consumer_waits()?;
        if floor.ring.next().is_some() {
            events += 1;
            continue;
        }
        let mut fds = [PollFd::new(floor.ring.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(100u8))
            .map_err(|e| ObserveError::Poll { source: e.into() })?;
    }
    while floor.ring.next().is_some() {
        events += 1;
    }
    Ok(events)
}
