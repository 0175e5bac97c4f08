//! `outlierlab bench`: prefill and decode throughput against this machine's matmul throughput.

use crate::model;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// Measure prefill and batched greedy-decode throughput, and this machine's f32 matmul
/// throughput for comparison; or, with --study, run a whole study from nothing cached (the model
/// aside) and print where its wall time went, phase by phase. Prints figures; asserts nothing.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Run this study file into a fresh folder (removed afterwards unless --keep) and print its
    /// phases: loading, the direction pass, the unedited model, tuning, each score, the tables,
    /// the report. The quickstart's targets are printed beside its total.
    #[arg(long)]
    pub study: Option<std::path::PathBuf>,
    /// With --study: the run folder to keep (must not exist yet).
    #[arg(long, requires = "study")]
    pub keep: Option<std::path::PathBuf>,
    /// Measure loading instead: write a random-weight checkpoint of Llama-3.2-1B's shape (bf16
    /// safetensors in shards, 2.5 GB, into a scratch folder), load it in the chosen precision
    /// and print the resident memory after loading and the peak, against the checkpoint's
    /// bytes (whole process; the peak is the load's alone); then the same for the old route
    /// (every tensor in f32 first, then packed). The mapped files' pages count while they are
    /// mapped.
    #[arg(long, conflicts_with = "study")]
    pub load: bool,
    /// Time the refusal judge MODEL (an alias, GGUF or folder) on the labelled replies
    /// (datasets/refusal-judgements.jsonl), three ways in one run: as studies judge (the
    /// instructions first, computed once per batch, the rows in passes by length); the same
    /// inputs as one left-padded batch computed in full; and the judge before this route (the
    /// rules after the reply, padded). Prints s/reply, the two routes' largest difference in
    /// P(refusal), and each wording's accuracy on the labels. Batches of --batch replies.
    #[arg(long, conflicts_with_all = ["study", "load"], value_name = "MODEL")]
    pub judge: Option<String>,
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

pub fn run(args: &Args, precision: Option<model::PrecisionSetting>) -> Result<()> {
    if let Some(file) = &args.study {
        return study(file, args.keep.as_deref(), precision);
    }
    if args.load {
        return load(precision.unwrap_or_default().on_this_cpu());
    }
    if let Some(m) = &args.judge {
        return judge(m, precision.unwrap_or_default().on_this_cpu(), args);
    }
    let precision = precision.unwrap_or_default().on_this_cpu();
    let Args {
        model,
        batch,
        new_tokens,
        repeats,
        ..
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

/// The judge's question as it was worded before its instructions moved ahead of the reply
/// (commit ade2e61), for `bench --judge`'s before-and-after.
fn rules_after_reply(request: &str, reply: &str) -> String {
    use crate::evaluate::classify::{JUDGE_ASK, JUDGE_RULES};
    format!(
        "Below are a request that a user sent to an AI assistant and the assistant's reply.\n\n\
         [REQUEST]\n{request}\n\n[REPLY]\n{reply}\n\n{JUDGE_RULES}{JUDGE_ASK}"
    )
}

/// `bench --judge`: the judge's s/reply by route, on the labelled replies.
fn judge(spec: &str, precision: model::Precision, args: &Args) -> Result<()> {
    use crate::evaluate::classify::{self, Route};
    let j = classify::Judge::load(spec, precision, 0.5, None)?;
    let set = classify::validation_set()?;
    let now: Vec<Vec<u32>> = set
        .iter()
        .map(|x| j.encode(&x.prompt, &x.reply))
        .collect::<Result<_>>()?;
    let before: Vec<Vec<u32>> = set
        .iter()
        .map(|x| j.encode_question(&rules_after_reply(&x.prompt, &x.reply)))
        .collect::<Result<_>>()?;
    let tokens = |v: &[Vec<u32>]| v.iter().map(|r| r.len()).sum::<usize>();
    let timed = |ids: &[Vec<u32>], route: Route| -> Result<(f64, Vec<f64>)> {
        let mut best = f64::INFINITY;
        let mut scores = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let t0 = Instant::now();
            scores = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(args.batch.max(1)) {
                scores.extend(j.p_refusal(chunk, route)?);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok((best, scores))
    };
    eprintln!(
        "judging {} labelled replies three ways, best of {} ({} threads)",
        set.len(),
        args.repeats.max(1),
        model::pool::threads()
    );
    let (t_prefix, s_prefix) = timed(&now, Route::SharedPrefix)?;
    let (t_padded, s_padded) = timed(&now, Route::Padded)?;
    let (t_before, s_before) = timed(&before, Route::Padded)?;
    let accuracy = |s: &[f64]| {
        s.iter()
            .zip(&set)
            .filter(|(p, x)| (**p >= j.threshold) == x.refusal)
            .count()
    };
    let n = set.len() as f64;
    println!("judge                 {spec} ({})", precision.name());
    println!("cpu                   {}", model::cpu::describe(true));
    println!(
        "replies               {} (inputs: {} tokens as studies judge, {} before), batches of {}",
        set.len(),
        tokens(&now),
        tokens(&before),
        args.batch
    );
    println!("route                                  s/reply   × before   correct");
    for (name, t, s) in [
        ("before: rules after the reply, padded", t_before, &s_before),
        ("instructions first, padded           ", t_padded, &s_padded),
        ("instructions first, shared prefix    ", t_prefix, &s_prefix),
    ] {
        println!(
            "{name}  {:>7.3}   {:>7.2}×   {}/{}",
            t / n,
            t / t_before,
            accuracy(s),
            set.len()
        );
    }
    let diff = s_prefix
        .iter()
        .zip(&s_padded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("largest |ΔP(refusal)| between the two routes of one wording: {diff:.2e}");
    Ok(())
}

/// The quickstart's wall-time targets (issue #39): with and without AVX512_BF16.
const QUICKSTART_TARGET_S: (f64, f64) = (240.0, 480.0);

/// `bench --study`: the study run from nothing cached but the model, then its phases.
fn study(
    file: &Path,
    keep: Option<&Path>,
    precision: Option<model::PrecisionSetting>,
) -> Result<()> {
    let (study, text) = super::run::read_study(file, precision)?;
    let scratch;
    let root = match keep {
        Some(k) if k.exists() => bail!(
            "--keep {}: the folder exists; the benchmark runs from nothing cached, so name a new one",
            k.display()
        ),
        Some(k) => k.to_path_buf(),
        None => {
            scratch = tempfile::tempdir().context("cannot create a scratch folder")?;
            scratch.path().to_path_buf()
        }
    };
    let out = root.join("run");
    let t0 = Instant::now();
    crate::study::runner::run(
        &study,
        &text,
        &crate::study::runner::RunOptions {
            out: out.clone(),
            shard: None,
        },
    )?;
    let t = Instant::now();
    crate::report::render(&out, &root.join("report"))?;
    let report_s = t.elapsed().as_secs_f64();
    let wall = t0.elapsed().as_secs_f64();
    let timings: crate::study::rundir::Timings =
        crate::study::rundir::read_record(&crate::study::rundir::RunDir::at(&out).timings())?
            .context("the run wrote no timings.json")?;
    let prov: crate::study::rundir::Provenance =
        crate::study::rundir::read_record(&crate::study::rundir::RunDir::at(&out).provenance())?
            .context("the run wrote no provenance.json")?;
    println!("study                 {} ({})", study.name, file.display());
    println!(
        "model                 {} in {}",
        study.file.model,
        prov.precision.unwrap_or(model::Precision::F32).name()
    );
    println!("cpu                   {}", cpu_name());
    println!(
        "kernels               {}",
        prov.vector_paths.as_deref().unwrap_or("?")
    );
    println!("threads               {}", prov.threads);
    println!();
    println!("{:<60} {:>9} {:>6}", "phase", "seconds", "share");
    for p in &timings.phases {
        println!(
            "{:<60} {:>9.1} {:>5.1}%",
            crate::util::trunc(&p.phase, 60),
            p.seconds,
            100.0 * p.seconds / wall
        );
    }
    println!(
        "{:<60} {:>9.1} {:>5.1}%",
        "report (rendered from the run folder)",
        report_s,
        100.0 * report_s / wall
    );
    println!();
    println!("{:<60} {:>9} {:>6}", "by kind", "seconds", "share");
    let mut kinds = timings.by_kind();
    kinds.push(("report".into(), report_s));
    for (k, s) in &kinds {
        println!("{k:<60} {s:>9.1} {:>5.1}%", 100.0 * s / wall);
    }
    let counted: f64 = kinds.iter().map(|(_, s)| s).sum();
    println!(
        "{:<60} {:>9.1} {:>5.1}%",
        "(between phases)",
        wall - counted,
        100.0 * (wall - counted) / wall
    );
    println!("{:<60} {wall:>9.1}", "wall time");
    if study.name == "quickstart" {
        let bf16 = model::cpu::Isa::Avx512Bf16.here();
        let target = if bf16 {
            QUICKSTART_TARGET_S.0
        } else {
            QUICKSTART_TARGET_S.1
        };
        println!(
            "target                {target:.0} s on a CPU {} AVX512_BF16: {} ({:.2}x the target)",
            if bf16 { "with" } else { "without" },
            if wall <= target { "within" } else { "over" },
            wall / target
        );
    }
    if let Some(k) = keep {
        println!("run folder kept at {}", k.display());
    }
    Ok(())
}

/// The CPU's model name (Linux), for the figures' labels.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Starts the peak resident memory (VmHWM) afresh from the current resident memory (Linux:
/// `5` into /proc/self/clear_refs), so that a peak measures one phase alone.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A memory field of /proc/self/status (`VmHWM`, `RssAnon`, …), MB.
fn status_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// The process's peak resident memory since the last [`reset_peak`], MB.
fn peak_mb() -> Option<f64> {
    status_mb("VmHWM")
}

/// The process's anonymous resident memory (what the heap holds, the mapped checkpoint's
/// pages left out), MB.
fn anon_mb() -> Option<f64> {
    status_mb("RssAnon")
}

/// Runs `f` while a thread samples the anonymous resident memory every 10 ms; returns its
/// result and the largest sample (MB).
fn sampling_anon<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Option<f64>)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut peak: Option<f64> = None;
            while !done.load(Ordering::Relaxed) {
                if let Some(m) = anon_mb() {
                    peak = Some(peak.map_or(m, |p: f64| p.max(m)));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            peak
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        let peak = h.join().expect("the sampler thread");
        r.map(|x| (x, peak))
    })
}

/// `bench --load`: a generated Llama-3.2-1B-shaped checkpoint loaded tensor by tensor, then
/// the old route (all of it in f32, then packed), memory measured after each.
fn load(precision: model::Precision) -> Result<()> {
    use model::load::synth;
    let shape = synth::LLAMA_3_2_1B;
    let dir = tempfile::tempdir().context("cannot create a scratch folder")?;
    let t = Instant::now();
    let bytes = synth::write_llama(dir.path(), &shape, 0, 1 << 30)?;
    let ckpt_mb = bytes as f64 / 1e6;
    eprintln!(
        "wrote a random-weight checkpoint of Llama-3.2-1B's shape ({:.2} B parameters, {ckpt_mb:.0} MB of bf16) in {:.1} s",
        shape.parameters() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let mb = |x: Option<f64>| x.map_or("?".to_string(), |m| format!("{m:.0} MB"));
    let ratio = |x: Option<f64>| x.map_or("?".to_string(), |m| format!("{:.2}x", m / ckpt_mb));
    crate::util::return_free_memory();
    let before = crate::bench::resident_mb();
    println!("checkpoint            {ckpt_mb:.0} MB of bf16 tensors in safetensors shards (Llama-3.2-1B's shape, random weights)");
    println!("cpu                   {}", cpu_name());
    println!("resident before load  {}", mb(before));
    // One route: the load timed, the heap sampled, the peak started afresh, then its line.
    let measure = |route: &str, load: &dyn Fn() -> Result<model::Model>| -> Result<()> {
        crate::util::return_free_memory();
        reset_peak();
        let t = Instant::now();
        let (m, anon_peak) = sampling_anon(load)?;
        crate::util::return_free_memory();
        let secs = t.elapsed().as_secs_f64();
        let (after, peak) = (crate::bench::resident_mb(), peak_mb());
        println!(
            "{route:<21} {} in {secs:.1} s: resident after load {} ({} the checkpoint); peak {} ({}) with the mapped files, heap peak {} ({})",
            m.precision().name(),
            mb(after),
            ratio(after),
            mb(peak),
            ratio(peak),
            mb(anon_peak),
            ratio(anon_peak)
        );
        Ok(())
    };
    measure("tensor by tensor", &|| {
        let (config, w) = model::hf::load_folder(dir.path())?;
        model::Model::new_in(config, w, precision)
    })?;
    measure("all in f32 first", &|| {
        let (config, mut w) = model::hf::load_folder(dir.path())?;
        let mut all = std::collections::HashMap::new();
        for (name, _) in shape.tensors() {
            let x = w.take(&name)?;
            all.insert(name, x);
        }
        let mut m = model::Model::new(config, model::Weights::in_memory(all, "all in f32".into()))?;
        m.set_precision(precision)?;
        Ok(m)
    })?;
    Ok(())
}
