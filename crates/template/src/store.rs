//! The template directory, and the one place that writes, opens, verifies
//! and repairs it. A template directory holds the snapshot (`state.bin`,
//! `memory.bin` and `write-set.txt`, in zeroboot_vmm::snapshot's formats),
//! the guest's `boot.log`, and `template.json` ([`TemplateInfo`]).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroboot_vmm::machine::WrittenSnapshot;
use zeroboot_vmm::snapshot::{self, Snapshot};
use zeroboot_vmm::{page_cache, Hypervisor, Machine};

use crate::cache::{io_err, Cache};
use crate::error::TemplateError;
use crate::runtime::Runtime;
use crate::spec::{is_valid_name, TemplateSpec};

pub const METADATA_FILE: &str = "template.json";
pub const BOOT_LOG: &str = "boot.log";

/// Seconds spent in each build phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub artifacts_s: f64,
    pub boot_s: f64,
    pub snapshot_s: f64,
}

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: String,
    pub mem_mib: u64,
    /// Hash of everything the template was built from; a different value
    /// means the template is stale.
    pub inputs: String,
    pub kernel: String,
    pub root_image: String,
    pub created_unix: u64,
    pub phases: PhaseTimes,
    /// Guest memory the snapshot holds (non-zero pages), in bytes.
    pub memory_bytes: u64,
    pub exits_to_ready: u64,
    /// `page_cache::memory_checksum` of the memory file when it was written;
    /// checked on open. None in templates made before it existed.
    #[serde(default)]
    pub memory_crc32: Option<u32>,
    /// 2 MiB ranges of the memory file that the page cache held in 2 MiB
    /// folios when it was written (`page_cache::MemoryFileRead`): what an
    /// open restores if the cache has since been spoilt. None in templates
    /// made before it existed.
    #[serde(default)]
    pub memory_huge_ranges: Option<u64>,
    /// What it was built from. None in templates made before specs existed
    /// (which were all the python template).
    #[serde(default)]
    pub spec: Option<TemplateSpec>,
}

impl TemplateInfo {
    pub fn runtime(&self) -> Runtime {
        self.spec.as_ref().map_or(Runtime::Python, |s| s.runtime)
    }
}

pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(TemplateError::BadName(name.into()))
    }
}

pub fn template_dir(cache: &Cache, name: &str) -> Result<PathBuf, TemplateError> {
    validate_name(name)?;
    Ok(cache.templates_dir().join(name))
}

pub fn read_info(dir: &Path) -> Result<TemplateInfo, TemplateError> {
    let path = dir.join(METADATA_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TemplateError::Metadata {
        path,
        message: e.to_string(),
    })
}

/// Replaces `template.json` of the template in `dir` with `info`, in one
/// step (a server opening the template meanwhile reads the old file or the
/// new one).
pub fn rewrite_info(dir: &Path, info: &TemplateInfo) -> Result<(), TemplateError> {
    let path = dir.join(METADATA_FILE);
    let staged = dir.join(format!("{METADATA_FILE}.new"));
    write_json(&staged, info)?;
    std::fs::rename(&staged, &path).map_err(io_err(&path))?;
    Ok(())
}

fn write_json(path: &Path, info: &TemplateInfo) -> Result<(), TemplateError> {
    let json = serde_json::to_string_pretty(info).map_err(|e| TemplateError::Metadata {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, json).map_err(io_err(path))?;
    Ok(())
}

/// A template directory being written: a sibling of the template's that
/// replaces it only once complete ([`Staging::commit`]), so a failed or
/// interrupted build never leaves a half-written template behind.
pub struct Staging {
    dir: PathBuf,
    path: PathBuf,
}

impl Staging {
    /// Starts writing the template whose directory is `dir`, removing
    /// what an interrupted build left.
    pub fn new(dir: &Path) -> Result<Self, TemplateError> {
        let path = dir.with_extension("building");
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            path,
        })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the template's files end up.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machine's snapshot: memory file and state file.
    pub fn write_snapshot(&self, machine: &Machine) -> Result<WrittenSnapshot, TemplateError> {
        Ok(machine.write_snapshot(&self.path)?)
    }

    /// The guest pages forks usually write (`snapshot::WRITE_SET_FILE`).
    pub fn write_write_set(&self, set: &snapshot::WriteSet) -> Result<(), TemplateError> {
        let path = self.path.join(snapshot::WRITE_SET_FILE);
        std::fs::write(&path, set.format()).map_err(io_err(&path))?;
        Ok(())
    }

    /// `template.json`, the last file a build writes.
    pub fn write_info(&self, info: &TemplateInfo) -> Result<(), TemplateError> {
        write_json(&self.path.join(METADATA_FILE), info)
    }

    /// Replaces the template with what was written, in one step: a server
    /// that opens the template meanwhile gets the old one or the new one,
    /// whole (`renameat2` with `RENAME_EXCHANGE` swaps the two directories;
    /// the old one is removed after).
    pub fn commit(self) -> Result<PathBuf, TemplateError> {
        if !self.dir.exists() {
            std::fs::rename(&self.path, &self.dir).map_err(io_err(&self.dir))?;
            return Ok(self.dir);
        }
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| io_err(p)(std::io::ErrorKind::InvalidInput.into()))
        };
        let (new, old) = (c(&self.path)?, c(&self.dir)?);
        // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD
        // resolves them as `rename` would.
        let swapped = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                new.as_ptr(),
                libc::AT_FDCWD,
                old.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if swapped != 0 {
            return Err(io_err(&self.dir)(std::io::Error::last_os_error()).into());
        }
        // The staging path now holds the old template.
        std::fs::remove_dir_all(&self.path).map_err(io_err(&self.path))?;
        Ok(self.dir)
    }

    /// Keeps the boot log where an error message points, even though the
    /// build failed before the commit.
    pub fn keep_boot_log(&self) {
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = std::fs::copy(self.path.join(BOOT_LOG), self.dir.join(BOOT_LOG));
    }
}

/// Opens template `name` for restoring.
pub fn open(cache: &Cache, hv: &Hypervisor, name: &str) -> Result<Snapshot, TemplateError> {
    let dir = existing_dir(cache, name)?;
    let snapshot = Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(hv))?;
    verify(&dir, &read_info(&dir)?)?;
    Ok(snapshot)
}

/// The directory of template `name`, which a finished build or import
/// wrote (it has its metadata file), or `NotFound`.
pub fn existing_dir(cache: &Cache, name: &str) -> Result<PathBuf, TemplateError> {
    let dir = template_dir(cache, name)?;
    if !dir.join(METADATA_FILE).exists() {
        return Err(TemplateError::NotFound {
            name: name.into(),
            dir: cache.templates_dir(),
        });
    }
    Ok(dir)
}

/// Checks the memory file against the checksum recorded when it was
/// written. (The state file carries its own CRC, checked as it is read.)
pub fn verify(dir: &Path, info: &TemplateInfo) -> Result<(), TemplateError> {
    let expected = info.memory_crc32.ok_or_else(|| TemplateError::Unverified {
        name: info.name.clone(),
    })?;
    let path = dir.join(snapshot::MEMORY_FILE);
    let file = File::open(&path).map_err(io_err(&path))?;
    // Templates from before `memory_huge_ranges` was recorded get the
    // repair only where some range is already in a 2 MiB folio.
    let possible = match info.memory_huge_ranges {
        Some(ranges) => ranges,
        None => {
            let read = page_cache::read_memory_file(&file).map_err(io_err(&path))?;
            if read.huge_ranges > 0 {
                read.data_ranges
            } else {
                0
            }
        }
    };
    let read = page_cache::read_and_repair(&file, possible).map_err(io_err(&path))?;
    let actual = read.crc32;
    if actual != expected {
        return Err(TemplateError::Corrupt {
            name: info.name.clone(),
            path,
            expected,
            actual,
        });
    }
    Ok(())
}

/// One line of `zeroboot template ls`.
pub struct Listed {
    pub name: String,
    pub info: Option<TemplateInfo>,
    /// Disk blocks the template's files occupy (the memory file is sparse).
    pub disk_bytes: u64,
}

pub fn list(cache: &Cache) -> Result<Vec<Listed>, TemplateError> {
    let dir = cache.templates_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e).into()),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || validate_name(&name).is_err() {
            continue;
        }
        let disk_bytes = std::fs::read_dir(&path)
            .map(|files| {
                files
                    .flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0);
        out.push(Listed {
            info: read_info(&path).ok(),
            name,
            disk_bytes,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("python").is_ok());
        assert!(validate_name("py-3_x").is_ok());
        for bad in ["", "../x", "Py", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_template_is_a_clear_error() {
        let cache = Cache::at(std::env::temp_dir().join(format!("zeroboot-empty-{}", std::process::id())));
        assert!(list(&cache).unwrap().is_empty());
        if let Ok(hv) = Hypervisor::open() {
            let err = open(&cache, &hv, "nope").err().unwrap().to_string();
            assert!(err.contains("zeroboot template build --name nope"), "{err}");
        }
    }
}
