//! Stage 6: studies — variants, plans and the runner that scores them.

pub mod variant;
