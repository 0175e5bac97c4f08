//! Labels by intervention (src/detect/validate.rs): holding an entry changes nothing before it,
//! and on SmolLM2 the massive activation (dim 507 at the first token) is caught while a dim that
//! merely stands out is not.

use candle_core::IndexOp;
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
    let batch = Batch::left_padded(&[enc.ids.clone()], lm.tokenizer.pad_id);
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
    let earlier = (held.i((0, ..t - 1)).unwrap() - base.i((0, ..t - 1)).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(earlier, 0.0, "positions before the held one changed");
    let zero = Intervention::new((1, t, d), &[(0, t - 1)], 7, 5, vec![vec![0.0]]).unwrap();
    let moved = lm.model.forward_intervened(&batch, &zero).unwrap();
    let last = (moved.i((0, t - 1)).unwrap() - base.i((0, t - 1)).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
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
    assert!(c507.zero_kl > 5.0 && c507.mean_kl < 0.01, "{c507:?}");
    // Dim 247 stands out (> 100x its position's median) but is no fixed bias: holding it at
    // its mean hurts as much as zeroing it, so it is not labelled massive.
    let c247 = cands
        .iter()
        .find(|c| c.dim == 247)
        .expect("247 is a candidate");
    assert!(!c247.massive && c247.mean_kl > s.mean_kl, "{c247:?}");
    for c in &cands {
        assert_eq!(
            c.massive,
            c.zero_kl >= s.zero_kl && c.mean_kl <= s.mean_kl,
            "{c:?}"
        );
    }
    let sc = validate::score(&[507], &cands);
    assert_eq!((sc.true_positives, sc.precision), (1, 1.0));
    let sc = validate::score(&[247], &cands);
    assert_eq!(sc.true_positives, 0);
}
