//! File operations: requests with [`crate::REQUEST_FILE_OP`] set, which
//! the agents' native half serves (guest/agent/native/files.h) and no
//! runtime ever sees.
//!
//! A request's code area holds a [`FileRequest`] ([`REQUEST_HEADER`]
//! bytes, then the path and the target path, without NULs); its stdin
//! area holds the data of [`FileOp::WriteData`]. The reply is one chunk:
//! exit code 0 or the guest's errno, stdout the op's answer, stderr a
//! message. Replies come from an untrusted guest: every decoder here is
//! bounds-checked and never panics.

use serde::{Deserialize, Serialize};

/// Bytes of a request's fixed part: op u32, uid u32, offset u64, length
/// u64, flags u32, path length u32, target length u32.
pub const REQUEST_HEADER: usize = 36;
/// Bytes of an [`Entry`]'s fixed part: kind u8, 3 padding, mode u32, size
/// u64, mtime (ns) i64, name length u32; the name follows.
pub const ENTRY_HEADER: usize = 28;
/// Bytes of one [`Extent`]: logical u64, physical u64, length u64, 8 padding.
pub const EXTENT_LEN: usize = 32;
/// Bytes before the extents of a map reply: file size u64, count u32, 4 padding.
pub const MAP_HEADER: usize = 16;

/// [`FileRequest::flags`]: create missing parent directories.
pub const PARENTS: u32 = 1 << 0;
/// Remove a directory and everything in it.
pub const RECURSIVE: u32 = 1 << 1;
/// Start the file empty.
pub const TRUNCATE: u32 = 1 << 2;

/// [`Entry::kind`] values.
pub const KIND_FILE: u8 = 1;
pub const KIND_DIR: u8 = 2;
pub const KIND_SYMLINK: u8 = 3;
pub const KIND_OTHER: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum FileOp {
    /// The path's [`Entry`] (not following a symlink).
    Stat = 1,
    /// u32 (1 if more remain), then [`Entry`]s from index `offset`.
    List = 2,
    /// `flags`: [`PARENTS`] (no error if it exists).
    MakeDir = 3,
    /// `flags`: [`RECURSIVE`].
    Remove = 4,
    /// Path to `target`; `flags`: [`PARENTS`] of the target.
    Rename = 5,
    /// Allocates `[offset, offset + length)` as written blocks on the disk
    /// and answers a map (see [`FileMap`]); the size may grow past it, to a
    /// 2 MiB boundary, until [`FileOp::SetSize`]. `flags`: [`TRUNCATE`],
    /// [`PARENTS`]. EXDEV off the disk.
    WriteMap = 6,
    /// A map of `[offset, offset + length)`; EXDEV off the disk.
    ReadMap = 7,
    /// Truncates or extends the file to `length`.
    SetSize = 8,
    /// Writes the request's data at `offset` (files off the disk).
    /// `flags`: [`TRUNCATE`], [`PARENTS`].
    WriteData = 9,
    /// The file size u64, then bytes from `offset`, at most `length`.
    ReadData = 10,
    /// The port tunnel (guest/agent/native/ports.h), on this channel
    /// because the same native half serves it: connects to TCP port
    /// `offset` on the guest's loopback and answers a u32 handle.
    /// ECONNREFUSED: nothing listens there.
    PortConnect = 11,
    /// On connection `offset` (a handle): sends the request's data, waits
    /// up to `flags` milliseconds for an answer, and answers a u32 (1 once
    /// the server closed its side), then at most `length` bytes it read.
    PortExchange = 12,
    /// Closes connection `offset`.
    PortClose = 13,
}

/// One file operation as the host sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRequest {
    pub op: FileOp,
    /// 0 (root) or 1000 (the sandbox user).
    pub uid: u32,
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
    /// Absolute, without NUL.
    pub path: String,
    pub target: String,
    pub data: Vec<u8>,
}

impl FileRequest {
    pub fn new(op: FileOp, uid: u32, path: impl Into<String>) -> Self {
        Self {
            op,
            uid,
            offset: 0,
            length: 0,
            flags: 0,
            path: path.into(),
            target: String::new(),
            data: Vec::new(),
        }
    }

    /// The code area's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REQUEST_HEADER + self.path.len() + self.target.len());
        out.extend_from_slice(&(self.op as u32).to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&(self.path.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(self.target.as_bytes());
        out
    }
}

/// What the guest answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReply {
    /// 0, or the guest's errno value.
    pub errno: i32,
    pub data: Vec<u8>,
    pub message: String,
}

/// A file or directory as [`FileOp::Stat`] and [`FileOp::List`] give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kind: u8,
    /// Permission bits (07777).
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A reply the host cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed file reply from the guest: {0}")]
pub struct BadReply(pub &'static str);

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Decodes a run of [`Entry`]s.
pub fn decode_entries(mut bytes: &[u8]) -> Result<Vec<Entry>, BadReply> {
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let head = bytes.get(..ENTRY_HEADER).ok_or(BadReply("entry cut short"))?;
        let name_len = u32_at(head, 24).ok_or(BadReply("entry"))? as usize;
        let name = bytes
            .get(ENTRY_HEADER..ENTRY_HEADER.saturating_add(name_len))
            .ok_or(BadReply("entry name cut short"))?;
        entries.push(Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind: head[0],
            mode: u32_at(head, 4).ok_or(BadReply("entry"))? & 0o7777,
            size: u64_at(head, 8).ok_or(BadReply("entry"))?,
            mtime_ns: u64_at(head, 16).ok_or(BadReply("entry"))? as i64,
        });
        bytes = &bytes[ENTRY_HEADER + name_len..];
    }
    Ok(entries)
}

/// [`FileOp::List`]'s reply: the entries, and whether more remain.
pub fn decode_listing(bytes: &[u8]) -> Result<(Vec<Entry>, bool), BadReply> {
    let more = u32_at(bytes, 0).ok_or(BadReply("listing cut short"))? != 0;
    Ok((decode_entries(&bytes[4..])?, more))
}

/// Where a file's written data lies on the disk: bytes
/// `[logical, logical + length)` of the file are at byte `physical` of the
/// disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
}

/// The reply of [`FileOp::ReadMap`] and [`FileOp::WriteMap`]. Ranges that
/// no extent covers read as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMap {
    pub size: u64,
    pub extents: Vec<Extent>,
}

impl FileMap {
    /// The parts of `[from, to)` that lie on extents, in order, each as
    /// (file offset, disk offset, length).
    pub fn pieces(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.extents.iter().filter_map(move |x| {
            let start = x.logical.max(from);
            let end = (x.logical + x.length).min(to);
            (start < end).then(|| (start, x.physical + (start - x.logical), end - start))
        })
    }
}

/// Decodes a map, checking that the extents are in order, do not overlap
/// and lie inside `[start, end)` of the file and inside a disk of
/// `disk_bytes`.
pub fn decode_map(bytes: &[u8], start: u64, end: u64, disk_bytes: u64) -> Result<FileMap, BadReply> {
    let size = u64_at(bytes, 0).ok_or(BadReply("map cut short"))?;
    let count = u32_at(bytes, 8).ok_or(BadReply("map cut short"))? as usize;
    let body = bytes.get(MAP_HEADER..).ok_or(BadReply("map cut short"))?;
    if body.len() != count.saturating_mul(EXTENT_LEN) {
        return Err(BadReply("map length does not match its count"));
    }
    let mut extents = Vec::with_capacity(count);
    let mut at = start;
    for rec in body.chunks_exact(EXTENT_LEN) {
        let extent = Extent {
            logical: u64_at(rec, 0).ok_or(BadReply("extent"))?,
            physical: u64_at(rec, 8).ok_or(BadReply("extent"))?,
            length: u64_at(rec, 16).ok_or(BadReply("extent"))?,
        };
        let logical_end = extent.logical.checked_add(extent.length);
        let physical_end = extent.physical.checked_add(extent.length);
        if extent.length == 0
            || extent.logical < at
            || logical_end.is_none_or(|e| e > end)
            || physical_end.is_none_or(|e| e > disk_bytes)
        {
            return Err(BadReply("extent out of order or out of bounds"));
        }
        at = extent.logical + extent.length;
        extents.push(extent);
    }
    Ok(FileMap { size, extents })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_bytes(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut b = vec![kind, 0, 0, 0];
        b.extend_from_slice(&0o644u32.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&5i64.to_le_bytes());
        b.extend_from_slice(&(name.len() as u32).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b
    }

    fn map_bytes(size: u64, extents: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = size.to_le_bytes().to_vec();
        b.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for &(l, p, n) in extents {
            for v in [l, p, n, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn request_layout() {
        let mut r = FileRequest::new(FileOp::Rename, 1000, "/a");
        r.target = "/bc".into();
        r.offset = 7;
        let b = r.encode();
        assert_eq!(b.len(), REQUEST_HEADER + 2 + 3);
        assert_eq!(u32_at(&b, 0), Some(FileOp::Rename as u32));
        assert_eq!(u32_at(&b, 4), Some(1000));
        assert_eq!(u64_at(&b, 8), Some(7));
        assert_eq!(u32_at(&b, 28), Some(2));
        assert_eq!(u32_at(&b, 32), Some(3));
        assert_eq!(&b[REQUEST_HEADER..], b"/a/bc");
    }

    #[test]
    fn entries_and_listings_decode_and_garbage_does_not_panic() {
        let mut listing = 1u32.to_le_bytes().to_vec();
        listing.extend(entry_bytes("a.txt", KIND_FILE, 3));
        listing.extend(entry_bytes("dir", KIND_DIR, 4096));
        let (entries, more) = decode_listing(&listing).unwrap();
        assert!(more);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].name.as_str(), entries[0].size, entries[0].mode),
            ("a.txt", 3, 0o644)
        );
        assert_eq!(entries[1].kind, KIND_DIR);
        for cut in 0..listing.len() - 1 {
            let _ = decode_listing(&listing[..cut]);
        }
        let mut huge_name = entry_bytes("x", KIND_FILE, 1);
        huge_name[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_entries(&huge_name).is_err());
    }

    #[test]
    fn maps_are_checked_against_the_range_and_the_disk() {
        let disk = 1 << 30;
        let ok = map_bytes(10 << 20, &[(0, 4 << 20, 2 << 20), (4 << 20, 8 << 20, 2 << 20)]);
        let map = decode_map(&ok, 0, 10 << 20, disk).unwrap();
        assert_eq!(map.size, 10 << 20);
        assert_eq!(map.extents.len(), 2);
        let pieces: Vec<_> = map.pieces(1 << 20, 5 << 20).collect();
        assert_eq!(pieces, [(1 << 20, 5 << 20, 1 << 20), (4 << 20, 8 << 20, 1 << 20)]);
        for bad in [
            map_bytes(1, &[(0, disk - 4096, 8192)]),
            map_bytes(1, &[(0, 0, 4096), (0, 8192, 4096)]),
            map_bytes(1, &[(0, 0, 0)]),
            map_bytes(1, &[(0, u64::MAX, 2)]),
            map_bytes(1, &[(u64::MAX, 0, 2)]),
            map_bytes(1, &[(10 << 20, 0, 4096)]),
        ] {
            assert!(decode_map(&bad, 0, 10 << 20, disk).is_err());
        }
        let mut lying_count = ok.clone();
        lying_count[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_map(&lying_count, 0, 10 << 20, disk).is_err());
        for cut in 0..ok.len() {
            let _ = decode_map(&ok[..cut], 0, 10 << 20, disk);
        }
    }
}
