//! Scaled dot-product attention with grouped-query heads: `softmax(q·kᵀ · scale + mask) · v`.
//!
//! Written out rather than built from candle's ops because a decoding step has one query per
//! row: candle's batched matmul then calls its gemm once per (row, key head) on a 7 × 64 by
//! 64 × L product, and the calls cost far more than the arithmetic they do (CHANGELOG.md,
//! Performance). Here one task per (row, key head) does
//! its query heads' scores, softmax and weighted sum of values in one pass over its keys.
//!
//! Keys the mask rules out (−∞) are skipped rather than added as zero weights, so a row's result
//! does not depend on how much padding its batch has. The arithmetic is in f32 in one fixed order
//! (16 lanes, no fused multiply-adds) whatever the CPU's vector width.

use crate::model::pool;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// `q [b, h, t, hd]` attending to `k`, `v` `[b, kv, tk, hd]` under the additive `mask`
/// `[b, 1, 1, t, tk]`; query heads `g·h/kv … (g+1)·h/kv − 1` share key head `g`. Scores are
/// `(q · scale) · k`, soft-capped as `c · tanh(s / c)` where `softcap` is given (before the
/// mask). Returns `[b, t, h · hd]`, heads side by side — what the output projection reads.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, kv, tk, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || kv == 0 || h % kv != 0 {
        bail!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.dims() != [b, 1, 1, t, tk] {
        bail!(
            "attention mask is {:?}, expected {:?}",
            mask.dims(),
            [b, 1, 1, t, tk]
        );
    }
    // Keys and values may be views of a cache with spare slots: read in place as long as each
    // (row, head)'s keys are one run of rows.
    let (q, k, v, mask) = (
        q.contiguous()?,
        runs_of_rows(k)?,
        runs_of_rows(v)?,
        mask.contiguous()?,
    );
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let head_strides = |l: &candle_core::Layout| [l.stride()[0], l.stride()[1]];
    let (ms, ml) = mask.storage_and_layout();
    let shapes = Shapes {
        h,
        kv,
        t,
        tk,
        hd,
        scale: scale as f32,
        softcap: softcap.map(|c| c as f32),
    };
    // The last key of the last (row, head) ends the span each tensor's view reads.
    let span = |st: [usize; 2]| (b - 1) * st[0] + (kv - 1) * st[1] + tk * hd;
    let (kst, vst) = (head_strides(kl), head_strides(vl));
    let inputs = Inputs {
        q: f32s(&qs, ql.start_offset(), b * h * t * hd)?,
        k: f32s(&ks, kl.start_offset(), span(kst))?,
        v: f32s(&vs, vl.start_offset(), span(vst))?,
        k_strides: kst,
        v_strides: vst,
        mask: f32s(&ms, ml.start_offset(), b * t * tk)?,
    };
    let rep = h / kv;
    let parts = pool::parallel_map(b * kv, |task| one_group(&inputs, &shapes, task));
    // Each task's rows are its query heads' outputs, head-major; the result is position-major.
    let mut y = vec![0f32; b * t * h * hd];
    for (task, part) in parts.iter().enumerate() {
        let (bi, g) = (task / kv, task % kv);
        for r in 0..rep {
            let head = g * rep + r;
            for qi in 0..t {
                let at = ((bi * t + qi) * h + head) * hd;
                y[at..at + hd].copy_from_slice(&part[(r * t + qi) * hd..(r * t + qi + 1) * hd]);
            }
        }
    }
    Ok(Tensor::from_vec(y, (b, t, h * hd), &Device::Cpu)?)
}

/// `t` `[b, kv, tk, hd]` as it is if every (row, head)'s keys are consecutive rows of `hd`,
/// else a contiguous copy.
fn runs_of_rows(t: &Tensor) -> Result<Tensor> {
    let (_, _, tk, hd) = t.dims4()?;
    let st = t.layout().stride();
    Ok(if st[3] == 1 && (st[2] == hd || tk == 1) {
        t.clone()
    } else {
        t.contiguous()?
    })
}

fn f32s(s: &candle_core::Storage, start: usize, len: usize) -> Result<&[f32]> {
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = s else {
        bail!("attention takes f32 tensors on the CPU");
    };
    Ok(&data[start..start + len])
}

struct Shapes {
    h: usize,
    kv: usize,
    t: usize,
    tk: usize,
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
}

struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// Where row b, key head g starts in `k` (`v`): `b · s[0] + g · s[1]`.
    k_strides: [usize; 2],
    v_strides: [usize; 2],
    mask: &'a [f32],
}

/// `$body::<$isa, HD>` with the head dimension a constant where it is a common one (64: SmolLM2,
/// Qwen2.5; 128; 256: Gemma 3), so that a head's dot products and weighted sums are unrolled
/// and its output stays in registers over the keys; `HD = 0` reads it from the shapes.
macro_rules! by_head_dim {
    ($body:ident, $isa:expr, $x:expr, $s:expr, $task:expr) => {
        match $s.hd {
            64 => $body::<$isa, 64>($x, $s, $task),
            128 => $body::<$isa, 128>($x, $s, $task),
            256 => $body::<$isa, 256>($x, $s, $task),
            _ => $body::<$isa, 0>($x, $s, $task),
        }
    };
}

/// Task `b · kv + g`: the outputs of the query heads of row `b` that share key head `g`,
/// `[h / kv, t, hd]`.
fn one_group(x: &Inputs, s: &Shapes, task: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::model::cpu::features();
        if f.avx512f {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { one_group_avx512(x, s, task) };
        }
        if f.avx2 {
            // SAFETY: as above.
            return unsafe { one_group_avx2(x, s, task) };
        }
    }
    by_head_dim!(one_group_body, PORTABLE, x, s, task)
}

/// The portable code compiled for 256-bit vectors: the 16-lane dot product in two registers,
/// the same operations in the same order (no fused multiply-add: the compiler does not contract).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn one_group_avx2(x: &Inputs, s: &Shapes, task: usize) -> Vec<f32> {
    by_head_dim!(one_group_body, AVX2, x, s, task)
}

/// The same code compiled for 512-bit vectors, its dot products in one register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn one_group_avx512(x: &Inputs, s: &Shapes, task: usize) -> Vec<f32> {
    by_head_dim!(one_group_body, AVX512, x, s, task)
}

/// The widest head whose weighted sum is kept in a local array.
const LOCAL: usize = 256;

#[inline(always)]
fn one_group_body<const ISA: u8, const HD: usize>(x: &Inputs, s: &Shapes, task: usize) -> Vec<f32> {
    let hd = if HD > 0 { HD } else { s.hd };
    let (rep, t, tk) = (s.h / s.kv, s.t, s.tk);
    let (bi, g) = (task / s.kv, task % s.kv);
    let start = |st: [usize; 2]| bi * st[0] + g * st[1];
    let keys = &x.k[start(x.k_strides)..][..tk * hd];
    let values = &x.v[start(x.v_strides)..][..tk * hd];
    let mut y = vec![0f32; rep * t * hd];
    let mut query = vec![0f32; hd];
    // (key, score) of the keys a query may see; the score becomes its weight.
    let mut seen: Vec<(usize, f32)> = Vec::with_capacity(tk);
    for r in 0..rep {
        let head = g * rep + r;
        for qi in 0..t {
            let q = &x.q[((bi * s.h + head) * t + qi) * hd..][..hd];
            for (d, &e) in query.iter_mut().zip(q) {
                *d = e * s.scale;
            }
            let mask = &x.mask[(bi * t + qi) * tk..][..tk];
            seen.clear();
            let mut top = f32::NEG_INFINITY;
            for (j, &m) in mask.iter().enumerate() {
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let mut score = dot::<ISA>(&query, &keys[j * hd..(j + 1) * hd]);
                if let Some(c) = s.softcap {
                    score = (score / c).tanh() * c;
                }
                score += m;
                top = top.max(score);
                seen.push((j, score));
            }
            let mut sum = 0f32;
            for (_, e) in seen.iter_mut() {
                *e = (*e - top).exp();
                sum += *e;
            }
            // Summed in a local of the head's width: with HD known it stays in registers.
            let mut local = [0f32; LOCAL];
            let out = if HD > 0 && HD <= LOCAL {
                &mut local[..hd]
            } else {
                &mut y[(r * t + qi) * hd..(r * t + qi + 1) * hd]
            };
            for &(j, e) in &seen {
                axpy(e / sum, &values[j * hd..(j + 1) * hd], out);
            }
            if HD > 0 && HD <= LOCAL {
                y[(r * t + qi) * hd..(r * t + qi + 1) * hd].copy_from_slice(&local[..hd]);
            }
        }
    }
    y
}

/// `a · b` in 16 lanes (lane `l` sums the products at `l`, `l + 16`, …), the lanes then folded
/// in halves (`l + 8` onto `l`, then `l + 4`, `l + 2`, `l + 1`), then the tail added.
#[inline(always)]
fn dot<const ISA: u8>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ISA names a feature only in code that runs where the CPU has it.
        match ISA {
            AVX512 => return unsafe { dot_avx512(a, b) },
            AVX2 => return unsafe { dot_avx2(a, b) },
            _ => {}
        }
    }
    dot_lanes(a, b)
}

/// Which instructions a body is compiled for: its dot products are written for them.
const PORTABLE: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail = tail_dot(ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn tail_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// [`dot_lanes`] with the 16 lanes in one register: the same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let p = _mm512_mul_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
        );
        acc = _mm512_add_ps(acc, p);
        i += 16;
    }
    let h8 = _mm256_add_ps(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)),
    );
    let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    let h1 = _mm_add_ss(h2, _mm_movehdup_ps(h2));
    _mm_cvtss_f32(h1) + tail_dot(&a[n..], &b[n..])
}

/// [`dot_lanes`] with the 16 lanes in two 8-lane registers (0–7 and 8–15): the same operations
/// in the same order. Written out because the compiler vectorized the portable loop in 2- and
/// 4-lane pieces, which a score's decoding paid for (CHANGELOG.md, Performance, "Outside the
/// kernel").
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / 16 * 16;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i < n {
        let p = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
        let q = _mm256_mul_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
        );
        lo = _mm256_add_ps(lo, p);
        hi = _mm256_add_ps(hi, q);
        i += 16;
    }
    let h8 = _mm256_add_ps(lo, hi);
    let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    let h1 = _mm_add_ss(h2, _mm_movehdup_ps(h2));
    _mm_cvtss_f32(h1) + tail_dot(&a[n..], &b[n..])
}

/// `y += a · x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (d, &e) in y.iter_mut().zip(x) {
        *d += a * e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention from candle's ops (as the layers computed it before this module).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, h, t, hd) = q.dims4().unwrap();
        let (_, kv, tk, _) = k.dims4().unwrap();
        let rep = h / kv;
        let q = (q.reshape((b, kv, rep * t, hd)).unwrap() * scale).unwrap();
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .reshape((b, kv, rep, t, tk))
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .reshape((b, kv, rep * t, tk))
            .unwrap();
        probs
            .matmul(v)
            .unwrap()
            .reshape((b, h, t, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * hd))
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Causal over left padding: row `bi` has `pads[bi]` masked leading keys.
    fn mask(b: usize, t: usize, tk: usize, pads: &[usize]) -> Tensor {
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for qi in 0..t {
                let q = tk - t + qi;
                for j in 0..tk {
                    if j > q || (j < pads[bi] && j != q) {
                        m[(bi * t + qi) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, 1, t, tk), &Device::Cpu).unwrap()
    }

    /// Keys and values read in place from a cache with spare slots give the same bits as a
    /// contiguous copy of the slots in use (and a view that is not runs of rows is copied).
    #[test]
    fn reads_views_of_a_cache_with_spare_slots() {
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for (b, h, kv, t, tk, slots, hd) in [(3, 14, 2, 1, 37, 50, 64), (2, 4, 4, 3, 9, 12, 20)] {
            let q = random(&[b, h, t, hd], 4);
            let kc = random(&[b, kv, slots, hd], 5);
            let vc = random(&[b, kv, slots, hd], 6);
            let (k, v) = (kc.narrow(2, 0, tk).unwrap(), vc.narrow(2, 0, tk).unwrap());
            assert!(!k.is_contiguous());
            let m = mask(b, t, tk, &vec![1; b]);
            let got = attend(&q, &k, &v, &m, 0.125, None).unwrap();
            let (kk, vv) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            let want = attend(&q, &kk, &vv, &m, 0.125, None).unwrap();
            assert_eq!(bits(&got), bits(&want));
            // Heads and keys swapped in memory: keys of one head are not consecutive rows.
            let kt = kk
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let odd = attend(&q, &kt, &vv, &m, 0.125, None).unwrap();
            assert_eq!(bits(&odd), bits(&want));
        }
    }

    #[test]
    fn equals_candles_attention_up_to_rounding() {
        // Decoding (t = 1) and prefill (t = tk) shapes, GQA and plain, head dims with tails.
        for (b, h, kv, t, tk, hd) in [
            (3, 14, 2, 1, 37, 64),
            (2, 4, 4, 9, 9, 20),
            (4, 6, 2, 5, 12, 64),
            (1, 8, 1, 1, 1, 256),
        ] {
            let q = random(&[b, h, t, hd], 1);
            let k = random(&[b, kv, tk, hd], 2);
            let v = random(&[b, kv, tk, hd], 3);
            let pads: Vec<usize> = (0..b).map(|i| (i * 3) % tk.max(1)).collect();
            let m = mask(b, t, tk, &pads);
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attend(&q, &k, &v, &m, scale, None).unwrap();
            let want = reference(&q, &k, &v, &m, scale);
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{b} {h} {kv} {t} {tk} {hd}: max |diff| {diff}");
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_padding() {
        let (h, kv, hd, own) = (4, 2, 32, 6);
        let q = random(&[1, h, 1, hd], 7);
        let k = random(&[1, kv, own, hd], 8);
        let v = random(&[1, kv, own, hd], 9);
        let alone = attend(&q, &k, &v, &mask(1, 1, own, &[0]), 0.125, None).unwrap();
        // The same keys after 5 pads whose keys and values are garbage.
        let junk = random(&[1, kv, 5, hd], 10);
        let kp = Tensor::cat(&[&junk, &k], 2).unwrap();
        let vp = Tensor::cat(&[&(junk * 1e6).unwrap(), &v], 2).unwrap();
        let padded = attend(&q, &kp, &vp, &mask(1, 1, own + 5, &[5]), 0.125, None).unwrap();
        let (a, p) = (
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            padded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, p);
    }

    /// The module's claim that every CPU sums in the same order: the 512-bit and the 256-bit dot
    /// products are the 16-lane one, bit for bit, on lengths with and without a tail (each where
    /// the CPU has it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_dot_products_are_the_portable_one() {
        use crate::model::cpu::{test_runs, Isa};
        let (avx512f, avx2) = (test_runs(Isa::Avx512f), test_runs(Isa::Avx2));
        for len in [1, 15, 16, 20, 64, 100, 256] {
            let a = random(&[len], len as u64).to_vec1::<f32>().unwrap();
            let b = random(&[len], 1000 + len as u64).to_vec1::<f32>().unwrap();
            let want = dot_lanes(&a, &b).to_bits();
            if avx512f {
                // SAFETY: the feature was checked.
                let wide = unsafe { dot_avx512(&a, &b) };
                assert_eq!(wide.to_bits(), want, "512-bit, length {len}");
            }
            if avx2 {
                // SAFETY: as above.
                let half = unsafe { dot_avx2(&a, &b) };
                assert_eq!(half.to_bits(), want, "256-bit, length {len}");
            }
        }
    }

    #[test]
    fn softcap_bounds_scores_before_the_softmax() {
        // With a cap of 1e-3 every score is within ±1e-3, so the weights are nearly uniform
        // and the output is nearly the mean of the values.
        let (h, kv, tk, hd) = (2, 1, 8, 16);
        let q = random(&[1, h, 1, hd], 11);
        let k = random(&[1, kv, tk, hd], 12);
        let v = random(&[1, kv, tk, hd], 13);
        let y = attend(&q, &k, &v, &mask(1, 1, tk, &[0]), 1.0, Some(1e-3)).unwrap();
        let mean = v.mean(2).unwrap().reshape((1, 1, hd)).unwrap();
        for head in 0..h {
            let d = max_abs_diff(&y.narrow(2, head * hd, hd).unwrap(), &mean);
            assert!(d < 1e-2, "head {head}: {d}");
        }
    }
}
