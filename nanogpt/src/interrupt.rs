//! SIGINT and SIGTERM during training: the first one lets the current step finish, after
//! which [`crate::train::train`] saves a checkpoint, says where, and returns [`Interrupted`];
//! a second one ends the process at once.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::config::TrainConfig;

/// The first signal received, 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Installs the handlers of SIGINT and SIGTERM (call it once, before training). Elsewhere than
/// on Unix it does nothing.
pub fn install() -> std::io::Result<()> {
    #[cfg(unix)]
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls write(2) and _exit(2), which
        // are async-signal-safe; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    let first = RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let msg: &[u8] = if first {
        b"\nnanogpt: stopping after this step to save a checkpoint (signal again to quit at once)\n"
    } else {
        b"\nnanogpt: quitting at once\n"
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        if !first {
            libc::_exit(128 + signal);
        }
    }
}

/// The signal that asked training to stop, if one came.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Training stopped on a signal.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
    message: String,
}

impl Interrupted {
    /// Stopped at iteration `iter` of the run `cfg`, with a checkpoint saved at `saved`.
    pub fn at(signal: i32, iter: usize, saved: Option<&Path>, cfg: &TrainConfig) -> Self {
        let name = match signal {
            2 => "SIGINT".to_string(),
            15 => "SIGTERM".to_string(),
            s => format!("signal {s}"),
        };
        let message = match saved {
            Some(path) => format!(
                "interrupted by {name} at iteration {iter}; checkpoint saved to {}; continue with `nanogpt train --init-from resume --out-dir {}`",
                path.display(),
                cfg.out_dir.display()
            ),
            None => format!(
                "interrupted by {name} at iteration {iter}, before any step of this run: nothing new to save"
            ),
        };
        Self { signal, message }
    }

    /// The exit status a shell gives a process killed by the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}
