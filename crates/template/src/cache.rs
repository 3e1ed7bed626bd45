//! The artifact cache: `$ZEROBOOT_CACHE`, else `$XDG_CACHE_HOME/zeroboot`,
//! else `~/.cache/zeroboot`. Every artifact lives in a directory named by the
//! hash of its inputs, so a change to any input builds a new one and an
//! unchanged input is never rebuilt.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::sources::SourceFile;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no cache directory: set ZEROBOOT_CACHE or HOME")]
    NoHome,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn from_env() -> Result<Self, CacheError> {
        let root = if let Some(dir) = std::env::var_os("ZEROBOOT_CACHE") {
            PathBuf::from(dir)
        } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(dir).join("zeroboot")
        } else if let Some(home) = std::env::var_os("HOME") {
            PathBuf::from(home).join(".cache").join("zeroboot")
        } else {
            return Err(CacheError::NoHome);
        };
        Ok(Self { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<kind>/<hash>`, created.
    pub fn artifact_dir(&self, kind: &str, hash: &str) -> Result<PathBuf, CacheError> {
        let dir = self.root.join(kind).join(hash);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Takes an exclusive lock named `name` for the life of the returned file,
    /// so that two processes never build the same artifact at once.
    pub fn lock(&self, name: &str) -> Result<File, CacheError> {
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CacheError::Io {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(file)
    }
}

/// Hashes named inputs. Each input contributes its name and length, so no two
/// different input lists hash the same by concatenation.
#[derive(Default)]
pub struct InputHash(Sha256);

impl InputHash {
    pub fn new(kind: &str) -> Self {
        let mut h = Self::default();
        h.add(b"kind", kind.as_bytes());
        h
    }

    pub fn add(&mut self, name: &[u8], value: &[u8]) -> &mut Self {
        for part in [name, value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn add_files(&mut self, files: &[SourceFile]) -> &mut Self {
        for f in files {
            self.add(f.path.as_bytes(), f.contents);
        }
        self
    }

    /// First 16 hex digits of the SHA-256: short enough for paths, long enough
    /// never to collide in one cache.
    pub fn finish(self) -> String {
        let digest = self.0.finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_input_and_on_boundaries() {
        let h = |parts: &[(&[u8], &[u8])]| {
            let mut h = InputHash::new("t");
            for (n, v) in parts {
                h.add(n, v);
            }
            h.finish()
        };
        let a = h(&[(b"a", b"bc")]);
        assert_eq!(a.len(), 16);
        assert_eq!(a, h(&[(b"a", b"bc")]));
        assert_ne!(a, h(&[(b"ab", b"c")]));
        assert_ne!(a, h(&[(b"a", b"bd")]));
    }

    #[test]
    fn env_override() {
        let c = Cache::at("/x/y");
        assert_eq!(c.templates_dir(), PathBuf::from("/x/y/templates"));
    }
}
