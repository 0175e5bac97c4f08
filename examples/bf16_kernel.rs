//! Microbenchmark of the bf16 kernels (vdpbf16ps, and widened to f32 FMA in 16 and 8 lanes) —
//! those this CPU has, NaN for the others — against candle's f32
//! GEMM on the shapes of Qwen2.5-0.5B's projections, prefill (m = 512), batch-100 and batch-16
//! decoding. Prints GFLOP/s; asserts nothing.
//!
//!     cargo run --release --example bf16_kernel
mod common;

use common::best;

use candle_core::{Device, Tensor};
use outlierlab::model::bf16;

fn main() {
    for (m, k, n) in [
        (512, 896, 4864),
        (512, 4864, 896),
        (512, 896, 896),
        (100, 896, 4864),
        (100, 4864, 896),
        (100, 896, 151936),
        (16, 896, 4864),
        (16, 4864, 896),
        (16, 896, 151936),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let wt = w.t().unwrap();
        let reps = if m * n > 1 << 22 { 3 } else { 10 };
        let f = best(reps, || {
            let _ = x.matmul(&wt).unwrap();
        });
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wb = bf16::Packed::new(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, k);
        let time = |kern: bf16::Kernel| {
            if kern.runs_here() {
                best(reps, || {
                    let _ = bf16::matmul_with(&xs, m, &wb, kern);
                })
            } else {
                f64::NAN
            }
        };
        let (d, w, w8) = (
            time(bf16::Kernel::Dot),
            time(bf16::Kernel::Widen),
            time(bf16::Kernel::Widen8),
        );
        let fl = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{m:>4} x {k:>5} x {n:>6}: f32 (candle) {:>6.1}   bf16 vdpbf16ps {:>6.1}   widened {:>6.1}   widened 8-lane {:>6.1} GFLOP/s",
            fl / f,
            fl / d,
            fl / w,
            fl / w8,
        );
    }
}
