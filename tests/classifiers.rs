//! Refusal classifiers on the project's labelled replies, and the judge's plumbing on both
//! tokenizers the tests have (prompt rendering, yes/no token ids, scores, cache).

use outlierlab::evaluate::classify::{
    self, answer_ids, judge_question, phrase_refusal, validation_set, Classifier, Judge,
};
use outlierlab::evaluate::RefusalClassifier;

#[test]
fn markers_and_phrases_on_the_labelled_replies() {
    let set = validation_set().unwrap();
    let v = classify::validate(
        &[Classifier::Heretic, Classifier::Phrases],
        &RefusalClassifier::default(),
        None,
        8,
    )
    .unwrap();
    let kind = |c: usize, k: &str| {
        v[c].by_kind
            .iter()
            .find(|x| x.0 == k)
            .map(|x| (x.1, x.2))
            .unwrap()
    };
    // The kinds are defined by whether heretic's topical markers ("illegal", "harmful", "sorry",
    // "unethical", …) flag a reply (datasets/refusal-judgements.md): they call every compliance
    // that mentions one a refusal, and see no refusal phrased without them.
    assert_eq!(kind(0, "compliance-with-marker"), (0, 21));
    assert_eq!(kind(0, "refusal-without-marker"), (0, 16));
    assert_eq!(kind(0, "deflection-with-marker"), (8, 8));
    assert_eq!(kind(0, "clear-compliance"), (34, 34));
    assert_eq!(kind(0, "partial-compliance"), (26, 26));
    // "I will not write misinformation" has no marker and none of the 12 phrases.
    assert_eq!(kind(0, "clear-refusal"), (47, 48));
    assert_eq!(kind(1, "clear-refusal"), (47, 48));
    // The phrases read most compliance that mentions "illegal" correctly (not one that opens
    // "As an AI language model" and one whose fake review says "I can't wait"), but miss the
    // same marker-free refusals and half the deflections that carry a marker.
    assert_eq!(kind(1, "compliance-with-marker"), (19, 21));
    assert_eq!(kind(1, "refusal-without-marker"), (0, 16));
    assert_eq!(kind(1, "deflection-with-marker"), (4, 8));
    assert_eq!((v[0].correct, v[1].correct, v[0].n), (115, 130, set.len()));
    for (x, l) in set.iter().zip(&v[1].labels) {
        assert_eq!(*l, phrase_refusal(&x.reply));
    }
}

#[test]
fn judge_plumbing_on_both_tokenizers() {
    for alias in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("judge.json");
        let mut j = Judge::load(
            alias,
            outlierlab::model::Precision::F32,
            0.5,
            Some(cache.clone()),
        )
        .unwrap();
        let (yes, no) = j.answer_tokens();
        assert!(!yes.is_empty() && !no.is_empty(), "{alias}");
        assert!(
            yes.iter().all(|y| !no.contains(y)),
            "{alias}: yes and no share a token"
        );
        // The rendered input holds the request and the reply, in the judge's own chat template,
        // and ends where the judge's answer starts.
        let lm = outlierlab::model::load(alias).unwrap();
        assert_eq!(answer_ids(&lm, "yes").unwrap(), yes.to_vec());
        let ids = j
            .encode("Bake a cake.", "Here is a recipe: flour, eggs.")
            .unwrap();
        let text = lm.tokenizer.decode(&ids).unwrap();
        assert!(
            text.contains("Bake a cake.") && text.contains("Here is a recipe"),
            "{text}"
        );
        assert!(
            ids == lm
                .encode_chat(
                    Some(classify::JUDGE_SYSTEM),
                    &judge_question("Bake a cake.", "Here is a recipe: flour, eggs.")
                )
                .unwrap()
                .ids
        );
        let rendered = lm
            .encode_chat(Some(classify::JUDGE_SYSTEM), "x")
            .unwrap()
            .rendered;
        assert!(
            rendered.trim_end().ends_with("assistant"),
            "{alias}: {rendered:?}"
        );
        // Scores are probabilities; a second call is answered from the cache, which is on disk.
        let pairs = [
            ("Bake a cake.", "I'm sorry, I can't help with that."),
            (
                "Bake a cake.",
                "Mix flour, eggs and sugar, then bake at 180 C.",
            ),
        ];
        let s = j.scores(&pairs, 4).unwrap();
        assert!(s.iter().all(|p| (0.0..=1.0).contains(p)), "{s:?}");
        assert_eq!(j.judged, 2);
        assert_eq!(j.scores(&pairs, 4).unwrap(), s);
        assert_eq!(j.judged, 2, "the second call is answered from the cache");
        let mut again =
            Judge::load(alias, outlierlab::model::Precision::F32, 0.5, Some(cache)).unwrap();
        assert_eq!(again.scores(&pairs, 4).unwrap(), s);
        assert_eq!(again.judged, 0, "the cache persists");
    }
}

/// The judge's inputs share their instructions, computed once per batch; that changes nothing
/// but the cost: the same P(refusal) as every row computed in full, in f32 and in bf16.
#[test]
fn the_judge_scores_the_same_with_its_instructions_computed_once() {
    use outlierlab::evaluate::classify::Route;
    use outlierlab::model::Precision;
    let set = validation_set().unwrap();
    // Short and long replies together, so the rows fall into passes of different lengths.
    let mut pick: Vec<&classify::Judged> = set.iter().step_by(9).collect();
    pick.sort_by_key(|x| x.reply.len());
    for precision in [Precision::F32, Precision::Bf16] {
        let j = Judge::load("smollm2-135m-instruct", precision, 0.5, None).unwrap();
        let ids: Vec<Vec<u32>> = pick
            .iter()
            .map(|x| j.encode(&x.prompt, &x.reply).unwrap())
            .collect();
        // The instructions come first: every input starts with the same tokens, past the
        // system prompt and the rules (over 100 tokens), and then differ.
        let common = ids[0]
            .iter()
            .zip(&ids[ids.len() - 1])
            .take_while(|(a, b)| a == b)
            .count();
        assert!(common > 100, "{common} tokens shared");
        assert!(common < ids[0].len().min(ids[ids.len() - 1].len()));
        let shared = j.p_refusal(&ids, Route::SharedPrefix).unwrap();
        let padded = j.p_refusal(&ids, Route::Padded).unwrap();
        let alone: Vec<f64> = ids
            .iter()
            .map(|r| j.p_refusal(std::slice::from_ref(r), Route::Padded).unwrap()[0])
            .collect();
        for ((s, p), a) in shared.iter().zip(&padded).zip(&alone) {
            assert!((0.0..=1.0).contains(s));
            assert!(
                (s - p).abs() < 1e-4 && (s - a).abs() < 1e-4,
                "{precision:?}: {s} {p} {a}"
            );
        }
        // A score that is not a constant: the replies are told apart.
        let (lo, hi) = shared
            .iter()
            .fold((1.0f64, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
        assert!(hi - lo > 0.05, "{precision:?}: every score in [{lo}, {hi}]");
    }
}
