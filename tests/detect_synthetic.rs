//! The detector on synthetic hidden states with planted outliers at known dims.

mod common;

use common::noise;
use outlierlab::detect::config::{MedianKind, Positions};
use outlierlab::detect::{self, preset, DetectConfig, Floor, PromptStates, Source};

const S: usize = 12; // hidden states
const T: usize = 8; // positions
const D: usize = 256; // hidden size

struct Plant {
    layers: std::ops::Range<usize>,
    pos: usize,
    dim: usize,
    value: f32,
}

fn prompt(seed: u64, plants: &[Plant], valid: Vec<bool>) -> PromptStates {
    let mut states = Vec::new();
    for s in 0..S {
        let mut h = noise(T * D, seed * 1000 + s as u64, 1.0);
        for p in plants.iter().filter(|p| p.layers.contains(&s)) {
            h[p.pos * D + p.dim] = p.value;
        }
        states.push(h);
    }
    PromptStates {
        source: Source::Trigger,
        text: format!("synthetic {seed}"),
        tokens: (0..T).map(|t| format!("tok{t}")).collect(),
        valid,
        states,
    }
}

fn all_valid() -> Vec<bool> {
    vec![true; T]
}

fn detect_with(cfg: &DetectConfig, prompts: &[PromptStates]) -> Vec<u32> {
    let scan = detect::scan(prompts, cfg.median_kind, detect::floor_for(cfg));
    detect::apply(cfg, &scan).unwrap().dim_ids()
}

fn planted_pair() -> Vec<PromptStates> {
    vec![
        prompt(
            1,
            &[Plant {
                layers: 3..12,
                pos: 0,
                dim: 17,
                value: 5000.0,
            }],
            all_valid(),
        ),
        prompt(
            2,
            &[Plant {
                layers: 2..11,
                pos: 3,
                dim: 42,
                value: -3000.0,
            }],
            all_valid(),
        ),
    ]
}

#[test]
fn presets_find_exactly_the_planted_dims() {
    let prompts = planted_pair();
    for name in ["pr154", "pr154-described", "sun2024", "median-only"] {
        let found = detect_with(&preset(name).unwrap(), &prompts);
        // precision and recall of 1: every planted dim, nothing else.
        assert_eq!(found, vec![17, 42], "preset {name}");
    }
    let mut top = preset("top-k").unwrap();
    assert_eq!(detect_with(&top, &prompts), vec![17]);
    top.top_k = Some(2);
    assert_eq!(detect_with(&top, &prompts), vec![17, 42]);
}

#[test]
fn a_large_value_in_a_heavy_tailed_layer_is_not_massive() {
    // Every value at position 2 is large (median |h| ~ 250); one of 5000 there is only 20x.
    let mut p = prompt(
        3,
        &[Plant {
            layers: 0..12,
            pos: 2,
            dim: 9,
            value: 5000.0,
        }],
        all_valid(),
    );
    for s in 0..S {
        for j in 0..D {
            if j != 9 {
                p.states[s][2 * D + j] *= 500.0;
            }
        }
    }
    let prompts = vec![p];
    let mut only_abs = preset("pr154").unwrap();
    only_abs.median_ratio = None;
    only_abs.mad_ratio = None;
    only_abs.max_cluster_size = None;
    only_abs.persistence = None;
    let scan = detect::scan(
        &prompts,
        MedianKind::Lower,
        Floor {
            min_ratio: 20.0,
            min_abs: Some(100.0),
        },
    );
    assert!(
        detect::apply(&only_abs, &scan)
            .unwrap()
            .dim_ids()
            .contains(&9),
        "|a| > 100 alone accepts it"
    );
    let mut only_median = preset("median-only").unwrap();
    only_median.median_ratio = Some(1000.0);
    assert!(
        detect_with(&only_median, &prompts).is_empty(),
        "the median ratio must reject it"
    );
    let mut only_mad = DetectConfig {
        median_ratio: None,
        ..only_median.clone()
    };
    only_mad.mad_ratio = Some(1000.0);
    assert!(
        detect_with(&only_mad, &prompts).is_empty(),
        "the MAD criterion must reject it"
    );
}

#[test]
fn a_small_value_with_a_huge_ratio_fails_min_abs() {
    let mut p = prompt(4, &[], all_valid());
    for s in 0..S {
        for x in p.states[s].iter_mut() {
            *x *= 0.001;
        }
        p.states[s][D + 5] = 50.0; // 100,000x the median, but |a| = 50
    }
    let prompts = vec![p];
    assert_eq!(
        detect_with(&preset("median-only").unwrap(), &prompts),
        vec![5]
    );
    assert!(detect_with(&preset("pr154").unwrap(), &prompts).is_empty());
}

#[test]
fn a_cluster_of_five_outliers_is_not_small() {
    let plants: Vec<Plant> = (0..5)
        .map(|i| Plant {
            layers: 0..12,
            pos: 1,
            dim: 100 + i,
            value: 4000.0 + i as f32,
        })
        .collect();
    let prompts = vec![prompt(5, &plants, all_valid())];
    let cfg = preset("pr154").unwrap();
    assert!(
        detect_with(&cfg, &prompts).is_empty(),
        "five equal outliers are no small cluster"
    );
    let no_cluster = DetectConfig {
        max_cluster_size: None,
        ..cfg.clone()
    };
    assert_eq!(
        detect_with(&no_cluster, &prompts),
        vec![100, 101, 102, 103, 104]
    );
    let big_cluster = DetectConfig {
        max_cluster_size: Some(6),
        ..cfg
    };
    assert_eq!(detect_with(&big_cluster, &prompts).len(), 5);
}

#[test]
fn a_one_layer_spike_does_not_persist() {
    let prompts = vec![prompt(
        6,
        &[Plant {
            layers: 5..6,
            pos: 4,
            dim: 77,
            value: 9000.0,
        }],
        all_valid(),
    )];
    let cfg = preset("pr154").unwrap();
    assert!(detect_with(&cfg, &prompts).is_empty());
    let described = preset("pr154-described").unwrap();
    assert!(detect_with(&described, &prompts).is_empty());
    let none = DetectConfig {
        persistence: None,
        ..cfg
    };
    assert_eq!(detect_with(&none, &prompts), vec![77]);
}

#[test]
fn consecutive_and_total_persistence_differ() {
    // Candidate in 8 of 12 states, but never 4 in a row (needs 1 + floor(12/4) = 4 consecutive).
    let layers = [0usize, 1, 2, 4, 5, 6, 8, 9];
    let mut p = prompt(7, &[], all_valid());
    for &s in &layers {
        p.states[s][3 * D + 8] = 8000.0;
    }
    let prompts = vec![p];
    assert!(
        detect_with(&preset("pr154").unwrap(), &prompts).is_empty(),
        "consecutive persistence rejects gaps"
    );
    assert_eq!(
        detect_with(&preset("pr154-described").unwrap(), &prompts),
        vec![8],
        "total persistence counts 8 >= 3"
    );
}

#[test]
fn a_hit_only_in_padding_depends_on_the_positions_setting() {
    let mut valid = all_valid();
    valid[0] = false;
    valid[1] = false;
    let prompts = vec![prompt(
        8,
        &[Plant {
            layers: 0..12,
            pos: 1,
            dim: 33,
            value: 7000.0,
        }],
        valid,
    )];
    let all = preset("pr154").unwrap();
    assert_eq!(all.positions, Positions::All);
    assert_eq!(
        detect_with(&all, &prompts),
        vec![33],
        "PR #154's code scans padding"
    );
    let valid_only = DetectConfig {
        positions: Positions::Valid,
        ..all
    };
    assert!(detect_with(&valid_only, &prompts).is_empty());
    let scan = detect::scan(&prompts, MedianKind::Lower, Floor::default());
    let det = detect::apply(&valid_only, &scan).unwrap();
    assert!(det
        .near_misses
        .iter()
        .any(|m| m.dim == 33 && m.rejected_by.iter().any(|r| r.contains("padding"))));
}

#[test]
fn all_zero_states_detect_nothing_and_do_not_divide_by_zero() {
    let mut p = prompt(9, &[], all_valid());
    for s in p.states.iter_mut() {
        s.iter_mut().for_each(|x| *x = 0.0);
    }
    let prompts = vec![p];
    let scan = detect::scan(&prompts, MedianKind::Lower, Floor::default());
    assert!(scan
        .positions
        .iter()
        .all(|ps| ps.median_abs == 0.0 && ps.mad == 0.0 && ps.max_abs == 0.0));
    assert!(scan.entries.is_empty());
    for name in ["pr154", "sun2024", "median-only", "pr154-described"] {
        assert!(
            detect_with(&preset(name).unwrap(), &prompts).is_empty(),
            "{name}"
        );
    }
    // One non-zero value in an all-zero vector: infinitely many medians away, and detected.
    let mut p = prompt(9, &[], all_valid());
    for s in p.states.iter_mut() {
        s.iter_mut().for_each(|x| *x = 0.0);
        s[2 * D + 11] = 500.0;
    }
    assert_eq!(detect_with(&preset("pr154").unwrap(), &[p]), vec![11]);
}

#[test]
fn nan_and_inf_are_reported_never_detected() {
    let mut p = prompt(
        10,
        &[Plant {
            layers: 0..12,
            pos: 0,
            dim: 17,
            value: 5000.0,
        }],
        all_valid(),
    );
    p.states[4][2 * D + 60] = f32::NAN;
    p.states[6][5 * D + 61] = f32::INFINITY;
    let prompts = vec![p];
    let cfg = preset("pr154").unwrap();
    let scan = detect::scan(&prompts, cfg.median_kind, Floor::default());
    assert_eq!(scan.non_finite.len(), 2);
    assert!(scan
        .non_finite
        .iter()
        .any(|n| n.dim == 60 && n.value.is_nan()));
    assert!(scan
        .non_finite
        .iter()
        .any(|n| n.dim == 61 && n.value.is_infinite()));
    let det = detect::apply(&cfg, &scan).unwrap();
    assert_eq!(
        det.dim_ids(),
        vec![17],
        "the planted dim is still found; NaN/Inf dims are not"
    );
    assert_eq!(det.non_finite, 2);
}

#[test]
fn a_single_layer_model_works() {
    let mut p = prompt(11, &[], all_valid());
    p.states.truncate(2); // embedding output + one layer
    p.states[0][D + 3] = 5000.0;
    p.states[1][D + 3] = 5000.0;
    let prompts = vec![p];
    assert_eq!(detect_with(&preset("pr154").unwrap(), &prompts), vec![3]);
    assert_eq!(
        detect_with(&preset("pr154-described").unwrap(), &prompts),
        vec![3]
    );
}

#[test]
fn llm_int8_needs_layers_and_positions() {
    // dim 20: |a| = 8 at 4 of 8 positions in 6 of 12 states; dim 21: |a| = 8 at one position in
    // one state only.
    let mut p = prompt(12, &[], all_valid());
    for s in 3..9 {
        for t in 0..4 {
            p.states[s][t * D + 20] = 8.0;
        }
    }
    p.states[2][D + 21] = 8.0;
    let found = detect_with(&preset("llm-int8").unwrap(), &[p]);
    assert!(found.contains(&20), "{found:?}");
    assert!(!found.contains(&21), "{found:?}");
}

#[test]
fn settings_are_validated() {
    let mut c = preset("pr154").unwrap();
    let e = c.set("median_ration=4").unwrap_err().to_string();
    assert!(e.contains("did you mean 'median_ratio'"), "{e}");
    assert!(c.set("median_ratio=abc").is_err());
    assert!(c.set("persistence=3").is_err());
    assert!(c
        .set("median_scope=row")
        .unwrap_err()
        .to_string()
        .contains("position, layer"));
    c.set("mad_ratio=none").unwrap();
    assert_eq!(c.mad_ratio, None);
    assert!(preset("nope").unwrap_err().to_string().contains("pr154"));
    // Thresholds looser than the scan's floor are refused rather than silently wrong.
    let prompts = planted_pair();
    let scan = detect::scan(&prompts, MedianKind::Lower, Floor::default());
    let loose = DetectConfig {
        median_ratio: Some(5.0),
        mad_ratio: None,
        ..preset("pr154").unwrap()
    };
    assert!(detect::apply(&loose, &scan).is_err());
}

#[test]
fn cluster_membership_is_a_choice() {
    // One dominant outlier (dim 1) over nine strong ones (dims 2..=10, 1000-1800): the largest
    // log gap comes right after dim 1, so the small cluster is {1} and dims 2..=10 lie outside it.
    let mut plants = vec![Plant {
        layers: 0..12,
        pos: 0,
        dim: 1,
        value: 60000.0,
    }];
    for d in 2..=10 {
        plants.push(Plant {
            layers: 0..12,
            pos: 0,
            dim: d,
            value: 1000.0 + 100.0 * d as f32,
        });
    }
    let prompts = vec![prompt(13, &plants, all_valid())];
    let position = preset("pr154").unwrap();
    assert_eq!(
        detect_with(&position, &prompts),
        (1..=10).collect::<Vec<u32>>(),
        "PR code: the position has a small cluster"
    );
    let mut member = position.clone();
    member.set("cluster_test=member").unwrap();
    assert_eq!(
        detect_with(&member, &prompts),
        vec![1],
        "PR text: only values inside the cluster"
    );
}

#[test]
fn the_scan_floor_decides_only_when_named() {
    // With every value criterion off, the floor would decide alone: refused, with what to do.
    let prompts = planted_pair();
    let scan = detect::scan(&prompts, MedianKind::Lower, Floor::default());
    let mut only_persistence = preset("pr154").unwrap();
    only_persistence.min_abs = None;
    only_persistence.median_ratio = None;
    only_persistence.mad_ratio = None;
    only_persistence.max_cluster_size = None;
    let e = detect::apply(&only_persistence, &scan)
        .unwrap_err()
        .to_string();
    assert!(e.contains("floor=20"), "{e}");
    // Named as a criterion, it takes entries that stand out by 20x or 20 MADs: the planted
    // dims, not the noise.
    only_persistence.set("floor=20").unwrap();
    assert_eq!(
        only_persistence.active_criteria(),
        vec!["persistence", "floor"]
    );
    assert_eq!(
        detect::apply(&only_persistence, &scan).unwrap().dim_ids(),
        vec![17, 42]
    );
    // A floor looser than the scan's would miss entries: refused.
    only_persistence.set("floor=5").unwrap();
    assert!(detect::apply(&only_persistence, &scan).is_err());
}
