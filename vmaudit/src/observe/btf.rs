//! The running kernel's struct layouts, from its BTF (`/sys/kernel/btf/vmlinux`): the offsets
//! the kernel programs read at, so that one object serves every kernel.
//!
//! A small reader of its own: aya's `Btf` parses this format but does not expose struct
//! members, and the one maintained crate that does (btf-rs) is LGPL, which this MIT/Apache
//! crate does not take in. Only what offsets need is read: struct and union members, through
//! typedefs and qualifiers, anonymous members included.

use std::{collections::HashMap, path::Path};

use thiserror::Error;
use vmaudit_common::KernelOffsets;

/// What stops offsets from being resolved.
#[derive(Debug, Error, PartialEq)]
pub enum BtfError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no field {0}")]
    NoField(String),
    #[error("kernel field {field} is {got} bytes, expected {want}")]
    FieldSize { field: String, got: u32, want: u32 },
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    kind_flag: bool,
    /// Size (int, struct, union, enum) or referenced type (ptr, typedef, qualifiers).
    size_or_type: u32,
    /// For an array: its element type.
    elem: u32,
    /// For a struct or union: its members' index range in `members`.
    members: (usize, usize),
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    ty: u32,
    /// Offset in bits.
    bits: u32,
}

/// The parts of a BTF blob needed to find field offsets.
#[derive(Debug)]
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is `void`; type ids index directly.
    types: Vec<Type>,
    members: Vec<Member>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(crate::paths::KERNEL_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|e| BtfError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (what the kernel exposes on x86_64).
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_at = hdr_len + type_off;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let section = b
            .get(types_at..types_at + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let mut btf = Self {
            strings,
            types: vec![Type {
                kind: 0,
                kind_flag: false,
                size_or_type: 0,
                elem: 0,
                members: (0, 0),
            }],
            members: Vec::new(),
            structs: HashMap::new(),
        };
        let mut at = 0;
        while at < section.len() {
            at = btf.parse_type(section, at)?;
        }
        Ok(btf)
    }

    /// Parses the type at `at`; returns where the next one starts.
    fn parse_type(&mut self, s: &[u8], at: usize) -> Result<usize, BtfError> {
        let name_off = u32_at(s, at)?;
        let info = u32_at(s, at + 4)?;
        let size_or_type = u32_at(s, at + 8)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let mut t = Type {
            kind,
            kind_flag: info >> 31 == 1,
            size_or_type,
            elem: 0,
            members: (0, 0),
        };
        let body = at + 12;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => {
                t.elem = u32_at(s, body)?;
                12
            }
            KIND_STRUCT | KIND_UNION => {
                let first = self.members.len();
                for i in 0..vlen {
                    let m = body + 12 * i;
                    self.members.push(Member {
                        name_off: u32_at(s, m)?,
                        ty: u32_at(s, m + 4)?,
                        bits: u32_at(s, m + 8)?,
                    });
                }
                t.members = (first, self.members.len());
                12 * vlen
            }
            KIND_ENUM => 8 * vlen,
            KIND_FUNC_PROTO => 8 * vlen,
            KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            0..=19 => 0,
            _ => return Err(BtfError::Malformed("unknown type kind")),
        };
        let id = self.types.len() as u32;
        if kind == KIND_STRUCT {
            let name = self.name(name_off).to_owned();
            if !name.is_empty() {
                self.structs.entry(name).or_insert(id);
            }
        }
        self.types.push(t);
        Ok(body + extra)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bytes of type `id`.
    fn size_of(&self, id: u32) -> Option<u32> {
        let t = self.resolve(id)?;
        match t.kind {
            KIND_PTR => Some(8),
            KIND_ARRAY => None,
            _ => Some(t.size_or_type),
        }
    }

    /// (bit offset, type) of member `name` of `ty`, looking into anonymous members.
    fn member(&self, ty: &Type, name: &str) -> Option<(u32, u32)> {
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &self.members[ty.members.0..ty.members.1] {
            let bits = if ty.kind_flag {
                m.bits & 0x00ff_ffff
            } else {
                m.bits
            };
            let mname = self.name(m.name_off);
            if mname == name {
                return Some((bits, m.ty));
            }
            if mname.is_empty()
                && let Some(inner) = self.resolve(m.ty)
                && let Some((b, t)) = self.member(inner, name)
            {
                return Some((bits + b, t));
            }
        }
        None
    }

    /// The byte offset and size of `path` (`f_path.dentry`) in `struct name`.
    pub fn field(&self, name: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let mut ty = self
            .resolve(id)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let mut bits = 0;
        let mut last = id;
        for part in path.split('.') {
            let (b, t) = self
                .member(ty, part)
                .ok_or_else(|| BtfError::NoField(format!("{name}.{path}")))?;
            bits += b;
            last = t;
            ty = self
                .resolve(t)
                .ok_or(BtfError::Malformed("dangling member type"))?;
        }
        if bits % 8 != 0 {
            return Err(BtfError::NoField(format!("{name}.{path} (a bitfield)")));
        }
        Ok((bits / 8, self.size_of(last).unwrap_or(0)))
    }

    /// The byte offset of `path` in `struct name`, whose size must be `size` bytes (0: any).
    pub fn offset(&self, name: &str, path: &str, size: u32) -> Result<u32, BtfError> {
        let (off, got) = self.field(name, path)?;
        if size != 0 && got != size {
            return Err(BtfError::FieldSize {
                field: format!("{name}.{path}"),
                got,
                want: size,
            });
        }
        Ok(off)
    }

    /// The offsets of a tun fd's interface name, when the kernel has tun: (`file.private_data`,
    /// `tun_file.tun`, `tun_struct.dev`, `net_device.name`).
    fn tun_offsets(&self) -> Result<[u32; 4], BtfError> {
        Ok([
            self.offset("file", "private_data", 8)?,
            self.offset("tun_file", "tun", 8)?,
            self.offset("tun_struct", "dev", 8)?,
            self.offset("net_device", "name", 0)?,
        ])
    }

    /// Every offset the kernel programs read.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        // Without tun (not built in), tun fds are named from fdinfo instead.
        let tun = self.tun_offsets().map_err(|e| {
            log::debug!("tun interfaces are not read in the kernel: {e}");
        });
        let [file_private, tun_file_tun, tun_dev, netdev_name] = tun.unwrap_or_default();
        Ok(KernelOffsets {
            file_private,
            tun_file_tun,
            tun_dev,
            netdev_name,
            tun_ready: u32::from(tun.is_ok()),
            task_files: self.offset("task_struct", "files", 8)?,
            files_fdt: self.offset("files_struct", "fdt", 8)?,
            fdt_max_fds: self.offset("fdtable", "max_fds", 4)?,
            fdt_fd: self.offset("fdtable", "fd", 8)?,
            fdt_close_on_exec: self.offset("fdtable", "close_on_exec", 8)?,
            file_inode: self.offset("file", "f_inode", 8)?,
            file_flags: self.offset("file", "f_flags", 4)?,
            file_dentry: self.offset("file", "f_path.dentry", 8)?,
            file_mnt: self.offset("file", "f_path.mnt", 8)?,
            inode_mode: self.offset("inode", "i_mode", 2)?,
            inode_ino: self.offset("inode", "i_ino", 8)?,
            inode_rdev: self.offset("inode", "i_rdev", 4)?,
            inode_sb: self.offset("inode", "i_sb", 8)?,
            sb_dev: self.offset("super_block", "s_dev", 4)?,
            dentry_name: self.offset("dentry", "d_name.name", 8)?,
            dentry_parent: self.offset("dentry", "d_parent", 8)?,
            mount_mnt: self.offset("mount", "mnt", 0)?,
            mount_parent: self.offset("mount", "mnt_parent", 8)?,
            mount_mountpoint: self.offset("mount", "mnt_mountpoint", 8)?,
            vfsmount_root: self.offset("vfsmount", "mnt_root", 8)?,
            task_ti_status: self.offset("task_struct", "thread_info.status", 4)?,
            task_pid: self.offset("task_struct", "pid", 4)?,
            task_tgid: self.offset("task_struct", "tgid", 4)?,
            ready: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct inner { int a; int b; }`, `struct outer { long x; union { int u; };
    /// struct inner in; struct inner *p; }`, an int and a typedef.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0u\0in\0p\0long\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |words: &[u32]| {
            for w in words {
                t.extend(w.to_le_bytes());
            }
        };
        // 1: int (4 bytes)
        ty(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: long (8 bytes)
        ty(&[s("long"), KIND_INT << 24, 8, 64]);
        // 3: struct inner { int a; int b; }
        ty(&[s("inner"), KIND_STRUCT << 24 | 2, 8]);
        ty(&[s("a"), 1, 0, s("b"), 1, 32]);
        // 4: anonymous union { int u; }
        ty(&[0, KIND_UNION << 24 | 1, 4]);
        ty(&[s("u"), 1, 0]);
        // 5: pointer to struct inner
        ty(&[0, KIND_PTR << 24, 3]);
        // 6: struct outer { long x; union {int u}; struct inner in; struct inner *p; }
        ty(&[s("outer"), KIND_STRUCT << 24 | 4, 32]);
        ty(&[s("x"), 2, 0, 0, 4, 64, s("in"), 3, 96, s("p"), 5, 160]);
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend([1u8, 0]);
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend(w.to_le_bytes());
        }
        b.extend(t);
        b.extend(strings);
        b
    }

    #[test]
    fn fields_through_anonymous_and_nested_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.field("outer", "x").unwrap(), (0, 8));
        assert_eq!(btf.field("outer", "u").unwrap(), (8, 4));
        assert_eq!(btf.field("outer", "in.b").unwrap(), (16, 4));
        assert_eq!(btf.field("outer", "p").unwrap(), (20, 8));
        assert_eq!(
            btf.offset("outer", "in.a", 8).unwrap_err().to_string(),
            "kernel field outer.in.a is 4 bytes, expected 8"
        );
    }

    #[test]
    fn a_missing_struct_or_field_is_named() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(
            btf.field("file", "f_inode").unwrap_err().to_string(),
            "kernel BTF has no struct file"
        );
        assert_eq!(
            btf.field("outer", "in.c").unwrap_err().to_string(),
            "kernel BTF has no field outer.in.c"
        );
        assert_eq!(
            btf.kernel_offsets().unwrap_err(),
            BtfError::NoStruct("task_struct".into())
        );
        assert!(matches!(
            Btf::parse(b"nope").unwrap_err(),
            BtfError::Malformed(_)
        ));
    }

    #[test]
    fn the_running_kernel_has_every_field() {
        // Every Linux with BTF has these structs; a missing one here is a real finding.
        let btf = Btf::from_sys_fs()
            .expect("/sys/kernel/btf/vmlinux unreadable: the tracker needs CONFIG_DEBUG_INFO_BTF");
        let o = btf.kernel_offsets().unwrap();
        assert_eq!(o.ready, 1);
        assert!(o.file_inode > 0 && o.inode_rdev > 0);
    }
}
