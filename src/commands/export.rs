//! `outlierlab export`: the abliterated model as a Hugging Face folder.

use super::abliterate::VariantArgs;
use crate::model::{self, Precision};
use crate::study::replicate;
use anyhow::Result;

/// Write the abliterated model as safetensors + config.json + tokenizer, loadable by
/// Hugging Face transformers and by outlierlab itself.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub variant: VariantArgs,
    /// Output folder.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

pub fn run(args: &Args, precision: Precision) -> Result<()> {
    let (a, out) = (&args.variant, args.out.as_path());
    use crate::pipeline as variant;
    let one = a.one_variant(0)?;
    let mut lm = model::load_with(&a.model, precision)?;
    let v = a.variant(&lm)?;
    let settings = one.settings(a, &[&v]);
    let (data, detected) = replicate::direction(&settings, &lm, 0, &one.sets)?;
    let prep = variant::prepare_with_dims(&data, &v, &replicate::dims_for(&v, &detected)?)?;
    let summary =
        crate::ablate::abliterate(&mut lm.model, &prep.directions, &v.ablation, &prep.protect)?;
    crate::model::export::write_hf_folder(&lm, out)?;
    let meta = serde_json::json!({"tool": "outlierlab", "version": env!("CARGO_PKG_VERSION"), "source_model": a.model,
        "variant": v, "dims": prep.dims, "edited": summary.edited});
    std::fs::write(
        out.join("outlierlab.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    eprintln!(
        "wrote {} ({} matrices edited)",
        out.display(),
        summary.edited.len()
    );
    Ok(())
}
