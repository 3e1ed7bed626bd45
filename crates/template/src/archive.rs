//! Templates built once and shipped: `zeroboot template export` writes a
//! template directory as one stream, and `zeroboot template import` checks
//! one and installs it in place of a build.
//!
//! ```text
//! 0   8  magic "ZBTARCH\0"
//! 8   4  format version (LE)
//! 12  4  manifest length (LE)
//! 16  …  manifest (JSON: name, the snapshot's format and CPU, every file
//!        with its size, its data extents and their SHA-256)
//! …      each file's data extents, in manifest order
//! end 32 SHA-256 of every byte before it: the archive's content address
//! ```
//!
//! Only the data extents of a file travel (the memory file is mostly holes),
//! and import writes them back into a sparse file. Import reads the stream
//! once, front to back, so it can come from a pipe; it writes into a staging
//! directory that replaces the template in one rename only once every
//! checksum, the CPU vendor, the CPU features and the snapshot format have
//! been checked. A truncated, tampered or foreign archive leaves nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroboot_vmm::snapshot::{self, codec};

use crate::cache::Cache;
use crate::store::{self, Staging, TemplateInfo, BOOT_LOG, METADATA_FILE};

pub const MAGIC: [u8; 8] = *b"ZBTARCH\0";
pub const FORMAT_VERSION: u32 = 1;
/// A manifest lists a few files with their extents: far below this.
const MAX_MANIFEST: u32 = 16 << 20;
/// Largest file an archive may hold (a memory file is guest RAM plus the
/// root image and disk: a few GiB).
const MAX_FILE: u64 = 1 << 40;
const CHUNK: usize = 1 << 20;

/// The files of a template directory an archive carries, in its order;
/// the first three are required.
const FILES: [&str; 5] = [
    METADATA_FILE,
    snapshot::STATE_FILE,
    snapshot::MEMORY_FILE,
    snapshot::WRITE_SET_FILE,
    BOOT_LOG,
];
const REQUIRED: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    /// `codec::FORMAT_VERSION` of its state file.
    pub snapshot_format: u32,
    /// The CPU vendor it was taken on; it restores only on the same one.
    pub cpu_vendor: String,
    pub files: Vec<ArchivedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchivedFile {
    pub name: String,
    /// Its length, holes included.
    pub size: u64,
    /// `(offset, length)` of each run of data, in order.
    pub extents: Vec<(u64, u64)>,
    /// SHA-256 of each extent's offset and length (LE) and bytes, in order.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("not a zeroboot template archive (bad magic)")]
    NotAnArchive,
    #[error("template archive format {found}; this zeroboot reads format {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("the archive ends early, in {0}: it is truncated")]
    Truncated(String),
    #[error("the archive's manifest is malformed: {0}")]
    Manifest(String),
    #[error("{0} does not match its checksum: the archive is damaged or was altered")]
    Checksum(String),
    #[error("the archive continues after its checksum: it is not one archive")]
    TrailingBytes,
    #[error(
        "this host cannot run template {name:?}: {why}; build it here with `zeroboot template build --name {name}`"
    )]
    Incompatible { name: String, why: String },
    #[error(transparent)]
    Template(#[from] crate::error::TemplateError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let what = what.into();
    move |source| ArchiveError::Io { what, source }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The runs of data in `file` (`SEEK_DATA` / `SEEK_HOLE`).
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a descriptor we own; it moves only the file offset.
        let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(size));
        if end > start {
            extents.push((start, end - start));
        }
        at = end.max(start + 1);
    }
    Ok(extents)
}

/// Hashes and copies a file's extents, `CHUNK` at a time.
fn for_each_chunk(
    file: &File,
    extents: &[(u64, u64)],
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for &(offset, len) in extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], offset + done)?;
            f(&buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

fn extent_header(hasher: &mut Sha256, offset: u64, len: u64) {
    hasher.update(offset.to_le_bytes());
    hasher.update(len.to_le_bytes());
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub bytes: u64,
    /// SHA-256 of the archive, its content address.
    pub sha256: String,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes template `name` of `cache` to `out` (see the module documentation).
pub fn export(cache: &Cache, name: &str, out: impl Write) -> Result<Exported, ArchiveError> {
    let dir = store::existing_dir(cache, name)?;
    // Also checks that the state file reads: an archive of a damaged
    // template would only be refused on import.
    let state = snapshot::read_state(&dir.join(snapshot::STATE_FILE)).map_err(crate::error::TemplateError::from)?;
    let mut files = Vec::new();
    let mut open = Vec::new();
    for (i, file_name) in FILES.iter().enumerate() {
        let path = dir.join(file_name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i >= REQUIRED => continue,
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        };
        let size = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        let extents = data_extents(&file, size).map_err(io(format!("finding the data of {}", path.display())))?;
        let mut hasher = Sha256::new();
        for &(offset, len) in &extents {
            extent_header(&mut hasher, offset, len);
            for_each_chunk(&file, &[(offset, len)], |chunk| {
                hasher.update(chunk);
                Ok(())
            })
            .map_err(io(format!("reading {}", path.display())))?;
        }
        files.push(ArchivedFile {
            name: file_name.to_string(),
            size,
            extents,
            sha256: hex(&hasher.finalize()),
        });
        open.push((path, file));
    }
    let manifest = Manifest {
        name: name.to_string(),
        snapshot_format: codec::FORMAT_VERSION,
        cpu_vendor: state.cpu_vendor.clone(),
        files,
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| ArchiveError::Manifest(e.to_string()))?;
    let mut out = Hashing {
        inner: out,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let write_err = io("writing the archive");
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.write_all(&header)
        .and_then(|()| out.write_all(&json))
        .map_err(write_err)?;
    for ((path, file), archived) in open.iter().zip(&manifest.files) {
        for_each_chunk(file, &archived.extents, |chunk| out.write_all(chunk))
            .map_err(io(format!("copying {}", path.display())))?;
    }
    let digest = out.hasher.clone().finalize();
    out.inner
        .write_all(&digest)
        .and_then(|()| out.inner.flush())
        .map_err(io("writing the archive"))?;
    Ok(Exported {
        bytes: out.bytes + 32,
        sha256: hex(&digest),
    })
}

/// A reader that hashes and counts what passes through it and names what
/// ends early.
struct Reading<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Reading<R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), ArchiveError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ArchiveError::Truncated(what.to_string()),
            _ => ArchiveError::Io {
                what: format!("reading the archive ({what})"),
                source: e,
            },
        })?;
        self.hasher.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

/// Checks what a manifest claims before a byte of data is read.
fn check_manifest(manifest: &Manifest) -> Result<(), ArchiveError> {
    store::validate_name(&manifest.name).map_err(|e| ArchiveError::Manifest(e.to_string()))?;
    let bad = |m: String| Err(ArchiveError::Manifest(m));
    let mut expected = FILES.iter();
    let mut seen = 0;
    for file in &manifest.files {
        // In FILES order, each at most once; optional ones may be missing.
        if !expected.any(|name| *name == file.name) {
            return bad(format!("file {:?} is unknown, repeated or out of order", file.name));
        }
        seen += usize::from(FILES[..REQUIRED].contains(&file.name.as_str()));
        if file.size > MAX_FILE {
            return bad(format!(
                "{} claims {} bytes, over the {MAX_FILE}-byte limit",
                file.name, file.size
            ));
        }
        let mut end = 0u64;
        for &(offset, len) in &file.extents {
            let Some(stop) = offset.checked_add(len) else {
                return bad(format!("{}: an extent overflows", file.name));
            };
            if len == 0 || offset < end || stop > file.size {
                return bad(format!(
                    "{}: extents must be non-empty, in order and inside the file",
                    file.name
                ));
            }
            end = stop;
        }
    }
    if seen != REQUIRED {
        return bad(format!("it must hold {}", FILES[..REQUIRED].join(", ")));
    }
    Ok(())
}

/// Removes a staging directory unless the import committed it.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// What the importing host is: [`import`] refuses a template it cannot run.
pub struct Host {
    pub cpu_vendor: String,
    /// The CPU features a guest restored here may see (`boot::cpuid::host_features`).
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

/// What [`import`] installed.
#[derive(Debug, Clone)]
pub struct Imported {
    pub name: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// Reads an archive from `input` and installs it in `cache` as `rename`
/// or the name it carries, replacing a template of that name in one rename.
pub fn import(cache: &Cache, host: &Host, input: impl Read, rename: Option<&str>) -> Result<Imported, ArchiveError> {
    let mut input = Reading {
        inner: input,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut header = [0u8; 16];
    input.exact(&mut header, "its header")?;
    if header[..8] != MAGIC {
        return Err(ArchiveError::NotAnArchive);
    }
    let word = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    if word(8) != FORMAT_VERSION {
        return Err(ArchiveError::Version { found: word(8) });
    }
    let manifest_len = word(12);
    if manifest_len > MAX_MANIFEST {
        return Err(ArchiveError::Manifest(format!(
            "{manifest_len} bytes, over the {MAX_MANIFEST}-byte limit"
        )));
    }
    let mut json = vec![0u8; manifest_len as usize];
    input.exact(&mut json, "its manifest")?;
    let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| ArchiveError::Manifest(e.to_string()))?;
    check_manifest(&manifest)?;
    let name = rename.unwrap_or(&manifest.name).to_string();
    let incompatible = |why: String| ArchiveError::Incompatible {
        name: name.clone(),
        why,
    };
    // What the manifest says is checked again against the state file below.
    if manifest.cpu_vendor != host.cpu_vendor {
        return Err(incompatible(format!(
            "it was taken on a {} CPU and this host is {}",
            manifest.cpu_vendor, host.cpu_vendor
        )));
    }
    if manifest.snapshot_format != codec::FORMAT_VERSION {
        return Err(incompatible(format!(
            "its snapshot format is {}, this zeroboot reads {}",
            manifest.snapshot_format,
            codec::FORMAT_VERSION
        )));
    }

    let dir = store::template_dir(cache, &name)?;
    std::fs::create_dir_all(cache.templates_dir()).map_err(io("creating the templates directory"))?;
    // A build or another import of the same name waits, as two builds do.
    let _lock = cache
        .lock(&format!("template-{name}"))
        .map_err(crate::error::TemplateError::from)?;
    let staging = Staging::new(&dir)?;
    let mut cleanup = Cleanup(Some(staging.path().to_path_buf()));
    let mut buf = vec![0u8; CHUNK];
    for archived in &manifest.files {
        let path = staging.path().join(&archived.name);
        let file = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        file.set_len(archived.size)
            .map_err(io(format!("sizing {}", path.display())))?;
        let mut hasher = Sha256::new();
        for &(offset, len) in &archived.extents {
            extent_header(&mut hasher, offset, len);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                input.exact(&mut buf[..n], &archived.name)?;
                hasher.update(&buf[..n]);
                file.write_all_at(&buf[..n], offset + done)
                    .map_err(io(format!("writing {}", path.display())))?;
                done += n as u64;
            }
        }
        if hex(&hasher.finalize()) != archived.sha256 {
            return Err(ArchiveError::Checksum(archived.name.clone()));
        }
    }
    let computed = input.hasher.clone().finalize();
    let mut stored = [0u8; 32];
    input
        .inner
        .read_exact(&mut stored)
        .map_err(|_| ArchiveError::Truncated("its checksum".into()))?;
    if stored[..] != computed[..] {
        return Err(ArchiveError::Checksum("the archive".into()));
    }
    let mut extra = [0u8; 1];
    if input.inner.read(&mut extra).map_err(io("reading the archive's end"))? != 0 {
        return Err(ArchiveError::TrailingBytes);
    }

    // The files themselves: the state file's own version, vendor and CPU
    // features, and the memory file's recorded checksum.
    let state_path = staging.path().join(snapshot::STATE_FILE);
    let state = snapshot::read_state(&state_path).map_err(|e| incompatible(e.to_string()))?;
    if state.cpu_vendor != host.cpu_vendor {
        return Err(incompatible(format!(
            "it was taken on a {} CPU and this host is {}",
            state.cpu_vendor, host.cpu_vendor
        )));
    }
    let missing = zeroboot_vmm::boot::cpuid::missing_features(&state.vcpu.cpuid, &host.cpuid);
    if !missing.is_empty() {
        return Err(incompatible(format!(
            "the CPU it was built on had features this one lacks ({})",
            missing.join("; ")
        )));
    }
    let mut info: TemplateInfo = store::read_info(staging.path())?;
    if info.name != name {
        info.name = name.clone();
        if let Some(spec) = info.spec.as_mut() {
            spec.name = name.clone();
        }
        staging.write_info(&info)?;
    }
    // Also reads the memory file back into the page cache in 2 MiB folios,
    // as a build leaves it, for the forks to come.
    store::verify(staging.path(), &info)?;
    let dir = staging.commit()?;
    cleanup.0 = None;
    Ok(Imported {
        name,
        dir,
        bytes: input.bytes + stored.len() as u64,
        sha256: hex(&stored),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file's name, size and extents.
    type Listed<'a> = (&'a str, u64, &'a [(u64, u64)]);

    fn manifest(files: &[Listed]) -> Manifest {
        Manifest {
            name: "t".into(),
            snapshot_format: codec::FORMAT_VERSION,
            cpu_vendor: "GenuineIntel".into(),
            files: files
                .iter()
                .map(|(name, size, extents)| ArchivedFile {
                    name: name.to_string(),
                    size: *size,
                    extents: extents.to_vec(),
                    sha256: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn manifests_are_checked_before_any_data() {
        let ok = manifest(&[
            ("template.json", 10, &[(0, 10)]),
            ("state.bin", 10, &[(0, 10)]),
            ("memory.bin", 1 << 30, &[(0, 4096), (1 << 20, 4096)]),
        ]);
        check_manifest(&ok).unwrap();
        let missing = manifest(&[("template.json", 10, &[(0, 10)]), ("memory.bin", 10, &[])]);
        assert!(check_manifest(&missing).is_err());
        let mut reordered = ok.clone();
        reordered.files.swap(0, 1);
        assert!(check_manifest(&reordered).is_err());
        let mut foreign = ok.clone();
        foreign.files[2].name = "../../etc/passwd".into();
        assert!(check_manifest(&foreign).is_err());
        for extents in [
            vec![(0, 0)],
            vec![(4096, 10), (0, 10)],
            vec![(u64::MAX, 2)],
            vec![(1 << 30, 1)],
        ] {
            let mut bad = ok.clone();
            bad.files[2].extents = extents.clone();
            assert!(check_manifest(&bad).is_err(), "{extents:?}");
        }
        let mut bad_name = ok;
        bad_name.name = "../x".into();
        assert!(check_manifest(&bad_name).is_err());
    }

    #[test]
    fn data_extents_skip_holes() {
        let dir = std::env::temp_dir().join(format!("zeroboot-archive-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        let extents = data_extents(&file, 64 << 20).unwrap();
        let data: u64 = extents.iter().map(|e| e.1).sum();
        assert!(data < 2 << 20, "{extents:?}");
        assert!(extents.iter().any(|&(o, l)| o <= 8 << 20 && o + l >= (8 << 20) + 4096));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
