//! `vmaudit demo`: watch a small real workload and print every fd event it causes.
//!
//! The workload is a bash script (bash opens, dups and closes with real syscalls): it opens
//! /dev/net/tun and /dev/null, duplicates and closes them, runs a child (fork + exec, followed),
//! and exits. vmaudit prints each event as a JSON line, then the summary.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use vmaudit::{exit, observe::WatchOptions};

use super::watch::{print_json, watch};

#[derive(Debug, clap::Args)]
pub struct Args {}

const WORKLOAD: &str = r#"
read -r go                      # wait until vmaudit watches
exec 3</dev/net/tun 5</dev/null # open
exec 4<&3                       # dup2
exec 3<&-                       # close
ls -l /proc/self/fd >/dev/null  # fork (followed: fds inherited) + exec
exec 4<&- 5<&-
"#;

pub fn run(_args: Args) -> u8 {
    let mut child = match Command::new("bash")
        .args(["-c", WORKLOAD])
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmaudit: cannot start the demo workload (bash): {e}");
            return exit::INTERNAL;
        }
    };
    let mut stdin = child.stdin.take();
    let opts = WatchOptions {
        pids: vec![child.id()],
        follow_children: true,
        ..Default::default()
    };
    let mut released = false;
    let result = watch(&opts, &mut |o| {
        print_json(&o);
        if !released {
            // The seed records are out: the table is live, let the workload go.
            released = true;
            if let Some(mut s) = stdin.take() {
                let _ = s.write_all(b"go\n");
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok(summary) => {
            print_json(&summary);
            exit::OK
        }
        Err(e) => super::fail(&e, e.exit_code()),
    }
}
