//! RMSNorm, `x / √(mean(x²) + ε) · w` over the last dimension, on the runtime's thread pool.
//!
//! candle's op (`candle_nn::ops::rms_norm`) hands batches of more than 32 rows to rayon's pool,
//! whose threads then wake beside candle's worker, which spins on the other core (see
//! [`crate::model::pool`]), and a call then costs far more than its arithmetic (CHANGELOG.md,
//! Performance, "Outside the kernel"). Here the
//! arithmetic is candle's — each row's squares summed in order in f32, `m = √(sum / n + ε)`,
//! then `x / m · w` per value — so the values are candle's bit for bit (tested); only the
//! threads differ.

use crate::model::pool;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// RMSNorm of `x [..., n]` with weight `w [n]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let n = w.dims1()?;
    let width = x.dims().last().copied().unwrap_or(0);
    if width != n {
        bail!(
            "rms_norm: input {:?} does not end in the weight's {n} values",
            x.dims()
        );
    }
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.elem_count() == 0 {
        return Ok(candle_nn::ops::rms_norm(x, w, eps)?);
    }
    let y = crate::model::with_rows(w, |w| {
        crate::model::with_rows(x, |x| {
            let mut y = vec![0f32; x.len()];
            let per = (pool::VALUES_PER_TASK / n).max(1) * n;
            pool::parallel_chunks_mut(&mut y, per, |t, dst| {
                let src = &x[t * per..t * per + dst.len()];
                for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                    norm_row(s, w, eps, d);
                }
            });
            y
        })
    })??;
    Ok(Tensor::from_vec(y, x.dims(), x.device())?)
}

fn norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x / m * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::noise;
    use candle_core::Device;

    #[test]
    fn gives_candles_values_bit_for_bit() {
        // Batches under and over candle's 32-row switch to rayon, tasks of one row and of many,
        // odd widths, one row of a massive value, a zero row.
        for (shape, seed) in [
            (vec![1, 896], 1),
            (vec![3, 7, 64], 2),
            (vec![100, 1, 896], 3),
            (vec![2, 300, 576], 4),
            (vec![5, 17_000], 5),
            (vec![33, 5], 6),
        ] {
            let n = *shape.last().unwrap();
            let count: usize = shape.iter().product();
            let mut v = noise(count, seed);
            v[..n].iter_mut().for_each(|x| *x = 0.0);
            if count > 2 * n {
                v[n + 3] = 3000.0;
            }
            let x = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(noise(n, seed + 100), n, &Device::Cpu).unwrap();
            for eps in [1e-6f32, 1e-5] {
                let bits = |t: Tensor| -> Vec<u32> {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|v| v.to_bits()).collect()
                };
                let ours = bits(rms_norm(&x, &w, eps).unwrap());
                let theirs = bits(candle_nn::ops::rms_norm(&x, &w, eps).unwrap());
                assert_eq!(ours, theirs, "{shape:?}, eps {eps}");
            }
        }
    }

    #[test]
    fn a_weight_of_another_width_is_an_error() {
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
        let e = rms_norm(&x, &w, 1e-6).unwrap_err().to_string();
        assert!(e.contains("weight's 7 values"), "{e}");
    }
}
