//! outlierlab: do massive activations spoil the refusal direction, and which way of detecting and
//! handling them helps?
//!
//! The pipeline, in the order data flows: `model` (runtime) → detect → direction → ablate →
//! evaluate → study → report. Each stage keeps its data types in its own module.

pub mod ablate;
pub mod assets;
pub mod bench;
pub mod commands;
pub mod datasets;
pub mod detect;
pub mod direction;
pub mod evaluate;
pub mod fs;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod stats;
pub mod study;
pub mod util;
