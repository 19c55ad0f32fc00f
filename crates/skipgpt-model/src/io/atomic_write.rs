//! Writing a user's files without losing what was there: a regular file is replaced in one
//! rename, so a reader (or a crash) never sees half of it; anything else is not replaced.
//!
//! - A **regular file**, or a path not there yet: the bytes go to a temporary sibling
//!   (`.NAME.XXXXXX.tmp`, removed if anything fails), are synced, and the sibling is renamed
//!   over the path (tempfile's `persist`).
//! - A **symbolic link**: the file it points to is replaced the same way; the link stays.
//! - A **FIFO, character device or socket** (`/dev/stdout`, a named pipe): written through in
//!   place. Renaming a regular file over it would destroy it.
//! - A **directory** or a block device: refused, naming the path.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Writes `bytes` to `path` as the module documentation says.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let target = resolve_links(path)?;
    match std::fs::metadata(&target) {
        Ok(meta) if meta.is_file() => replace(&target, bytes),
        Ok(meta) if meta.is_dir() => Err(ModelError::InvalidInput(format!(
            "{}: is a directory, not a file to write",
            path.display()
        ))),
        Ok(meta) if is_stream(&meta) => write_through(&target, bytes),
        Ok(_) => Err(ModelError::InvalidInput(format!(
            "{}: not a regular file; refusing to replace it",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => replace(&target, bytes),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// Follows symbolic links (relative ones from the link's own directory) to the path they name.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let next = std::fs::read_link(&target).map_err(|e| ModelError::io(&target, e))?;
                target = match target.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            _ => return Ok(target),
        }
    }
    Err(ModelError::InvalidInput(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

#[cfg(unix)]
fn is_stream(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    t.is_fifo() || t.is_char_device() || t.is_socket()
}

#[cfg(not(unix))]
fn is_stream(_meta: &std::fs::Metadata) -> bool {
    false
}

fn write_through(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| ModelError::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.flush())
        .map_err(|e| ModelError::io(path, e))
}

fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // a temporary file is private (0600); what replaces `path` gets the mode `path` had, or
    // the mode a plain `File::create` gives (0666 less the umask)
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o666, |m| m.permissions().mode() & 0o7777);
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| ModelError::io(dir, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| ModelError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| ModelError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_regular_files_and_keeps_links_and_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.json");
        atomic_write(&file, b"one").unwrap();
        atomic_write(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        // nothing left behind
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);

        #[cfg(unix)]
        {
            // a new file gets the mode `File::create` gives; a replaced one keeps its own
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
            let plain = dir.path().join("plain");
            std::fs::File::create(&plain).unwrap();
            assert_eq!(mode(&file), mode(&plain));
            std::fs::remove_file(&plain).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
            atomic_write(&file, b"again").unwrap();
            assert_eq!(mode(&file), 0o640);
        }

        #[cfg(unix)]
        {
            let link = dir.path().join("link.json");
            std::os::unix::fs::symlink("out.json", &link).unwrap();
            atomic_write(&link, b"three").unwrap();
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
            assert_eq!(std::fs::read(&file).unwrap(), b"three");

            // a FIFO is written through, not replaced by a regular file
            let fifo = dir.path().join("pipe");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                let reader = {
                    let fifo = fifo.clone();
                    std::thread::spawn(move || std::fs::read(fifo).unwrap())
                };
                atomic_write(&fifo, b"streamed").unwrap();
                assert_eq!(reader.join().unwrap(), b"streamed");
                use std::os::unix::fs::FileTypeExt;
                assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
            }
        }

        let err = atomic_write(dir.path(), b"x").unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }
}
