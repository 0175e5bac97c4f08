//! Microbenchmark of greedy decoding's head on Qwen2.5-0.5B's shape (151,936 × 896): the bf16
//! kernel's fused argmax against the integer screen that finishes on the rows it cannot rule
//! out (`src/model/screen.rs`), at batch 100 and 16, random normal states and head. Prints
//! milliseconds per call and the screen's share of the full head's time; asserts nothing beyond
//! the two giving the same tokens.
//!
//!     cargo run --release --example head_screen [-- --profile]   (the screen alone, for perf)
use outlierlab::model::{bf16, screen::Screen};
use std::time::Instant;

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

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
    let t = Instant::now();
    let Some(screen) = Screen::new(&head) else {
        eprintln!("the screen could not be built");
        return;
    };
    println!(
        "screen built in {:.2} s, {} MB",
        t.elapsed().as_secs_f64(),
        screen.bytes() >> 20
    );
    if std::env::args().any(|a| a == "--profile") {
        // Only the screen, over and over: for `perf record`.
        let x = normal(100 * k, 3, 3.0);
        for _ in 0..40 {
            let _ = screen.argmax(&x, 100, &head);
        }
        return;
    }
    for m in [100, 16] {
        let x = normal(m * k, 2 + m as u64, 3.0);
        assert_eq!(
            screen.argmax(&x, m, &head),
            bf16::matmul_argmax(&x, m, &head)
        );
        let full = best(5, || {
            let _ = bf16::matmul_argmax(&x, m, &head);
        });
        let screened = best(5, || {
            let _ = screen.argmax(&x, m, &head);
        });
        let macs = (m * k * n) as f64;
        println!(
            "batch {m:>3}: full head {:>7.1} ms ({:>5.1} G MAC/s)   screened {:>7.1} ms ({:>5.1} G MAC/s of the head's)   {:.2}× the full head's time",
            full * 1e3,
            macs / full / 1e9,
            screened * 1e3,
            macs / screened / 1e9,
            screened / full
        );
    }
}
