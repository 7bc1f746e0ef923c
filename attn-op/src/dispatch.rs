//! Choosing a backend: the scoped [`sdpa_kernel`] switch and the rules of what each backend accepts.

use std::cell::Cell;
use std::marker::PhantomData;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::validate::{check_sdpa, Problem};
use crate::{Backend, SdpaOptions};

thread_local! {
    static ENABLED: Cell<[bool; 3]> = const { Cell::new([true; 3]) };
}

fn index(b: Backend) -> usize {
    match b {
        Backend::Flash => 0,
        Backend::Efficient => 1,
        Backend::Math => 2,
    }
}

/// Restores the previously enabled backends when dropped; see [`sdpa_kernel`].
#[must_use = "the backends are restored as soon as the guard is dropped"]
pub struct SdpaKernelGuard {
    previous: [bool; 3],
    // The setting is per thread: the guard must be dropped on the thread that made it.
    _not_send: PhantomData<*const ()>,
}

impl Drop for SdpaKernelGuard {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.previous));
    }
}

/// Restricts automatic dispatch on this thread to `backends` until the guard is dropped, like
/// PyTorch's `torch.nn.attention.sdpa_kernel`. Guards nest; each restores what it replaced.
///
/// ```
/// use attn_op::{enabled_backends, sdpa_kernel, Backend};
/// {
///     let _g = sdpa_kernel(&[Backend::Math]);
///     assert_eq!(enabled_backends(), vec![Backend::Math]);
/// }
/// assert_eq!(enabled_backends(), Backend::ALL.to_vec());
/// ```
pub fn sdpa_kernel(backends: &[Backend]) -> SdpaKernelGuard {
    let mut set = [false; 3];
    for b in backends {
        set[index(*b)] = true;
    }
    let previous = ENABLED.with(|e| e.replace(set));
    SdpaKernelGuard {
        previous,
        _not_send: PhantomData,
    }
}

/// The backends automatic dispatch may use on this thread, in dispatch order.
pub fn enabled_backends() -> Vec<Backend> {
    let set = ENABLED.with(Cell::get);
    Backend::ALL
        .into_iter()
        .filter(|b| set[index(*b)])
        .collect()
}

/// The backend automatic dispatch picked, and why each one before it was passed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The backend that will run.
    pub backend: Backend,
    /// Backends that were not chosen, each with the reason.
    pub refused: Vec<(Backend, String)>,
}

/// Why `backend` cannot run this problem (ignoring `sdpa_kernel`), or `None` if it can.
pub(crate) fn refusal(
    backend: Backend,
    p: &Problem,
    has_mask: bool,
    device: &Device,
) -> Option<String> {
    if backend == Backend::Math {
        return None;
    }
    if !matches!(p.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Some(format!(
            "dtype {:?} is not supported (f32, f16, bf16)",
            p.dtype
        ));
    }
    if backend == Backend::Flash && has_mask {
        return Some("attn_mask is not supported".into());
    }
    match device {
        Device::Cpu => {
            const MAX_FLASH_HEAD_DIM: usize = 256;
            if backend == Backend::Flash && p.e.max(p.ev) > MAX_FLASH_HEAD_DIM {
                return Some(format!(
                    "head dim {} is above {MAX_FLASH_HEAD_DIM}",
                    p.e.max(p.ev)
                ));
            }
            None
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::refusal(backend, p.dtype, p.e, p.ev, has_mask, dev),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            Some("this build has no CUDA kernels (enable attn-op's `cuda` feature)".into())
        }
        Device::Metal(_) => Some("Metal is not supported".into()),
    }
}

pub(crate) fn select(p: &Problem, opts: &SdpaOptions, device: &Device) -> Result<Selection> {
    let enabled = ENABLED.with(Cell::get);
    let mut refused = Vec::new();
    for backend in Backend::ALL {
        let reason = if enabled[index(backend)] {
            refusal(backend, p, opts.attn_mask.is_some(), device)
        } else {
            Some("disabled by sdpa_kernel".to_string())
        };
        match reason {
            None => return Ok(Selection { backend, refused }),
            Some(r) => refused.push((backend, r)),
        }
    }
    bail!(
        "scaled_dot_product_attention: no backend can run these inputs ({})",
        reasons(&refused)
    )
}

/// Refusals as one line: `flash: why; efficient: why`.
pub(crate) fn reasons(refused: &[(Backend, String)]) -> String {
    let why: Vec<String> = refused.iter().map(|(b, r)| format!("{b}: {r}")).collect();
    why.join("; ")
}

/// Which backend [`crate::scaled_dot_product_attention`] would run for these inputs on this
/// thread, and why the others were passed over. Errors as the call itself would.
///
/// ```
/// use attn_op::{select_backend, sdpa_kernel, Backend, SdpaOptions};
/// use candle_core::{Device, Tensor};
/// let q = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &Device::Cpu)?;
/// let mask = Tensor::ones((4, 4), candle_core::DType::U8, &Device::Cpu)?;
/// let opts = SdpaOptions { attn_mask: Some(mask), ..Default::default() };
/// let sel = select_backend(&q, &q, &q, &opts)?;
/// assert_eq!(sel.backend, Backend::Efficient);
/// assert_eq!(sel.refused, vec![(Backend::Flash, "attn_mask is not supported".to_string())]);
///
/// let _only_flash = sdpa_kernel(&[Backend::Flash]);
/// let err = select_backend(&q, &q, &q, &opts).unwrap_err().to_string();
/// assert!(err.contains("flash: attn_mask is not supported; efficient: disabled by sdpa_kernel; math: disabled by sdpa_kernel"));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn select_backend(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SdpaOptions) -> Result<Selection> {
    let p = check_sdpa("select_backend", q, k, v, opts)?;
    select(&p, opts, q.device())
}
