//! Stage 6: studies — the study file, the plan it expands to, the runner that scores it, and the
//! optimisers it runs on the selection split.

pub mod optimize;
pub mod plan;
pub mod replicate;
pub mod rundir;
pub mod runner;
pub mod spec;
