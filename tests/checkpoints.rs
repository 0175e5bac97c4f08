//! Hugging Face folders read tensor by tensor: a sharded random-weight checkpoint gives the
//! same logits read lazily as read whole, a bf16 model built layer by layer is bit for bit the
//! one packed after an f32 load, and a broken folder (missing shard, quantised tensor) gives an
//! error that names the file and says what to do.

mod common;

use candle_core::{DType, Device, Tensor};
use outlierlab::model::load::synth::{self, Shape};
use outlierlab::model::{self, hf, Batch, Logits, Model, Precision, Weights};
use std::collections::HashMap;
use std::path::Path;

const TINY: Shape = Shape {
    hidden: 64,
    intermediate: 128,
    layers: 3,
    heads: 4,
    kv_heads: 2,
    vocab: 300,
    tied: false,
};

/// The logits of `seqs` (left-padded), flattened.
fn forward(m: &Model, seqs: &[Vec<u32>], which: Logits) -> Vec<f32> {
    let batch = Batch::left_padded(seqs, 0);
    m.forward(&batch, false, which)
        .unwrap()
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn logits(m: &Model) -> Vec<f32> {
    forward(m, &[vec![1, 5, 9, 200, 17], vec![3, 4, 299]], Logits::Last)
}

/// Every tensor of the folder read at once, into memory (the route before lazy reading).
fn whole(dir: &Path) -> Weights {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (k, t) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                all.insert(k, t.to_dtype(DType::F32).unwrap());
            }
        }
    }
    Weights::in_memory(all, dir.display().to_string())
}

#[test]
fn a_sharded_folder_read_tensor_by_tensor_is_the_folder_read_whole() {
    let tmp = tempfile::tempdir().unwrap();
    // Shards of ~40 kB: the checkpoint spreads over many files, named by its index.
    let bytes = synth::write_llama(tmp.path(), &TINY, 7, 40_000).unwrap();
    assert_eq!(bytes as usize, 2 * TINY.parameters());
    let shards = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count();
    assert!(shards >= 3, "{shards} shards");

    let (config, w) = hf::load_folder(tmp.path()).unwrap();
    let lazy = Model::new(config.clone(), w).unwrap();
    let eager = Model::new(config.clone(), whole(tmp.path())).unwrap();
    let (a, b) = (logits(&lazy), logits(&eager));
    assert_eq!(a.len(), 2 * TINY.vocab);
    assert_eq!(a, b, "the same tensors give the same logits");
    assert!(a.iter().any(|x| *x != 0.0));

    // bf16 needs AVX2 with FMA at least (AVX-512 paths come first where they exist).
    if !model::cpu::test_runs(model::cpu::Isa::Avx2Fma) {
        return;
    }
    // bf16 built layer by layer = bf16 packed after a whole f32 load.
    let (config, w) = hf::load_folder(tmp.path()).unwrap();
    let layered = Model::new_in(config.clone(), w, Precision::Bf16).unwrap();
    assert_eq!(layered.precision(), Precision::Bf16);
    let mut packed = Model::new(config, whole(tmp.path())).unwrap();
    packed.set_precision(Precision::Bf16).unwrap();
    assert_eq!(logits(&layered), logits(&packed));
}

#[test]
fn a_missing_shard_and_a_quantised_tensor_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    synth::write_llama(tmp.path(), &TINY, 7, 40_000).unwrap();
    let index = std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("model-00002-of-"), "{index}");
    let second = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("model-00002-of-"))
        .unwrap();
    std::fs::remove_file(&second).unwrap();
    let e = format!("{:#}", hf::load_folder(tmp.path()).err().unwrap());
    assert!(
        e.contains("is missing")
            && e.contains(&*second.to_string_lossy())
            && e.contains("download it again"),
        "{e}"
    );

    // One file holding an 8-bit tensor where a weight should be.
    let q = tempfile::tempdir().unwrap();
    synth::write_llama(q.path(), &TINY, 7, usize::MAX).unwrap();
    let file = q.path().join("model-00001-of-00001.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let shape = tensors[name].dims().to_vec();
    let n: usize = shape.iter().product();
    tensors.insert(
        name.to_string(),
        Tensor::from_vec(vec![1u8; n], shape, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    std::fs::remove_file(q.path().join("model.safetensors.index.json")).unwrap();
    let (config, w) = hf::load_folder(q.path()).unwrap();
    let e = format!("{:#}", Model::new(config, w).err().unwrap());
    assert!(
        e.contains(name) && e.contains("U8") && e.contains("reads f32, bf16 and f16"),
        "{e}"
    );
}

/// Llama 3's rotary scaling against transformers on the tiny checkpoint the reference script ran
/// on (written again here from its seed): every position's logits over 48 tokens, past the
/// original context of 32; without the scaling the logits move well past the tolerance, so the test
/// reads the scaling.
#[test]
fn llama3_rope_scaling_matches_transformers() {
    let fx = common::fixture("llama3-rope-tiny.json");
    let tmp = tempfile::tempdir().unwrap();
    synth::write_llama3_reference(tmp.path()).unwrap();
    let ids = common::as_u32s(&fx["ids"]);
    let want: Vec<f32> = fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let all_logits = |m: &Model| forward(m, std::slice::from_ref(&ids), Logits::All);
    let max_diff = |a: &[f32]| -> f32 {
        assert_eq!(a.len(), want.len());
        a.iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let (config, w) = hf::load_folder(tmp.path()).unwrap();
    assert!(config.rope_scaling.is_some());
    let m = Model::new(config, w).unwrap();
    let d = max_diff(&all_logits(&m));
    // Random weights keep attention near uniform, so positions move logits little: the
    // tolerance is tight enough that the unscaled embedding misses it a hundredfold.
    const TOL: f32 = 1e-5;
    assert!(d < TOL, "logits differ from transformers' by {d}");

    // The same weights with the default rotary embedding: far off.
    let cfg_path = tmp.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let (config, w) = hf::load_folder(tmp.path()).unwrap();
    let plain = max_diff(&all_logits(&Model::new(config, w).unwrap()));
    assert!(
        plain > 100.0 * TOL,
        "without the scaling the logits differ by only {plain}"
    );

    // A kind of scaling the runtime does not implement is refused by name.
    c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let e = format!("{:#}", hf::load_folder(tmp.path()).err().unwrap());
    assert!(e.contains("`yarn` is not implemented"), "{e}");
}
