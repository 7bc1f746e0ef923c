//! The emulator's own checks: an access past a buffer's end or before its start stops the
//! process naming the kernel, and launches it cannot run are errors, not undefined behaviour.
#![cfg(feature = "emu")]

use std::ffi::c_void;

use attn_kernels::emu::{Args, Buffer, Guard};

/// `attn_delta_f32` over `rows` rows of width 5, with buffers holding three rows.
fn delta_over(rows: i64) -> Result<Vec<f32>, String> {
    let o = Buffer::guarded(&[1f32; 15], Guard::End);
    let dout = Buffer::guarded(&(0..15).map(|x| x as f32).collect::<Vec<_>>(), Guard::End);
    let delta = Buffer::guarded(&[0f32; 3], Guard::End);
    let mut args = Args::default();
    args.buf(&o).buf(&dout).buf(&delta).val(rows).val(5i32);
    // SAFETY: the argument types match attn_delta_f32; with rows > 3 the kernel reads past the
    // buffers, which is what the emulator must catch (in a child process, see below).
    unsafe { args.launch("attn_delta_f32", (1, 1), 128, 0) }?;
    Ok(delta.to_vec())
}

/// Runs `test` alone in a child process with `ATTN_EMU_GUARD_CHILD` set: whether it failed, the
/// thread the emulator's fault report names for `attn_delta_f32`'s block (0, 0), and its stderr.
fn faulting_thread(test: &str) -> (bool, Option<u32>, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("ATTN_EMU_GUARD_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let thread = stderr
        .split("SIGSEGV in kernel attn_delta_f32, block (0, 0), thread ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|t| t.parse::<u32>().ok());
    (!out.status.success(), thread, stderr)
}

#[test]
fn reads_past_a_buffer_stop_the_process() {
    if std::env::var_os("ATTN_EMU_GUARD_CHILD").is_some() {
        let _ = delta_over(4);
        return; // not reached when the guard works: the parent sees a clean exit and fails
    }
    let (failed, thread, stderr) = faulting_thread("reads_past_a_buffer_stop_the_process");
    assert!(failed, "the out-of-bounds read went unnoticed");
    // Row 3 belongs to warp 3 (threads 96..127); which of its lanes faults first depends on the
    // emulator's schedule.
    assert!(
        thread.is_some_and(|t| (96..128).contains(&t)),
        "unexpected report: {stderr}"
    );
}

/// `attn_delta_f32` over two rows of width 5 whose `o` starts `before` elements ahead of a
/// buffer guarded at its start.
fn delta_from_before(before: usize) -> Result<Vec<f32>, String> {
    let o = Buffer::guarded(&[1f32; 10], Guard::Start);
    let dout = Buffer::guarded(&[2f32; 10], Guard::End);
    let delta = Buffer::from_slice(&[0f32; 2]);
    let mut args = Args::default();
    args.val(o.as_ptr().wrapping_sub(before).cast::<c_void>())
        .buf(&dout)
        .buf(&delta)
        .val(2i64)
        .val(5i32);
    // SAFETY: the argument types match attn_delta_f32; with `before` > 0 the kernel reads in
    // front of `o`, which is what the emulator must catch (in a child process, see below).
    unsafe { args.launch("attn_delta_f32", (1, 1), 128, 0) }?;
    Ok(delta.to_vec())
}

#[test]
fn reads_before_a_buffer_stop_the_process() {
    if std::env::var_os("ATTN_EMU_GUARD_CHILD").is_some() {
        let _ = delta_from_before(5);
        return;
    }
    assert_eq!(delta_from_before(0).unwrap(), vec![10.0, 10.0]);
    let (failed, thread, stderr) = faulting_thread("reads_before_a_buffer_stop_the_process");
    assert!(failed, "the read before the buffer went unnoticed");
    // Row 0 (warp 0, threads 0..31) starts 5 elements before the buffer.
    assert!(
        thread.is_some_and(|t| t < 32),
        "unexpected report: {stderr}"
    );
}

#[test]
fn in_bounds_launches_compute() {
    assert_eq!(delta_over(3).unwrap(), vec![10.0, 35.0, 60.0]);
}

#[test]
fn bad_launches_are_errors() {
    let args = Args::default();
    // SAFETY: neither launch reaches a kernel.
    let unknown = unsafe { args.launch("no_such_kernel", (1, 1), 128, 0) };
    assert!(unknown
        .unwrap_err()
        .contains("no kernel named no_such_kernel"));
    let wrong = unsafe { args.launch("attn_delta_f32", (1, 1), 128, 0) };
    assert!(wrong.unwrap_err().contains("takes 5 arguments, got 0"));
    let threads = unsafe { args.launch("attn_delta_f32", (1, 1), 100, 0) };
    assert!(threads.is_err());
}
