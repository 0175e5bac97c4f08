//! The bf16 weight path: `y = x Wᵀ` with `W` stored as bf16 `[n, k]` and `x`, `y` in f32,
//! multiplied with AVX512_BF16's `vdpbf16ps` (pairs of bf16 products accumulated in f32).
//!
//! The only unsafe code of the runtime lives here. `x` is rounded to bf16 once per call (round to
//! nearest even, as PyTorch's bf16 casts); every product and sum is in f32 and `y` stays f32, so
//! the residual stream is never rounded. Rows of `x` and of `W` are both contiguous along `k`,
//! the layout `vdpbf16ps` reads, so neither operand is repacked: a 4 × 4 block of outputs keeps 16
//! accumulators in registers over the whole of `k`, and each block of weight rows (4 × k × 2
//! bytes) is reused from L1 for every block of `x` rows before the next one is read.

use half::bf16;
use rayon::prelude::*;

/// Whether this CPU has the instructions (checked once; the binary runs f32 elsewhere).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rounds to bf16, nearest even (NaN stays NaN).
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Output rows per block and weight rows per block.
const MR: usize = 4;
const NR: usize = 4;

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, split over the rayon pool by blocks of weight rows.
/// Panics if the slices do not have these shapes or the CPU lacks the instructions (callers
/// check [`available`] when choosing the bf16 path).
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert!(
        available(),
        "bf16 kernel called on a CPU without AVX512_BF16"
    );
    let xb = to_bf16(x);
    let mut y = vec![0f32; m * n];
    // Columns of y in chunks: a whole number of NR-blocks per task, enough tasks to balance.
    let threads = rayon::current_num_threads().max(1);
    let per = (n.div_ceil(threads * 4)).div_ceil(NR) * NR;
    let per = per.max(NR);
    let chunks: Vec<(usize, usize)> = (0..n).step_by(per).map(|s| (s, (s + per).min(n))).collect();
    let parts: Vec<(usize, Vec<f32>)> = chunks
        .into_par_iter()
        .map(|(s, e)| {
            let mut part = vec![0f32; m * (e - s)];
            // SAFETY: `available()` was asserted; shapes were checked above.
            unsafe { block_range(&xb, m, k, &w[s * k..e * k], e - s, &mut part) };
            (s, part)
        })
        .collect();
    for (s, part) in parts {
        let width = part.len() / m.max(1);
        for r in 0..m {
            y[r * n + s..r * n + s + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    y
}

/// `out[m, nn] = xb[m, k] · w[nn, k]ᵀ` for one range of weight rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block_range(xb: &[bf16], m: usize, k: usize, w: &[bf16], nn: usize, out: &mut [f32]) {
    let mut j = 0;
    while j < nn {
        let nr = (nn - j).min(NR);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(MR);
            match (mr, nr) {
                (4, 4) => tile::<4, 4>(xb, k, w, i, j, nn, out),
                (mr, 4) => {
                    for ii in 0..mr {
                        tile::<1, 4>(xb, k, w, i + ii, j, nn, out)
                    }
                }
                (mr, nr) => {
                    for ii in 0..mr {
                        for jj in 0..nr {
                            tile::<1, 1>(xb, k, w, i + ii, j + jj, nn, out)
                        }
                    }
                }
            }
            i += mr;
        }
        j += nr;
    }
}

/// One R × C tile of outputs: rows `i..i+R` of x against weight rows `j..j+C`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    xb: &[bf16],
    k: usize,
    w: &[bf16],
    i: usize,
    j: usize,
    nn: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let xp = xb.as_ptr() as *const u16;
    let wp = w.as_ptr() as *const u16;
    let full = k / 32 * 32;
    let mut p = 0;
    while p < full {
        let mut xs = [_mm512_setzero_si512(); R];
        for (r, xv) in xs.iter_mut().enumerate() {
            *xv = _mm512_loadu_si512(xp.add((i + r) * k + p) as *const _);
        }
        for c in 0..C {
            let wv: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(wp.add((j + c) * k + p) as *const _));
            for r in 0..R {
                let xv: __m512bh = std::mem::transmute(xs[r]);
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv);
            }
        }
        p += 32;
    }
    if p < k {
        // The last k % 32 pairs: masked loads read zeros past the end.
        let mask: __mmask32 = (1u32 << (k - p)) - 1;
        for c in 0..C {
            let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                mask,
                wp.add((j + c) * k + p) as *const _,
            ));
            for r in 0..R {
                let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    mask,
                    xp.add((i + r) * k + p) as *const _,
                ));
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[(i + r) * nn + j + c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_range(_: &[bf16], _: usize, _: usize, _: &[bf16], _: usize, _: &mut [f32]) {
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Against an f64 product of the same bf16-rounded operands, on shapes with every tail
    /// (m, n not multiples of 4; k not a multiple of 32, below and above one chunk).
    #[test]
    fn agrees_with_the_exact_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        for (m, k, n, seed) in [
            (1, 1, 1, 1),
            (3, 31, 5, 2),
            (4, 32, 4, 3),
            (5, 33, 7, 4),
            (16, 576, 64, 5),
            (9, 100, 13, 6),
            (17, 896, 33, 7),
        ] {
            let x = noise(m * k, seed);
            let w = to_bf16(&noise(n * k, seed + 100));
            let y = matmul_t(&x, m, k, &w, n);
            let xr = to_bf16(&x);
            for r in 0..m {
                for c in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| xr[r * k + p].to_f64() * w[c * k + p].to_f64())
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|p| (xr[r * k + p].to_f64() * w[c * k + p].to_f64()).abs())
                        .sum();
                    let err = (y[r * n + c] as f64 - exact).abs();
                    assert!(
                        err <= 1e-5 * scale.max(1.0),
                        "({m},{k},{n}) at ({r},{c}): {} vs {exact} (scale {scale})",
                        y[r * n + c]
                    );
                }
            }
        }
    }
}
