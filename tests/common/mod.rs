//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// ../shared/fixtures beside the checkout (override with OUTLIERLAB_FIXTURES).
pub fn fixtures_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTLIERLAB_FIXTURES") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e} (set OUTLIERLAB_FIXTURES)", p.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn as_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("int") as u32).collect()
}

pub fn as_f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outlierlab")
}
