#![no_std]
//! The kernel programs are the `vmaudit-ebpf` binary; this empty library only lets
//! `vmaudit` name the crate as a build dependency (aya-build).
