//! The eleven functions exist with candle-flash-attn 0.11.1's exact signatures (checked by
//! coercing each to its function-pointer type), and read windows and soft caps as it does: a
//! window wider than the keys is unlimited, a soft cap of 0 or below none.

use candle_core::{Device, Result, Tensor};

type T<'a> = &'a Tensor;
type W = Option<usize>;

#[test]
#[allow(clippy::type_complexity)]
fn the_eleven_signatures_are_candle_flash_attns() {
    use candle_flash_attn as c;
    let _: fn(T, T, T, f32, bool) -> Result<Tensor> = c::flash_attn;
    let _: fn(T, T, T, f32, W, W) -> Result<Tensor> = c::flash_attn_windowed;
    let _: fn(T, T, T, T, f32, bool) -> Result<Tensor> = c::flash_attn_alibi;
    let _: fn(T, T, T, T, f32, W, W) -> Result<Tensor> = c::flash_attn_alibi_windowed;
    let _: fn(T, T, T, Option<T>, f32, W, W, f32) -> Result<Tensor> =
        c::flash_attn_alibi_windowed_softcap;
    let _: fn(T, T, T, T, T, usize, usize, f32, bool) -> Result<Tensor> = c::flash_attn_varlen;
    let _: fn(T, T, T, T, T, usize, usize, f32, W, W) -> Result<Tensor> =
        c::flash_attn_varlen_windowed;
    let _: fn(T, T, T, T, T, T, usize, usize, f32, bool) -> Result<Tensor> =
        c::flash_attn_varlen_alibi;
    let _: fn(T, T, T, T, T, T, usize, usize, f32, W, W) -> Result<Tensor> =
        c::flash_attn_varlen_alibi_windowed;
    let _: fn(T, T, T, Option<T>, T, T, usize, usize, f32, W, W, f32) -> Result<Tensor> =
        c::flash_attn_varlen_alibi_windowed_softcap;
    #[allow(clippy::type_complexity)]
    let _: fn(
        T,
        T,
        T,
        T,
        T,
        T,
        Option<T>,
        usize,
        usize,
        f32,
        W,
        W,
        usize,
        Option<f32>,
    ) -> Result<Tensor> = c::flash_attn_varlen_paged_windowed;
}

fn same(a: &Tensor, b: &Tensor) -> Result<()> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    // Equal up to summation order (a window may split the key tiles differently).
    assert!(d < 1e-5, "outputs differ by {d}");
    Ok(())
}

#[test]
fn wide_windows_are_unlimited_and_caps_at_or_below_zero_are_none() -> Result<()> {
    use candle_flash_attn as c;
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 12, 2, 8), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, 20, 2, 8), &dev)?;
    let slopes = Tensor::new(&[0.3f32, 0.1], &dev)?;
    let causal = c::flash_attn(&q, &k, &k, 0.3, true)?;
    same(
        &c::flash_attn_windowed(&q, &k, &k, 0.3, Some(21), Some(0))?,
        &causal,
    )?;
    same(
        &c::flash_attn_windowed(&q, &k, &k, 0.3, Some(20), Some(0))?,
        &causal,
    )?;
    same(
        &c::flash_attn_alibi_windowed(&q, &k, &k, &slopes, 0.3, Some(99), Some(0))?,
        &c::flash_attn_alibi(&q, &k, &k, &slopes, 0.3, true)?,
    )?;
    for cap in [0.0, -1.0] {
        same(
            &c::flash_attn_alibi_windowed_softcap(&q, &k, &k, None, 0.3, None, Some(30), cap)?,
            &c::flash_attn(&q, &k, &k, 0.3, false)?,
        )?;
    }
    // A positive cap that matters changes the output; NaN is an error.
    let capped = c::flash_attn_alibi_windowed_softcap(&q, &k, &k, None, 0.3, None, Some(0), 0.5)?;
    assert!((capped - &causal)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-3);
    assert!(
        c::flash_attn_alibi_windowed_softcap(&q, &k, &k, None, 0.3, None, None, f32::NAN).is_err()
    );

    // Packed: windows against max_seqlen_k.
    let (qp, kp) = (q.squeeze(0)?, k.squeeze(0)?);
    let (cq, ck) = (
        Tensor::new(&[0u32, 12], &dev)?,
        Tensor::new(&[0u32, 20], &dev)?,
    );
    let packed_causal = c::flash_attn_varlen(&qp, &kp, &kp, &cq, &ck, 12, 20, 0.3, true)?;
    same(
        &c::flash_attn_varlen_windowed(&qp, &kp, &kp, &cq, &ck, 12, 20, 0.3, Some(50), Some(0))?,
        &packed_causal,
    )?;
    same(
        &c::flash_attn_varlen_alibi_windowed_softcap(
            &qp,
            &kp,
            &kp,
            None,
            &cq,
            &ck,
            12,
            20,
            0.3,
            Some(50),
            Some(0),
            0.0,
        )?,
        &packed_causal,
    )?;
    let cache = kp.reshape((5, 4, 2, 8))?; // 5 blocks of 4 keys, in order
    let table = Tensor::new(&[[0u32, 1, 2, 3, 4]], &dev)?;
    same(
        &c::flash_attn_varlen_paged_windowed(
            &qp,
            &cache,
            &cache,
            &cq,
            &ck,
            &table,
            None,
            12,
            20,
            0.3,
            Some(50),
            Some(0),
            4,
            Some(0.0),
        )?,
        &packed_causal,
    )?;
    Ok(())
}
