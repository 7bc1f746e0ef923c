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

        /// The options both fused ops take.
        impl $op {
            /// Sliding-window attention, replacing the causal setting: query `i` sees key `j`
            /// when `i + off - left <= j <= i + off + right`, `off = align.offset(Lq, Lk)`,
            /// `None` unlimited (`(None, Some(0))` is causal). A window wider than the keys sees
            /// them all.
            pub fn with_window(
                mut self,
                align: $crate::CausalAlign,
                left: Option<usize>,
                right: Option<usize>,
            ) -> Self {
                self.0.set_window(align, left, right);
                self
            }

            /// Gemma 2's logit soft cap: scaled scores `x` become `cap·tanh(x / cap)` (`cap`
            /// finite and positive).
            pub fn with_softcap(mut self, cap: f32) -> candle_core::Result<Self> {
                self.0.set_softcap(cap)?;
                Ok(self)
            }

            /// ALiBi: `-slopes[h]·|i + Lk - Lq - j|` added to the scaled scores of query head
            /// `h` (one finite slope per query head).
            pub fn with_alibi(mut self, slopes: &[f32]) -> candle_core::Result<Self> {
                self.0.set_alibi(slopes)?;
                Ok(self)
            }

            /// Drops attention weights with probability `p` (`0 <= p < 1`), the mask drawn from
            /// `seed`.
            pub fn with_dropout(mut self, p: f64, seed: u64) -> candle_core::Result<Self> {
                self.0.set_dropout(p, seed)?;
                Ok(self)
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
