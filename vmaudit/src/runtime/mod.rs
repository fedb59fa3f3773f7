//! `vmaudit run`: open a VM's devices, set its cgroup, launch and stop the emulator.

pub mod devices;
pub mod launch;
pub mod netlink;
pub mod run;
pub mod spec;
pub mod vmcgroup;
