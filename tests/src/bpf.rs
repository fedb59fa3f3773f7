//! Staging what a hostile process with CAP_BPF and CAP_SYS_ADMIN can do to a VM's device
//! policy: detach the device programs of a cgroup (a link's or a legacy attach), attach one
//! more. Raw `bpf(2)` calls: aya's links detach only what they attached themselves.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_DETACH: i64 = 9;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_LINK_GET_FD_BY_ID: i64 = 30;
const BPF_LINK_DETACH: i64 = 34;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr`, as u32 words (zeroed: the kernel wants unused bytes zero).
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: i64, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed, valid for the call; the commands
    // used here read only the words set and write nothing back that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_by_id(cmd: i64, id: u32) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 32]);
    a.0[0] = id;
    let fd = bpf(cmd, &mut a)? as RawFd;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaches every device program attached to the cgroup directory `dir`, whether by a bpf
/// link (vmaudit's) or by a legacy attach (libvirt's). Returns their ids.
pub fn detach_device_programs(dir: &Path) -> Vec<u32> {
    let ids = vmaudit::cgroup::attached::device_programs(dir).expect("BPF_PROG_QUERY");
    assert!(!ids.is_empty(), "no device program on {}", dir.display());
    let cg = File::open(dir).expect("open the cgroup");
    for id in &ids {
        let link = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .find(|l| l.program_id() == *id);
        match link {
            Some(l) => {
                let fd = fd_by_id(BPF_LINK_GET_FD_BY_ID, l.id()).expect("link fd");
                let mut a = Attr([0; 32]);
                a.0[0] = fd.as_raw_fd() as u32;
                bpf(BPF_LINK_DETACH, &mut a).expect("BPF_LINK_DETACH");
            }
            None => {
                let prog = fd_by_id(BPF_PROG_GET_FD_BY_ID, *id).expect("program fd");
                let mut a = Attr([0; 32]);
                a.0[0] = cg.as_raw_fd() as u32;
                a.0[1] = prog.as_raw_fd() as u32;
                a.0[2] = BPF_CGROUP_DEVICE;
                bpf(BPF_PROG_DETACH, &mut a).expect("BPF_PROG_DETACH");
            }
        }
    }
    ids
}

/// A device program that allows every access, attached beside what `dir` has
/// (BPF_F_ALLOW_MULTI); detached when dropped.
pub struct AllowAll {
    cg: File,
    prog: OwnedFd,
}

impl AllowAll {
    pub fn attach(dir: &Path) -> Self {
        // r0 = 1; exit: allow.
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut a = Attr([0; 32]);
        a.0[0] = BPF_PROG_TYPE_CGROUP_DEVICE;
        a.0[1] = insns.len() as u32;
        let p = insns.as_ptr() as u64;
        a.0[2] = p as u32;
        a.0[3] = (p >> 32) as u32;
        let l = license.as_ptr() as u64;
        a.0[4] = l as u32;
        a.0[5] = (l >> 32) as u32;
        let fd = bpf(BPF_PROG_LOAD, &mut a).expect("BPF_PROG_LOAD of an allow-all device program");
        // SAFETY: the kernel just returned this fd, and nothing else owns it.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let cg = File::open(dir).expect("open the cgroup");
        let mut a = Attr([0; 32]);
        a.0[0] = cg.as_raw_fd() as u32;
        a.0[1] = prog.as_raw_fd() as u32;
        a.0[2] = BPF_CGROUP_DEVICE;
        a.0[3] = BPF_F_ALLOW_MULTI;
        bpf(BPF_PROG_ATTACH, &mut a).expect("BPF_PROG_ATTACH beside the VM's program");
        Self { cg, prog }
    }
}

impl Drop for AllowAll {
    fn drop(&mut self) {
        let mut a = Attr([0; 32]);
        a.0[0] = self.cg.as_raw_fd() as u32;
        a.0[1] = self.prog.as_raw_fd() as u32;
        a.0[2] = BPF_CGROUP_DEVICE;
        let _ = bpf(BPF_PROG_DETACH, &mut a);
    }
}
