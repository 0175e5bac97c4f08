//! Reports rendered from a stored run (tests/fixtures/run-tiny, made by `outlierlab run
//! tests/fixtures/run-tiny/study.yaml` on SmolLM2): the files, the tables' numbers against the
//! stored results, valid non-blank images, byte-identical re-rendering, and the page as a
//! browser shows it.

mod common;

use common::bin;
use outlierlab::study::rundir;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_run() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-tiny")
}

fn render(out: &Path) {
    let o = Command::new(bin())
        .args(["report", fixture_run().to_str().unwrap(), "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Decodes a PNG and returns (width, height, share of pixels that are not white, distinct colours).
fn png_stats(path: &Path) -> (u32, u32, f64, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bytes = &buf[..info.buffer_size()];
    let ch = info.color_type.samples();
    let px: Vec<&[u8]> = bytes.chunks(ch).collect();
    let non_white = px
        .iter()
        .filter(|p| p.iter().take(3).any(|c| *c < 250))
        .count();
    let colours: std::collections::HashSet<&[u8]> = px.iter().copied().collect();
    (
        info.width,
        info.height,
        non_white as f64 / px.len() as f64,
        colours.len(),
    )
}

#[test]
fn report_from_a_stored_run_has_every_file_number_and_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    render(&out);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();

    // Every figure the fixture allows, as PNG and SVG, referenced from both documents.
    for stem in [
        "refusal_vs_kl",
        "variants",
        "detection_heatmap",
        "layer_peaks",
        "criteria_overlap",
        "threshold_sweep",
        "tuning_trace",
    ] {
        let png = out.join(format!("{stem}.png"));
        let (w, h, ink, colours) = png_stats(&png);
        assert!(w >= 600 && h >= 300, "{stem}: {w}x{h}");
        assert!(
            ink > 0.01 && colours > 8,
            "{stem} looks blank: ink {ink}, {colours} colours"
        );
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<text"),
            "{stem}.svg"
        );
        assert!(
            md.contains(&format!("]({stem}.png)")),
            "{stem} not in report.md"
        );
        assert!(
            html.contains(&format!("src=\"{stem}.png\"")),
            "{stem} not in report.html"
        );
    }
    // Every image the page references exists beside it.
    for part in html.split("src=\"").skip(1) {
        let src = part.split('"').next().unwrap();
        assert!(
            out.join(src).is_file(),
            "report.html references missing {src}"
        );
    }
    assert!(html.contains("<table>") && html.contains("<h2>Criteria ablation</h2>"));

    // The tables' numbers are the stored results', read here from the raw JSON files (not
    // through the code that wrote or renders them): plan.json names each variant, the
    // assignments map it to a score file, the score file holds its per-prompt outcome.
    let raw = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture_run().join(p)).unwrap()).unwrap()
    };
    let plan = raw("plan.json");
    let assignments = raw("assignments.json");
    let outcome_of = |name: &str| -> Option<(usize, usize, f64)> {
        let id = plan["variants"]
            .as_array()?
            .iter()
            .find(|v| v["variant"]["name"] == name)?["id"]
            .as_str()?
            .to_string();
        let key = assignments
            .as_array()?
            .iter()
            .find(|a| a["variant_id"] == id.as_str())?["key"]
            .as_str()?
            .to_string();
        let rec = raw(&format!("results/r0/{key}.json"));
        let refused = rec["outcome"]["refused"].as_array()?;
        let kl: Vec<f64> = rec["outcome"]["kl"]
            .as_array()?
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        Some((
            refused.iter().filter(|x| x.as_bool() == Some(true)).count(),
            refused.len(),
            kl.iter().sum::<f64>() / kl.len() as f64,
        ))
    };
    let names: Vec<String> = plan["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["variant"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut checked = 0;
    for name in &names {
        let Some((k, n, kl)) = outcome_of(name) else {
            continue;
        };
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {name}"));
        assert!(line.contains(&format!("{k}/{n} (")), "{line} vs {k}/{n}");
        assert!(line.contains(&format!("| {kl:.3} [")), "{line} vs KL {kl}");
        checked += 1;
    }
    assert!(checked >= 3, "rows checked: {checked}");
    // Each verdict row's differences are the raw differences of the two arms it names.
    let verdict_rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| A")).collect();
    assert_eq!(
        verdict_rows.len(),
        3,
        "none, winsorize and the [507] arm: 3 distinct comparisons"
    );
    for row in &verdict_rows {
        let cells: Vec<&str> = row.split(" | ").collect();
        let first_name = |cell: &str| {
            let after = cell
                .trim_start_matches('|')
                .trim()
                .split_once(": ")
                .unwrap()
                .1;
            after
                .split(", ")
                .next()
                .unwrap()
                .split(" (+")
                .next()
                .unwrap()
                .to_string()
        };
        let (v, r) = (first_name(cells[0]), first_name(cells[1]));
        let (kv, nv, klv) = outcome_of(&v).unwrap();
        let (kr, _, klr) = outcome_of(&r).unwrap();
        let d_ref = 100.0 * (kv as f64 - kr as f64) / nv as f64;
        assert!(
            cells[2].starts_with(&format!("{d_ref:+.1} [")),
            "{v} vs {r}: refusals cell {} vs {d_ref:+.1}",
            cells[2]
        );
        assert!(
            cells[6].starts_with(&format!("{:+.4} [", klv - klr)),
            "{v} vs {r}: KL cell {} vs {:+.4}",
            cells[6],
            klv - klr
        );
    }
    assert!(md.contains("3 distinct comparisons between 3 distinct scores"));
    let r = rundir::read_results(&fixture_run()).unwrap();
    let t = &r.tunes[0];
    let tune_line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {} | {} |", t.name, t.replicate)))
        .expect("a tuning row");
    assert!(
        tune_line.contains(&format!("{:.4}", t.objective)),
        "{tune_line}"
    );
    assert!(md.contains("### Criterion importance"));
    for c in ["min_abs", "persistence"] {
        assert!(
            md.lines().any(|l| l.starts_with(&format!("| {c} | "))),
            "{c}"
        );
    }

    // Rendering the same results again gives the same bytes.
    let again = tmp.path().join("b");
    render(&again);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for n in &names {
        assert_eq!(
            std::fs::read(out.join(n)).unwrap(),
            std::fs::read(again.join(n)).unwrap(),
            "{n} differs between two renderings"
        );
    }
}

/// A free local port for chromedriver.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post(url: &str, body: serde_json::Value) -> serde_json::Value {
    let resp = ureq::post(url)
        .send_json(body)
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    resp.into_json().unwrap()
}

/// A run folder renders from its stored results alone, even when the prompt files its study
/// named are gone (a run copied to another machine).
#[test]
fn a_moved_run_renders_without_its_prompt_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("moved");
    let status = Command::new("cp")
        .args(["-r", fixture_run().to_str().unwrap(), run.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let y = std::fs::read_to_string(run.join("study.yaml")).unwrap();
    let moved = y.replacen(
        "good: {name: harmless-outlierlab, count: 8}",
        "good: {name: /nonexistent/own-prompts.txt, count: 8}",
        1,
    );
    assert_ne!(moved, y);
    std::fs::write(run.join("study.yaml"), moved).unwrap();
    let o = Command::new(bin())
        .args(["report", run.to_str().unwrap(), "--out"])
        .arg(tmp.path().join("r"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(tmp.path().join("r/report.md")).unwrap();
    assert!(md.contains("## Verdicts"));
}

#[test]
fn report_html_loads_every_image_in_headless_chromium() {
    let required = std::env::var("OUTLIERLAB_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let (chromium, driver) = (
        Path::new("/usr/bin/chromium"),
        Path::new("/usr/bin/chromedriver"),
    );
    if !chromium.exists() || !driver.exists() {
        assert!(
            !required,
            "OUTLIERLAB_REQUIRE_BROWSER=1 but chromium/chromedriver are missing: apt-get install chromium chromium-driver"
        );
        eprintln!("skipped: no /usr/bin/chromium and /usr/bin/chromedriver (CI installs them and sets OUTLIERLAB_REQUIRE_BROWSER=1)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    render(&out);
    let port = free_port();
    let _driver = Kill(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    while ureq::get(&format!("{base}/status")).call().is_err() {
        assert!(t0.elapsed().as_secs() < 30, "chromedriver did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let profile = tmp.path().join("profile");
    let session = post(
        &format!("{base}/session"),
        serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_str().unwrap(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-first-run",
                         format!("--user-data-dir={}", profile.display()), "--window-size=1280,2000"]
            }
        }}}),
    );
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_string();
    let s = format!("{base}/session/{id}");
    let page = format!("file://{}", out.join("report.html").display());
    post(&format!("{s}/url"), serde_json::json!({ "url": page }));
    let js = "const imgs = [...document.images];\
              return {total: imgs.length,\
                      broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),\
                      text: document.body.innerText.length,\
                      height: document.body.scrollHeight};";
    let mut state = serde_json::Value::Null;
    for _ in 0..50 {
        state = post(
            &format!("{s}/execute/sync"),
            serde_json::json!({"script": js, "args": []}),
        )["value"]
            .clone();
        if state["broken"].as_array().is_some_and(|b| b.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let shot = ureq::get(&format!("{s}/screenshot"))
        .call()
        .unwrap()
        .into_json::<serde_json::Value>()
        .unwrap();
    let _ = ureq::delete(&s).call();
    assert!(state["total"].as_u64().unwrap_or(0) >= 7, "{state}");
    assert_eq!(
        state["broken"],
        serde_json::json!([]),
        "broken images: {state}"
    );
    assert!(
        state["text"].as_u64().unwrap_or(0) > 1000,
        "page nearly empty: {state}"
    );
    // The screenshot is a real, non-blank picture of the page.
    let b64 = shot["value"].as_str().expect("a screenshot");
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 screenshot");
    let shot_path = tmp.path().join("shot.png");
    std::fs::write(&shot_path, &bytes).unwrap();
    let (w, h, ink, colours) = png_stats(&shot_path);
    assert!(w >= 800 && h >= 600, "{w}x{h}");
    assert!(
        ink > 0.02 && colours > 16,
        "blank page: ink {ink}, {colours} colours"
    );
    if let Ok(dir) = std::env::var("OUTLIERLAB_SCREENSHOT_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&shot_path, Path::new(&dir).join("report-screenshot.png")).unwrap();
    }
}
