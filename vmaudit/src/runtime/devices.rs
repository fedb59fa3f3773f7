//! Opening a VM's network devices: taps through /dev/net/tun (TUNSETIFF), macvtap links
//! through their /dev/tapN node, vhost-net. Every fd is opened O_CLOEXEC; only the launch
//! clears that flag, in the emulator's process, for the fds it hands over.

use std::{
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use super::{
    netlink::{LinkError, MacvtapLink},
    spec::{Backend, Interface},
};
use crate::procfs::DevNum;

pub const TUN_PATH: &str = "/dev/net/tun";
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// What an fd is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A tap or macvtap queue.
    Tap,
    /// A vhost-net instance for a queue.
    Vhost,
}

/// One device fd vmaudit opened for an interface.
#[derive(Debug)]
pub struct DeviceFd {
    pub fd: OwnedFd,
    pub path: PathBuf,
    pub rdev: Option<DevNum>,
    pub role: Role,
    pub queue: u32,
}

/// One attempt to open a device, as the audit record describes it.
#[derive(Debug)]
pub struct OpenAttempt<'a> {
    pub path: &'a Path,
    pub rdev: Option<DevNum>,
    /// The fd number on success, or the error.
    pub result: Result<i32, &'a io::Error>,
    pub role: Role,
    pub queue: u32,
}

/// Why an interface's devices could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETIFF on {path} for {ifname}")]
    SetIff {
        path: PathBuf,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("macvtap link")]
    Link(#[from] LinkError),
    #[error("making the device node {path}")]
    Mknod {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("interface name `{0}` is longer than 15 bytes")]
    NameTooLong(String),
    #[error("noting what is about to be made")]
    Note(#[source] super::rundir::RunDirError),
}

/// Something about to be made for an interface, told before it is made (the run keeps a note
/// of it, so that the next run can remove it should this one die).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    /// A macvtap link: its name, parent and MAC.
    Link {
        name: String,
        parent: String,
        mac: String,
    },
    /// A device node (`/dev/tapN`).
    Node(PathBuf),
    /// A tap interface, named once the kernel has.
    Tap(String),
}

/// What `open_interface` reports as it goes.
pub struct Hooks<'a> {
    /// Each open attempt, success or failure, before the next step (its audit record).
    pub record: &'a mut dyn FnMut(OpenAttempt<'_>),
    /// Each thing about to be made.
    pub note: &'a mut dyn FnMut(&Made) -> Result<(), super::rundir::RunDirError>,
}

/// An interface's devices, open. Dropping it closes every fd, deletes a macvtap link vmaudit
/// created and a device node it made.
#[derive(Debug)]
pub struct NetDevice {
    pub mac: super::spec::Mac,
    pub backend: Backend,
    /// The host interface (tap name, or macvtap link name).
    pub ifname: String,
    pub fds: Vec<DeviceFd>,
    pub link: Option<MacvtapLink>,
    node_made: Option<PathBuf>,
}

impl NetDevice {
    pub fn taps(&self) -> impl Iterator<Item = &DeviceFd> {
        self.fds.iter().filter(|f| f.role == Role::Tap)
    }
    pub fn vhosts(&self) -> impl Iterator<Item = &DeviceFd> {
        self.fds.iter().filter(|f| f.role == Role::Vhost)
    }

    /// What vmaudit made for this interface, as it was noted ([`Made`]).
    pub fn made(&self) -> Vec<Made> {
        let mut out = Vec::new();
        match &self.link {
            Some(l) => out.push(Made::Link {
                name: l.name.clone(),
                parent: String::new(),
                mac: self.mac.to_string(),
            }),
            None if self.backend == Backend::Tap => out.push(Made::Tap(self.ifname.clone())),
            None => {}
        }
        out.extend(self.node_made.clone().map(Made::Node));
        out
    }

    /// Closes the fds and removes what vmaudit created for this interface.
    pub async fn teardown(mut self) {
        self.fds.clear();
        if let Some(mut link) = self.link.take() {
            link.remove().await;
        }
        self.remove_node();
    }

    fn remove_node(&mut self) {
        if let Some(node) = self.node_made.take()
            && let Err(e) = std::fs::remove_file(&node)
        {
            log::warn!("removing {}: {e}", node.display());
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.fds.clear();
        // The link's own Drop deletes it.
        self.link.take();
        self.remove_node();
    }
}

fn rdev_of(path: &Path) -> Option<DevNum> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_char_device())
        .map(|m| DevNum::from_raw(m.rdev()))
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
/// Fail with EBUSY rather than attach to a tap that already exists (another VM's).
const IFF_TUN_EXCL: i16 = -0x8000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// TUNSETIFF: attaches a /dev/net/tun fd to tap `name` (a `%d` template lets the kernel
/// number it). `new`: the tap must not exist yet (IFF_TUN_EXCL); otherwise this fd is one more
/// queue of the multiqueue tap `name`. Returns the interface's name.
fn tun_set_iff(fd: &OwnedFd, name: &str, multi_queue: bool, new: bool) -> io::Result<String> {
    // struct ifreq: char ifr_name[IFNAMSIZ = 16]; short ifr_flags; padded to 40 bytes.
    let mut ifr = [0u8; 40];
    if name.len() > super::names::IFNAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{name}` is longer than 15 bytes"),
        ));
    }
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    if new {
        flags |= IFF_TUN_EXCL;
    }
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `fd` is an open /dev/net/tun fd and `ifr` a writable 40-byte struct ifreq,
    // which TUNSETIFF reads and writes back (the chosen name).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = ifr[..16].iter().position(|b| *b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&ifr[..end]).into_owned())
}

/// Opens every device of one interface. `hooks.record` is called for each open attempt,
/// success or failure, before the next step (the runtime writes its audit record there);
/// `hooks.note` before each thing is made. On an error every fd opened so far is closed and
/// every link or node made is removed.
pub async fn open_interface(
    iface: &Interface,
    default_name: &str,
    hooks: Hooks<'_>,
) -> Result<NetDevice, DeviceError> {
    let Hooks { record, note } = hooks;
    if default_name.len() > super::names::IFNAME_MAX {
        return Err(DeviceError::NameTooLong(default_name.to_owned()));
    }
    let mut dev = NetDevice {
        mac: iface.mac,
        backend: iface.backend,
        ifname: iface
            .ifname
            .clone()
            .unwrap_or_else(|| default_name.to_owned()),
        fds: Vec::new(),
        link: None,
        node_made: None,
    };
    let multi = iface.queues > 1;
    match iface.backend {
        Backend::Tap => {
            let path = Path::new(TUN_PATH);
            let asked = dev.ifname.clone();
            // The first queue makes the tap (the kernel numbers a template); the others join
            // that very tap, by the name it got.
            let mut made: Option<String> = None;
            let mut noted = Ok(());
            let opened = open_queues(&mut dev, path, Role::Tap, iface.queues, record, |p| {
                let fd = open_rw(p)?;
                let got = tun_set_iff(
                    &fd,
                    made.as_deref().unwrap_or(&asked),
                    multi,
                    made.is_none(),
                )?;
                if made.is_none() {
                    noted = note(&Made::Tap(got.clone()));
                    made = Some(got.clone());
                }
                Ok((fd, Some(got)))
            });
            noted.map_err(DeviceError::Note)?;
            opened.map_err(|(path, source)| DeviceError::SetIff {
                path,
                ifname: asked,
                source,
            })?;
        }
        Backend::Macvtap => {
            let parent = iface.parent.as_deref().unwrap_or_default();
            note(&Made::Link {
                name: dev.ifname.clone(),
                parent: parent.to_owned(),
                mac: iface.mac.to_string(),
            })
            .map_err(DeviceError::Note)?;
            let link = MacvtapLink::create(&dev.ifname, parent, iface.mac.0).await?;
            let node = link.node();
            let link_dev = link.dev;
            dev.link = Some(link);
            if !node.exists() {
                note(&Made::Node(node.clone())).map_err(DeviceError::Note)?;
                // No udev on such hosts: make the node from sysfs's numbers, and remove it later.
                let devnum = libc::makedev(link_dev.major, link_dev.minor);
                nix::sys::stat::mknod(
                    &node,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    devnum,
                )
                .map_err(|source| DeviceError::Mknod {
                    path: node.clone(),
                    source,
                })?;
                dev.node_made = Some(node.clone());
            }
            open_queues(&mut dev, &node, Role::Tap, iface.queues, record, |p| {
                Ok((open_rw(p)?, None))
            })
            .map_err(|(path, source)| DeviceError::Open { path, source })?;
        }
    }
    if iface.vhost {
        let path = Path::new(VHOST_NET_PATH);
        open_queues(&mut dev, path, Role::Vhost, iface.queues, record, |p| {
            Ok((open_rw(p)?, None))
        })
        .map_err(|(path, source)| DeviceError::Open { path, source })?;
    }
    if iface.backend == Backend::Tap
        && let Err(e) = super::netlink::set_up(&dev.ifname).await
    {
        log::warn!("setting {} up: {e}", dev.ifname);
    }
    Ok(dev)
}

/// Opens `path` once per queue with `open` (which may also name the interface), recording each
/// attempt and keeping each fd in `dev`; the first failure is returned with its path, after its
/// record.
fn open_queues(
    dev: &mut NetDevice,
    path: &Path,
    role: Role,
    queues: u32,
    record: &mut dyn FnMut(OpenAttempt<'_>),
    mut open: impl FnMut(&Path) -> io::Result<(OwnedFd, Option<String>)>,
) -> Result<(), (PathBuf, io::Error)> {
    let rdev = rdev_of(path);
    for queue in 0..queues {
        match open(path) {
            Ok((fd, name)) => {
                record(OpenAttempt {
                    path,
                    rdev,
                    result: Ok(fd.as_raw_fd()),
                    role,
                    queue,
                });
                if let Some(name) = name {
                    dev.ifname = name;
                }
                dev.fds.push(DeviceFd {
                    fd,
                    path: path.to_owned(),
                    rdev,
                    role,
                    queue,
                });
            }
            Err(source) => {
                record(OpenAttempt {
                    path,
                    rdev,
                    result: Err(&source),
                    role,
                    queue,
                });
                return Err((path.to_owned(), source));
            }
        }
    }
    Ok(())
}

/// qemu's arguments for one interface: `-netdev tap,id=..,fd=N[,vhost=on,vhostfd=M]` (or
/// `fds=a:b`/`vhostfds=c:d` with queues) and its `-device`.
pub fn qemu_args(dev: &NetDevice, index: usize, queues: u32) -> Vec<String> {
    let id = format!("net{index}");
    let taps: Vec<String> = dev.taps().map(|f| f.fd.as_raw_fd().to_string()).collect();
    let vhosts: Vec<String> = dev.vhosts().map(|f| f.fd.as_raw_fd().to_string()).collect();
    let mut netdev = format!("tap,id={id}");
    if queues > 1 {
        netdev.push_str(&format!(",fds={}", taps.join(":")));
        if !vhosts.is_empty() {
            netdev.push_str(&format!(",vhost=on,vhostfds={}", vhosts.join(":")));
        }
    } else {
        netdev.push_str(&format!(",fd={}", taps.join("")));
        if !vhosts.is_empty() {
            netdev.push_str(&format!(",vhost=on,vhostfd={}", vhosts.join("")));
        }
    }
    let mut device = format!("virtio-net-pci,netdev={id},id=nic{index},mac={}", dev.mac);
    if queues > 1 {
        device.push_str(&format!(",mq=on,vectors={}", 2 * queues + 2));
    }
    vec!["-netdev".into(), netdev, "-device".into(), device]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::spec::Mac;

    fn fake_fd(n: &str) -> DeviceFd {
        DeviceFd {
            fd: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            path: PathBuf::from(n),
            rdev: None,
            role: if n.contains("vhost") {
                Role::Vhost
            } else {
                Role::Tap
            },
            queue: 0,
        }
    }

    #[test]
    fn qemu_args_single_and_multiqueue_with_vhost() {
        let mut dev = NetDevice {
            mac: Mac([0x52, 0x54, 0, 1, 2, 3]),
            backend: Backend::Tap,
            ifname: "t0".into(),
            fds: vec![fake_fd("/dev/net/tun")],
            link: None,
            node_made: None,
        };
        let fd0 = dev.fds[0].fd.as_raw_fd();
        assert_eq!(
            qemu_args(&dev, 0, 1),
            vec![
                "-netdev".to_owned(),
                format!("tap,id=net0,fd={fd0}"),
                "-device".into(),
                "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:01:02:03".into()
            ]
        );
        dev.fds.push(fake_fd("/dev/net/tun"));
        dev.fds.push(fake_fd("/dev/vhost-net"));
        dev.fds.push(fake_fd("/dev/vhost-net"));
        let n: Vec<i32> = dev.fds.iter().map(|f| f.fd.as_raw_fd()).collect();
        let a = qemu_args(&dev, 2, 2);
        assert_eq!(
            a[1],
            format!(
                "tap,id=net2,fds={}:{},vhost=on,vhostfds={}:{}",
                n[0], n[1], n[2], n[3]
            )
        );
        assert!(a[3].ends_with(",mq=on,vectors=6"));
    }
}
