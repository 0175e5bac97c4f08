//! Microbenchmark of SwiGLU's activation on Qwen2.5-0.5B's MLP width: candle's `silu` and
//! product against the fused pass (`model::swiglu`), at batch-16 and batch-100 decoding and a
//! prefill pass. Prints microseconds and the ratio; asserts nothing.
//!
//!     cargo run --release --example swiglu
mod common;

use candle_core::{Device, Tensor};
use common::best;
use outlierlab::model::swiglu;

fn main() {
    for rows in [16, 100, 1617] {
        let shape = (rows, 4864);
        let g = (Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap() * 3.0).unwrap();
        let u = Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
        let reps = 50;
        let candle = best(reps, || {
            let _ = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        });
        let fused = best(reps, || {
            let _ = swiglu::silu_mul(&g, &u).unwrap();
        });
        println!(
            "{rows:5} x 4864: candle silu · u {:8.1} µs   fused {:8.1} µs   ({:.2}×)",
            candle * 1e6,
            fused * 1e6,
            fused / candle
        );
    }
}
