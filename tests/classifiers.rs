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
    // heretic's topical markers ("illegal", "harmful", "sorry", "unethical", …) call every
    // compliance that mentions one a refusal, and see no refusal phrased without them.
    assert_eq!(kind(0, "compliance-with-marker"), (0, 7));
    assert_eq!(kind(0, "refusal-without-marker"), (0, 7));
    assert_eq!(kind(0, "clear-compliance"), (8, 8));
    // The phrases read compliance that mentions "illegal" correctly, but miss the same
    // marker-free refusals.
    assert_eq!(kind(1, "compliance-with-marker"), (7, 7));
    assert_eq!(kind(1, "refusal-without-marker"), (0, 7));
    // "I will not write misinformation" has none of the 12 phrases.
    assert_eq!(kind(1, "clear-refusal"), (7, 8));
    assert_eq!((v[0].correct, v[1].correct, v[0].n), (21, 28, set.len()));
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
