//! bf16 tiles packed for the AVX512_BF16 products ([`super::matmul::gemm_bf16_pairs`]): each
//! 32-bit word holds two bf16 that are consecutive along the product's inner dimension (the
//! first in the low half), so one `vdpbf16ps` does two multiply-adds per f32 lane. The words
//! travel as `f32` bit patterns (the transpose and the kernel only move them), with zeros where
//! an odd length leaves a half empty.
//!
//! Only called where [`available`] says the CPU has AVX512_BF16 (so AVX-512F, BW and VL as well:
//! [`super::use_avx512`]); the functions with intrinsics inside assert it.

use std::arch::x86_64::*;

use half::bf16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::matmul::{transpose_into, MatRef};
use super::Src;

/// Whether the bf16 inputs' products run on bf16 pairs: the AVX-512 kernels are in use
/// ([`super::use_avx512`]), the CPU has AVX512_BF16, and `ATTN_OP_BF16_PRODUCTS` is `1`, or is
/// unset and the CPU is an AMD one. Zen 4 runs `vdpbf16ps` at its f32 FMA's rate, so twice the
/// work per cycle; a Sapphire Rapids Xeon ran it at half its f32 FMA's FLOP rate (both measured:
/// BENCHMARKS.md), so there bf16 is widened to f32 unless `ATTN_OP_BF16_PRODUCTS=1` asks (the
/// tests do, to cover this path on every CPU that has it). `ATTN_OP_BF16_PRODUCTS=0` widens.
pub(crate) fn available() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| {
        let wanted = match std::env::var("ATTN_OP_BF16_PRODUCTS").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => {
                let v = __cpuid(0);
                [v.ebx, v.edx, v.ecx].map(u32::to_le_bytes).concat() == b"AuthenticAMD"
            }
        };
        wanted && super::use_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// The bf16 storage of q, k and v when the products run on bf16 pairs: all three are bf16 and
/// the CPU can ([`available`]).
pub(crate) fn storage<'a>(
    q: Src<'a>,
    k: Src<'a>,
    v: Src<'a>,
) -> Option<(&'a [bf16], &'a [bf16], &'a [bf16])> {
    match (q, k, v) {
        (Src::BF16(q), Src::BF16(k), Src::BF16(v)) if available() => Some((q, k, v)),
        _ => None,
    }
}

/// `buf`'s words as bf16 halves (two per word, the low half first).
fn halves(buf: &mut [f32]) -> &mut [bf16] {
    // SAFETY: an f32 is 4 bytes holding two aligned u16s, and every bit pattern is a valid f32
    // and a valid u16; the borrow of `buf` covers the view's lifetime.
    let u: &mut [u16] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 2) };
    u.reinterpret_cast_mut()
}

/// `buf` resized to at least `n` words (contents left as they are: callers write every word).
fn words(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// `rows` rows of `cols` bf16 (row `r` from offset `off + r·rs` of `d`) as pair words along the
/// rows: `rows × cols.div_ceil(2)`, word `(r, p)` holding elements `2p`, `2p + 1` of row `r`.
pub(crate) fn along_rows<'b>(
    d: &[bf16],
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    buf: &'b mut Vec<f32>,
) -> MatRef<'b> {
    let wc = cols.div_ceil(2);
    let out = words(buf, rows * wc);
    for (r, row) in out.chunks_exact_mut(wc.max(1)).take(rows).enumerate() {
        let h = halves(row);
        h[..cols].copy_from_slice(&d[off + r * rs..][..cols]);
        h[cols..].fill(bf16::ZERO);
    }
    MatRef::rows(buf, rows, wc, wc)
}

/// Keys for `q·kᵀ`: `rows` key rows of `cols` bf16 (as [`along_rows`]) transposed to
/// `cols.div_ceil(2) × rows` words, column `j` holding key `j` by pairs. `tmp` is scratch.
pub(crate) fn keys_t<'b>(
    d: &[bf16],
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    tmp: &mut Vec<f32>,
    out: &'b mut Vec<f32>,
) -> MatRef<'b> {
    transpose_into(along_rows(d, off, rows, cols, rs, tmp), out)
}

/// Values for `p·v`: `rows` rows of `cols` bf16 as pair words across rows,
/// `rows.div_ceil(2) × cols`, word `(p, c)` holding element `c` of rows `2p` and `2p + 1`
/// (zero past the last row).
pub(crate) fn across_rows<'b>(
    d: &[bf16],
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    buf: &'b mut Vec<f32>,
) -> MatRef<'b> {
    assert!(available(), "bf16 pairs: the CPU lacks AVX512_BF16");
    let row = |r: usize| d[off + r * rs..][..cols].reinterpret_cast();
    // SAFETY: `available` (asserted above) implies AVX-512F, BW and VL.
    pair_rows(rows, cols, buf, row, |a, b, w| unsafe {
        interleave(a, b, w)
    })
}

/// The words of rows `2p` and `2p + 1` (`row(r)` is row `r`, `cols` long; the second `None` past
/// the last row) made by `pair` into row `p` of `rows.div_ceil(2) × cols` words in `buf`.
fn pair_rows<'b, 'd, T: 'd>(
    rows: usize,
    cols: usize,
    buf: &'b mut Vec<f32>,
    row: impl Fn(usize) -> &'d [T],
    pair: impl Fn(&[T], Option<&[T]>, &mut [f32]),
) -> MatRef<'b> {
    let wr = rows.div_ceil(2);
    let out = words(buf, wr * cols);
    for (p, w) in out.chunks_exact_mut(cols.max(1)).take(wr).enumerate() {
        pair(row(2 * p), (2 * p + 1 < rows).then(|| row(2 * p + 1)), w);
    }
    MatRef::rows(buf, wr, cols, cols)
}

/// `w[c] = a[c] | b[c] << 16` (`b` zero when `None`), sixteen words per step.
///
/// # Safety
/// The CPU must have AVX-512F, BW and VL; `a` (and `b`) at least `w.len()` long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn interleave(a: &[u16], b: Option<&[u16]>, w: &mut [f32]) {
    let n = w.len();
    assert!(a.len() >= n && b.is_none_or(|b| b.len() >= n));
    for c0 in (0..n).step_by(16) {
        let k = super::lanes(n - c0);
        // SAFETY: lanes `c0..c0 + (n - c0).min(16)` of `a`, `b` and `w`, in bounds (asserted).
        unsafe {
            let lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, a.as_ptr().add(c0).cast()));
            let word = match b {
                Some(b) => {
                    let hi = _mm256_maskz_loadu_epi16(k, b.as_ptr().add(c0).cast());
                    _mm512_or_si512(lo, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)))
                }
                None => lo,
            };
            _mm512_mask_storeu_ps(w.as_mut_ptr().add(c0), k, _mm512_castsi512_ps(word));
        }
    }
}

/// f32 rows (`rows × cols`, contiguous) rounded to bf16 and paired across rows as
/// [`across_rows`] does: `rows.div_ceil(2) × cols` words.
pub(crate) fn across_rows_f32<'b>(
    s: &[f32],
    rows: usize,
    cols: usize,
    buf: &'b mut Vec<f32>,
) -> MatRef<'b> {
    assert!(available(), "bf16 pairs: the CPU lacks AVX512_BF16");
    let row = |r: usize| &s[r * cols..][..cols];
    // SAFETY: `available` (asserted above) implies AVX-512F, BW, VL and BF16.
    pair_rows(rows, cols, buf, row, |a, b, w| unsafe {
        round_interleave(a, b, w)
    })
}

/// `w[c]` = the bf16 of `a[c]` in the low half, of `b[c]` (0 when `None`) in the high half,
/// rounded to nearest even, sixteen words per step.
///
/// # Safety
/// The CPU must have AVX-512F, BW, VL and BF16; `a` (and `b`) at least `w.len()` long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round_interleave(a: &[f32], b: Option<&[f32]>, w: &mut [f32]) {
    let n = w.len();
    assert!(a.len() >= n && b.is_none_or(|b| b.len() >= n));
    // Halves 0..16 hold `a`, 16..32 hold `b`: word `i` takes halves `i` and `16 + i`.
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for c0 in (0..n).step_by(16) {
        let k = super::lanes(n - c0);
        // SAFETY: lanes `c0..c0 + (n - c0).min(16)` of `a`, `b` and `w`, in bounds (asserted).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(k, a.as_ptr().add(c0));
            let hi = match b {
                Some(b) => _mm512_maskz_loadu_ps(k, b.as_ptr().add(c0)),
                None => _mm512_setzero_ps(),
            };
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let word = _mm512_permutexvar_epi16(idx, both);
            _mm512_mask_storeu_ps(w.as_mut_ptr().add(c0), k, _mm512_castsi512_ps(word));
        }
    }
}

/// `dst = src` rounded to bf16 (to nearest even, as `vcvtneps2bf16` does), sixteen at a time.
///
/// # Safety
/// The CPU must have AVX-512F, BW, VL and BF16; `dst` at least as long as `src`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round(src: &[f32], dst: &mut [bf16]) {
    let n = src.len();
    assert!(dst.len() >= n);
    for c0 in (0..n).step_by(16) {
        let k = super::lanes(n - c0);
        // SAFETY: lanes `c0..c0 + (n - c0).min(16)` of `src` and `dst`, in bounds (asserted).
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, src.as_ptr().add(c0)));
            let h: __m256i = std::mem::transmute(h);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(c0).cast(), k, h);
        }
    }
}

/// f32 rows (probabilities for `p·v`, say): each row of `s` (`cols` wide) rounded to bf16 after
/// `lead` (0 or 1) zeros and padded with a zero to an even length, as pair words along the rows:
/// `rows × (lead + cols).div_ceil(2)`. (`lead` aligns the row's first key with a value pair that
/// starts one key earlier.)
pub(crate) fn along_rows_f32<'b>(
    s: &[f32],
    cols: usize,
    lead: usize,
    buf: &'b mut Vec<f32>,
) -> MatRef<'b> {
    assert!(available(), "bf16 pairs: the CPU lacks AVX512_BF16");
    let rows = s.len() / cols.max(1);
    let wc = (lead + cols).div_ceil(2);
    let out = words(buf, rows * wc);
    for (row, w) in s
        .chunks_exact(cols.max(1))
        .zip(out.chunks_exact_mut(wc.max(1)))
    {
        let h = halves(w);
        h[..lead].fill(bf16::ZERO);
        // SAFETY: `available` (asserted above) implies AVX-512F, BW, VL and BF16.
        unsafe { round(row, &mut h[lead..lead + cols]) };
        h[lead + cols..].fill(bf16::ZERO);
    }
    MatRef::rows(buf, rows, wc, wc)
}

/// Probabilities for `p·v` that the softmax ([`super::simd::online_softmax_rows`]) rounds to
/// bf16 straight from its exponentials into the pair words [`along_rows_f32`] would make of
/// them: row `r`'s `cols` values at half `r·2·wc + lead`, the `lead` and padding halves zero.
pub(crate) struct ProbRows<'b> {
    /// `rows × wc` pair words.
    words: &'b mut [f32],
    wc: usize,
    lead: usize,
    cols: usize,
}

impl<'b> ProbRows<'b> {
    /// `rows × cols` probabilities after `lead` (0 or 1) zeros in `buf`, as pair words of
    /// `rows × (lead + cols).div_ceil(2)`; [`Self::into_matrix`] gives them once filled.
    pub(crate) fn new(buf: &'b mut Vec<f32>, rows: usize, cols: usize, lead: usize) -> Self {
        assert!(available(), "bf16 pairs: the CPU lacks AVX512_BF16");
        let wc = (lead + cols).div_ceil(2);
        let words = words(buf, rows * wc);
        for row in halves(words).chunks_exact_mut(2 * wc.max(1)) {
            row[..lead].fill(bf16::ZERO);
            row[lead + cols..].fill(bf16::ZERO);
        }
        Self {
            words,
            wc,
            lead,
            cols,
        }
    }

    /// Row `r`'s `cols` halves.
    pub(crate) fn row(&mut self, r: usize) -> &mut [bf16] {
        let (stride, lead, cols) = (2 * self.wc, self.lead, self.cols);
        &mut halves(self.words)[r * stride + lead..][..cols]
    }

    /// The filled rows as pair words.
    pub(crate) fn into_matrix(self) -> MatRef<'b> {
        let words: &'b [f32] = self.words;
        let rows = words.len() / self.wc.max(1);
        MatRef::rows(words, rows, self.wc, self.wc)
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::gemm_bf16_pairs;
    use super::*;

    fn bf(x: f32) -> bf16 {
        bf16::from_f32(x)
    }

    /// `q·kᵀ` then `p·v` through the packings and the pair kernel against f64 loops on the
    /// same bf16-rounded inputs, at odd sizes, with a leading half-pair.
    #[test]
    fn packed_products_match_f64() {
        if !available() {
            return;
        }
        for &(rows, keys, e, lead) in
            &[(7, 13, 5, 1), (6, 64, 32, 0), (13, 37, 64, 1), (1, 2, 3, 0)]
        {
            let rs = e + 3;
            let q: Vec<bf16> = (0..rows * rs)
                .map(|i| bf((i as f32 * 0.37).sin()))
                .collect();
            let k: Vec<bf16> = (0..keys * rs)
                .map(|i| bf((i as f32 * 0.11).cos()))
                .collect();
            let v: Vec<bf16> = (0..(keys + lead) * rs)
                .map(|i| bf((i as f32 * 0.23).sin()))
                .collect();
            let (mut qb, mut tmp, mut kb, mut s) = (vec![], vec![], vec![], vec![0.0; rows * keys]);
            let qw = along_rows(&q, 1, rows, e, rs, &mut qb);
            let kt = keys_t(&k, 2, keys, e, rs, &mut tmp, &mut kb);
            // SAFETY: `available` implies AVX-512F and AVX512_BF16.
            unsafe { gemm_bf16_pairs(&mut s, keys, qw, kt, false, 0.5) };
            for i in 0..rows {
                for j in 0..keys {
                    let want: f64 = (0..e)
                        .map(|c| q[1 + i * rs + c].to_f64() * k[2 + j * rs + c].to_f64())
                        .sum::<f64>()
                        * 0.5;
                    assert!((s[i * keys + j] as f64 - want).abs() < 1e-4, "s ({i}, {j})");
                }
            }
            // Values from row `lead` on; the pairs start one row earlier when `lead` is 1.
            let (mut vb, mut pb) = (vec![], vec![]);
            let vw = across_rows(&v, 0, keys + lead, e, rs, &mut vb);
            let pw = along_rows_f32(&s, keys, lead, &mut pb);
            let mut o: Vec<f32> = (0..rows * e).map(|i| i as f32).collect();
            let before = o.clone();
            // SAFETY: as above.
            unsafe { gemm_bf16_pairs(&mut o, e, pw, vw, true, 1.0) };
            for i in 0..rows {
                for c in 0..e {
                    let want: f64 = before[i * e + c] as f64
                        + (0..keys)
                            .map(|j| bf(s[i * keys + j]).to_f64() * v[(j + lead) * rs + c].to_f64())
                            .sum::<f64>();
                    assert!((o[i * e + c] as f64 - want).abs() < 1e-4, "o ({i}, {c})");
                }
            }
        }
    }
}
