//! The `pr154` preset against PR #154's own code run in transformers (tests/fixtures/reference:
//! pr154-code-trigger-*.json, pr154-code-padded-batch-*.json), and pad rows computed as
//! transformers computes them (pad-rows-*.json, made by scripts/pad_rows.py).

mod common;

use common::*;
use outlierlab::detect::config::{Positions, PR154_TRIGGER};
use outlierlab::detect::{self, preset, DetectConfig, Source};
use outlierlab::model::{self, HiddenConvention, Logits, PadRows};

const SYSTEM: &str = "You are a helpful assistant.";

fn dims_of(v: &serde_json::Value) -> Vec<u32> {
    as_u32s(v)
}

/// The preset with both ratio thresholds at `f`, as the reference sweeps them.
fn at(f: &str, cluster: bool) -> DetectConfig {
    let mut c = preset("pr154").unwrap();
    c.set(&format!("median_ratio={f}")).unwrap();
    c.set(&format!("mad_ratio={f}")).unwrap();
    if !cluster {
        c.set("max_cluster_size=none").unwrap();
    }
    c
}

fn scan_as_the_cli_does(
    lm: &model::LoadedModel,
    prompts: &[(Source, String)],
    batch: usize,
) -> detect::Scan {
    let cfg = preset("pr154").unwrap();
    let states = detect::collect_states(
        lm,
        prompts,
        Some(SYSTEM),
        HiddenConvention::Transformers,
        batch,
        cfg.pad_rows,
        |_| {},
    )
    .unwrap();
    let s = detect::ScanSettings::for_config(&cfg);
    detect::scan(&states, s.median_kind, s.floor)
}

fn trigger_matches(alias: &str, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let lm = model::load(alias).unwrap();
    assert_eq!(
        lm.encode_chat(Some(SYSTEM), PR154_TRIGGER).unwrap().ids,
        as_u32s(&fx["input_ids"])
    );
    // The trigger goes in with other prompts; it must still run alone (no padding).
    let prompts = vec![
        (Source::Trigger, PR154_TRIGGER.to_string()),
        (Source::Good, "Hi".to_string()),
    ];
    let scan = scan_as_the_cli_does(&lm, &prompts, 8);
    assert!(
        scan.prompts[0].valid.iter().all(|v| *v),
        "the trigger was padded"
    );
    let mut checked = 0;
    for (f, want) in fx["pr154_by_F"].as_object().unwrap() {
        for (key, cluster) in [("full", true), ("no_cluster", false)] {
            let mut cfg = at(f, cluster);
            cfg.sources.good = false;
            cfg.sources.bad = false;
            let got = detect::apply(&cfg, &scan).unwrap().dim_ids();
            assert_eq!(got, dims_of(&want[key]), "{alias} F={f} {key}");
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn pr154_preset_matches_the_prs_code_on_the_trigger_smollm2() {
    trigger_matches("smollm2-135m-instruct", "pr154-code-trigger-smollm2.json");
}

#[test]
fn pr154_preset_matches_the_prs_code_on_the_trigger_qwen05() {
    trigger_matches(
        "qwen2.5-coder-0.5b-instruct",
        "pr154-code-trigger-qwen05.json",
    );
}

fn padded_batch_matches(alias: &str, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let lm = model::load(alias).unwrap();
    let prompts: Vec<(Source, String)> = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (Source::Good, p.as_str().unwrap().to_string()))
        .collect();
    let scan = scan_as_the_cli_does(&lm, &prompts, prompts.len());
    let pads: usize = scan
        .prompts
        .iter()
        .map(|p| p.valid.iter().filter(|v| !**v).count())
        .sum();
    assert_eq!(pads as u64, fx["pad_positions"].as_u64().unwrap());
    for (f, want) in fx["pr154_by_F"].as_object().unwrap() {
        for (key, positions) in [
            ("all_positions", Positions::All),
            ("valid_positions", Positions::Valid),
        ] {
            let mut cfg = at(f, true);
            cfg.sources.trigger = None;
            cfg.positions = positions;
            let det = detect::apply(&cfg, &scan).unwrap();
            assert_eq!(det.dim_ids(), dims_of(&want[key]), "{alias} F={f} {key}");
        }
    }
}

#[test]
fn pr154_preset_matches_the_prs_code_on_a_padded_batch_smollm2() {
    padded_batch_matches(
        "smollm2-135m-instruct",
        "pr154-code-padded-batch-smollm2.json",
    );
}

#[test]
fn pr154_preset_matches_the_prs_code_on_a_padded_batch_qwen05() {
    padded_batch_matches(
        "qwen2.5-coder-0.5b-instruct",
        "pr154-code-padded-batch-qwen05.json",
    );
}

/// Largest relative error of our pad rows against transformers', over every hidden state of
/// every padded prompt (norm and first eight components at the first pad).
fn pad_row_error(lm: &model::LoadedModel, fx: &serde_json::Value, mode: PadRows) -> f32 {
    let enc: Vec<_> = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| lm.encode_chat(Some(SYSTEM), p.as_str().unwrap()).unwrap())
        .collect();
    let batch = lm.batch(&enc).with_pad_rows(mode);
    let out = lm.model.forward(&batch, true, Logits::None).unwrap();
    let hs = out.hidden_states(HiddenConvention::Transformers);
    let mut worst = 0f32;
    for row in fx["padded"].as_array().unwrap() {
        let b = row["prompt"].as_u64().unwrap() as usize;
        assert_eq!(batch.ids[b], as_u32s(&row["input_ids"]), "prompt {b} ids");
        let t = row["first_pad"].as_u64().unwrap() as usize;
        for st in row["states"].as_array().unwrap() {
            let s = st["state"].as_u64().unwrap() as usize;
            let v: Vec<f32> = hs[s].get(b).unwrap().get(t).unwrap().to_vec1().unwrap();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let want = st["pad_norm"].as_f64().unwrap() as f32;
            worst = worst.max((norm - want).abs() / want.max(1e-3));
            // Components relative to the vector's norm (single components may be near zero).
            for (x, y) in v.iter().zip(as_f32s(&st["pad_first8"])) {
                worst = worst.max((x - y).abs() / want.max(1e-3));
            }
        }
    }
    worst
}

fn pad_rows_match(alias: &str, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let lm = model::load(alias).unwrap();
    let ours = pad_row_error(&lm, &fx, PadRows::Transformers);
    assert!(
        ours < 2e-3,
        "{alias}: pad rows differ from transformers' by {ours}"
    );
    // The check can fail: pad rows computed as first tokens are far from transformers'.
    let other = pad_row_error(&lm, &fx, PadRows::SelfOnly);
    eprintln!("{alias}: largest relative error of pad rows: transformers mode {ours:.2e}, self-only {other:.2e}");
    assert!(
        other > 20.0 * ours.max(1e-4),
        "{alias}: self-only pads err {other}"
    );
}

#[test]
fn pad_rows_are_computed_as_transformers_computes_them_smollm2() {
    pad_rows_match("smollm2-135m-instruct", "pad-rows-smollm2.json");
}

#[test]
fn pad_rows_are_computed_as_transformers_computes_them_qwen05() {
    pad_rows_match("qwen2.5-coder-0.5b-instruct", "pad-rows-qwen05.json");
}
