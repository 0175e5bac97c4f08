//! Microbenchmark of `model::attention::attend` against the same attention built from candle's
//! ops (scaled matmul, mask, softmax, matmul — what the layers ran before), on Qwen2.5-0.5B's
//! heads (14 query heads on 2 key heads of 64) at decoding and prefill shapes, the two
//! alternated in one run. Prints milliseconds per call and the ratio; asserts nothing.
//!
//!     cargo run --release --example attention
use candle_core::{Device, Tensor};
use outlierlab::model::attention::attend;
use std::time::Instant;

fn candle_ops(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let (b, h, t, hd) = q.dims4().unwrap();
    let (_, kv, tk, _) = k.dims4().unwrap();
    let rep = h / kv;
    let q = (q.reshape((b, kv, rep * t, hd)).unwrap() * scale).unwrap();
    let scores = q
        .matmul(&k.t().unwrap())
        .unwrap()
        .reshape((b, kv, rep, t, tk))
        .unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask).unwrap())
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

fn main() {
    let (h, kv, hd) = (14, 2, 64);
    let scale = 1.0 / (hd as f64).sqrt();
    println!(
        "{:>28}  {:>10}  {:>10}  {:>6}",
        "shape", "candle ms", "attend ms", "ratio"
    );
    for (b, t, tk) in [(100, 1, 60), (100, 1, 150), (16, 1, 100), (30, 48, 48)] {
        let q = Tensor::randn(0f32, 1.0, (b, h, t, hd), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, kv, tk, hd), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kv, tk, hd), &Device::Cpu).unwrap();
        // Causal, with every row's first tenth of the keys padding.
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for qi in 0..t {
                for j in 0..tk {
                    if j > tk - t + qi || j < tk / 10 {
                        m[(bi * t + qi) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t, tk), &Device::Cpu).unwrap();
        let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
        for _ in 0..20 {
            let t0 = Instant::now();
            std::hint::black_box(candle_ops(&q, &k, &v, &mask, scale));
            theirs = theirs.min(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            std::hint::black_box(attend(&q, &k, &v, &mask, scale, None).unwrap());
            ours = ours.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{:>28}  {:>10.3}  {:>10.3}  {:>5.2}x",
            format!("b {b} t {t} keys {tk}"),
            theirs * 1e3,
            ours * 1e3,
            theirs / ours
        );
    }
}
