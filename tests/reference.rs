//! The runtime against values computed by Hugging Face transformers on the same dequantised
//! weights (tests/fixtures/reference/*-public.json).

mod common;

use candle_core::{IndexOp, D};
use common::*;
use outlierlab::model::generate::{self, GenerateOptions};
use outlierlab::model::{self, Batch, HiddenConvention, Logits};

fn check_against_reference(alias: &str, fixture_name: &str) {
    let fx = fixture(fixture_name);
    assert_eq!(fx["meta"]["model"].as_str(), Some(alias));
    let mut lm = model::load(alias).expect("model loads");
    let l = lm.model.num_layers();
    for case in fx["cases"].as_array().unwrap() {
        // A base model's case is raw text (BOS + text); the others are chat turns.
        let (user, enc) = match case["text"].as_str() {
            Some(text) => {
                lm.raw = true;
                (text, lm.encode_chat(None, text).unwrap())
            }
            None => {
                let user = case["user"].as_str().unwrap();
                let enc = lm.encode_chat(case["system"].as_str(), user).unwrap();
                assert_eq!(
                    enc.rendered,
                    case["rendered"].as_str().unwrap(),
                    "rendered chat text for {user:?}"
                );
                (user, enc)
            }
        };
        assert_eq!(
            enc.ids,
            as_u32s(&case["input_ids"]),
            "input ids for {user:?}"
        );

        let batch = Batch::left_padded(std::slice::from_ref(&enc.ids), lm.tokenizer.pad_id);
        let out = lm.model.forward(&batch, true, Logits::Last).unwrap();
        let logits: Vec<f32> = out
            .logits
            .as_ref()
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top10: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
        assert_eq!(
            top10,
            as_u32s(&case["top10_ids"]),
            "top-10 next tokens for {user:?}"
        );
        for (i, want) in as_f32s(&case["top10_logits"]).iter().enumerate() {
            let got = logits[top10[i] as usize];
            assert!(
                (got - want).abs() <= 1e-2,
                "{user:?}: logit of token {} is {got}, reference {want}",
                top10[i]
            );
        }

        let hs = out.hidden_states(HiddenConvention::Transformers);
        assert_eq!(hs.len(), l + 1);
        let refs = case["hidden_states"].as_array().unwrap();
        assert_eq!(refs.len(), l + 1);
        let t = enc.ids.len();
        for (i, r) in refs.iter().enumerate() {
            let last = hs[i].i((0, t - 1)).unwrap();
            let norm = last
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let want = r["last_norm"].as_f64().unwrap() as f32;
            assert!(
                ((norm - want) / want).abs() <= 1e-3,
                "{user:?}: hidden state {i} last-position norm {norm}, reference {want}"
            );
            let first8: Vec<f32> = last.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
            for (g, w) in first8.iter().zip(as_f32s(&r["last_first8"])) {
                assert!(
                    (g - w).abs() <= 1e-3 * want.max(1.0),
                    "{user:?}: layer {i} component {g} vs {w}"
                );
            }
            let abs = hs[i].i(0).unwrap().abs().unwrap();
            let max_abs = abs
                .max_keepdim(D::Minus1)
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let want_max = r["max_abs"].as_f64().unwrap() as f32;
            assert!(
                ((max_abs - want_max) / want_max).abs() <= 1e-3,
                "{user:?}: layer {i} max |h| {max_abs} vs {want_max}"
            );
        }
        // The residual convention differs from transformers' only in the last entry.
        let raw = out.hidden_states(HiddenConvention::Residual);
        let diff = (&raw[l] - &hs[l])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff > 1e-3,
            "raw residual and post-norm last state should differ"
        );

        let opts = GenerateOptions {
            max_new_tokens: 24,
            stop_ids: lm.tokenizer.stop_ids.clone(),
            pad_id: lm.tokenizer.pad_id,
            use_cache: true,
        };
        let got = &generate::greedy(&lm.model, std::slice::from_ref(&enc.ids), &opts).unwrap()[0];
        let want = as_u32s(&case["greedy24"]);
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        // The reference stops at EOS, so a short reference must be matched whole.
        assert!(same >= 16.min(want.len()), "{user:?}: greedy continuation agrees for {same} tokens only\n got {got:?}\nwant {want:?}");
        if same == want.len() {
            assert_eq!(
                lm.tokenizer.decode(got).unwrap(),
                case["greedy24_text"].as_str().unwrap()
            );
        }
    }
}

#[test]
fn smollm2_matches_transformers() {
    check_against_reference("smollm2-135m-instruct", "smollm2-public.json");
}

#[test]
fn qwen05_matches_transformers() {
    check_against_reference("qwen2.5-coder-0.5b-instruct", "qwen05-public.json");
}

#[test]
fn gemma3_matches_transformers() {
    check_against_reference("gemma3-270m", "gemma3-270m-public.json");
}

#[test]
fn a_base_model_refuses_a_chat_template() {
    let lm = model::load("gemma3-270m").unwrap();
    let e = lm
        .encode_chat(Some("You are a helpful assistant."), "Hi")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no chat template") && e.contains("--raw"), "{e}");
}
