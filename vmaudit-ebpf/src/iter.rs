//! The task_file iterator: one [`IterRecord`] per fd of the process its link names, read by
//! userspace to check its tables against the kernel's (not /proc).

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_seq_write};
use vmaudit_common::IterRecord;

use crate::kfile;

/// `struct bpf_iter__task_file`: the context of a task_file iterator program.
#[repr(C)]
pub struct TaskFileCtx {
    /// `struct bpf_iter_meta *`: its first field is the `struct seq_file *` to write to.
    meta: *const *mut core::ffi::c_void,
    task: u64,
    fd: u32,
    file: u64,
}

/// Runs once per (task, fd) of the linked process, and once more at the end with no file.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn vmaudit_iter_task_file(ctx: *const TaskFileCtx) -> i32 {
    // SAFETY: the kernel passes a valid context. `task` and `file` are copied with
    // bpf_probe_read_kernel so that they are plain numbers to the verifier, as the readers of
    // `kfile` that take an address expect (a typed pointer from a direct load could not be
    // indexed by an fd).
    let (meta, fd) = unsafe { ((*ctx).meta, (*ctx).fd) };
    // SAFETY: as above; the addresses are those of the context's fields.
    let (task, file) = unsafe {
        (
            bpf_probe_read_kernel(&raw const (*ctx).task).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*ctx).file).unwrap_or(0),
        )
    };
    if file == 0 || task == 0 {
        return 0;
    }
    let mut rec = IterRecord {
        fd: fd as i32,
        ..IterRecord::default()
    };
    if kfile::file_info(file, &mut rec.file).is_none() {
        rec.fd = -1 - fd as i32;
    }
    kfile::tun_iface(file, rec.file.rdev, &mut rec.iface);
    if let Some((_, cloexec)) = kfile::file_at(task, fd as i32) {
        rec.cloexec = cloexec as u32;
    }
    // SAFETY: `meta` is the iterator's meta (non-NULL for every call that has a file); its
    // first field is the seq_file; `rec` is a live stack value of the size given.
    unsafe {
        let seq = *meta;
        bpf_seq_write(
            seq.cast(),
            (&rec as *const IterRecord).cast(),
            core::mem::size_of::<IterRecord>() as u32,
        );
    }
    0
}
