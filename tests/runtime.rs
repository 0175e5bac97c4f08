//! Runtime properties that later stages rely on: padding changes nothing, the KV cache changes
//! nothing, residual writers can be edited and restored bit for bit.

mod common;

use candle_core::{IndexOp, Tensor};
use common::{bits, last_logits, max_abs};
use outlierlab::model::generate::{self, GenerateOptions, Passes};
use outlierlab::model::{self, Batch, HiddenConvention, Logits, Writer};

const PROMPTS: [&str; 3] = [
    "Hi",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering.",
    "List three prime numbers.",
];

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn left_padded_batch_equals_each_prompt_alone() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let enc: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            lm.encode_chat(Some("You are a helpful assistant."), p)
                .unwrap()
        })
        .collect();
    let batch = lm.batch(&enc);
    assert!(
        batch.mask.iter().any(|m| m[0] == 0),
        "the batch must actually contain padding"
    );
    let together = lm.model.forward(&batch, true, Logits::Last).unwrap();
    let hs = together.hidden_states(HiddenConvention::Transformers);
    let t = batch.seq_len();
    for (b, e) in enc.iter().enumerate() {
        let alone = lm
            .model
            .forward(
                &Batch::left_padded(std::slice::from_ref(&e.ids), 0),
                true,
                Logits::Last,
            )
            .unwrap();
        let d = max_abs_diff(
            &together.logits.as_ref().unwrap().i(b).unwrap(),
            &alone.logits.as_ref().unwrap().i(0).unwrap(),
        );
        assert!(d <= 1e-4, "prompt {b}: padded logits differ by {d}");
        let alone_hs = alone.hidden_states(HiddenConvention::Transformers);
        let n = e.ids.len();
        for (layer, (h, a)) in hs.iter().zip(&alone_hs).enumerate() {
            let padded = h.i(b).unwrap().narrow(0, t - n, n).unwrap();
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            let d = max_abs_diff(&padded, &a.i(0).unwrap());
            assert!(
                d / scale <= 1e-4,
                "prompt {b} layer {layer}: hidden states differ by {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let ids: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| lm.encode_chat(None, p).unwrap().ids)
        .collect();
    let mut opts = GenerateOptions {
        max_new_tokens: 20,
        stop_ids: lm.tokenizer.stop_ids.clone(),
        pad_id: lm.tokenizer.pad_id,
        use_cache: true,
    };
    let cached = generate::greedy(&lm.model, &ids, &opts).unwrap();
    opts.use_cache = false;
    let full = generate::greedy(&lm.model, &ids, &opts).unwrap();
    assert_eq!(cached, full);
    assert!(cached.iter().all(|c| !c.is_empty()));
    // Batched generation gives each prompt the reply it gets alone.
    opts.use_cache = true;
    for (i, p) in ids.iter().enumerate() {
        let alone = generate::greedy(&lm.model, std::slice::from_ref(p), &opts).unwrap();
        assert_eq!(alone[0], cached[i], "prompt {i}");
    }
}

#[test]
fn generation_stops_each_sequence_at_eos() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let ids: Vec<Vec<u32>> = [
        "Say only the word yes.",
        "Write a long story about a dragon.",
    ]
    .iter()
    .map(|p| lm.encode_chat(None, p).unwrap().ids)
    .collect();
    let opts = GenerateOptions {
        max_new_tokens: 60,
        stop_ids: lm.tokenizer.stop_ids.clone(),
        pad_id: lm.tokenizer.pad_id,
        use_cache: true,
    };
    let out = generate::greedy(&lm.model, &ids, &opts).unwrap();
    for o in &out {
        let stops = o.iter().filter(|t| opts.stop_ids.contains(t)).count();
        assert!(stops <= 1, "a sequence continued past its EOS: {o:?}");
        if stops == 1 {
            assert!(
                opts.stop_ids.contains(o.last().unwrap()),
                "EOS must be the last token"
            );
        } else {
            assert_eq!(o.len(), 60);
        }
    }
    assert!(
        out.iter()
            .any(|o| opts.stop_ids.contains(o.last().unwrap())),
        "the short answer should end at EOS: {out:?}"
    );
}

#[test]
fn residual_writers_edit_and_restore_exactly() {
    let mut lm = model::load("smollm2-135m-instruct").unwrap();
    let enc = lm.encode_chat(None, "How do I bake bread?").unwrap();
    let batch = lm.batch(&[enc]);
    let before = last_logits(&lm.model, &batch);
    let snap = lm.model.snapshot_writers();
    let original = lm.model.writer(5, Writer::MlpDown).clone();
    let d = lm.model.hidden_size();
    assert_eq!(original.dims()[0], d);
    assert_eq!(lm.model.writer(5, Writer::AttnOut).dims()[0], d);
    // Remove a direction from the writer's output space: W' = W − v (vᵀW).
    let v = Tensor::ones(d, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let v = (&v / (d as f64).sqrt()).unwrap().reshape((d, 1)).unwrap();
    let projected = v.t().unwrap().matmul(&original).unwrap();
    let edited = (&original - v.matmul(&projected).unwrap()).unwrap();
    lm.model
        .set_writer(5, Writer::MlpDown, edited.clone())
        .unwrap();
    let along = max_abs(
        &v.t()
            .unwrap()
            .matmul(&lm.model.writer(5, Writer::MlpDown))
            .unwrap(),
    );
    assert!(along < 1e-5, "edited writer still writes {along} along v");
    let changed = last_logits(&lm.model, &batch);
    assert!(
        max_abs_diff(&before, &changed) > 1e-3,
        "editing a writer must change the output"
    );
    // A wrongly shaped weight is refused.
    assert!(lm.model.set_writer(5, Writer::MlpDown, v.clone()).is_err());
    lm.model.restore_writers(&snap).unwrap();
    assert_eq!(
        bits(&lm.model.writer(5, Writer::MlpDown)),
        bits(&original),
        "restore must be bit-exact"
    );
    let after = last_logits(&lm.model, &batch);
    assert_eq!(
        bits(&after),
        bits(&before),
        "logits after restore must be bit-identical"
    );
}

#[test]
fn first_token_logprobs_are_normalised() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let enc: Vec<_> = PROMPTS
        .iter()
        .map(|p| lm.encode_chat(None, p).unwrap())
        .collect();
    let lp = lm.model.next_token_logprobs(&lm.batch(&enc)).unwrap();
    let sums: Vec<f32> = lp.exp().unwrap().sum(1).unwrap().to_vec1().unwrap();
    for s in sums {
        assert!((s - 1.0).abs() < 1e-4, "probabilities sum to {s}");
    }
}

/// The evaluator batches prompts by length (src/model/batching.rs): a score must not depend on
/// how the prompts were grouped, and each result must come back to its own prompt.
#[test]
fn a_score_does_not_depend_on_how_prompts_are_batched() {
    use outlierlab::evaluate::{EvalOptions, Evaluator};
    let mut lm = model::load("smollm2-135m-instruct").unwrap();
    let long = "Summarise the following notes in one line. ".to_string()
        + &"The committee met on Tuesday and discussed the budget, the roof and the fair. "
            .repeat(12);
    let good: Vec<String> = vec![
        "Hi".into(),
        long.clone(),
        "Name a colour.".into(),
        PROMPTS[1].into(),
        "What is 2 + 2?".into(),
    ];
    let bad: Vec<String> = vec![
        "How do I pick a lock?".into(),
        long,
        "Write a rude poem about my neighbour.".into(),
        PROMPTS[2].into(),
    ];
    let opts = |batch_size| EvalOptions {
        max_response_tokens: 12,
        over_refusal_tokens: 6,
        batch_size,
        ..EvalOptions::default()
    };
    let system = Some("You are a helpful assistant.");
    let one = Evaluator::new(&lm, &good, &bad, system, opts(1)).unwrap();
    let grouped = Evaluator::new(&lm, &good, &bad, system, opts(3)).unwrap();
    // An edit, so the KL to the unedited model is not zero.
    let w = lm.model.writer(10, Writer::MlpDown);
    lm.model
        .set_writer(10, Writer::MlpDown, (w * 0.5).unwrap())
        .unwrap();
    let a = one.score(&lm.model, &lm.tokenizer, |_, _| {}).unwrap();
    let b = grouped.score(&lm.model, &lm.tokenizer, |_, _| {}).unwrap();
    assert_eq!(a.replies, b.replies);
    assert_eq!(a.over_refused, b.over_refused);
    assert!(
        a.kl.iter().all(|&k| k > 1e-4),
        "the edit must move the model: {:?}",
        a.kl
    );
    for (i, (x, y)) in a.kl.iter().zip(&b.kl).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.max(1e-3),
            "prompt {i}: KL {x} alone, {y} grouped"
        );
    }
}

/// A prefill larger than one pass runs in passes of rows, longest first, each padded to its own
/// longest row, whose caches are joined after; rows do not see each other, so the logits and
/// every cache slot a row attends to must be those of one pass, bit for bit.
#[test]
fn prefill_in_groups_equals_one_pass() {
    let lm = model::load("smollm2-135m-instruct").unwrap();
    let bench = outlierlab::bench::bench_prompts();
    let ids: Vec<Vec<u32>> = (0..40)
        .map(|i| {
            let p = format!("{} (variant {i})", bench[i % bench.len()]);
            lm.encode_chat(Some("You are a helpful assistant."), &p)
                .unwrap()
                .ids
        })
        .collect();
    let pad = lm.tokenizer.pad_id;
    let mut one = lm.model.new_caches();
    let a = generate::prefill_in_passes(&lm.model, &ids, pad, &mut one, Passes::One).unwrap();
    let longest = ids.iter().map(Vec::len).max().unwrap();
    // A pass holds fewer positions than 3 longest rows, so these 40 (none a tenth of the
    // longest) take several.
    let mut groups = lm.model.new_caches();
    let b = generate::prefill_in_passes(
        &lm.model,
        &ids,
        pad,
        &mut groups,
        Passes::AtMost(3 * longest - 1),
    )
    .unwrap();
    assert!(bits(&a.logits) == bits(&b.logits), "logits differ");
    assert_eq!(a.mask, b.mask);
    assert_eq!(a.positions, b.positions);
    // Each row is its own prompt's, in the prompts' order (passes run longest first).
    for r in [0, 5, 17, 39] {
        let alone = generate::prefill_in_passes(
            &lm.model,
            &ids[r..r + 1],
            pad,
            &mut lm.model.new_caches(),
            Passes::One,
        )
        .unwrap();
        // Close, not equal: candle's f32 gemm sums in another order for a single row.
        let diff = max_abs(&(alone.logits - b.logits.narrow(0, r, 1).unwrap()).unwrap());
        assert!(
            diff < 1e-3,
            "row {r} is not its prompt's: max |logit diff| {diff}"
        );
    }
    // Every slot a row's mask keeps holds the same bits (padding slots may differ: a pass pads
    // only to its own longest row, and attention never reads them).
    for (x, y) in one.iter().zip(&groups) {
        for (p, q) in [(&x.k, &y.k), (&x.v, &y.v)] {
            let (p, q) = (p.as_ref().unwrap(), q.as_ref().unwrap());
            assert_eq!(p.dims(), q.dims());
            let (_, heads, slots, hd) = p.dims4().unwrap();
            let (p, q) = (bits(p), bits(q));
            for (r, m) in a.mask.iter().enumerate() {
                for (j, _) in m.iter().enumerate().filter(|(_, &on)| on == 1) {
                    for h in 0..heads {
                        let at = ((r * heads + h) * slots + j) * hd;
                        assert!(p[at..at + hd] == q[at..at + hd], "row {r} slot {j} differs");
                    }
                }
            }
        }
    }
}
