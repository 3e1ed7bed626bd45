//! The guest sources, compiled into the binary so that `zeroboot` builds the
//! same guest wherever it runs, and so that their hashes name the artifacts.

pub struct SourceFile {
    pub path: &'static str,
    pub contents: &'static [u8],
}

/// A [`SourceFile`] of `guest/`, compiled in.
macro_rules! guest_file {
    ($path:literal) => {
        SourceFile {
            path: $path,
            contents: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest/", $path)),
        }
    };
}
pub(crate) use guest_file;

/// Everything that decides the kernel build.
pub const KERNEL: &[SourceFile] = &[
    guest_file!("kernel/build.sh"),
    guest_file!("kernel/zeroboot.config"),
    guest_file!("kernel/patches/0001-zeroboot-guest-kconfig.patch"),
    guest_file!("kernel/patches/0002-skip-int3-selftest.patch"),
    guest_file!("kernel/patches/0003-fpu-drop-without-fwait.patch"),
    guest_file!("kernel/patches/0004-finish-syscall-faulting-at-entry.patch"),
    guest_file!("kernel/patches/0005-e820-pmem-resources-without-pci.patch"),
    guest_file!("kernel/patches/0006-adopt-host-clock-after-restore.patch"),
    guest_file!("kernel/patches/0007-pmem-zeroes-through-the-host.patch"),
    guest_file!("kernel/patches/0008-host-written-data-in-one-page.patch"),
];

/// Everything that decides the Debian base of the root filesystem.
pub const ROOTFS_BASE: &[SourceFile] = &[guest_file!("rootfs/build-base.sh")];

/// Writes `files` under `dir`, keeping their relative paths and making
/// scripts executable.
pub fn materialize(files: &[SourceFile], dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for file in files {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, file.contents)?;
        if file.path.ends_with(".sh") || file.path.ends_with(".py") || file.path.starts_with("agent/init-") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_patch_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest/kernel/patches");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| format!("kernel/patches/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = KERNEL
            .iter()
            .filter(|f| f.path.starts_with("kernel/patches/"))
            .map(|f| f.path.to_string())
            .collect();
        assert_eq!(listed, on_disk, "add new patches to sources::KERNEL");
    }
}
