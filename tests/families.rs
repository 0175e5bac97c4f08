//! Mistral, Qwen3, Gemma 2 and Phi-3 against transformers 5.25 on tiny random-weight checkpoints
//! (configs written by transformers' own config classes, `tests/fixtures/reference/tiny/`;
//! weights made here from the seed the reference script used, `synth::tiny_model`; values from
//! `tests/fixtures/reference/scripts/families.py`): logits at every position and every hidden
//! state in f32, 16 greedy tokens, heretic's edit on the writers heretic finds, and the edited
//! model exported and read back.

mod common;

use outlierlab::model::load::synth;
use outlierlab::model::{hf, Batch, HiddenConvention, Logits, Model, Precision};

fn flat(v: &serde_json::Value) -> Vec<f32> {
    fn walk(v: &serde_json::Value, out: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            x => out.push(x.as_f64().expect("a number") as f32),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn all_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let out = m
        .forward(&Batch::left_padded(&[ids.to_vec()], 0), false, Logits::All)
        .unwrap();
    out.logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Greedy tokens, the whole sequence recomputed each step (as the script does).
fn greedy(m: &Model, ids: &[u32], n: usize) -> Vec<u32> {
    let mut seq = ids.to_vec();
    for _ in 0..n {
        let out = m
            .forward(&Batch::left_padded(&[seq.clone()], 0), false, Logits::Last)
            .unwrap();
        let row: Vec<f32> = out
            .logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
        seq.push(best.0 as u32);
    }
    seq[ids.len()..].to_vec()
}

const TOL: f32 = 1e-4;

fn check(family: &str) {
    let fx = common::fixture(&format!("family-{family}-tiny.json"));
    let config =
        std::fs::read_to_string(common::fixtures_dir().join(format!("tiny/{family}/config.json")))
            .unwrap();
    let ids = common::as_u32s(&fx["ids"]);
    let seed = fx["seed"].as_u64().unwrap();
    let mut m = synth::tiny_model(&config, seed).unwrap();
    assert_eq!(m.config.family.name(), family);

    let want_logits = flat(&fx["logits"]);
    let d = max_diff(&all_logits(&m, &ids), &want_logits);
    eprintln!("{family}: f32 logits within {d:.2e} of transformers'");
    assert!(d < TOL, "{family}: logits differ from transformers' by {d}");
    let out = m
        .forward(
            &Batch::left_padded(std::slice::from_ref(&ids), 0),
            true,
            Logits::None,
        )
        .unwrap();
    let hs = out.hidden_states(HiddenConvention::Transformers);
    let want = fx["hidden_states"].as_array().unwrap();
    assert_eq!(
        hs.len(),
        want.len(),
        "{family}: one hidden state per layer and the embeddings"
    );
    for (i, (h, w)) in hs.iter().zip(want).enumerate() {
        let d = max_diff(&h.flatten_all().unwrap().to_vec1().unwrap(), &flat(w));
        assert!(d < TOL, "{family}: hidden state {i} differs by {d}");
    }
    assert_eq!(
        greedy(&m, &ids, 16),
        common::as_u32s(&fx["greedy"]),
        "{family}: greedy tokens"
    );

    // heretic's edit, on the matrices heretic edits.
    let (dirs, params) = outlierlab::ablate::reference_edit(m.num_layers(), m.hidden_size());
    outlierlab::ablate::abliterate(&mut m, &dirs, &params, &[]).unwrap();
    let edited = all_logits(&m, &ids);
    let d = max_diff(&edited, &flat(&fx["edited_logits"]));
    eprintln!("{family}: edited logits within {d:.2e} of heretic's edit in transformers");
    assert!(
        d < TOL,
        "{family}: the edited model's logits differ from heretic's edit by {d}"
    );
    assert!(
        max_diff(&edited, &flat(&fx["logits"])) > 100.0 * TOL,
        "{family}: the edit moved nothing"
    );
    assert_eq!(greedy(&m, &ids, 16), common::as_u32s(&fx["edited_greedy"]));
    // transformers read outlierlab's export of this edit and generated heretic's tokens.
    assert!(fx["export_max_logit_diff"].as_f64().unwrap() < 1e-4);
    assert_eq!(fx["export_greedy"], fx["edited_greedy"]);

    // The export read back by outlierlab: the same model.
    let tmp = tempfile::tempdir().unwrap();
    let json = serde_json::to_string(&m.config.to_hf_json(None, None)).unwrap();
    synth::write_model(&m, &json, tmp.path(), candle_core::DType::F32).unwrap();
    let (cfg, w) = hf::load_folder(tmp.path()).unwrap();
    let back = Model::new(cfg, w).unwrap();
    assert_eq!(
        all_logits(&back, &ids),
        edited,
        "{family}: export and reload"
    );

    // bf16 (where the kernels run): the same greedy start, logits near.
    if outlierlab::model::cpu::test_runs(outlierlab::model::cpu::Isa::Avx2Fma) {
        let (cfg, w) = hf::load_folder(tmp.path()).unwrap();
        let b = Model::new_in(cfg, w, Precision::Bf16).unwrap();
        let d = max_diff(&all_logits(&b, &ids), &edited);
        let scale = edited.iter().fold(0f32, |a, x| a.max(x.abs()));
        eprintln!("{family}: bf16 logits within {d:.3} of f32 (largest |logit| {scale:.2})");
        assert!(
            d < 0.05 * scale.max(1.0),
            "{family}: bf16 logits differ by {d} (largest {scale})"
        );
    }
}

#[test]
fn mistral_matches_transformers() {
    check("mistral");
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3");
}

#[test]
fn gemma2_matches_transformers() {
    check("gemma2");
}

#[test]
fn phi3_matches_transformers() {
    check("phi3");
}

/// `generate`, `detect` and `abliterate` on a local Hugging Face folder of each family (the
/// tiny checkpoint with a byte-level tokenizer): they run to the end and say what they did.
#[test]
fn the_commands_run_on_a_local_folder_of_each_family() {
    let bin = env!("CARGO_BIN_EXE_outlierlab");
    for family in ["mistral", "qwen3", "gemma2", "phi3"] {
        let tiny = common::fixtures_dir().join("tiny");
        let config = std::fs::read_to_string(tiny.join(format!("{family}/config.json"))).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let m = synth::tiny_model(&config, 5).unwrap();
        synth::write_model(&m, &config, tmp.path(), candle_core::DType::BF16).unwrap();
        synth::copy_tokenizer(&tiny.join("byte-tokenizer"), tmp.path()).unwrap();
        let dir = tmp.path().to_str().unwrap();
        let run = |args: &[&str]| -> String {
            let out = std::process::Command::new(bin).args(args).output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{family}: {args:?} failed:\n{text}");
            text
        };
        let g = run(&[
            "generate",
            "--model",
            dir,
            "--max-new-tokens",
            "4",
            "Hello there",
        ]);
        assert!(g.contains("generating: 1/1, done"), "{family}: {g}");
        let d = run(&["detect", "--model", dir, "--prompt", "Hello there"]);
        assert!(
            d.contains(&format!("model {dir}")) && d.contains("4 hidden states"),
            "{family}: {d}"
        );
        let a = run(&[
            "abliterate",
            "--model",
            dir,
            "--direction-prompts",
            "8",
            "--eval-prompts",
            "4",
            "--max-response-tokens",
            "4",
            "--precision",
            "f32",
        ]);
        assert!(a.contains("none vs unedited"), "{family}: {a}");
    }
}
