//! Writes the tiny random-weight Llama-3 checkpoint the rotary-scaling reference is computed on
//! (`tests/fixtures/reference/scripts/llama3_rope.py` reads it with transformers):
//!
//!     cargo run --release --example synth_checkpoint -- DIR

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: synth_checkpoint DIR"))?;
    outlierlab::model::load::synth::write_llama3_reference(std::path::Path::new(&dir))?;
    println!("{dir}");
    Ok(())
}
