//! Times candle-flash-attn's eleven functions against plain causal `flash_attn` on one shape
//! (alternating, medians of rounds), and sliding-window attention against causal attention as
//! the length grows (time should grow with L·window, not L²). Prints markdown tables.
//!
//! `cargo run --release -p attn-op --example flash_variants -- [ROUNDS] [DTYPE] [PASS]`
//! with DTYPE `f32`/`f16`/`bf16` (default f32) and PASS `forward`/`train` (default forward).

use std::time::Duration;

use attn_op::bench::time;
use candle_core::{DType, Device, Result, Tensor, Var};

/// One timed call: the function's name and the call itself.
type Variant<'a> = (
    &'static str,
    Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a>,
);

/// A named call without arguments.
type Call<'a> = (&'static str, Box<dyn Fn() -> Result<Tensor> + 'a>);

/// Median time in ms of `f` on q, k, v, forward only or forward + backward.
fn ms(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    qkv: &[Var; 3],
    train: bool,
) -> Result<f64> {
    let t = time(&Device::Cpu, Duration::from_millis(300), || {
        let y = f(qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor())?;
        if train {
            y.sum_all()?.backward()?;
        }
        Ok(())
    })?;
    Ok(t.median.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn var(dims: (usize, usize, usize, usize), dtype: DType) -> Result<Var> {
    Var::from_tensor(&Tensor::randn(0f32, 1., dims, &Device::Cpu)?.to_dtype(dtype)?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .get(1)
        .map_or(Ok(3), |s| s.parse())
        .expect("ROUNDS: a count");
    let dtype = match args.get(2).map_or("f32", String::as_str) {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => panic!("DTYPE: f32, f16 or bf16, not {other}"),
    };
    let train = args.get(3).is_some_and(|p| p == "train");
    let pass = if train {
        "forward + backward"
    } else {
        "forward"
    };
    let dev = Device::Cpu;

    // The eleven functions on one shape, (B, S, H, D) = (1, 2048, 8, 64), causal where they can
    // be, ALiBi slopes of 8 heads, soft cap 50, a window of 512 keys where one is given.
    let (s, h, d) = (2048, 8, 64);
    let qkv = [
        var((1, s, h, d), dtype)?,
        var((1, s, h, d), dtype)?,
        var((1, s, h, d), dtype)?,
    ];
    let scale = 1.0 / (d as f32).sqrt();
    let slopes = Tensor::new(
        &(0..h)
            .map(|i| 2f32.powi(-(i as i32) - 1))
            .collect::<Vec<_>>()[..],
        &dev,
    )?;
    let cu = Tensor::new(&[0u32, s as u32], &dev)?;
    let page = 256;
    let blocks: Vec<u32> = (0..(s / page) as u32).rev().collect();
    let table = Tensor::from_vec(blocks, (1, s / page), &dev)?;
    let flat = |t: &Tensor| t.squeeze(0);
    let paged = |t: &Tensor| t.reshape((s / page, page, h, d));
    let (sl, cu, tb) = (&slopes, &cu, &table);
    let variants: Vec<Variant> = vec![
        (
            "flash_attn (causal)",
            Box::new(|q, k, v| attn_op::flash_attn(q, k, v, scale, true)),
        ),
        (
            "flash_attn_windowed (None, 0)",
            Box::new(|q, k, v| attn_op::flash_attn_windowed(q, k, v, scale, None, Some(0))),
        ),
        (
            "flash_attn_windowed (512, 0)",
            Box::new(|q, k, v| attn_op::flash_attn_windowed(q, k, v, scale, Some(512), Some(0))),
        ),
        (
            "flash_attn_alibi (causal)",
            Box::new(|q, k, v| attn_op::flash_attn_alibi(q, k, v, sl, scale, true)),
        ),
        (
            "flash_attn_alibi_windowed (512, 0)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_alibi_windowed(q, k, v, sl, scale, Some(512), Some(0))
            }),
        ),
        (
            "flash_attn_alibi_windowed_softcap (None, 0, 50)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_alibi_windowed_softcap(
                    q,
                    k,
                    v,
                    Some(sl),
                    scale,
                    None,
                    Some(0),
                    50.0,
                )
            }),
        ),
        (
            "flash_attn_varlen (causal)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    cu,
                    cu,
                    s,
                    s,
                    scale,
                    true,
                )
            }),
        ),
        (
            "flash_attn_varlen_windowed (512, 0)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen_windowed(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    cu,
                    cu,
                    s,
                    s,
                    scale,
                    Some(512),
                    Some(0),
                )
            }),
        ),
        (
            "flash_attn_varlen_alibi (causal)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen_alibi(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    sl,
                    cu,
                    cu,
                    s,
                    s,
                    scale,
                    true,
                )
            }),
        ),
        (
            "flash_attn_varlen_alibi_windowed (512, 0)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen_alibi_windowed(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    sl,
                    cu,
                    cu,
                    s,
                    s,
                    scale,
                    Some(512),
                    Some(0),
                )
            }),
        ),
        (
            "flash_attn_varlen_alibi_windowed_softcap (None, 0, 50)",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen_alibi_windowed_softcap(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    Some(sl),
                    cu,
                    cu,
                    s,
                    s,
                    scale,
                    None,
                    Some(0),
                    50.0,
                )
            }),
        ),
        (
            "flash_attn_varlen_paged_windowed (None, 0), pages of 256",
            Box::new(|q, k, v| {
                attn_op::flash_attn_varlen_paged_windowed(
                    &flat(q)?,
                    &paged(k)?,
                    &paged(v)?,
                    cu,
                    cu,
                    tb,
                    None,
                    s,
                    s,
                    scale,
                    None,
                    Some(0),
                    page,
                    None,
                )
            }),
        ),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in variants.iter().enumerate() {
            times[i].push(ms(f.as_ref(), &qkv, train)?);
        }
    }
    let base = median(times[0].clone());
    println!("(1, {s}, {h}, {d}) {dtype:?} {pass}, {rounds} alternating rounds\n");
    println!("| function | median ms | / flash_attn causal |\n|---|---:|---:|");
    for ((name, _), t) in variants.iter().zip(times) {
        let m = median(t);
        println!("| {name} | {m:.1} | {:.2}x |", m / base);
    }

    // Decoding against a paged cache: 8 sequences of 4096 cached keys, one new query each,
    // (Hq, Hkv, D) = (32, 8, 128), pages of 256 in shuffled order, against the same keys as one
    // dense tensor (flash_attn) and as packed sequences (flash_attn_varlen).
    if !train {
        let (b, lk, hq, hkv, d, page) = (8, 4096, 32, 8, 128, 256);
        let q = var((b, 1, hq, d), dtype)?;
        let kv = [var((b, lk, hkv, d), dtype)?, var((b, lk, hkv, d), dtype)?];
        let nb = b * lk / page;
        // Block i of sequence s is physical block (s * 16 + i) * 7 % nb: a permutation.
        let table: Vec<u32> = (0..nb).map(|i| (i * 7 % nb) as u32).collect();
        let inverse = {
            let mut inv = vec![0u32; nb];
            for (i, &p) in table.iter().enumerate() {
                inv[p as usize] = i as u32;
            }
            Tensor::new(inv, &dev)?
        };
        // The paged cache holds the dense keys, block by block, at the table's places.
        let paged: Vec<Tensor> = kv
            .iter()
            .map(|t| {
                t.as_tensor()
                    .detach()
                    .reshape((nb, page, hkv, d))?
                    .index_select(&inverse, 0)
            })
            .collect::<Result<_>>()?;
        let table = Tensor::from_vec(table, (b, lk / page), &dev)?;
        let cu_q = Tensor::new(&(0..=b as u32).collect::<Vec<_>>()[..], &dev)?;
        let cu_k = Tensor::new(
            &(0..=b as u32).map(|i| i * lk as u32).collect::<Vec<_>>()[..],
            &dev,
        )?;
        let flat = |t: &Tensor| t.flatten(0, 1);
        let (qd, kd, vd) = (
            q.as_tensor().detach(),
            kv[0].as_tensor().detach(),
            kv[1].as_tensor().detach(),
        );
        let calls: [Call; 3] = [
            (
                "flash_attn (dense cache)",
                Box::new(|| attn_op::flash_attn(&qd, &kd, &vd, scale, true)),
            ),
            (
                "flash_attn_varlen (packed cache)",
                Box::new(|| {
                    attn_op::flash_attn_varlen(
                        &flat(&qd)?,
                        &flat(&kd)?,
                        &flat(&vd)?,
                        &cu_q,
                        &cu_k,
                        1,
                        lk,
                        scale,
                        true,
                    )
                }),
            ),
            (
                "flash_attn_varlen_paged_windowed (pages of 256)",
                Box::new(|| {
                    attn_op::flash_attn_varlen_paged_windowed(
                        &flat(&qd)?,
                        &paged[0],
                        &paged[1],
                        &cu_q,
                        &cu_k,
                        &table,
                        None,
                        1,
                        lk,
                        scale,
                        None,
                        Some(0),
                        page,
                        None,
                    )
                }),
            ),
        ];
        let want = calls[0].1()?;
        let mut times = vec![Vec::new(); calls.len()];
        for _ in 0..rounds {
            for (i, (_, f)) in calls.iter().enumerate() {
                let t = time(&dev, Duration::from_millis(300), || f().map(|_| ()))?;
                times[i].push(t.median.as_secs_f64() * 1e3);
            }
        }
        let diff = (calls[2].1()?.reshape(want.shape())? - &want)?
            .abs()?
            .to_dtype(DType::F32)?
            .max_all()?;
        println!("\nDecoding ({b}, 1, {hq}, {d}) against {lk} keys per sequence, {hkv} kv heads {dtype:?} (paged output differs from dense by {diff})\n");
        println!("| function | median ms | / dense |\n|---|---:|---:|");
        let base = median(times[0].clone());
        for ((name, _), t) in calls.iter().zip(times) {
            let m = median(t);
            println!("| {name} | {m:.1} | {:.2}x |", m / base);
        }
    }

    // Sliding window against causal as L grows: (1, L, 8, 64), window 1024.
    println!("\n| L | causal ms | window 1024 ms | window / causal |\n|---:|---:|---:|---:|");
    for l in [1024, 2048, 4096, 8192] {
        let qkv = [
            var((1, l, h, d), dtype)?,
            var((1, l, h, d), dtype)?,
            var((1, l, h, d), dtype)?,
        ];
        let (mut c, mut w) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            c.push(ms(
                &|q, k, v| attn_op::flash_attn(q, k, v, scale, true),
                &qkv,
                train,
            )?);
            w.push(ms(
                &|q, k, v| attn_op::flash_attn_windowed(q, k, v, scale, Some(1024.min(l)), Some(0)),
                &qkv,
                train,
            )?);
        }
        let (c, w) = (median(c), median(w));
        println!("| {l} | {c:.1} | {w:.1} | {:.2} |", w / c);
    }
    Ok(())
}
