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
    // The precision line a bf16 load prints is information, not part of the error.
    let lines: Vec<&str> = err
        .trim()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("bf16: vector paths"))
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
    // Complete metadata for a 1-layer model of width 32 with 64 tokens, so that the loader gets
    // as far as the tensors: a failure is then the tensor's, not the metadata's.
    let arch_v = Value::String(arch.to_string());
    let tokens = Value::Array((0..64).map(|i| Value::String(format!("t{i}"))).collect());
    let u = |x: u32| Value::U32(x);
    let (width, heads, ffn, blocks) = (u(32), u(4), u(64), u(1));
    let key = |k: &str| format!("{arch}.{k}");
    let keys = [
        key("embedding_length"),
        key("attention.head_count"),
        key("feed_forward_length"),
        key("block_count"),
    ];
    let meta: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch_v),
        ("tokenizer.ggml.tokens", &tokens),
        (&keys[0], &width),
        (&keys[1], &heads),
        (&keys[2], &ffn),
        (&keys[3], &blocks),
    ];
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
        "is neither a model alias (smollm2-135m-instruct",
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
    assert_one_line_error(
        &["generate", "--model", cut.to_str().unwrap(), "hi"],
        "is truncated or corrupt (tensor 'token_embd.weight')",
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
    assert_one_line_error(
        &["generate", "--model", p.to_str().unwrap(), "hi"],
        "tensor 'token_embd.weight' has type Q8_1, which outlierlab cannot dequantise",
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

/// A wheel built here, served by a package index on 127.0.0.1 that the test runs itself: pip's
/// download path end to end, with nothing from the network.
fn local_wheel() -> (Vec<u8>, String) {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opt = zip::write::SimpleFileOptions::default();
        let files = [
            ("tinyasset/data.txt", "the asset's bytes\n".to_string()),
            (
                "tinyasset-0.1.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: tinyasset\nVersion: 0.1.0\n".to_string(),
            ),
            (
                "tinyasset-0.1.0.dist-info/WHEEL",
                "Wheel-Version: 1.0\nGenerator: outlierlab-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
                    .to_string(),
            ),
            ("tinyasset-0.1.0.dist-info/RECORD", String::new()),
        ];
        for (name, body) in files {
            z.start_file(name, opt).unwrap();
            z.write_all(body.as_bytes()).unwrap();
        }
        z.finish().unwrap();
    }
    let bytes = buf.into_inner();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    (bytes, sha)
}

/// Serves a PEP 503 index with one wheel until the test ends; returns the index URL.
fn serve_index(wheel: Vec<u8>, sha: String) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    const NAME: &str = "tinyasset-0.1.0-py3-none-any.whl";
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&chunk[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, ctype, body): (&str, &str, Vec<u8>) = if path
                .starts_with("/simple/tinyasset")
            {
                let page = format!(
                    "<!DOCTYPE html><html><body><a href=\"/files/{NAME}#sha256={sha}\">{NAME}</a></body></html>"
                );
                ("200 OK", "text/html", page.into_bytes())
            } else if path == format!("/files/{NAME}") {
                ("200 OK", "application/octet-stream", wheel.clone())
            } else {
                ("404 Not Found", "text/plain", b"not here".to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://127.0.0.1:{port}/simple/")
}

#[test]
fn registry_download_is_verified_and_a_wrong_sha256_refused() {
    use outlierlab::assets::{ensure_in, Asset, Part};
    let (wheel, wheel_sha) = local_wheel();
    let member_sha = {
        use sha2::Digest;
        sha2::Sha256::digest(b"the asset's bytes\n")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let url = serve_index(wheel, wheel_sha.clone());
    // pip reads its index from the environment; this test binary's only pip user is this test.
    std::env::set_var("PIP_INDEX_URL", &url);
    std::env::set_var("PIP_FIND_LINKS", "");
    std::env::set_var("PIP_NO_CACHE_DIR", "1");
    let asset = |archive_sha: &str, sha: &str| Asset {
        alias: "tiny-as-a-model".into(),
        description: "test".into(),
        hub_id: "none".into(),
        file_name: "data.txt".into(),
        sha256: sha.into(),
        size_hint: 18,
        parts: vec![Part {
            requirement: "tinyasset==0.1.0".into(),
            archive: "tinyasset-0.1.0-py3-none-any.whl".into(),
            archive_sha256: archive_sha.into(),
            member: "tinyasset/data.txt".into(),
        }],
        provenance_note: "".into(),
    };
    // The right hashes: downloaded, checked, extracted into the cache.
    let tmp = tempfile::tempdir().unwrap();
    let path = ensure_in(&asset(&wheel_sha, &member_sha), tmp.path()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"the asset's bytes\n");
    // A wrong wheel hash: refused, naming the file, and nothing unverified lands in the cache.
    let tmp = tempfile::tempdir().unwrap();
    let wrong = "1".repeat(64);
    let err = format!(
        "{:#}",
        ensure_in(&asset(&wrong, &member_sha), tmp.path()).unwrap_err()
    );
    assert!(
        err.contains("tinyasset-0.1.0-py3-none-any.whl has sha256"),
        "{err}"
    );
    assert!(!tmp.path().join("data.txt").exists());
    // A wrong member hash: refused too.
    let tmp = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        ensure_in(&asset(&wheel_sha, &wrong), tmp.path()).unwrap_err()
    );
    assert!(err.contains("sha256"), "{err}");
    assert!(!tmp.path().join("data.txt").exists());
    // A requirement the index does not have: pip's own log, kept quiet on success, comes with
    // the error in full.
    let tmp = tempfile::tempdir().unwrap();
    let mut missing = asset(&wheel_sha, &member_sha);
    missing.parts[0].requirement = "tinyasset==9.9.9".into();
    let err = format!("{:#}", ensure_in(&missing, tmp.path()).unwrap_err());
    assert!(
        err.contains("`pip download tinyasset==9.9.9` failed")
            && err.contains("pip said:")
            && err.contains("No matching distribution found for tinyasset==9.9.9"),
        "{err}"
    );
}

#[test]
fn precision_flag_that_differs_from_the_study_file() {
    // smoke.yaml names f32 (its committed results ran in it); the refusal comes before any
    // model is loaded or any folder made.
    let study = concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/smoke.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_one_line_error(
        &["--precision", "bf16", "run", study, "--out", out.to_str().unwrap()],
        "runs in f32 (its `precision:`), and --precision asks for bf16; set `precision: bf16` (or auto)",
    );
    assert!(!out.exists(), "a refused run made its folder");
}
