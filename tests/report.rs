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
        "forest",
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
    // Each verdict row's differences are the raw differences of the two arms it names: one table
    // for refusals, one for KL.
    let table = |title: &str| -> Vec<&str> {
        md.split(&format!("### {title}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {title} table"))
            .split("\n\n")
            .next()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("| A"))
            .collect()
    };
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
    for (title, refusals) in [("Refusals", true), ("KL", false)] {
        let rows = table(title);
        assert_eq!(
            rows.len(),
            3,
            "{title}: none, winsorize and the [507] arm: 3 distinct comparisons"
        );
        for row in &rows {
            let cells: Vec<&str> = row.split(" | ").collect();
            let (v, r) = (first_name(cells[0]), first_name(cells[1]));
            let (kv, nv, klv) = outcome_of(&v).unwrap();
            let (kr, _, klr) = outcome_of(&r).unwrap();
            let want = if refusals {
                format!("{:+.1} [", 100.0 * (kv as f64 - kr as f64) / nv as f64)
            } else {
                format!("{:+.4} [", klv - klr)
            };
            assert!(
                cells[2].starts_with(&want),
                "{v} vs {r}: {title} cell {} vs {want}",
                cells[2]
            );
        }
    }
    // The answer comes first, with the forest plot.
    let answer = md.find("## Answer").expect("an answer section");
    assert!(answer < md.find("## Replicate").unwrap());
    assert!(md[answer..].contains("**Does a variant beat `none`?**"));
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

/// `report --comment` fits a pull-request comment and `--csv` holds every comparison, on the
/// fixture run and on the committed decisive study.
#[test]
fn comment_and_csv() {
    let decisive = Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/pr154-vs-winsorization/run");
    for run in [fixture_run(), decisive] {
        let o = Command::new(bin())
            .args(["report", run.to_str().unwrap(), "--comment"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(text.lines().count() <= 60, "{} lines", text.lines().count());
        for part in [
            "**Question.**",
            "**Setup.**",
            "**Answer**",
            "**Caveats.**",
            "**Reproduce.**",
        ] {
            assert!(text.contains(part), "{part} missing:\n{text}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let csv = tmp.path().join("c.csv");
        let o = Command::new(bin())
            .args(["report", run.to_str().unwrap(), "--csv"])
            .arg(&csv)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&csv).unwrap();
        let r = rundir::read_results(&run).unwrap();
        let st = outlierlab::report::settings(&run, &Default::default()).unwrap();
        let outs = outlierlab::report::outcomes_under(&r, &st.headline);
        let fam = outlierlab::report::family_of(&r, &st.stats, &outs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 2 * fam.comparisons.len());
        let width = lines[0].split(',').count();
        assert!(lines
            .iter()
            .all(|l| !l.contains('"') && l.split(',').count() == width));
        assert!(text.contains(",sign-flip,") || text.contains(",mcnemar,"));
    }
}

/// The committed decisive study (3 direction draws of the same 400 + 300 prompts) is decided over
/// prompts: each test runs over the distinct prompts, and its KL interval for `sun2024` vs
/// `none` is about 1.7× as wide as the pooled test's at the same level — what counting the 900
/// (prompt, draw) pairs as independent had hidden.
#[test]
fn the_decisive_study_counts_each_prompt_once() {
    use outlierlab::stats::paired::SignFlip;
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/pr154-vs-winsorization/run");
    let r = rundir::read_results(&run).unwrap();
    let st = outlierlab::report::settings(&run, &Default::default()).unwrap();
    let outs = outlierlab::report::outcomes_under(&r, &st.headline);
    let fam = outlierlab::report::family_of(&r, &st.stats, &outs);
    let arm = |name: &str| {
        fam.arms
            .iter()
            .position(|a| a.names.iter().any(|n| n == name))
            .unwrap()
    };
    let c = fam
        .comparisons
        .iter()
        .find(|c| c.variant == arm("sun2024") && c.reference == arm("none"))
        .expect("sun2024 vs none");
    assert_eq!(c.replicates.len(), 3);
    assert_eq!(
        (c.kl.prompts, c.kl.n, c.kl.test.as_str()),
        (300, 900, "sign-flip")
    );
    assert_eq!(c.refusals.test, "sign-flip");
    assert!(c.refusals.prompts < c.refusals.n);
    // The pooled test at the same level, over every (prompt, draw) difference.
    let d: Vec<f64> = c
        .replicates
        .iter()
        .flat_map(|rep| {
            let a = fam.arms[c.variant].outcomes[rep].1;
            let b = fam.arms[c.reference].outcomes[rep].1;
            a.kl.iter()
                .zip(&b.kl)
                .map(|(x, y)| x - y)
                .collect::<Vec<_>>()
        })
        .collect();
    let pooled = SignFlip::new(&d, fam.reps, 1).interval(c.kl.level);
    let ratio = (c.kl.hi - c.kl.lo) / (pooled.1 - pooled.0);
    assert!((1.5..2.0).contains(&ratio), "width ratio {ratio}");
    let w = c.kl.over_draws.as_ref().expect("a reading over draws");
    assert_eq!(w.reading.draws, 3);
}

/// `report --against`: the stored run against a copy of itself is unchanged everywhere; against a
/// copy marked bf16 with one refusal label flipped and one KL moved, the section and the summary
/// say exactly that.
#[test]
fn a_run_against_another_run_of_its_study() {
    let tmp = tempfile::tempdir().unwrap();
    let report = |run: &Path, against: &Path, extra: &[&str]| {
        let o = Command::new(bin())
            .arg("report")
            .arg(run)
            .arg("--against")
            .arg(against)
            .arg("--out")
            .arg(tmp.path().join("r"))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    report(&fixture_run(), &fixture_run(), &[]);
    let md = std::fs::read_to_string(tmp.path().join("r/report.md")).unwrap();
    let section = md.split("## Against").nth(1).expect("an Against section");
    assert!(section.contains("the run in"), "{section}");
    assert!(
        section.contains("detected dims the same in all"),
        "{section}"
    );
    assert!(section.contains(" 0 of "), "{section}");
    assert!(
        section.contains("per-prompt KL differs by at most 0.0000"),
        "{section}"
    );
    assert!(!section.contains("(changed)"), "{section}");

    let copy = tmp.path().join("bf16");
    let status = Command::new("cp")
        .args([
            "-r",
            fixture_run().to_str().unwrap(),
            copy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let mut plan = read(&copy.join("plan.json"));
    plan["precision"] = "bf16".into();
    std::fs::write(copy.join("plan.json"), plan.to_string()).unwrap();
    // The score `none` was assigned: its first harmful reply's label flipped, its first KL moved.
    let id = plan["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"]["name"] == "none")
        .unwrap()["id"]
        .clone();
    let key = read(&copy.join("assignments.json"))
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["variant_id"] == id)
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let path = copy.join(format!("results/r0/{key}.json"));
    let mut rec = read(&path);
    let was = rec["outcome"]["refused"][0].as_bool().unwrap();
    rec["outcome"]["refused"][0] = (!was).into();
    let kl = rec["outcome"]["kl"][0].as_f64().unwrap();
    rec["outcome"]["kl"][0] = (kl + 0.25).into();
    std::fs::write(&path, rec.to_string()).unwrap();

    let summary = report(&copy, &fixture_run(), &["--summary"]);
    let last = summary.lines().last().unwrap();
    assert!(last.starts_with("Against the f32 run in "), "{last}");
    assert!(
        last.contains("per-prompt KL differs by at most 0.2500"),
        "{last}"
    );
    let variants = plan["variants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["variant"]["name"] != "null")
        .count();
    // Every variant sharing `none`'s score carries the flipped label.
    let sharing = read(&copy.join("assignments.json"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["key"] == key.as_str())
        .count();
    let prompts = rec["outcome"]["refused"].as_array().unwrap().len();
    assert!(
        last.contains(&format!(
            "{sharing} of {} harmful replies' refusal labels differ",
            variants * prompts
        )),
        "{last}"
    );
    report(&copy, &fixture_run(), &[]);
    let md = std::fs::read_to_string(tmp.path().join("r/report.md")).unwrap();
    assert!(md.contains("## Against the f32 run in"), "{md}");
    assert!(md.contains("| bf16 | f32 |"));
    let none_row = md
        .split("## Against")
        .nth(1)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("| none | "))
        .expect("a row for none");
    assert!(none_row.contains("| 1 of "), "{none_row}");
    assert!(none_row.contains("| 0.2500 |"), "{none_row}");

    // A study's compare_with that names no run folder leaves the section out, with a warning.
    let y = std::fs::read_to_string(copy.join("study.yaml")).unwrap();
    std::fs::write(
        copy.join("study.yaml"),
        format!("{y}\ncompare_with: /nonexistent/run\n"),
    )
    .unwrap();
    let o = Command::new(bin())
        .arg("report")
        .arg(&copy)
        .arg("--out")
        .arg(tmp.path().join("r2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("compare_with: /nonexistent/run is not a run folder"));
    let md = std::fs::read_to_string(tmp.path().join("r2/report.md")).unwrap();
    assert!(!md.contains("## Against"));
}
