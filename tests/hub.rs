//! The `hf:ORG/NAME[@REVISION]` route, against a local HTTP server that speaks the part of the
//! Hub protocol hf-hub uses (repo info, ranged file downloads with etag and commit headers).

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` as repo `test-org/tiny-llama` at revision `main`; returns the port and a
/// counter of file requests.
fn serve(files: HashMap<String, Vec<u8>>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let v = v.trim().to_string();
                    let (a, b) = v.split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                }
            }
            let (status, headers, body): (&str, Vec<(String, String)>, Vec<u8>) =
                if path == "/api/models/test-org/tiny-llama/revision/main" {
                    let siblings: Vec<_> = files
                        .keys()
                        .map(|k| serde_json::json!({"rfilename": k}))
                        .collect();
                    let body = serde_json::json!({"siblings": siblings, "sha": COMMIT}).to_string();
                    (
                        "200 OK",
                        vec![("Content-Type".into(), "application/json".into())],
                        body.into_bytes(),
                    )
                } else if let Some(name) = path.strip_prefix("/test-org/tiny-llama/resolve/main/") {
                    match files.get(name) {
                        Some(data) => {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let (a, b) = range.unwrap_or((0, None));
                            let end = b.map_or(data.len(), |b| (b + 1).min(data.len()));
                            let etag = format!("\"etag-{name}-{}\"", data.len());
                            (
                                "206 Partial Content",
                                vec![
                                    ("ETag".into(), etag),
                                    ("X-Repo-Commit".into(), COMMIT.into()),
                                    (
                                        "Content-Range".into(),
                                        format!("bytes {a}-{}/{}", end - 1, data.len()),
                                    ),
                                ],
                                data[a..end].to_vec(),
                            )
                        }
                        None => ("404 Not Found", vec![], b"not found".to_vec()),
                    }
                } else {
                    ("404 Not Found", vec![], b"not found".to_vec())
                };
            let mut resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            let _ = stream.write_all(resp.as_bytes());
            let _ = stream.write_all(&body);
            let _ = reader.read(&mut [0u8; 0]);
        }
    });
    (port, hits)
}

fn generate(model: &str, envs: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args([
        "generate",
        "--model",
        model,
        "--max-new-tokens",
        "5",
        "--json",
        "hello there",
        "abc",
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn hub_route_downloads_and_runs_the_same_model_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("tiny");
    write_tiny_llama(&folder);
    let mut files = HashMap::new();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.insert(name.to_string(), std::fs::read(folder.join(name)).unwrap());
    }
    let (port, hits) = serve(files);
    let hf_home = tmp.path().join("hf-home");
    let envs = [
        ("HF_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("HF_HOME", hf_home.display().to_string()),
    ];
    let via_hub = generate("hf:test-org/tiny-llama", &envs);
    assert!(
        via_hub.status.success(),
        "hub route failed: {}",
        String::from_utf8_lossy(&via_hub.stderr)
    );
    assert!(
        hits.load(Ordering::SeqCst) >= 4,
        "every file must come from the server"
    );
    assert!(
        hf_home.join("hub/models--test-org--tiny-llama").is_dir(),
        "files land in HF_HOME's cache"
    );
    let local = generate(folder.to_str().unwrap(), &[]);
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&via_hub.stdout),
        String::from_utf8_lossy(&local.stdout)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&local.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        for key in ["prompt", "rendered", "input_ids", "output_ids", "reply"] {
            assert!(l.get(key).is_some(), "missing {key} in {l}");
        }
        assert!(l["rendered"]
            .as_str()
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
        assert!(!l["output_ids"].as_array().unwrap().is_empty());
    }
    // An explicit revision that the server does not know is an error naming the model.
    let bad_rev = generate("hf:test-org/tiny-llama@nope", &envs);
    assert!(!bad_rev.status.success());
    let err = String::from_utf8_lossy(&bad_rev.stderr);
    assert!(err.contains("test-org/tiny-llama@nope"), "{err}");
}

#[test]
fn unreachable_hub_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = generate(
        "hf:some-org/some-model",
        &[
            ("HF_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("HF_HOME", tmp.path().display().to_string()),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the Hugging Face Hub"), "{err}");
}
