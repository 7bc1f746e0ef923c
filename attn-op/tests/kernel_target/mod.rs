//! Where the CUDA kernel tests run the kernels: a CUDA device (feature `cuda`), or, without one
//! and with feature `cuda-emu`, the CPU emulator of the kernels (`attn_op::emu`).

use candle_core::Device;

/// A CUDA device or the emulator.
pub enum Target {
    #[cfg(feature = "cuda")]
    Gpu(Device),
    #[cfg(feature = "cuda-emu")]
    Emulator,
}

/// Keeps the emulator switched on while alive (nothing on a GPU).
pub struct Running {
    #[cfg(feature = "cuda-emu")]
    _emulate: Option<attn_op::emu::EmulateCuda>,
}

impl Target {
    /// The first CUDA device; else the emulator when built in; else `None` after printing
    /// `SKIP` (failing instead when `ATTN_OP_REQUIRE_GPU` is set).
    pub fn get() -> Option<Target> {
        #[cfg(feature = "cuda")]
        match Device::new_cuda(0) {
            Ok(d) => return Some(Target::Gpu(d)),
            Err(e) => {
                assert!(
                    std::env::var_os("ATTN_OP_REQUIRE_GPU").is_none(),
                    "ATTN_OP_REQUIRE_GPU is set but no CUDA device opens: {e}"
                );
                if cfg!(not(feature = "cuda-emu")) {
                    eprintln!(
                        "SKIP: no CUDA device ({})",
                        e.to_string().lines().next().unwrap_or("")
                    );
                }
            }
        }
        #[cfg(feature = "cuda-emu")]
        return Some(Target::Emulator);
        #[cfg(not(feature = "cuda-emu"))]
        None
    }

    /// The device the kernels' tensors live on (the CPU for the emulator).
    pub fn device(&self) -> Device {
        match self {
            #[cfg(feature = "cuda")]
            Target::Gpu(d) => d.clone(),
            #[cfg(feature = "cuda-emu")]
            Target::Emulator => Device::Cpu,
        }
    }

    /// Call before running attention on [`Target::device`]; keep the guard while it runs.
    pub fn run(&self) -> Running {
        Running {
            #[cfg(feature = "cuda-emu")]
            _emulate: match self {
                Target::Emulator => Some(attn_op::emu::emulate_cuda()),
                #[allow(unreachable_patterns)]
                _ => None,
            },
        }
    }

    /// Whether this is the emulator (slower: tests run fewer cases there).
    pub fn emulated(&self) -> bool {
        #[cfg(feature = "cuda-emu")]
        if matches!(self, Target::Emulator) {
            return true;
        }
        false
    }
}
