//! Writes the tiny random-weight checkpoints the transformers references are computed on.
//!
//!     cargo run --release --example synth_checkpoint -- DIR
//!         the Llama-3 rotary-scaling checkpoint (tests/fixtures/reference/scripts/llama3_rope.py)
//!     cargo run --release --example synth_checkpoint -- --config CONFIG.json --seed S DIR [EDITED_DIR]
//!         a checkpoint of CONFIG's family with weights from seed S; with EDITED_DIR, also the
//!         same model after `ablate::reference_edit`, exported as outlierlab exports an edit
//!         (tests/fixtures/reference/scripts/families.py)

use anyhow::{bail, Context, Result};
use candle_core::DType;
use outlierlab::model::load::synth;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [dir] => {
            synth::write_llama3_reference(Path::new(dir))?;
            println!("{dir}");
        }
        [flag, config, seed_flag, seed, dir, rest @ ..]
            if flag == "--config" && seed_flag == "--seed" =>
        {
            let text =
                std::fs::read_to_string(config).with_context(|| format!("cannot read {config}"))?;
            let seed: u64 = seed.parse().context("--seed takes a whole number")?;
            let mut m = synth::tiny_model(&text, seed)?;
            synth::write_model(&m, &text, Path::new(dir), DType::BF16)?;
            println!("{dir}");
            if let [edited] = rest {
                let (dirs, params) =
                    outlierlab::ablate::reference_edit(m.num_layers(), m.hidden_size());
                outlierlab::ablate::abliterate(&mut m, &dirs, &params, &[])?;
                let exported = m.config.to_hf_json(None, None);
                // In f32, as `outlierlab export` writes an edited model.
                let json = serde_json::to_string_pretty(&exported)?;
                synth::write_model(&m, &json, Path::new(edited), DType::F32)?;
                println!("{edited}");
            }
        }
        _ => bail!("usage: synth_checkpoint DIR | --config CONFIG.json --seed S DIR [EDITED_DIR]"),
    }
    Ok(())
}
