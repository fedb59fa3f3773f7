//! What every vmaudit eBPF object needs: a panic handler and its licence.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time (the verifier rejects such paths), so this
    // is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}

/// vmaudit's kernel programs are GPL-2.0: the kernel refuses GPL-only helpers
/// (bpf_probe_read_user, bpf_ktime_get_ns, ...) to programs under an incompatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
