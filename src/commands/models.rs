//! `outlierlab models`: the model aliases and where each comes from.

use anyhow::Result;

pub fn run() -> Result<()> {
    for a in crate::assets::model_assets() {
        println!("{:<30} {}", a.alias, a.description);
        println!("{:<30} Hub: {}  sha256: {}", "", a.hub_id, a.sha256);
        if !a.provenance_note.is_empty() {
            println!("{:<30} note: {}", "", a.provenance_note);
        }
    }
    Ok(())
}
