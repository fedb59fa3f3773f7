//! `vmaudit run`: open a VM's devices, set its cgroup, launch and stop the emulator.
