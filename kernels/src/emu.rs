//! The kernels on the CPU (feature `emu`): `src/*.cu` compiled as C++ against a small emulation
//! of CUDA (`emu/cuda_emu.h`, `emu/emu_sm80.h`, `emu/runtime.cpp`). Every CUDA thread of a block
//! is a fiber; `__syncthreads`, `__shfl_xor_sync`, `mma.sync`, `ldmatrix` and `cp.async` follow
//! the PTX ISA's definitions, so the kernels' index arithmetic, fragment layouts, masking, tails,
//! segment tables and dropout can be checked against the CPU implementation without a GPU.
//!
//! Checked while running: warp-wide operations reached by all 32 lanes with the same operation,
//! `ldmatrix`/`cp.async` addresses aligned and inside the dynamic shared memory, no deadlock at
//! barriers; memory from [`Buffer`] and the shared memory border an inaccessible page, at the end
//! or (every other buffer and launch) at the start, so an access past the end or before the start
//! stops the process with the kernel, block and thread named; dynamic shared memory starts as NaN
//! bytes. The order of the threads, how far warps run ahead of
//! each other and when `cp.async` copies land vary between blocks and passes, so a missing
//! barrier tends to give a wrong result (not a race report: compute-sanitizer's racecheck on a GPU
//! is still the real check); `ATTN_EMU_SCHEDULE=fixed` runs threads in order instead, for
//! debugging. Not checked: anything about speed, and the real hardware's rounding inside `mma`
//! (f32 fused multiply-adds here).
//!
//! ```
//! use attn_kernels::emu::{Args, Buffer};
//! // D_i = dO_i . O_i for 3 rows of width 5 (one warp per row, 4 warps per block).
//! let o = Buffer::from_slice(&[1f32; 15]);
//! let dout = Buffer::from_slice(&(0..15).map(|x| x as f32).collect::<Vec<_>>());
//! let delta = Buffer::from_slice(&[0f32; 3]);
//! let mut args = Args::default();
//! args.buf(&o).buf(&dout).buf(&delta).val(3i64).val(5i32);
//! // SAFETY: the arguments match attn_delta_f32's signature and the buffers are that long.
//! unsafe { args.launch("attn_delta_f32", (1, 1), 128, 0) }.unwrap();
//! assert_eq!(delta.to_vec(), vec![10.0, 35.0, 60.0]);
//! ```

use std::any::Any;
use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn attn_emu_alloc(bytes: usize, front: i32) -> *mut c_void;
    fn attn_emu_free(p: *mut c_void, bytes: usize, front: i32);
    fn attn_emu_launch(
        name: *const c_char,
        gx: u32,
        gy: u32,
        threads: u32,
        smem: usize,
        args: *const *mut c_void,
        nargs: u32,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
}

/// Which end of a [`Buffer`] borders an inaccessible page, so that a kernel's access beyond it
/// stops the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The buffer ends right before the page: reading or writing past the end faults.
    End,
    /// The buffer starts right after the page: an access before the start faults (the end has
    /// up to a page of slack).
    Start,
}

/// Host memory holding one kernel buffer argument, placed right next to an inaccessible page.
pub struct Buffer<T: Copy> {
    ptr: *mut T,
    len: usize,
    guard: Guard,
}

impl<T: Copy> Buffer<T> {
    /// A buffer holding a copy of `data`, guarded at its end and at its start in turn (every
    /// other buffer made this way has [`Guard::Start`]), so that a test suite checks both.
    pub fn from_slice(data: &[T]) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let guard = if MADE.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            Guard::End
        } else {
            Guard::Start
        };
        Self::guarded(data, guard)
    }

    /// A buffer holding a copy of `data`, guarded at the given end.
    pub fn guarded(data: &[T], guard: Guard) -> Self {
        let bytes = std::mem::size_of_val(data);
        // SAFETY: attn_emu_alloc returns `bytes` (at least 1) writable bytes starting at a page
        // boundary (Start) or at a page boundary minus `bytes` (End), so aligned for any T
        // whose size divides the page size.
        let ptr = unsafe { attn_emu_alloc(bytes, i32::from(guard == Guard::Start)) }.cast::<T>();
        assert!(!ptr.is_null(), "attn-kernels emulator: out of memory");
        assert!(ptr.is_aligned(), "attn-kernels emulator: misaligned buffer");
        // SAFETY: `ptr` has room for data.len() elements and does not overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Self {
            ptr,
            len: data.len(),
            guard,
        }
    }

    /// A buffer of `len` copies of `value`.
    pub fn filled(len: usize, value: T) -> Self {
        Self::from_slice(&vec![value; len])
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: `ptr` holds `len` initialised elements (written in from_slice or by kernels).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the memory starts (for tests that hand a kernel a pointer of their own).
    pub fn as_ptr(&self) -> *const T {
        self.ptr
    }
}

impl<T: Copy> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by attn_emu_alloc with this byte count and guard.
        unsafe {
            attn_emu_free(
                self.ptr.cast(),
                self.len * std::mem::size_of::<T>(),
                i32::from(self.guard == Guard::Start),
            )
        };
    }
}

/// The argument list of one launch, in the kernel's parameter order (as cuLaunchKernel's
/// `kernelParams`: one pointer to each value).
#[derive(Default)]
pub struct Args {
    values: Vec<Box<dyn Any>>,
}

impl Args {
    /// A by-value argument (an integer, or a `#[repr(C)]` parameter block).
    pub fn val<T: Copy + 'static>(&mut self, v: T) -> &mut Self {
        self.values.push(Box::new(v));
        self
    }

    /// A pointer argument: the buffer's memory.
    pub fn buf<T: Copy>(&mut self, b: &Buffer<T>) -> &mut Self {
        self.val(b.ptr.cast::<c_void>())
    }

    /// Runs kernel `name` on `grid` (x, y) blocks of `threads` threads with `smem` bytes of
    /// dynamic shared memory, block after block. Returns the emulator's message when a check
    /// fails, the kernel is unknown or the argument count is not the kernel's.
    ///
    /// # Safety
    /// The arguments must have the types of the kernel's parameters, in order, and every access
    /// the kernel makes with them must be inside the buffers (the emulator catches an access
    /// past a buffer's end, not one inside another allocation).
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        threads: u32,
        smem: usize,
    ) -> Result<(), String> {
        let cname = CString::new(name).map_err(|_| format!("kernel name {name:?} has a NUL"))?;
        let ptrs: Vec<*mut c_void> = self
            .values
            .iter()
            .map(|b| (&**b as *const dyn Any).cast::<c_void>().cast_mut())
            .collect();
        let mut err = vec![0u8; 4096];
        // SAFETY: `ptrs` points at live values for the call; the caller vouches for their types.
        let rc = unsafe {
            attn_emu_launch(
                cname.as_ptr(),
                grid.0,
                grid.1,
                threads,
                smem,
                ptrs.as_ptr(),
                ptrs.len() as u32,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
        Err(String::from_utf8_lossy(&err[..end]).into_owned())
    }
}
