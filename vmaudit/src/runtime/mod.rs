//! `vmaudit run`: open a VM's devices, set its cgroup, launch and stop the emulator.
//!
//! Imports flow one way: `run` drives the phases; `hotplug`, `vmcgroup`, `devices`, `launch`
//! and `rundir` do one thing each for it; `trail` (records and claims) sits under all of them;
//! `spec`, `names` and `identity` under everything.

pub mod control;
pub mod devices;
pub mod hotplug;
pub mod identity;
pub mod launch;
pub mod names;
pub mod netlink;
pub mod qmp;
pub mod recover;
pub mod run;
pub mod rundir;
pub mod spec;
pub mod trail;
pub mod vmcgroup;
