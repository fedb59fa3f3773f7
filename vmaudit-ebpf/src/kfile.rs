//! Reading the file behind an fd from the kernel: task → files → fdt → fd[] → struct file →
//! inode and superblock, at field offsets userspace resolved from the running kernel's BTF.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::{
    bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
    generated::{bpf_get_current_task_btf, bpf_probe_read_kernel as probe_read_raw},
};
use vmaudit_common::{FileInfo, IFNAMSIZ, KernelOffsets, PATH_SLOTS, PathTail, ofd};

/// Written by userspace before loading (`EbpfLoader::set_global`): the kernel's field offsets.
#[unsafe(no_mangle)]
static VMAUDIT_OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// Written by userspace before loading: the per-boot secret key of the open-file-description id.
#[unsafe(no_mangle)]
static VMAUDIT_OFD_KEY: [u64; 2] = [0; 2];

const S_IFMT: u16 = 0o170000;
const S_IFCHR: u16 = 0o020000;
const S_IFBLK: u16 = 0o060000;
/// Levels of the dentry walk, mount crossings included.
const WALK_STEPS: u32 = 12;

/// One offset, read through a volatile load so that the compiler does not fold the zero the
/// object is built with (the loader replaces it).
macro_rules! o {
    ($field:ident) => {
        // SAFETY: a static of the object; reading it is always valid.
        (unsafe { core::ptr::read_volatile(&VMAUDIT_OFFSETS.$field) } as u64)
    };
}

#[inline(always)]
fn key() -> [u64; 2] {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&VMAUDIT_OFD_KEY) }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// A new task's thread id and process id (`task_struct.pid`, `.tgid`): the two are equal for
/// a new process, and the tgid is the parent's for a new thread. A `task_struct` the
/// tracepoint gave, so probe reads.
#[inline(always)]
pub fn task_ids(task: u64) -> Option<(u32, u32)> {
    if o!(ready) == 0 {
        return None;
    }
    Some((read(task + o!(task_pid))?, read(task + o!(task_tgid))?))
}

/// Whether `child` has `parent`'s fd table itself, not a copy (CLONE_FILES).
#[inline(always)]
pub fn shares_files(parent: u64, child: u64) -> Option<bool> {
    if o!(ready) == 0 {
        return None;
    }
    let files: u64 = read(child + o!(task_files))?;
    Some(files == read::<u64>(parent + o!(task_files))?)
}

/// The first `W` 8-byte words of a kernel struct, copied in one helper call (each call costs
/// more than the copy): a field inside them is taken from the copy, one past them is read alone,
/// so a kernel with another layout is read correctly, only with more calls. `W` stays within the
/// smallest size the struct has had, so the copy never reaches past the object. The offsets
/// are constants of the loaded program (read-only data), so the verifier sees fixed stack
/// offsets and drops the branch not taken. The copy is kept in words, and fields (naturally
/// aligned in the kernel's structs) are taken with one aligned load each: a byte array would
/// cost a load, shift and or per byte of every field, and a byte-wise move of the whole copy.
struct Window<const W: usize> {
    base: u64,
    words: [u64; W],
}

impl<const W: usize> Window<W> {
    #[inline(always)]
    fn read(base: u64) -> Option<Self> {
        if base == 0 {
            return None;
        }
        let mut w = MaybeUninit::<Self>::uninit();
        let p = w.as_mut_ptr();
        // SAFETY: copies W words of kernel memory into the window, in place, failing cleanly on
        // a bad address; the window is used only when the copy succeeded and `base` is set.
        unsafe {
            let words = (&raw mut (*p).words).cast();
            if probe_read_raw(words, (W * 8) as u32, base as *const _) != 0 {
                return None;
            }
            (&raw mut (*p).base).write(base);
            Some(w.assume_init())
        }
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: u64) -> Option<T> {
        let off = off as usize;
        if off + size_of::<T>() <= W * 8 && off.is_multiple_of(align_of::<T>()) {
            // SAFETY: `off..off + size_of::<T>()` lies within the copy and is aligned for `T`
            // (the words are 8-aligned); any bit pattern is a valid integer or address, which
            // is all this reads.
            Some(unsafe { self.words.as_ptr().cast::<u8>().add(off).cast::<T>().read() })
        } else {
            read(self.base + off as u64)
        }
    }
}

/// Words of `struct fdtable` copied at once (max_fds, fd, close_on_exec lead it; it has been at
/// least 48 bytes long).
const FDTABLE_WINDOW: usize = 4;
/// Words of `struct file` copied at once (f_inode, f_flags, private_data, f_path lie within the
/// first 96 bytes of 6.x kernels; it is over 180 bytes long).
const FILE_WINDOW: usize = 12;
/// Words of `struct inode` copied at once (i_mode, i_sb, i_ino, i_rdev lie within the first 96
/// bytes; it is over 500 bytes long).
const INODE_WINDOW: usize = 12;
/// Words of `struct dentry` copied at once (d_parent and d_name.name lie within the first 48
/// bytes; it is over 150 bytes long).
const DENTRY_WINDOW: usize = 6;

/// Whether a file mode is a character or block device.
#[inline(always)]
pub fn is_device(mode: u16) -> bool {
    matches!(mode & S_IFMT, S_IFCHR | S_IFBLK)
}

/// The fd table of `task`: (the `fdtable`'s address, its `max_fds`).
#[inline(always)]
fn fdtable(task: u64) -> Option<Window<FDTABLE_WINDOW>> {
    let files: u64 = read(task + o!(task_files))?;
    let fdt: u64 = read(files + o!(files_fdt))?;
    Window::read(fdt)
}

/// The `struct file` at `fd` of `task`'s table and whether the fd is close-on-exec; `Some((0,
/// _))` when the slot is empty (another thread closed it already). For a task known only by
/// its address (the iterator's); the running task's is [`current_file_at`].
#[inline(always)]
pub fn file_at(task: u64, fd: i32) -> Option<(u64, bool)> {
    if o!(ready) == 0 || fd < 0 {
        return None;
    }
    let fdt = fdtable(task)?;
    let max: u32 = fdt.get(o!(fdt_max_fds))?;
    let fd = fd as u32;
    if fd >= max {
        return Some((0, false));
    }
    let arr: u64 = fdt.get(o!(fdt_fd))?;
    let file: u64 = read(arr + 8 * fd as u64)?;
    let bits: u64 = fdt.get(o!(fdt_close_on_exec))?;
    let word: u64 = read(bits + 8 * (fd / 64) as u64)?;
    Some((file, word & (1 << (fd % 64)) != 0))
}

/// Where a file was opened: its `f_path` (dentry and mount), kernel addresses that stay in the
/// kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FilePath {
    pub dentry: u64,
    pub mnt: u64,
}

/// Bits of an fd number that can be set: the kernel's hard limit on fds per process (nr_open)
/// is 2^20; masking tells the verifier the index is bounded.
const FD_MASK: u32 = (1 << 20) - 1;

/// [`file_at`] for the running task: `task → files → fdtable` and the table's fields are
/// direct loads (the helper returns a typed task pointer and the offsets are constants of the
/// loaded program, so the verifier checks each load against the kernel's BTF and the JIT makes
/// it one guarded load); only the fd slot and its close-on-exec word are copied with a helper.
#[inline(always)]
pub fn current_file_at(fd: i32) -> Option<(u64, bool)> {
    if o!(ready) == 0 || fd < 0 {
        return None;
    }
    let (files_off, fdt_off) = (o!(task_files) as usize, o!(files_fdt) as usize);
    let (max_off, fd_off, bits_off) = (
        o!(fdt_max_fds) as usize,
        o!(fdt_fd) as usize,
        o!(fdt_close_on_exec) as usize,
    );
    // SAFETY: each load is at the offset of a field of the struct the pointer before it names
    // (the kernel's BTF says so, and the verifier checks it); a NULL pointer is stopped before
    // the next load.
    let (max, arr, bits) = unsafe {
        let task = bpf_get_current_task_btf().cast::<u8>();
        let files = core::ptr::read_volatile(task.add(files_off).cast::<*const u8>());
        if files.is_null() {
            return None;
        }
        let fdt = core::ptr::read_volatile(files.add(fdt_off).cast::<*const u8>());
        if fdt.is_null() {
            return None;
        }
        (
            core::ptr::read_volatile(fdt.add(max_off).cast::<u32>()),
            core::ptr::read_volatile(fdt.add(fd_off).cast::<u64>()),
            core::ptr::read_volatile(fdt.add(bits_off).cast::<u64>()),
        )
    };
    let fd = fd as u32;
    if fd >= max {
        return Some((0, false));
    }
    let fd = fd & FD_MASK;
    let file: u64 = read(arr + 8 * fd as u64)?;
    let word: u64 = read(bits + 8 * (fd / 64) as u64)?;
    Some((file, word & (1 << (fd % 64)) != 0))
}

/// What the kernel says about `file`; returns where it was opened.
#[inline(always)]
pub fn file_info(file: u64, info: &mut FileInfo) -> Option<FilePath> {
    let f = Window::<FILE_WINDOW>::read(file)?;
    let inode = Window::<INODE_WINDOW>::read(f.get(o!(file_inode))?)?;
    info.flags = f.get(o!(file_flags))?;
    info.mode = inode.get(o!(inode_mode))?;
    info.ino = inode.get(o!(inode_ino))?;
    info.rdev = inode.get(o!(inode_rdev))?;
    let sb: u64 = inode.get(o!(inode_sb))?;
    info.dev = read(sb + o!(sb_dev))?;
    info.ofd = ofd::id(key(), file);
    info._pad = 0;
    Some(FilePath {
        dentry: f.get(o!(file_dentry))?,
        mnt: f.get(o!(file_mnt))?,
    })
}

/// `i_rdev` of /dev/net/tun (10:200), kernel encoding.
pub const TUN_RDEV: u32 = (10 << 20) | 200;

/// Writes the interface a tun fd is attached to into `out` (NUL-padded; left empty for another
/// device, or a tun fd not attached yet).
#[inline(always)]
pub fn tun_iface(file: u64, rdev: u32, out: &mut [u8; IFNAMSIZ]) {
    *out = [0; IFNAMSIZ];
    if rdev != TUN_RDEV || o!(tun_ready) == 0 {
        return;
    }
    let Some(tfile) = read::<u64>(file + o!(file_private)) else {
        return;
    };
    let Some(tun) = read::<u64>(tfile + o!(tun_file_tun)) else {
        return;
    };
    let Some(dev) = read::<u64>(tun + o!(tun_dev)) else {
        return;
    };
    if dev != 0 {
        let name = dev + o!(netdev_name);
        // SAFETY: copies a NUL-terminated kernel string into `out`, bounded by its size.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, out) };
    }
}

/// Writes the names of the dentries of `at`, leaf first, crossing mounts, into `tail`.
#[inline(never)]
pub fn walk_path(at: &FilePath, tail: &mut PathTail) {
    tail.form = PathTail::COMPONENTS;
    tail.depth = 0;
    tail.complete = 0;
    let (mut dentry, mut vfsmnt) = (at.dentry, at.mnt);
    if dentry == 0 || vfsmnt == 0 {
        return;
    }
    // The root of the mount being walked, read again only when the walk crosses into another.
    let Some(mut root) = read::<u64>(vfsmnt + o!(vfsmount_root)) else {
        return;
    };
    let mut depth: usize = 0;
    let mut step = 0;
    while step < WALK_STEPS {
        step += 1;
        if dentry == root {
            // The top of this mount: go on from where it is mounted in its parent.
            let mnt = vfsmnt.wrapping_sub(o!(mount_mnt));
            let Some(parent) = read::<u64>(mnt + o!(mount_parent)) else {
                return;
            };
            if parent == mnt {
                tail.complete = 1;
                return;
            }
            let Some(point) = read::<u64>(mnt + o!(mount_mountpoint)) else {
                return;
            };
            dentry = point;
            vfsmnt = parent + o!(mount_mnt);
            let Some(r) = read::<u64>(vfsmnt + o!(vfsmount_root)) else {
                return;
            };
            root = r;
            continue;
        }
        let Some(d) = Window::<DENTRY_WINDOW>::read(dentry) else {
            return;
        };
        let Some(parent) = d.get::<u64>(o!(dentry_parent)) else {
            return;
        };
        if depth >= PATH_SLOTS {
            return;
        }
        if let Some(name) = d.get::<u64>(o!(dentry_name)) {
            // SAFETY: copies a NUL-terminated kernel string into the slot, bounded by its size.
            let _ = unsafe {
                bpf_probe_read_kernel_str_bytes(name as *const u8, &mut tail.slots[depth])
            };
        }
        depth += 1;
        tail.depth = depth as u16;
        if parent == dentry {
            tail.complete = 1;
            return;
        }
        dentry = parent;
    }
}

/// The current task's `thread_info.status`, loaded directly: the helper returns a typed
/// pointer, the offset is a constant of the loaded program, so the verifier checks the load
/// against the kernel's BTF and the JIT makes it one guarded load (no helper call).
#[inline(always)]
pub fn current_ti_status() -> u32 {
    let off = o!(task_ti_status) as usize;
    // SAFETY: the helper returns the running task, valid for the program's whole run; the
    // offset is that of a u32 field of it (from the kernel's BTF), and the verifier refuses
    // the program otherwise.
    unsafe {
        let task = bpf_get_current_task_btf().cast::<u8>();
        core::ptr::read_volatile(task.add(off).cast::<u32>())
    }
}
