//! Root-only files and directories: made without following a planted
//! link, and refused when someone else owns them.

use std::{fs, io, os::unix::fs::OpenOptionsExt as _, path::Path};

/// Creates `dir` (and missing parents) mode 0700, and refuses one that is
/// a symlink or not root's.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a directory owned by this user (a symlink?); refusing to use it",
            dir.display()
        )));
    }
    // One made earlier (by an older loopguard, or a unit's
    // RuntimeDirectory) may be open to others: close it.
    if meta.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes a small root-only file (0600, never following a planted link),
/// replacing what was there.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    create_private(path)?.write_all(bytes)
}

/// Creates `path` afresh, root-only (0600): whatever was there (a leftover
/// or a planted file or link) goes first, and the new one is never reached
/// through a link.
pub fn create_private(path: &Path) -> io::Result<fs::File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens (creating it 0600) a lock file in a private directory, never
/// through a symlink.
pub fn open_lock_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}
