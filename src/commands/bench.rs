//! `outlierlab bench`: prefill and decode throughput against this machine's matmul throughput.

use crate::model::{self, Precision};
use anyhow::Result;

/// Measure prefill and batched greedy-decode throughput, and this machine's f32 matmul
/// throughput for comparison. Prints figures; asserts nothing.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Repeats per figure; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

pub fn run(args: &Args, precision: Precision) -> Result<()> {
    let Args {
        model,
        batch,
        new_tokens,
        repeats,
    } = args.clone();
    let lm = model::load_with(&model, precision)?;
    // The pool's own count: RAYON_NUM_THREADS / CANDLE_NUM_THREADS can set it below the
    // cores the process may use.
    eprintln!(
        "model loaded in {:.1} s; benchmarking on {} threads",
        lm.load_seconds,
        model::pool::threads()
    );
    let r = crate::bench::run(&lm, batch, new_tokens, repeats)?;
    println!("model                 {model}");
    println!(
        "precision             {} (resident after loading: {} MB)",
        lm.model.precision().name(),
        crate::bench::resident_mb().map_or("?".into(), |m| format!("{m:.0}"))
    );
    println!(
        "cpu                   {}",
        // The bf16 micro-kernel has its own line below.
        model::cpu::describe(false)
    );
    println!("f32 matmul (candle)   {:.1} GFLOP/s", r.matmul_gflops);
    if let Some(g) = r.bf16_matmul_gflops {
        println!(
            "bf16 matmul (kernel)  {g:.1} GFLOP/s  (micro-kernel: {})",
            model::bf16::kernel().name()
        );
        println!(
            "greedy head           {}",
            match (
                lm.model.head_screen().map(|s| s.flavour()),
                model::screen::timed(),
            ) {
                (Some(f), Some((t, r))) if f == t => format!(
                    "integer screen, {}, finished exactly (timed at load: {r:.2}× the fused argmax's time)",
                    f.name()
                ),
                (Some(f), _) => format!("integer screen, {}, finished exactly", f.name()),
                (None, Some((t, r))) => format!(
                    "fused argmax of the bf16 kernel (the {} screen timed at load: {r:.2}× its time)",
                    t.name()
                ),
                (None, None) => "fused argmax of the bf16 kernel".into(),
            }
        );
    }
    // Fractions of the peak of the precision the model runs in.
    let peak = match lm.model.precision() {
        model::Precision::Bf16 => r.bf16_matmul_gflops.unwrap_or(r.matmul_gflops),
        model::Precision::F32 => r.matmul_gflops,
    };
    println!(
        "prefill               {:.0} tokens/s  ({} prompts, {} tokens; {:.1} GFLOP/s = {:.0}% of matmul)",
        r.prefill_tokens_per_s, r.batch, r.prompt_tokens, r.prefill_gflops,
        100.0 * r.prefill_gflops / peak
    );
    match (r.decode_tokens_per_s, r.decode_gflops) {
        (Some(tps), Some(g)) => println!(
            "decode (batch {:>2})     {tps:.0} tokens/s  ({} new tokens each; {g:.1} GFLOP/s = {:.0}% of matmul)",
            r.batch, r.new_tokens, 100.0 * g / peak
        ),
        _ => println!(
            "decode (batch {:>2})     too short to time against the prefill ({} new tokens each); raise --new-tokens",
            r.batch, r.new_tokens
        ),
    }
    Ok(())
}
