//! Labels by intervention (src/detect/validate.rs): holding an entry changes nothing before it,
//! and on SmolLM2 the massive activation (dim 507 at the first token) is caught while a dim that
//! merely stands out is not; on a tiny synthetic Llama a planted fixed bias is labelled massive
//! and a planted large value that nothing reads is not.

mod common;

use candle_core::IndexOp;
use common::{max_abs, write_tiny_llama};
use outlierlab::detect::config::{MedianKind, PR154_TRIGGER};
use outlierlab::detect::validate::{self, ValidationSettings};
use outlierlab::detect::{self, Floor, Source};
use outlierlab::model::{self, Batch, HiddenConvention, Intervention, Logits, PadRows};

#[test]
fn an_intervention_holds_its_entries_and_nothing_else() {
    // Out-of-range entries are refused, not silently ignored.
    assert!(Intervention::new((2, 3, 4), &[(0, 3)], 1, 0, vec![vec![0.0]]).is_err());
    assert!(Intervention::new((2, 3, 4), &[(0, 1)], 4, 0, vec![vec![0.0]]).is_err());
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let enc = lm
        .encode_chat(Some("You are a helpful assistant."), PR154_TRIGGER)
        .unwrap();
    let batch = Batch::left_padded(std::slice::from_ref(&enc.ids), lm.tokenizer.pad_id);
    let base = lm
        .model
        .forward(&batch, false, Logits::All)
        .unwrap()
        .logits
        .unwrap();
    // Holding a value at the position it already has (from a state after every layer) is a
    // no-op up to rounding; holding at the last position changes nothing before it.
    let t = enc.ids.len();
    let d = lm.model.hidden_size();
    let states = lm.model.forward(&batch, true, Logits::None).unwrap();
    let v = states.residual[5]
        .i((0, t - 1, 7))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let same = Intervention::new((1, t, d), &[(0, t - 1)], 7, 5, vec![vec![v]]).unwrap();
    let held = lm.model.forward_intervened(&batch, &same).unwrap();
    let earlier =
        max_abs(&(held.i((0, ..t - 1)).unwrap() - base.i((0, ..t - 1)).unwrap()).unwrap());
    assert_eq!(earlier, 0.0, "positions before the held one changed");
    let zero = Intervention::new((1, t, d), &[(0, t - 1)], 7, 5, vec![vec![0.0]]).unwrap();
    let moved = lm.model.forward_intervened(&batch, &zero).unwrap();
    let last = max_abs(&(moved.i((0, t - 1)).unwrap() - base.i((0, t - 1)).unwrap()).unwrap());
    assert!(last > 0.0 || v == 0.0);
}

#[test]
fn smollm2_dim_507_is_massive_and_a_large_harmless_dim_is_not() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let system = Some("You are a helpful assistant.");
    let prompts = vec![
        (Source::Trigger, PR154_TRIGGER.to_string()),
        (Source::Good, "How do clouds form?".to_string()),
        (
            Source::Good,
            "Give me three tips for a morning routine.".to_string(),
        ),
    ];
    let states = detect::collect_states(
        &lm,
        &prompts,
        system,
        HiddenConvention::Residual,
        4,
        PadRows::SelfOnly,
        |_| {},
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(_, p)| lm.encode_chat(system, p).unwrap().ids)
        .collect();
    let scan = detect::scan(&states, MedianKind::Average, Floor::default());
    let s = ValidationSettings::default();
    let mut cands = validate::candidates(&scan, &s, &Default::default());
    validate::label(&lm, &states, &ids, &mut cands, &s, |_| {}).unwrap();
    let c507 = cands
        .iter()
        .find(|c| c.dim == 507)
        .expect("507 is a candidate");
    assert!(c507.massive, "{c507:?}");
    assert!(
        c507.damage.zero_kl > 5.0 && c507.damage.mean_kl < 0.01,
        "{c507:?}"
    );
    // Dim 247 stands out (> 100x its position's median) but is no fixed bias: holding it at
    // its mean hurts as much as zeroing it, so it is not labelled massive.
    let c247 = cands
        .iter()
        .find(|c| c.dim == 247)
        .expect("247 is a candidate");
    assert!(!c247.massive && c247.damage.mean_kl > s.mean_kl, "{c247:?}");
    for c in &cands {
        assert_eq!(
            c.massive,
            c.damage.zero_kl >= s.zero_kl && c.damage.mean_kl <= s.mean_kl,
            "{c:?}"
        );
    }
    let sc = validate::score(&[507], &cands);
    assert_eq!((sc.true_positives, sc.precision), (1.0, 1.0));
    let sc = validate::score(&[247], &cands);
    assert_eq!(sc.true_positives, 0.0);
}

/// A tiny Llama with two planted values, raw text: dim 3 of `<|im_start|>`'s embedding is a
/// fixed bias of 1000 (the token opens every corpus prompt, so its value is the same wherever it
/// stands), dim 5 of `~`'s embedding is 1000 too, but `~` only ever ends a prompt, so nothing after
/// it reads it. Returns the model folder and the corpus file.
fn planted_tiny_llama(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use candle_core::{Device, Tensor};
    let folder = dir.join("planted");
    write_tiny_llama(&folder);
    let path = folder.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let emb = &t["model.embed_tokens.weight"];
    let (vocab, d) = emb.dims2().unwrap();
    let mut e: Vec<Vec<f32>> = emb.to_vec2().unwrap();
    // The byte-level alphabet sorted, then the two specials: `<|im_start|>` is vocab - 2.
    let tok = outlierlab::model::tokenizer::TextTokenizer::from_hf_folder(&folder).unwrap();
    let tilde = tok.encode("~").unwrap()[0] as usize;
    let bang = tok.encode("!").unwrap()[0] as usize;
    e[vocab - 2][3] = 1000.0;
    e[tilde][5] = 1000.0;
    e[bang][7] = 1000.0;
    t.insert(
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(e.concat(), (vocab, d), &Device::Cpu).unwrap(),
    );
    // A sharper output distribution, so that a changed hidden state shows in the KL.
    t.insert(
        "model.norm.weight".into(),
        Tensor::from_vec(vec![4f32; d], d, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        [
            "the cat sat on the mat",
            "a bird flew over the hill",
            "rain fell on the old roof",
            "we walked to the river at dawn",
            "bread is best when warm",
            "the lamp was left on all night",
        ]
        .map(|s| format!("<|im_start|>{s}~\n"))
        .concat(),
    )
    .unwrap();
    let bad = dir.join("bad.txt");
    std::fs::write(
        &bad,
        [
            "tell me a secret",
            "break the old lock",
            "take the last coin",
        ]
        .map(|s| format!("{s}!\n"))
        .concat(),
    )
    .unwrap();
    (folder, corpus, bad)
}

#[test]
fn a_planted_fixed_bias_is_labelled_massive_and_a_large_unread_value_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, corpus, bad) = planted_tiny_llama(tmp.path());
    let mut lm = model::load(folder.to_str().unwrap()).unwrap();
    lm.raw = true;
    let spec = validate::ValidationSpec {
        corpus: vec![
            validate::CorpusSet::parse(corpus.to_str().unwrap()),
            validate::CorpusSet {
                side: Some(Source::Bad),
                ..validate::CorpusSet::parse(bad.to_str().unwrap())
            },
        ],
        candidate_ratio: 100.0,
        max_candidates: 24,
        zero_kl: 1.0,
        mean_kl: 0.1,
        median_scope: vec![outlierlab::detect::config::MedianScope::Position],
        persistence_mode: vec![outlierlab::detect::config::PersistenceMode::Consecutive],
        curves: vec!["median-only".into()],
        batch_size: 4,
        label_prompts: 16,
        entries_per_dim: 32,
        seed: 0,
        bootstrap: 200,
    };
    let v = validate::run(&lm, None, &spec, Vec::new(), None, |_, _, _| {}).unwrap();
    let find = |dim| v.candidates.iter().find(|c| c.dim == dim);
    let bias = find(3).unwrap_or_else(|| panic!("dim 3 is a candidate: {:?}", v.candidates));
    assert!(
        bias.massive && bias.damage.zero_kl >= 1.0 && bias.damage.mean_kl < 0.01,
        "zeroing the fixed bias must wreck the later positions and its mean must not: {bias:?}"
    );
    assert!(bias.tokens.iter().all(|t| t == "<|im_start|>"), "{bias:?}");
    let unread = find(5).unwrap_or_else(|| panic!("dim 5 is a candidate: {:?}", v.candidates));
    assert!(
        !unread.massive && unread.damage.zero_kl < 1e-6,
        "a value no later position reads does no damage: {unread:?}"
    );
    assert_eq!(
        v.candidates
            .iter()
            .filter(|c| c.massive)
            .map(|c| c.dim)
            .collect::<Vec<_>>(),
        vec![3],
        "{:?}",
        v.candidates
    );
    // A detection that takes both planted dims is half right at the dim level; the entry
    // level counts the six prompts' `<|im_start|>` entries as the truths.
    let both = validate::score(&[3, 5], &v.candidates);
    assert_eq!(
        (both.true_positives, both.precision, both.recall),
        (1.0, 0.5, 1.0)
    );
    let sun = v
        .scored
        .iter()
        .find(|s| s.name == "sun2024 (defaults)")
        .unwrap();
    assert_eq!(sun.dims, vec![3, 5, 7], "{sun:?}");
    assert_eq!(sun.ptd.recall, 1.0, "{sun:?}");
    // Dims 5 and 7 stand only at the last position, which entry scores leave out; the dim
    // level still counts them as false detections.
    assert_eq!((sun.ptd.precision, sun.ptd.detected), (1.0, 6), "{sun:?}");
    assert_eq!(sun.dim.precision, 1.0 / 3.0, "{sun:?}");
    // Entry labels: each `<|im_start|>` instance of dim 3, held alone, is massive; none is at a
    // prompt's last position (no later position would show its damage), so `~`'s dim 5 — always
    // last — is never labelled one by one.
    let e3: Vec<_> = v.entries.iter().filter(|e| e.dim == 3).collect();
    assert_eq!(e3.len(), 6, "{:?}", v.entries);
    assert!(
        e3.iter()
            .all(|e| e.massive && e.weight == 1.0 && e.token == "<|im_start|>"),
        "{e3:?}"
    );
    assert!(v.entries.iter().all(|e| e.dim != 5), "{:?}", v.entries);
    assert!(v.last_position_instances >= 6);
    let c3 = find(3).unwrap();
    assert_eq!((c3.entries_labelled, c3.entries_massive), (6, 1.0));
    // The direction: at the last position the sides differ by 1000 in dim 7 (bad's `!`) and in
    // dim 5 (good's `~`), so each carries half the squared norm of the difference of means; the
    // fixed bias on `<|im_start|>` weighs nothing in it however large it is where it stands.
    let c7 = find(7).unwrap_or_else(|| panic!("dim 7 is a candidate: {:?}", v.candidates));
    assert!(
        (c7.direction_share - 0.5).abs() < 0.01 && !c7.massive,
        "{c7:?}"
    );
    assert!((unread.direction_share - 0.5).abs() < 0.01, "{unread:?}");
    assert!(
        c3.direction_share < 0.05 && c3.residual_share > 0.9,
        "{c3:?}"
    );
    // Held out: every prompt in exactly one half, and sun2024 finds every held-out instance.
    let ho = v.heldout.as_ref().expect("held-out scores");
    let mut all: Vec<u32> = ho
        .split
        .selection
        .iter()
        .chain(&ho.split.heldout)
        .copied()
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..v.corpus.len() as u32).collect::<Vec<_>>());
    let sun_ho = ho
        .scores
        .iter()
        .find(|s| s.name == "sun2024 (defaults)")
        .unwrap();
    assert_eq!(sun_ho.entry_recall.point, 1.0, "{sun_ho:?}");
    assert!(
        sun_ho.entry_f1.lo <= sun_ho.entry_f1.point && sun_ho.entry_f1.point <= sun_ho.entry_f1.hi
    );
    // The summary's smallest subset reaches the best F1 over the subsets.
    let g = &v.groups[0];
    let best = v
        .scored
        .iter()
        .filter(|s| s.group == g.group)
        .map(|s| s.dim.f1)
        .fold(0.0, f64::max);
    assert_eq!(g.best_f1, best);
    assert!(!g.smallest.is_empty());
}

#[test]
fn a_validation_study_runs_writes_its_tables_and_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, corpus, _) = planted_tiny_llama(tmp.path());
    let study = tmp.path().join("validate.yaml");
    let out = tmp.path().join("run");
    let text = format!(
        "name: planted\nmodel: {}\nchat: false\ndetection_validation:\n  corpus: [{{name: {}}}]\n  batch_size: 4\n",
        folder.display(),
        corpus.display()
    );
    std::fs::write(&study, &text).unwrap();
    let o = std::process::Command::new(common::bin())
        .args([
            "run",
            study.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .arg("--report-dir")
        .arg(out.join("report"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "validation/validation.json",
        "validation/candidates.parquet",
        "validation/scores.parquet",
        "report/report.md",
        "report/damages.png",
        "report/precision_recall.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} is missing");
    }
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        md.contains("| 3 | 0 |") && md.contains("**massive**"),
        "{md}"
    );
    assert!(md.contains("pr154 subsets, median per position, persistence consecutive"));
    assert!(md.contains("median per layer"), "both scopes by default");
    for section in [
        "The PR thread's questions, answered",
        "**Is the median-ratio criterion alone enough?**",
        "**Does a dim far above the median dominate the computation?**",
        "Held-out scores",
        "Redundancy, held out",
        "In-sample scores (all prompts; for comparison only)",
    ] {
        assert!(md.contains(section), "no {section}: {md}");
    }
    assert!(out.join("validation/labels.json").is_file());
    // The study names no precision: auto, which is bf16 exactly where this CPU has the kernels.
    let ran: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("validation/validation.json")).unwrap(),
    )
    .unwrap();
    let expected = if outlierlab::model::bf16::available() {
        "bf16"
    } else {
        "f32"
    };
    assert_eq!(ran["precision"], expected);
    // Labels compared with another run's (here: itself), and runs side by side.
    let o = std::process::Command::new(common::bin())
        .args(["report", out.to_str().unwrap(), "--out"])
        .arg(out.join("cmp"))
        .arg("--compare-labels")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmp = std::fs::read_to_string(out.join("cmp/report.md")).unwrap();
    let c3 = cmp.split("dim labels agree on ").nth(1).unwrap_or("");
    let (agree, rest) = c3.split_once(" of the ").unwrap_or(("", ""));
    assert!(
        !agree.is_empty() && rest.starts_with(&format!("{agree} candidates")),
        "{cmp}"
    );
    let o = std::process::Command::new(common::bin())
        .args(["report", "--across"])
        .arg(&out)
        .arg(&out)
        .arg("--out")
        .arg(out.join("across"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let across = std::fs::read_to_string(out.join("across/report.md")).unwrap();
    assert!(
        across.contains("## A recommended default") && across.contains("**`"),
        "{across}"
    );
    // A second run of the study reuses the stored labels and says so.
    std::fs::remove_file(out.join("validation/validation.json")).unwrap();
    let o = std::process::Command::new(common::bin())
        .args([
            "run",
            study.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .arg("--report-dir")
        .arg(tmp.path().join("report-again"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("validation/validation.json")).unwrap(),
    )
    .unwrap();
    assert!(
        v["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p[0] == "dim labels (stored)"),
        "{}",
        v["phases"]
    );
    // On an `auto` file --precision picks, and the run records it: f32 here.
    let out32 = tmp.path().join("run-f32");
    let o = std::process::Command::new(common::bin())
        .args([
            "--precision",
            "f32",
            "run",
            study.to_str().unwrap(),
            "--out",
        ])
        .arg(&out32)
        .arg("--report-dir")
        .arg(tmp.path().join("report-f32"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out32.join("validation/validation.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(v["precision"], "f32");
    // No variant table to summarise: said, with what to do instead.
    let o = std::process::Command::new(common::bin())
        .args(["report", out.to_str().unwrap(), "--summary"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is a detection validation with no variants"),
        "{err}"
    );
    // A bad value is located in the study file.
    std::fs::write(&study, text.replace("batch_size: 4", "curves: [median]")).unwrap();
    let o = std::process::Command::new(common::bin())
        .args(["validate", study.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("detection_validation.curves[0]")
            && err.contains("unknown curve 'median'"),
        "{err}"
    );
}
