//! Keys and evidence at rest: owner-only data directories.
//!
//! Every process that keeps keys, tokens or recordings on disk starts with
//! [`owner_only_umask`], so what it creates is readable by its user alone,
//! and checks its data directory with [`private_dir`]: an entry other local
//! users can read stops the start with the path and the fix.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A data directory others can reach, or one that cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error(
        "{path} is accessible by other users (mode {mode:03o}); data directories must be owner-only: chmod -R go-rwx {root}"
    )]
    Exposed {
        path: PathBuf,
        mode: u32,
        root: PathBuf,
    },
    #[error("checking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// From now on, files and directories this process creates are owner-only.
pub fn owner_only_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PermError + '_ {
    move |source| PermError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` if needed; a new (empty) directory is made owner-only,
/// and an existing one must be owner-only throughout.
pub fn private_dir(dir: &Path) -> Result<(), PermError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
    if empty {
        return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(dir));
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.file_type().is_symlink() && mode & 0o077 != 0 {
            return Err(PermError::Exposed {
                path: p,
                mode,
                root: dir.to_path_buf(),
            });
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).map_err(io(&p))? {
                stack.push(e.map_err(io(&p))?.path());
            }
        }
    }
    Ok(())
}

/// Writes a file readable only by its owner, and syncs it.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_dirs_are_made_private_and_exposed_entries_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("data");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        write_private(&d.join("key"), b"k").unwrap();
        private_dir(&d).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::set_permissions(d.join("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(d.join("sub/open"), b"x").unwrap();
        std::fs::set_permissions(d.join("sub/open"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = private_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("sub/open") && e.contains("644") && e.contains("chmod"),
            "{e}"
        );
    }
}
