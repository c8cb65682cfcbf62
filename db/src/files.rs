//! Files written and read back safely.
//! - Durable writes: the content goes to a temporary file beside the target (unique to this
//!   process and call), which is fsynced, renamed over the target, and the folder fsynced. A crash
//!   or a power cut leaves the old file or the new one, never half of one, and two processes
//!   writing one file do not share a temporary.
//! - File hashes, streamed (checkpoints, artifacts, weights files can be large).
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Write `path` through `write`, which is given the temporary path to write to.
/// Errors (of `write`, the fsyncs or the rename) are `io::Error`s; the temporary is removed.
pub fn write_atomic<E: Display>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_folder(&dir)?;
    let tmp = temporary(&dir, path);
    let result = write(&tmp)
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // the rename itself is durable once the folder's entry is on disk
    std::fs::File::open(&dir)?.sync_all()
}

/// `create_dir_all`, with an error that names the part of the path in the way when one of the
/// folders exists as a file (the system's own error is "File exists" or "Not a directory").
pub fn create_folder(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let in_the_way = dir
            .ancestors()
            .find(|a| a.exists() && !a.is_dir())
            .map(Path::to_path_buf);
        match in_the_way {
            Some(file) => std::io::Error::new(
                e.kind(),
                format!(
                    "{} is a file where ablate needs a folder: move it away",
                    file.display()
                ),
            ),
            None => e,
        }
    })
}

/// `write_atomic` of bytes.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes))
}

/// sha256 of a file's bytes, hex, read in a stream.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// `.NAME.tmp-PID-N.EXT` beside the target: the target's extension stays last, for writers that
/// choose the format from it (images, plots).
fn temporary(dir: &Path, path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp-{}-{n}{ext}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/out.json");
        write_bytes(&p, b"one").expect("write");
        write_bytes(&p, b"two").expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let entries: Vec<_> = std::fs::read_dir(p.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("out.json")]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.bin");
        write_bytes(&p, b"old").expect("write");
        let e = write_atomic(&p, |tmp| {
            std::fs::write(tmp, b"half").map_err(|e| e.to_string())?;
            Err("disk full".to_string())
        })
        .expect_err("the writer failed");
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn a_file_where_a_folder_belongs_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        std::fs::write(&cache, b"not a folder").expect("write");
        let e = write_bytes(&cache.join("tokenizers/x.safetensors"), b"x").expect_err("blocked");
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a file where ablate needs a folder: move it away",
                cache.display()
            )
        );
    }
}
