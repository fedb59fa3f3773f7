//! The VM's device cgroup: layout detection, v2 device program, v1 devices controller.
