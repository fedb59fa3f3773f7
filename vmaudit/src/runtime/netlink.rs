//! macvtap links over rtnetlink (the `rtnetlink` crate), and their removal.

use std::path::PathBuf;

use futures::TryStreamExt as _;
use rtnetlink::{LinkMacVtap, LinkUnspec, packet_route::link::MacVtapMode};
use thiserror::Error;

use crate::procfs::DevNum;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("rtnetlink socket")]
    Socket(#[source] std::io::Error),
    #[error("no link named {0}")]
    NoSuchLink(String),
    #[error("creating macvtap {name} on {parent}")]
    Create {
        name: String,
        parent: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {name}")]
    Query {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("reading {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

async fn handle() -> Result<rtnetlink::Handle, LinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(h: &rtnetlink::Handle, name: &str) -> Result<u32, LinkError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(msg.header.index),
        Ok(None) => Err(LinkError::NoSuchLink(name.to_owned())),
        // The kernel answers ENODEV for an unknown name.
        Err(rtnetlink::Error::NetlinkError(_)) => Err(LinkError::NoSuchLink(name.to_owned())),
        Err(source) => Err(LinkError::Query {
            name: name.to_owned(),
            source,
        }),
    }
}

/// A macvtap link this process created: removed by [`MacvtapLink::remove`], or on drop.
#[derive(Debug)]
pub struct MacvtapLink {
    pub name: String,
    pub index: u32,
    /// The character device's numbers (`/sys/class/net/NAME/macvtap/tapN/dev`).
    pub dev: DevNum,
    removed: bool,
}

impl MacvtapLink {
    /// Creates `name` as a bridge-mode macvtap on `parent` with the guest's MAC, and brings
    /// it up.
    pub async fn create(name: &str, parent: &str, mac: [u8; 6]) -> Result<Self, LinkError> {
        let h = handle().await?;
        let parent_index = index_of(&h, parent).await?;
        h.link()
            .add(
                LinkMacVtap::new(name, parent_index, MacVtapMode::Bridge)
                    .address(mac.to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| LinkError::Create {
                name: name.to_owned(),
                parent: parent.to_owned(),
                source,
            })?;
        let index = index_of(&h, name).await?;
        let mut link = Self {
            name: name.to_owned(),
            index,
            dev: DevNum { major: 0, minor: 0 },
            removed: false,
        };
        match read_tap_dev(name, index) {
            Ok(dev) => link.dev = dev,
            Err(e) => {
                link.remove().await;
                return Err(e);
            }
        }
        Ok(link)
    }

    /// `/dev/tapN` for this link.
    pub fn node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/tap{}", self.index))
    }

    /// Deletes the link (logging a failure: nothing else can be done about it).
    pub async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let result = async {
            let h = handle().await?;
            h.link()
                .del(self.index)
                .execute()
                .await
                .map_err(|source| LinkError::Query {
                    name: self.name.clone(),
                    source,
                })
        }
        .await;
        if let Err(e) = result {
            log::warn!("removing macvtap {}: {e}", self.name);
        }
    }
}

impl Drop for MacvtapLink {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Drop cannot await: delete from a thread with its own runtime (works inside or
        // outside a tokio runtime).
        let index = self.index;
        let name = self.name.clone();
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (conn, h, _) = rtnetlink::new_connection()?;
                tokio::spawn(conn);
                h.link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(std::io::Error::other)
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("removing macvtap {name}: {e}"),
            Err(_) => log::warn!("removing macvtap {name}: the removal thread panicked"),
        }
    }
}

/// The macvtap character device numbers from sysfs.
fn read_tap_dev(name: &str, index: u32) -> Result<DevNum, LinkError> {
    let base = PathBuf::from("/sys/class/net").join(name);
    let candidates = [
        base.join("macvtap").join(format!("tap{index}")).join("dev"),
        base.join(format!("tap{index}")).join("dev"),
    ];
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or(&candidates[0])
        .clone();
    let text = std::fs::read_to_string(&path).map_err(|source| LinkError::Sysfs {
        path: path.clone(),
        source,
    })?;
    let bad = || LinkError::Sysfs {
        path: path.clone(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not MAJ:MIN: {text:?}"),
        ),
    };
    let (maj, min) = text.trim().split_once(':').ok_or_else(bad)?;
    Ok(DevNum {
        major: maj.parse().map_err(|_| bad())?,
        minor: min.parse().map_err(|_| bad())?,
    })
}

/// Sets a link up by name (taps are created down).
pub async fn set_up(name: &str) -> Result<(), LinkError> {
    let h = handle().await?;
    let index = index_of(&h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|source| LinkError::Query {
            name: name.to_owned(),
            source,
        })
}

/// Whether `name` is a macvtap link on `parent` with MAC `mac` (read from sysfs): how a dead
/// run's link is told from someone else's link of the same name.
pub fn is_macvtap_of(name: &str, parent: &str, mac: &str) -> bool {
    let base = PathBuf::from("/sys/class/net").join(name);
    let address = std::fs::read_to_string(base.join("address")).unwrap_or_default();
    address.trim().eq_ignore_ascii_case(mac)
        && base.join("macvtap").is_dir()
        && base.join(format!("lower_{parent}")).exists()
}

/// Deletes the link `name`.
pub async fn delete(name: &str) -> Result<(), LinkError> {
    let h = handle().await?;
    let index = index_of(&h, name).await?;
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(|source| LinkError::Query {
            name: name.to_owned(),
            source,
        })
}
