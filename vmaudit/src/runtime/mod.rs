//! `vmaudit run`: open a VM's devices, set its cgroup, launch and stop the emulator.

pub mod control;
pub mod devices;
pub mod hotplug;
pub mod launch;
pub mod netlink;
pub mod qmp;
pub mod run;
pub mod spec;
pub mod vmcgroup;
