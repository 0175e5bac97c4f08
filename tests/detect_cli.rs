//! `outlierlab detect` as a user runs it.

mod common;

use common::bin;
use polars::prelude::*;
use std::process::Command;

fn detect(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["detect", "--model", "smollm2-135m-instruct", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pr154_finds_nothing_and_says_why() {
    let v = detect(&[]);
    assert_eq!(v["dims"].as_array().unwrap().len(), 0);
    assert_eq!(v["hits"].as_array().unwrap().len(), 0);
    let nm = v["near_misses"].as_array().unwrap();
    assert!(!nm.is_empty());
    assert_eq!(nm[0]["dim"], 507);
    assert_eq!(nm[0]["token"], "<|im_start|>");
    let why: Vec<&str> = nm[0]["rejected_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(why.iter().any(|w| w.starts_with("median_ratio")), "{why:?}");
    let ratio = nm[0]["ratio_position"].as_f64().unwrap();
    assert!(
        (450.0..=520.0).contains(&ratio),
        "dim 507 sits at ~450-513x its position's median, got {ratio}"
    );
}

#[test]
fn lower_ratios_find_507_with_provenance_and_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let table = tmp.path().join("scan.parquet");
    let v = detect(&[
        "--set",
        "median_ratio=400",
        "--set",
        "mad_ratio=400",
        "--table",
        table.to_str().unwrap(),
    ]);
    let dims = v["dims"].as_array().unwrap();
    assert_eq!(dims.len(), 1);
    assert_eq!(dims[0]["dim"], 507);
    let layers: Vec<u64> = dims[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(layers, (12..=21).collect::<Vec<u64>>());
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 10);
    assert!(hits
        .iter()
        .all(|h| h["dim"] == 507 && h["position"] == 0 && h["source"] == "trigger"));
    let peak = dims[0]["peak_abs"].as_f64().unwrap();
    assert!((24_000.0..26_000.0).contains(&peak), "{peak}");

    let df = outlierlab::detect::table::read_parquet(&table).unwrap();
    for col in [
        "layer",
        "prompt",
        "source",
        "position",
        "token",
        "dim",
        "abs",
        "ratio_position",
        "ratio_layer",
        "mad_z_position",
        "deviation_rank",
        "cluster_gap_index",
        "cluster_max_log_gap",
        "run_length",
    ] {
        assert!(df.column(col).is_ok(), "table lacks column {col}");
    }
    let dim = df.column("dim").unwrap().u32().unwrap().clone();
    let layer = df.column("layer").unwrap().u32().unwrap().clone();
    let run = df.column("run_length").unwrap().u32().unwrap().clone();
    let mut found = false;
    for i in 0..df.height() {
        if dim.get(i) == Some(507)
            && layer.get(i) == Some(12)
            && df.column("position").unwrap().u32().unwrap().get(i) == Some(0)
        {
            found = true;
            // dim 507 stays above the floor from layer 12 through 28 at least.
            assert!(run.get(i).unwrap() >= 17, "run length {:?}", run.get(i));
        }
    }
    assert!(found, "the table must hold dim 507 at layer 12, position 0");
    let _ = df.column("abs").unwrap().f32().unwrap();
    let _: &DataFrame = &df;
}

#[test]
fn bad_detect_settings_are_one_line_errors() {
    for (args, needle) in [
        (vec!["--preset", "nope"], "unknown detection preset 'nope'"),
        (
            vec!["--set", "median_ration=3"],
            "did you mean 'median_ratio'",
        ),
        (vec!["--set", "median_ratio"], "expected key=value"),
        (
            vec!["--hidden", "raw"],
            "expected 'transformers' or 'residual'",
        ),
    ] {
        let out = Command::new(bin())
            .args(["detect", "--model", "smollm2-135m-instruct"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn datasets_scan_with_their_source() {
    let v = detect(&[
        "--dataset",
        "advbench:8",
        "--dataset",
        "harmless-outlierlab:4",
        "--preset",
        "sun2024",
    ]);
    let dims: Vec<u64> = v["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dim"].as_u64().unwrap())
        .collect();
    assert!(dims.contains(&507), "{dims:?}");
    let sources: std::collections::BTreeSet<&str> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["source"].as_str().unwrap())
        .collect();
    assert!(
        sources.contains("bad") && sources.contains("good"),
        "{sources:?}"
    );
}
