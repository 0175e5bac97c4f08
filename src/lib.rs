//! outlierlab: do massive activations spoil the refusal direction, and which way of detecting and
//! handling them helps?
//!
//! The pipeline, in the order data flows: `model` (runtime) → detect → direction → ablate →
//! evaluate → study → report. Each stage keeps its data types in its own module.

pub mod assets;
pub mod bench;
pub mod cli;
pub mod detect;
pub mod model;
pub mod util;
