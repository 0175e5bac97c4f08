//! The commands, one module each with its arguments beside it; `main` parses the command line
//! and hands it to [`Command::run`].

use crate::model::PrecisionSetting;
use anyhow::Result;

pub mod abliterate;
pub mod bench;
pub mod cost;
pub mod datasets;
pub mod detect;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod label;
pub mod merge;
pub mod models;
pub mod power;
pub mod report;
pub mod run;
pub mod validate;

#[derive(clap::Subcommand)]
pub enum Command {
    Fetch(fetch::Args),
    /// List the model aliases and where each comes from.
    Models,
    Generate(generate::Args),
    Detect(detect::Args),
    Label(label::Args),
    Abliterate(abliterate::Args),
    Export(export::Args),
    Validate(validate::Args),
    Run(run::Args),
    Merge(merge::Args),
    Report(report::Args),
    Power(power::Args),
    Datasets(datasets::Args),
    Bench(bench::Args),
}

impl Command {
    /// `precision` is the `--precision` flag: the commands that load a model use it (auto when
    /// absent; a bf16 load prints the kernel path it chose); `run` checks it against the
    /// study's own.
    pub fn run(self, precision: Option<PrecisionSetting>) -> Result<()> {
        let p = || precision.unwrap_or_default().on_this_cpu();
        match self {
            Command::Fetch(a) => fetch::run(&a),
            Command::Models => models::run(),
            Command::Generate(a) => generate::run(a, p()),
            Command::Detect(a) => detect::run(a, p()),
            Command::Label(a) => label::run(&a, p()),
            Command::Abliterate(a) => abliterate::run(&a, p()),
            Command::Export(a) => export::run(&a, p()),
            Command::Validate(a) => validate::run(&a),
            Command::Run(a) => run::run(a, precision),
            Command::Merge(a) => merge::run(&a),
            Command::Report(a) => report::run(&a),
            Command::Power(a) => power::run(&a),
            Command::Datasets(a) => datasets::run(&a),
            Command::Bench(a) => bench::run(&a, precision),
        }
    }
}
