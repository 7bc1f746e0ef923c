//! An out-dir belongs to one training run at a time: the run holds an advisory lock on
//! `out-dir/train.lock` (which names its pid) until it ends, and a fresh run refuses to
//! replace an earlier run's checkpoint or loss history unless told to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint;
use crate::files;

/// The lock file's name inside `out-dir`.
pub const LOCK_FILE: &str = "train.lock";
/// The loss history's name inside `out-dir`.
pub const LOSS_CSV: &str = "loss.csv";

/// An out-dir claimed by this process; the lock is released when it is dropped (or the
/// process ends, however it ends).
#[derive(Debug)]
pub struct OutDirLock {
    _file: File,
    path: PathBuf,
}

impl OutDirLock {
    /// Creates `out_dir` if needed and locks it, or errors naming the process that holds it.
    /// Then removes the checkpoint temporaries that killed runs left there.
    pub fn acquire(out_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("cannot create out-dir {}", out_dir.display()))?;
        let path = out_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        if !try_lock(&file)? {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = match owner.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            bail!(
                "out-dir {} is in use by another training run{owner}: {} is locked; wait for that run to finish or stop it, or train into another --out-dir",
                out_dir.display(),
                path.display()
            );
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write the lock file {}", path.display()))?;
        files::remove_stale_temps(out_dir, checkpoint::FILE_NAME, true)?;
        // The fixed temporary name of earlier versions.
        let legacy = out_dir.join(format!("{}.tmp", checkpoint::FILE_NAME));
        if legacy.is_file() {
            std::fs::remove_file(&legacy)
                .with_context(|| format!("cannot remove {}", legacy.display()))?;
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks `file` exclusively without waiting: false when another process holds it.
fn try_lock(file: &File) -> Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor we own; the kernel releases it when the file is
        // closed or the process ends.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        Err(err).context("cannot lock the out-dir")
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(true)
    }
}

/// Before a fresh (not resumed) run in the locked `out_dir`: errors if it holds an earlier
/// run's checkpoint or loss history, unless `overwrite`; with `overwrite`, removes that
/// checkpoint now, so that a crash before this run's first save cannot leave the old
/// checkpoint beside the new run's history. Returns whether something was replaced.
pub fn prepare_fresh(out_dir: &Path, overwrite: bool) -> Result<bool> {
    let ckpt = checkpoint::path_in(out_dir);
    let csv = out_dir.join(LOSS_CSV);
    let has_ckpt = ckpt.exists();
    let has_history = std::fs::metadata(&csv).is_ok_and(|m| m.len() > 0);
    if !overwrite {
        if has_ckpt {
            bail!(
                "out-dir {} holds the checkpoint of an earlier run ({}); to continue it pass --init-from resume, to replace it pass --overwrite, or train into another --out-dir",
                out_dir.display(),
                ckpt.display()
            );
        }
        if has_history {
            bail!(
                "out-dir {} holds the loss history of an earlier run ({}); pass --overwrite to replace it, or train into another --out-dir",
                out_dir.display(),
                csv.display()
            );
        }
        return Ok(false);
    }
    if has_ckpt {
        std::fs::remove_file(&ckpt)
            .with_context(|| format!("cannot remove the old checkpoint {}", ckpt.display()))?;
        files::sync_dir(out_dir)?;
    }
    Ok(has_ckpt || has_history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_fresh_runs_do_not_replace_silently() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let lock = OutDirLock::acquire(&out).unwrap();
        let pid = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock locks belong to the open file: a second open, even in this process, is refused.
        let e = OutDirLock::acquire(&out).unwrap_err().to_string();
        assert!(
            e.contains("in use by another training run") && e.contains(pid.trim()),
            "{e}"
        );
        drop(lock);
        let _again = OutDirLock::acquire(&out).unwrap();

        assert!(!prepare_fresh(&out, false).unwrap());
        std::fs::write(out.join(LOSS_CSV), "iter,split,loss,lr,ms\n").unwrap();
        let e = prepare_fresh(&out, false).unwrap_err().to_string();
        assert!(
            e.contains("loss history") && e.contains("--overwrite"),
            "{e}"
        );
        std::fs::write(checkpoint::path_in(&out), b"x").unwrap();
        let e = prepare_fresh(&out, false).unwrap_err().to_string();
        assert!(e.contains("--init-from resume"), "{e}");
        assert!(prepare_fresh(&out, true).unwrap());
        assert!(!checkpoint::path_in(&out).exists());
    }
}
