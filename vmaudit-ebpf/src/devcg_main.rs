//! vmaudit's VM device cgroup program (`vmaudit-devcg`).
//!
//! A `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to a VM's cgroup v2 directory: it decides
//! every device access check of the processes in that cgroup from a rule map in libvirt's
//! layout, and reports each decision to userspace. Its own binary (and object file), so that a
//! VM cgroup loads nothing of the fd tracker.
#![no_std]
#![no_main]

mod devcg;
mod prelude;
