//! Stage 6: studies — the study file, the plan it expands to, and the runner that scores it.

pub mod plan;
pub mod runner;
pub mod spec;
pub mod variant;
