//! The per-boot secret key of open-file-description ids.
//!
//! The kernel programs hash each `struct file`'s address with this key, so ids from any
//! vmaudit process of one boot compare, and none tells a kernel address. The key lives on
//! tmpfs (`/run`, gone at reboot), readable by root only; the first vmaudit of a boot makes
//! it, atomically, from the kernel's random source.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Reads the key at `path`, making it first if this is the first use since boot.
pub fn ofd_key(path: &Path) -> io::Result<[u64; 2]> {
    match fs::read(path) {
        Ok(bytes) => return parse(&bytes),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let tmp = dir.join(format!(".ofd-key.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&random16()?)?;
    f.sync_all()?;
    drop(f);
    // link() fails if another vmaudit made the key first: then its key is the one.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    parse(&fs::read(path)?)
}

fn parse(bytes: &[u8]) -> io::Result<[u64; 2]> {
    let b: [u8; 16] = bytes.try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the key is {} bytes, not 16", bytes.len()),
        )
    })?;
    let (k0, k1) = b.split_at(8);
    Ok([
        u64::from_le_bytes(k0.try_into().expect("8 bytes")),
        u64::from_le_bytes(k1.try_into().expect("8 bytes")),
    ])
}

fn random16() -> io::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    // SAFETY: the buffer is live and 16 bytes long; getrandom writes at most that.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        return Err(io::Error::last_os_error());
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn made_once_then_read_back() {
        let dir = std::env::temp_dir().join(format!("vmaudit-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("run").join("ofd-key");
        let k = ofd_key(&path).unwrap();
        assert_ne!(k, [0, 0]);
        assert_eq!(ofd_key(&path).unwrap(), k, "the same key on every use");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(&path, b"short").unwrap();
        assert_eq!(
            ofd_key(&path).unwrap_err().to_string(),
            "the key is 5 bytes, not 16"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_are_siphash_2_4() {
        // The kernel programs and this test share vmaudit_common::ofd::id; std's SipHasher is
        // SipHash-2-4, the reference.
        #[allow(deprecated)]
        let reference = |k: [u64; 2], m: u64| {
            use std::hash::Hasher as _;
            let mut h = std::hash::SipHasher::new_with_keys(k[0], k[1]);
            h.write(&m.to_le_bytes());
            h.finish()
        };
        for (k, m) in [
            (
                [0x0706050403020100, 0x0f0e0d0c0b0a0908],
                0x0706050403020100u64,
            ),
            ([1, 2], 0xffff_8880_1234_5678),
            ([u64::MAX, 0], 0),
        ] {
            assert_eq!(vmaudit_common::ofd::id(k, m), reference(k, m));
        }
        // The paper's vector for 8 bytes 00..07 under key 00..0f.
        assert_eq!(
            vmaudit_common::ofd::id([0x0706050403020100, 0x0f0e0d0c0b0a0908], 0x0706050403020100),
            0x93f5_f579_9a93_2462
        );
    }
}
