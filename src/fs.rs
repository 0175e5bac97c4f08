//! Writing files so that a reader never sees half of one: through a temporary file in the same
//! folder, synced, then renamed over the target. A run killed mid-write leaves the old file (or
//! none), never a truncated one.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path`, creating its folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Writes `path` with `write`, which fills the open temporary file.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let mut tmp = temporary_beside(path)?;
    write(tmp.as_file_mut()).with_context(|| format!("cannot write {}", path.display()))?;
    finish(tmp, path)
}

/// Writes `path` with `write`, which writes the file at the temporary path it is given (for
/// writers that only take a path).
pub fn write_atomic_at(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_beside(path)?;
    write(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    finish(tmp, path)
}

fn temporary_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

fn finish(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    // Any handle's sync flushes the file, also what a path-taking writer wrote through its own.
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the new file into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_keeps_the_old_one_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let failed = write_atomic_with(&p, |f| {
            f.write_all(b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        write_atomic_at(&p, |t| Ok(std::fs::write(t, b"three")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        // Only the target is left: no temporary file stays behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
