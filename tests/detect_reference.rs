//! The detector against PR #154's algorithm transcribed to Python and run on SmolLM2 with the
//! trigger prompt (tests/fixtures/reference/massive-trigger-smollm2.json).

mod common;

use common::*;
use outlierlab::detect::config::{MedianKind, PersistenceMode, PR154_TRIGGER};
use outlierlab::detect::scan::MAD_SCALE;
use outlierlab::detect::{self, preset, DetectConfig, Floor, Source};
use outlierlab::model::{self, HiddenConvention};

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-6)
}

fn trigger_states() -> Vec<detect::PromptStates> {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let fx = fixture("massive-trigger-smollm2.json");
    let enc = lm
        .encode_chat(Some("You are a helpful assistant."), PR154_TRIGGER)
        .unwrap();
    assert_eq!(enc.rendered, fx["chat_string"].as_str().unwrap());
    assert_eq!(enc.ids, as_u32s(&fx["input_ids"]));
    detect::collect_states(
        &lm,
        &[(Source::Trigger, PR154_TRIGGER.to_string())],
        Some("You are a helpful assistant."),
        HiddenConvention::Transformers,
        1,
        outlierlab::model::PadRows::SelfOnly,
        |_| {},
    )
    .unwrap()
}

#[test]
fn pr154_matches_the_reference_on_smollm2() {
    let fx = fixture("massive-trigger-smollm2.json");
    let states = trigger_states();
    assert_eq!(
        states[0].states.len(),
        fx["num_hidden_state_tensors"].as_u64().unwrap() as usize
    );
    let scan = detect::scan(&states, MedianKind::Lower, Floor::default());

    // Per-layer, per-position statistics.
    let mut gap_idx_agree = 0;
    let mut total = 0;
    for (layer, row) in fx["per_layer_position_stats"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for st in row.as_array().unwrap() {
            let pos = st["pos"].as_u64().unwrap() as u32;
            let ps = scan.position_stats(layer as u32, 0, pos).unwrap();
            let want_max = st["max_abs"].as_f64().unwrap() as f32;
            assert!(
                rel(ps.max_abs, want_max) < 2e-3 || (ps.max_abs - want_max).abs() < 2e-3,
                "layer {layer} pos {pos}: max |h| {} vs {want_max}",
                ps.max_abs
            );
            let want_med = st["median_abs"].as_f64().unwrap() as f32;
            assert!(
                rel(ps.median_abs, want_med) < 5e-3 || (ps.median_abs - want_med).abs() < 1e-4,
                "layer {layer} pos {pos}: median {} vs {want_med}",
                ps.median_abs
            );
            // The reference stores the scaled MAD (1.4826 × median absolute deviation).
            let want_mad = st["mad"].as_f64().unwrap() as f32;
            let mad = MAD_SCALE * ps.mad;
            assert!(
                rel(mad, want_mad) < 5e-3 || (mad - want_mad).abs() < 1e-4,
                "layer {layer} pos {pos}: MAD {mad} vs {want_mad}"
            );
            let small = st["small_cluster"].as_bool().unwrap();
            assert_eq!(
                ps.cluster.is_small(3),
                small,
                "layer {layer} pos {pos}: cluster verdict"
            );
            total += 1;
            if ps.cluster.gap_index as u64 == st["cluster_gap_idx"].as_u64().unwrap() {
                gap_idx_agree += 1;
                let g = st["max_log_gap"].as_f64().unwrap() as f32;
                assert!(
                    (ps.cluster.max_log_gap - g).abs() < 2e-2,
                    "layer {layer} pos {pos}: gap {} vs {g}",
                    ps.cluster.max_log_gap
                );
            }
        }
    }
    // Quantised weights make exact ties among the top-10 deviations common; float noise may
    // order a tie differently, so a few gap indices may differ (the verdicts above may not).
    assert!(
        gap_idx_agree as f64 >= 0.97 * total as f64,
        "gap index agrees at {gap_idx_agree} of {total} positions"
    );

    // Defaults find nothing; both ratio thresholds at 400 find dim 507.
    let det = detect::apply(&preset("pr154").unwrap(), &scan).unwrap();
    assert!(det.dims.is_empty());
    assert!(
        !det.near_misses.is_empty(),
        "an empty result must come with near-misses"
    );
    assert_eq!(det.near_misses[0].dim, 507);
    assert!(det.near_misses[0]
        .rejected_by
        .iter()
        .any(|r| r.starts_with("median_ratio")));

    let mut cfg = preset("pr154").unwrap();
    cfg.set("median_ratio=400").unwrap();
    cfg.set("mad_ratio=400").unwrap();
    let det = detect::apply(&cfg, &scan).unwrap();
    let c400 = &fx["candidates_when_med_factor_and_mad_factor_are_400"];
    assert_eq!(det.dim_ids(), as_u32s(&c400["massive_dims"]));
    assert_eq!(
        det.dims[0].layers,
        as_u32s(&c400["confirmed_layers"]["507"])
    );
    assert!(det.dims[0]
        .positions
        .iter()
        .all(|(p, t, _)| *p == 0 && *t == 0));
    let want: Vec<(u32, f32)> = c400["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["layer"].as_u64().unwrap() as u32,
                c["abs"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(det.n_candidate_ptd, 1);
    let cand_layers: Vec<u32> = scan
        .entries
        .iter()
        .filter(|e| {
            e.dim == 507
                && e.position == 0
                && e.abs > 100.0
                && e.ratio_position > 400.0
                && e.mad_z_position > 400.0
        })
        .map(|e| e.layer)
        .collect();
    assert_eq!(cand_layers, want.iter().map(|w| w.0).collect::<Vec<_>>());
    for (l, a) in want {
        let e = scan
            .entries
            .iter()
            .find(|e| e.layer == l && e.dim == 507 && e.position == 0)
            .unwrap();
        assert!(rel(e.abs, a) < 1e-3, "layer {l}: |a| {} vs {a}", e.abs);
    }
}

fn sweep_config(variant: &str, f: f32) -> DetectConfig {
    let mut c = preset("pr154").unwrap();
    c.median_ratio = Some(f);
    c.mad_ratio = Some(f);
    match variant {
        "full" => {}
        "drop_abs100" => c.min_abs = None,
        "drop_med1000x" => c.median_ratio = None,
        "drop_mad1000x" => c.mad_ratio = None,
        "drop_cluster" => c.max_cluster_size = None,
        "drop_persistence" => c.persistence = None,
        "only_med" | "only_med_with_persistence" => {
            c.min_abs = None;
            c.mad_ratio = None;
            c.max_cluster_size = None;
            c.persistence = if variant == "only_med" {
                None
            } else {
                Some(0.25)
            };
            c.persistence_mode = PersistenceMode::Consecutive;
        }
        other => panic!("unknown sweep variant {other}"),
    }
    c
}

#[test]
fn threshold_sweep_matches_the_reference() {
    let fx = fixture("massive-trigger-smollm2.json");
    let states = trigger_states();
    let mut checked = 0;
    let mut exact = 0;
    for (kind_name, kind) in [
        ("lower_median", MedianKind::Lower),
        ("avg_median", MedianKind::Average),
    ] {
        let scan = detect::scan(
            &states,
            kind,
            Floor {
                min_ratio: 20.0,
                min_abs: None,
            },
        );
        for (f, variants) in fx["threshold_sweep_trigger"]["results"][kind_name]
            .as_object()
            .unwrap()
        {
            let f: f32 = f.parse().unwrap();
            for (variant, want) in variants.as_object().unwrap() {
                let ctx = format!("{kind_name} F={f} {variant}");
                let run = |f: f32| detect::apply(&sweep_config(variant, f), &scan).unwrap();
                let det = run(f);
                let (dims, conf, cand) = (
                    as_u32s(&want["massive_dims"]),
                    want["n_confirmed_ptd"].as_u64().unwrap() as usize,
                    want["n_candidate_ptd"].as_u64().unwrap() as usize,
                );
                if det.dim_ids() == dims
                    && det.n_confirmed_ptd == conf
                    && det.n_candidate_ptd == cand
                {
                    exact += 1;
                } else {
                    // Our hidden states agree with transformers' to ~1e-4 relative, so an entry
                    // sitting on a threshold (e.g. 49.9993 MADs against F = 50) may fall either
                    // way. Then the reference must lie inside the band of thresholds F(1 ± 1e-4).
                    let (loose, strict) = (run(f * (1.0 - 1e-4)), run(f * (1.0 + 1e-4)));
                    assert!(
                        strict.n_candidate_ptd <= cand && cand <= loose.n_candidate_ptd,
                        "{ctx}: {} candidates vs reference {cand} (band {}..{})",
                        det.n_candidate_ptd,
                        strict.n_candidate_ptd,
                        loose.n_candidate_ptd
                    );
                    assert!(
                        strict.n_confirmed_ptd <= conf && conf <= loose.n_confirmed_ptd,
                        "{ctx}: confirmed"
                    );
                    assert!(
                        loose.dim_ids() == dims || strict.dim_ids() == dims,
                        "{ctx}: dims {:?} vs {dims:?}",
                        det.dim_ids()
                    );
                    eprintln!("{ctx}: matches the reference only within the 1e-4 threshold band");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 8 * 8);
    assert!(
        exact >= checked - 4,
        "only {exact} of {checked} sweep points match exactly"
    );
}

#[test]
fn sun2024_finds_dim_507_with_the_layer_median() {
    let states = trigger_states();
    let cfg = preset("sun2024").unwrap();
    let scan = detect::scan(&states, cfg.median_kind, detect::floor_for(&cfg));
    let det = detect::apply(&cfg, &scan).unwrap();
    // 507 is the dominant channel; dim 247 also crosses 1000x the layer median (1012x), at
    // layer 12 only, so Sun et al.'s two criteria without persistence report it as well.
    assert!(det.dim_ids().contains(&507), "{:?}", det.dim_ids());
    let d = &det.dims[0];
    assert_eq!(d.dim, 507, "the strongest detected dim");
    assert!(
        d.peak_abs > 24_000.0 && d.peak_abs < 26_000.0,
        "peak {}",
        d.peak_abs
    );
    assert!(
        d.peak_ratio_layer > 5_000.0,
        "layer-median ratio {}",
        d.peak_ratio_layer
    );
    assert!(
        d.peak_ratio_position > 400.0 && d.peak_ratio_position < 600.0,
        "position ratio {}",
        d.peak_ratio_position
    );
    assert!(
        d.positions
            .iter()
            .all(|(_, t, tok)| *t == 0 && tok == "<|im_start|>"),
        "{:?}",
        d.positions
    );
}
