//! The fused attention ops, as Candle `CustomOp3`s on (q, k, v).

/// Implements `CustomOp3` for a newtype over [`fused::Fused`]: the flash and efficient ops share
/// the CPU implementation and differ in their name, their profiler spans and, on CUDA, their
/// kernels (`backend`).
macro_rules! fused_op {
    ($op:ty, $name:literal, $forward:literal, $backward:literal, $backend:expr) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let _span = tracing::debug_span!($forward).entered();
                self.0.cpu_fwd($backend, s1, l1, s2, l2, s3, l3)
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CudaStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CudaStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                let _span = tracing::debug_span!($forward).entered();
                self.0.cuda_fwd($backend, s1, l1, s2, l2, s3, l3)
            }

            fn bwd(
                &self,
                q: &candle_core::Tensor,
                k: &candle_core::Tensor,
                v: &candle_core::Tensor,
                res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                let _span = tracing::debug_span!($backward).entered();
                self.0.bwd($backend, q, k, v, res, grad)
            }
        }
    };
}

pub(crate) mod efficient;
mod flash;
pub(crate) mod fused;
pub(crate) mod qkv;

pub use efficient::EfficientAttention;
pub use flash::FlashAttention;
