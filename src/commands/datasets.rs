//! `outlierlab datasets`: the built-in prompt sets, or one of them printed.

use anyhow::Result;

/// List the built-in prompt sets, or print one (one prompt per line, newlines inside a
/// prompt as spaces: what benches/heretic_trial.py reads).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A built-in set or a prompt file to print.
    pub name: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(name) = &args.name {
        for p in crate::datasets::load(name)? {
            println!("{}", p.replace(['\n', '\r'], " "));
        }
        return Ok(());
    }
    for m in crate::datasets::manifests() {
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
    Ok(())
}
