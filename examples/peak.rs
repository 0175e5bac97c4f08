//! The arithmetic peak of one core for the multiply-accumulate instructions a kernel here
//! could be built on: vfmadd231ps (f32, in 512- and 256-bit registers), vdpbf16ps (bf16 pairs
//! into f32) and vpdpbusd (u8 x s8 quadruples into i32), each as independent register-only
//! chains (28 of 32 registers; 12 of AVX2's 16), so neither memory nor latency limits them. Says what a bf16 or int8 kernel could at best gain over f32 on this CPU.
//! Asserts nothing.
//!
//!     cargo run --release --example peak
use std::time::Instant;

const CHAINS: usize = 28;
const CHAINS_256: usize = 12;
const ITERS: usize = 20_000_000;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    macro_rules! peak {
        ($name:ident, $feat:literal, $ty:ty, $zero:expr, $op:expr) => {
            peak!($name, $feat, $ty, $zero, $op, CHAINS);
        };
        ($name:ident, $feat:literal, $ty:ty, $zero:expr, $op:expr, $chains:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(a: $ty, b: $ty) -> $ty {
                let mut acc: [$ty; $chains] = [$zero; $chains];
                for _ in 0..ITERS {
                    for c in acc.iter_mut() {
                        *c = $op(*c, a, b);
                    }
                }
                let mut s = acc[0];
                for c in &acc[1..] {
                    s = $op(s, *c, b);
                }
                s
            }
        };
    }
    peak!(
        fma_f32,
        "avx512f",
        __m512,
        _mm512_setzero_ps(),
        |c, a, b| _mm512_fmadd_ps(a, b, c)
    );
    peak!(
        fma_f32_256,
        "avx2,fma",
        __m256,
        _mm256_setzero_ps(),
        |c, a, b| _mm256_fmadd_ps(a, b, c),
        CHAINS_256
    );
    peak!(
        dp_bf16,
        "avx512f,avx512bf16",
        __m512,
        _mm512_setzero_ps(),
        |c, a, b| {
            _mm512_dpbf16_ps(
                c,
                std::mem::transmute::<__m512, __m512bh>(a),
                std::mem::transmute::<__m512, __m512bh>(b),
            )
        }
    );
    peak!(
        dp_u8s8,
        "avx512f,avx512vnni",
        __m512i,
        _mm512_setzero_si512(),
        |c, a, b| { _mm512_dpbusd_epi32(c, a, b) }
    );

    pub fn run() {
        // (name, lanes, multiply-adds per lane per instruction, chains, available)
        let rows: [(&str, f64, f64, usize, bool); 4] = [
            (
                "vfmadd231ps  f32",
                16.0,
                1.0,
                CHAINS,
                is_x86_feature_detected!("avx512f"),
            ),
            (
                "vfmadd231ps  f32 ymm",
                8.0,
                1.0,
                CHAINS_256,
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            ),
            (
                "vdpbf16ps    bf16",
                16.0,
                2.0,
                CHAINS,
                is_x86_feature_detected!("avx512bf16"),
            ),
            (
                "vpdpbusd     u8xs8",
                16.0,
                4.0,
                CHAINS,
                is_x86_feature_detected!("avx512vnni"),
            ),
        ];
        for (i, (name, lanes, per_lane, chains, ok)) in rows.into_iter().enumerate() {
            if !ok {
                println!("{name:<20} not available on this CPU");
                continue;
            }
            let t = Instant::now();
            // SAFETY: each feature was detected above.
            unsafe {
                match i {
                    0 => {
                        std::hint::black_box(fma_f32(_mm512_set1_ps(1e-9), _mm512_set1_ps(1e-9)));
                    }
                    1 => {
                        std::hint::black_box(fma_f32_256(
                            _mm256_set1_ps(1e-9),
                            _mm256_set1_ps(1e-9),
                        ));
                    }
                    2 => {
                        std::hint::black_box(dp_bf16(_mm512_set1_ps(1e-9), _mm512_set1_ps(1e-9)));
                    }
                    _ => {
                        std::hint::black_box(dp_u8s8(_mm512_set1_epi8(1), _mm512_set1_epi8(1)));
                    }
                }
            }
            let s = t.elapsed().as_secs_f64();
            let ops = (ITERS * chains) as f64 * lanes * per_lane * 2.0;
            println!(
                "{name:<20} {:>7.1} G multiply-adds/s  ({:.1} GOP/s, one core)",
                ops / 2.0 / s / 1e9,
                ops / s / 1e9
            );
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
