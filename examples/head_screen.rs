//! Microbenchmark of greedy decoding's head on Qwen2.5-0.5B's shape (151,936 × 896): the bf16
//! kernel's fused argmax against the integer screens this CPU runs, which finish on the rows
//! they cannot rule out (`src/model/screen.rs`), at batch 100 and 16, random normal states and
//! head. Prints milliseconds per call and each screen's share of the full head's time; asserts
//! nothing beyond all giving the same tokens.
//!
//!     cargo run --release --example head_screen [-- --profile]   (the screen alone, for perf)
mod common;

use common::best;
use std::time::Instant;

use outlierlab::model::{
    bf16,
    screen::{Flavour, Screen},
};

fn normal(n: usize, seed: u64, sd: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut u = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos()) as f32 * sd)
        .collect()
}

fn main() {
    if !bf16::available() {
        eprintln!("this CPU has no bf16 kernel");
        return;
    }
    let (k, n) = (896, 151936);
    let head = bf16::Packed::new(&normal(n * k, 1, 0.02), n, k);
    let flavours: Vec<Flavour> = [Flavour::Int16, Flavour::Int8]
        .into_iter()
        .filter(|f| f.runs_here())
        .collect();
    let screens: Vec<Screen> = flavours
        .iter()
        .filter_map(|&f| {
            let t = Instant::now();
            let s = Screen::new(&head, f)?;
            println!(
                "{} screen built in {:.2} s, {} MB",
                f.name(),
                t.elapsed().as_secs_f64(),
                s.bytes() >> 20
            );
            Some(s)
        })
        .collect();
    if std::env::args().any(|a| a == "--profile") {
        // Only the first screen, over and over: for `perf record`.
        let x = normal(100 * k, 3, 3.0);
        for _ in 0..40 {
            let _ = screens[0].argmax(&x, 100, &head);
        }
        return;
    }
    for m in [100, 16] {
        let x = normal(m * k, 2 + m as u64, 3.0);
        let want = bf16::matmul_argmax(&x, m, &head);
        let full = best(5, || {
            let _ = bf16::matmul_argmax(&x, m, &head);
        });
        let macs = (m * k * n) as f64;
        println!(
            "batch {m:>3}: full head {:>7.1} ms ({:>5.1} G MAC/s)",
            full * 1e3,
            macs / full / 1e9
        );
        for s in &screens {
            assert_eq!(s.argmax(&x, m, &head), want);
            let t = best(5, || {
                let _ = s.argmax(&x, m, &head);
            });
            println!(
                "           {:<40} {:>7.1} ms ({:>5.1} G MAC/s of the head's)   {:.2}× the full head's time",
                s.flavour().name(),
                t * 1e3,
                macs / t / 1e9,
                t / full
            );
        }
    }
}
