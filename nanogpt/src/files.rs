//! Durable writes of the files a user keeps: each is written under a unique hidden temporary
//! name beside its destination, flushed, renamed into place, and the folder flushed, so a crash
//! leaves the old file or the new one, never a torn one. Temporaries that a killed process left
//! are recognised by name and removed.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

/// The suffix of every temporary name.
const TMP_SUFFIX: &str = ".tmp";

/// A unique temporary path beside `dest`: `.NAME.PID.N.tmp` in the same folder (same file
/// system, so the rename is atomic).
pub fn temp_path(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(dest.file_name().unwrap_or_default());
    name.push(format!(".{}.{n}{TMP_SUFFIX}", std::process::id()));
    dest.with_file_name(name)
}

/// Whether `name` is a temporary of [`temp_path`] for a destination called `dest_name`, and
/// the pid of the process that made it.
fn temp_owner(name: &str, dest_name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix('.')?
        .strip_prefix(dest_name)?
        .strip_prefix('.')?
        .strip_suffix(TMP_SUFFIX)?;
    let (pid, n) = rest.split_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether process `pid` is running (always true where it cannot be told).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporaries of `dest_name` in `dir` left by processes that are gone (or, with
/// `any_owner`, by any process: the caller holds the folder's lock). Returns how many.
pub fn remove_stale_temps(dir: &Path, dest_name: &str, any_owner: bool) -> Result<usize> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| temp_owner(n, dest_name)) else {
            continue;
        };
        if any_owner || (pid != std::process::id() && !process_alive(pid)) {
            let path = entry.path();
            let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            gone.with_context(|| format!("cannot remove the stale temporary {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Flushes the folder `dir`, so that a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot flush the folder {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The folder holding `path`.
pub fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// Writes `dest` atomically: `write` fills a temporary file at the path it is given, which is
/// then flushed and renamed over `dest`; the temporary is removed if anything fails.
pub fn write_atomic(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(dest);
    let result = write(&tmp).and_then(|()| flush_and_rename(&tmp, dest));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent_of(dest))
}

/// [`write_atomic`] for writers that make temporaries of their own beside the path they are
/// given (safetensors' `serialize_to_file` writes a `.tmpXXXXXX` there and renames it): `write`
/// gets a path inside a fresh folder named by [`temp_path`], so all a killed process can leave
/// is that folder, which [`remove_stale_temps`] recognises and removes.
pub fn write_atomic_in_dir(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = temp_path(dest);
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let inner = dir.join(dest.file_name().unwrap_or_default());
    let result = write(&inner).and_then(|()| flush_and_rename(&inner, dest));
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    sync_dir(parent_of(dest))
}

/// Flushes the written temporary `tmp` and renames it over `dest`.
fn flush_and_rename(tmp: &Path, dest: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {}", tmp.display()))?;
    std::fs::rename(tmp, dest)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))
}

/// Writes `bytes` to `dest` atomically.
pub fn write_bytes_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(dest, |tmp| {
        std::fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Replaces the folder `dir` by one holding `files` (name, bytes) and every other regular file
/// or link `dir` held: the new folder is built under a temporary name beside it (other files
/// hard-linked, or copied where links fail) and swapped into place, so `dir` is at every moment
/// either wholly old or wholly new. Errors, leaving `dir` as it was, if `dir` holds a folder.
pub fn replace_dir(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} does not name a folder", dir.display()))?
        .to_string();
    let parent = parent_of(&dir);
    remove_stale_temps(parent, &name, false)?;
    let tmp = temp_path(&dir);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let built = fill_dir(&tmp, &dir, files).and_then(|()| swap_into_place(&tmp, &dir));
    // After a swap the temporary name holds the old folder, otherwise the unfinished new one.
    let _ = std::fs::remove_dir_all(&tmp);
    built?;
    sync_dir(parent)
}

/// Writes `files` into the new folder `tmp` and carries over the other entries of `old`.
fn fill_dir(tmp: &Path, old: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    for (name, bytes) in files {
        let path = tmp.join(name);
        std::fs::write(&path, bytes)
            .and_then(|()| File::open(&path)?.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let entries = match std::fs::read_dir(old) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", old.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", old.display()))?;
        let name = entry.file_name();
        if files.iter().any(|(f, _)| name == *f) {
            continue;
        }
        let (from, to) = (entry.path(), tmp.join(&name));
        let kind = entry.file_type()?;
        if kind.is_file() {
            std::fs::hard_link(&from, &to)
                .or_else(|_| std::fs::copy(&from, &to).map(drop))
                .with_context(|| format!("cannot carry {} over", from.display()))?;
        } else if kind.is_symlink() {
            #[cfg(unix)]
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)
                .with_context(|| format!("cannot carry the link {} over", from.display()))?;
            #[cfg(not(unix))]
            bail!(
                "{} is a link; move it out of the folder first",
                from.display()
            );
        } else {
            bail!(
                "{} holds the folder {}; the folder is replaced as a whole, so move that folder elsewhere first",
                old.display(),
                from.display()
            );
        }
    }
    sync_dir(tmp)
}

/// Puts the folder `new` at `dest`: an atomic exchange where the system has one (the old
/// folder is then at `new`), a rename when `dest` does not exist.
fn swap_into_place(new: &Path, dest: &Path) -> Result<()> {
    if !dest.exists() {
        return std::fs::rename(new, dest)
            .with_context(|| format!("cannot move {} to {}", new.display(), dest.display()));
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (a, b) = (c(new)?, c(dest)?);
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    // No atomic exchange here: move the old folder aside, then the new one in.
    let aside = temp_path(dest);
    std::fs::rename(dest, &aside)
        .with_context(|| format!("cannot move {} aside", dest.display()))?;
    if let Err(e) = std::fs::rename(new, dest) {
        let _ = std::fs::rename(&aside, dest);
        return Err(e)
            .with_context(|| format!("cannot move {} to {}", new.display(), dest.display()));
    }
    std::fs::rename(&aside, new)
        .with_context(|| format!("cannot move {} to {}", aside.display(), new.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_unique_recognised_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ckpt.safetensors");
        let (a, b) = (temp_path(&dest), temp_path(&dest));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            temp_owner(name, "ckpt.safetensors"),
            Some(std::process::id())
        );
        assert_eq!(temp_owner("ckpt.safetensors", "ckpt.safetensors"), None);
        assert_eq!(
            temp_owner(".ckpt.safetensors.x.1.tmp", "ckpt.safetensors"),
            None
        );

        write_bytes_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        // A dead process's temporary goes; a live one's (ours) stays unless the folder is ours.
        let dead = dir
            .path()
            .join(format!(".ckpt.safetensors.{}.0.tmp", u32::MAX));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(dir.path().join("keep.tmp"), b"x").unwrap();
        assert_eq!(
            remove_stale_temps(dir.path(), "ckpt.safetensors", false).unwrap(),
            1
        );
        assert!(!dead.exists() && a.exists());
        assert_eq!(
            remove_stale_temps(dir.path(), "ckpt.safetensors", true).unwrap(),
            1
        );
        assert!(!a.exists() && dir.path().join("keep.tmp").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// A writer that, like safetensors, writes a temporary of its own beside its path: in a
    /// temporary folder nothing of it is left, whether it succeeds or fails, and a folder a
    /// killed writer left is cleaned as a stale temporary.
    #[test]
    fn writers_with_their_own_temporaries_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ckpt.safetensors");
        let own_temp = |path: &Path, fail: bool| -> Result<()> {
            let side = tempfile::NamedTempFile::new_in(parent_of(path))?;
            std::fs::write(side.path(), b"new")?;
            if fail {
                bail!("failed mid-write");
            }
            side.persist(path)?;
            Ok(())
        };
        write_atomic_in_dir(&dest, |p| own_temp(p, false)).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(write_atomic_in_dir(&dest, |p| own_temp(p, true)).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(dir.path()), ["ckpt.safetensors"]);
        // What a writer killed mid-write leaves: the folder with its own temporary inside.
        let killed = dir
            .path()
            .join(format!(".ckpt.safetensors.{}.0.tmp", u32::MAX));
        std::fs::create_dir(&killed).unwrap();
        std::fs::write(killed.join(".tmpabcdef"), b"x").unwrap();
        assert_eq!(
            remove_stale_temps(dir.path(), "ckpt.safetensors", false).unwrap(),
            1
        );
        assert_eq!(names(dir.path()), ["ckpt.safetensors"]);
    }

    #[test]
    fn folders_are_replaced_whole_keeping_other_files() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        replace_dir(&data, &[("a.bin", b"1"), ("meta.json", b"{}")]).unwrap();
        std::fs::write(data.join("input.txt"), b"corpus").unwrap();
        replace_dir(&data, &[("a.bin", b"22"), ("meta.json", b"{2}")]).unwrap();
        assert_eq!(std::fs::read(data.join("a.bin")).unwrap(), b"22");
        assert_eq!(std::fs::read(data.join("input.txt")).unwrap(), b"corpus");
        // Only `data` is left beside it: no temporaries.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        std::fs::create_dir(data.join("sub")).unwrap();
        let e = replace_dir(&data, &[("a.bin", b"333")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds the folder"), "{e}");
        assert_eq!(std::fs::read(data.join("a.bin")).unwrap(), b"22");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
