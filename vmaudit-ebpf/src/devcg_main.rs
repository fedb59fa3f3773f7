//! vmaudit's VM device cgroup program (`vmaudit-devcg`).
//!
//! A `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to a VM's cgroup v2 directory: it decides
//! every device access check of the processes in that cgroup from a rule map in libvirt's
//! layout, and reports each decision to userspace. Its own binary (and object file), so that a
//! VM cgroup loads nothing of the fd tracker.
#![no_std]
#![no_main]

mod devcg;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time (the verifier rejects such paths), so this
    // is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-2.0, as the rest of vmaudit's kernel programs: the kernel refuses GPL-only helpers to
/// programs under an incompatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
