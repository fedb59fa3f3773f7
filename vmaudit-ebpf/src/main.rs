//! vmaudit's kernel programs: the fd tracker.
//!
//! Syscall tracepoints (one generic entry and one generic exit program, attached to every
//! tracked syscall) and sched tracepoints report every way a watched process gains or loses a
//! file descriptor. A process that is not watched costs one hash lookup and emits nothing.
//! Every event that cannot be delivered is counted per cause, and per process, so that
//! userspace resyncs exactly the affected tables.
#![no_std]
#![no_main]

mod fdtrack;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time (the verifier rejects such paths), so this
    // is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}

/// These programs are GPL-2.0: the kernel refuses GPL-only helpers (bpf_probe_read_user,
/// bpf_ktime_get_ns, ...) to programs under an incompatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
