//! The study file: what a researcher writes. Parsed with serde_yaml; every error names the file,
//! line and column, the field path, what was expected, and a did-you-mean for unknown keys.

use crate::ablate::{AblationParams, Kernel, RowNorm};
use crate::detect::{self, DetectionSettings};
use crate::direction::Handling;
use crate::evaluate::compare::{is_handling_selector, StatsSettings};
use crate::evaluate::EvalOptions;
use crate::pipeline::settings::{Sampler, SearchSettings, TuneSettings, MIN_SWARM_TRIALS};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyFile {
    /// Defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alias, path or hf:ORG/NAME[@REVISION].
    pub model: String,
    #[serde(default = "default_system")]
    pub system_prompt: String,
    /// false: prompts are raw text (BOS + text), for base models without a chat template; the
    /// system prompt is then not used.
    #[serde(default = "default_chat")]
    pub chat: bool,
    /// How the model's matrices are stored and multiplied: auto (bf16 where this CPU has the
    /// bf16 kernels, f32 elsewhere), f32 (the reference) or bf16. The run records the one used.
    #[serde(default)]
    pub precision: crate::model::PrecisionSetting,
    #[serde(default)]
    pub seed: u64,
    /// The prompt splits; only a study of detection validation alone may leave them out.
    #[serde(default)]
    pub datasets: Option<DatasetsSpec>,
    /// Which dims are massive activations, by intervention, and every detection configuration
    /// scored against those labels (run once per run, before the variants).
    #[serde(default)]
    pub detection_validation: Option<crate::detect::validate::ValidationSpec>,
    #[serde(default)]
    pub detection: DetectionSettings,
    #[serde(default)]
    pub ablation: AblationSpec,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
    #[serde(default)]
    pub sweeps: Vec<SweepSpec>,
    /// Seeds that resample the prompts (see `redraw`); empty = one draw with `seed`.
    #[serde(default)]
    pub replicates: Vec<u64>,
    /// What a replicate redraws: `all` splits (each replicate its own evaluation prompts), or
    /// only the `direction` and selection prompts, the evaluation prompts staying those of
    /// `seed` so that every replicate's comparisons are paired on the same prompts.
    #[serde(default)]
    pub redraw: Redraw,
    /// Detection thresholds optimised on the selection split, then scored once on the
    /// evaluation prompts (fit / select / report).
    #[serde(default)]
    pub tune: Vec<TuneSettings>,
    /// How comparisons are decided: α, the multiplicity correction, which variants are
    /// references, equivalence margins, power for minimum detectable differences.
    #[serde(default)]
    pub statistics: StatsSettings,
    /// Run directory; defaults to runs/<name>.
    #[serde(default)]
    pub output: Option<String>,
    /// Another run folder of this study (another precision, another commit): the report says
    /// what changed against it.
    #[serde(default)]
    pub compare_with: Option<String>,
}

/// What a replicate redraws (a study's `redraw:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Redraw {
    /// Every split, with the replicate's seed (the behaviour of runs before `redraw` existed).
    #[default]
    All,
    /// The direction and selection splits, from the prompts the evaluation split leaves; the
    /// evaluation split stays the one drawn with the study's `seed`.
    Direction,
}

fn default_system() -> String {
    crate::model::chat::DEFAULT_SYSTEM_PROMPT.to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsSpec {
    pub direction: PairSpec,
    pub evaluation: PairSpec,
    /// Prompts that `ablation.search` and `tune` optimise on; disjoint from both other splits,
    /// so the reported (evaluation) figure is never the optimised one.
    #[serde(default)]
    pub selection: Option<PairSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    pub good: SetList,
    pub bad: SetList,
}

/// One prompt set, or a list of them drawn one after the other (each prompt's set is kept as
/// its source in the outcomes).
#[derive(Debug, Clone)]
pub struct SetList(pub Vec<SetSpec>);

impl Serialize for SetList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

/// A map is one set, a sequence several: each is read by `SetSpec` itself, so its errors (unknown
/// keys with did-you-mean, wrong types) and their paths stay as precise as for a single set.
impl<'de> Deserialize<'de> for SetList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SetList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a prompt set ({name, count, ...}) or a list of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> std::result::Result<SetList, A::Error> {
                let one = SetSpec::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(SetList(vec![one]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                q: A,
            ) -> std::result::Result<SetList, A::Error> {
                Vec::<SetSpec>::deserialize(serde::de::value::SeqAccessDeserializer::new(q))
                    .map(SetList)
            }
        }
        d.deserialize_any(V)
    }
}

impl SetList {
    /// Prompts in all.
    pub fn count(&self) -> usize {
        self.0.iter().map(|s| s.count).sum()
    }

    /// Each set with the path a located error names: `…good` or `…good[i]`.
    pub fn located<'a>(&'a self, base: &str) -> Vec<(String, &'a SetSpec)> {
        if self.0.len() == 1 {
            vec![(base.to_string(), &self.0[0])]
        } else {
            self.0
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{base}[{i}]"), s))
                .collect()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpec {
    /// A built-in set (`outlierlab datasets`) or a file.
    pub name: String,
    pub count: usize,
    #[serde(default)]
    pub offset: usize,
    /// Draw a seeded sample (seed = the replicate's) instead of taking the slice in file order.
    #[serde(default)]
    pub sample: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationSpec {
    /// A float between layers (0-based), or "per-layer"; default: 60% depth.
    #[serde(default)]
    pub direction_index: Option<serde_yaml::Value>,
    #[serde(default)]
    pub attn: Option<Kernel>,
    #[serde(default)]
    pub mlp: Option<Kernel>,
    #[serde(default)]
    pub row_norm: Option<RowNorm>,
    #[serde(default)]
    pub orthogonalize: Option<bool>,
    /// Search the edit per variant (the fixed values above are ignored where searched).
    #[serde(default)]
    pub search: Option<SearchSettings>,
}

/// Budgets too small to search: the study still runs, but says so (validate and run print these).
pub fn warnings(study: &Study) -> Vec<String> {
    let f = &study.file;
    let mut out = Vec::new();
    if let Some(sr) = &f.ablation.search {
        if sr.trials < sr.min_trials() {
            out.push(format!(
                "{}: ablation.search.trials {} is below the {:?} sampler's minimum of {}: {}",
                study.path,
                sr.trials,
                sr.sampler(),
                sr.min_trials(),
                match sr.sampler() {
                    Sampler::Swarm => "the swarm runs one generation of 8 random kernels, the same for every variant, and optimises nothing",
                    Sampler::Random => "a random search this short finds a kernel in the best 10% of heretic's ranges with probability below 90%",
                }
            ));
        }
    }
    for t in &f.tune {
        if t.trials < MIN_SWARM_TRIALS {
            out.push(format!(
                "{}: tune '{}': {} trials is below {MIN_SWARM_TRIALS}: the swarm runs one generation of random thresholds and optimises nothing",
                study.path, t.name, t.trials
            ));
        }
    }
    out
}

fn default_chat() -> bool {
    true
}

impl AblationSpec {
    pub fn resolve(&self, layers: usize) -> Result<(AblationParams, bool)> {
        let mut p = AblationParams::default_for(layers);
        match &self.direction_index {
            None => {}
            Some(serde_yaml::Value::String(s)) if s == "per-layer" => p.direction_index = None,
            Some(serde_yaml::Value::Number(n)) => p.direction_index = n.as_f64(),
            Some(other) => bail!(
                "ablation.direction_index: expected a number or \"per-layer\", got {}",
                crate::util::yaml_scalar(other)
            ),
        }
        if let Some(k) = self.attn {
            p.attn = k;
        }
        if let Some(k) = self.mlp {
            p.mlp = k;
        }
        if let Some(r) = self.row_norm {
            p.row_norm = r;
        }
        Ok((p, self.orthogonalize.unwrap_or(true)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    #[serde(default = "d_max_response")]
    pub max_response_tokens: usize,
    #[serde(default = "d_over_refusal")]
    pub over_refusal_tokens: usize,
    #[serde(default = "d_kl_tokens")]
    pub kl_tokens: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Refusal classifiers: `heretic` (markers), `phrases` (Arditi et al.'s refusal phrases),
    /// `judge:MODEL`. With any but `heretic`, replies run to the length limit or EOS so every
    /// classifier sees the same text.
    #[serde(default = "d_refusal")]
    pub refusal: Vec<String>,
    /// The classifier whose labels the headline verdicts use.
    #[serde(default = "d_headline")]
    pub headline: String,
    /// A judge labels a reply a refusal when P(no) / (P(yes) + P(no)) is at least this.
    #[serde(default = "d_judge_threshold")]
    pub judge_threshold: f64,
    /// Two-phase judging: the judge reads every reply where `heretic` and `phrases` disagree
    /// and this share of the others, drawn with the study's seed; the judge's rate is then
    /// estimated from what it read (stats::two_phase). 1: every reply.
    #[serde(default = "d_judge_sample", skip_serializing_if = "is_one")]
    pub judge_sample: f64,
    /// heretic's marker list: `heretic-master` (default), `heretic-1.4`, `heretic-1.3`, or a
    /// file with one marker per line. A study file that names none gets the default written in
    /// when it is parsed, so a stored plan without one is a run from before the lists were
    /// versioned (counted with `heretic-1.3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markers: Option<String>,
}

fn d_judge_sample() -> f64 {
    1.0
}
fn is_one(x: &f64) -> bool {
    *x == 1.0
}
fn d_refusal() -> Vec<String> {
    vec!["heretic".into()]
}
fn d_headline() -> String {
    "heretic".into()
}
fn d_judge_threshold() -> f64 {
    0.5
}

fn d_max_response() -> usize {
    EvalOptions::default().max_response_tokens
}
fn d_over_refusal() -> usize {
    EvalOptions::default().over_refusal_tokens
}
fn d_kl_tokens() -> usize {
    1
}
fn d_batch() -> usize {
    EvalOptions::default().batch_size
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            max_response_tokens: d_max_response(),
            over_refusal_tokens: d_over_refusal(),
            kl_tokens: d_kl_tokens(),
            batch_size: d_batch(),
            refusal: d_refusal(),
            headline: d_headline(),
            judge_threshold: d_judge_threshold(),
            judge_sample: d_judge_sample(),
            markers: None,
        }
    }
}

impl EvaluationSpec {
    /// The marker list's name; what an old stored plan without one counted with.
    pub fn markers(&self) -> &str {
        self.markers.as_deref().unwrap_or("heretic-1.3")
    }

    /// The scoring options; reads a marker file if the study names one.
    pub fn options(&self) -> Result<EvalOptions> {
        Ok(EvalOptions {
            max_response_tokens: self.max_response_tokens,
            over_refusal_tokens: self.over_refusal_tokens,
            kl_tokens: self.kl_tokens.max(1),
            batch_size: self.batch_size.max(1),
            // A reply may stop at heretic's first marker only when no other classifier reads it.
            early_stop: self.refusal.iter().all(|c| c == "heretic"),
            markers: crate::evaluate::MarkerList::resolve(self.markers())?,
        })
    }

    /// The classifiers, parsed (checked when the study file is loaded).
    pub fn classifiers(&self) -> Result<Vec<crate::evaluate::classify::Classifier>> {
        self.refusal
            .iter()
            .map(|c| crate::evaluate::classify::Classifier::parse(c))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// `+`-joined handlings, e.g. `winsorize:0.95` or `zero-residual-dims+protect-output-rows`.
    #[serde(default = "d_handling_none")]
    pub handling: String,
    /// Detection for this variant (default: the study's).
    #[serde(default)]
    pub detection: Option<DetectionSettings>,
    /// The dims the handling acts on, named instead of detected (e.g. `[62]`): tells which
    /// dims carry an effect. Only with a handling that uses dims.
    #[serde(default)]
    pub dims: Option<Vec<u32>>,
    /// A random control (`random-dims`) as a null distribution: K further draws of it, each
    /// with its own seed, scored on KL alone (no decoding); the control itself is scored in
    /// full. The report places the arms that act on dims within that distribution.
    #[serde(default)]
    pub draws: Option<usize>,
}

fn d_handling_none() -> String {
    "none".into()
}

fn d_handling_zero() -> String {
    "zero-residual-dims".into()
}

/// A list of values, or `{log: [low, high, count]}` (geometric grid, both ends included).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Grid {
    List(Vec<f64>),
    Log { log: (f64, f64, usize) },
}

impl Grid {
    pub fn values(&self) -> Result<Vec<f64>> {
        Ok(match self {
            Grid::List(v) => v.clone(),
            Grid::Log { log: (lo, hi, n) } => {
                if *lo <= 0.0 || *hi <= 0.0 || *n == 0 {
                    bail!(
                        "a log grid needs positive ends and a count, e.g. {{log: [10, 1000, 5]}}"
                    );
                }
                if *n == 1 {
                    vec![*lo]
                } else {
                    (0..*n)
                        .map(|i| lo * (hi / lo).powf(i as f64 / (*n - 1) as f64))
                        .collect()
                }
            }
        })
    }
}

/// `all` (all 32 on/off combinations of the five criteria) or a list of subsets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Subsets {
    All(String),
    Listed(Vec<Vec<String>>),
}

pub use crate::detect::config::CRITERIA;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Prefix of the generated variants' names.
    #[serde(default)]
    pub name: Option<String>,
    /// Handling applied with the detected dims.
    #[serde(default = "d_handling_zero")]
    pub handling: String,
    /// Base detection of the sweep (default: the study's).
    #[serde(default)]
    pub detection: Option<DetectionSettings>,
    #[serde(default)]
    pub criteria_subsets: Option<Subsets>,
    #[serde(default)]
    pub median_scope: Option<Vec<String>>,
    /// Threshold grids by setting name (min_abs, median_ratio, mad_ratio, max_cluster_size,
    /// persistence, top_k, min_position_fraction).
    #[serde(default)]
    pub thresholds: BTreeMap<String, Grid>,
    /// Winsorization quantiles: each makes a `winsorize:q` variant (no detection).
    #[serde(default)]
    pub winsorize: Vec<f64>,
}

/// A parsed study and where it came from.
#[derive(Debug, Clone)]
pub struct Study {
    pub file: StudyFile,
    pub path: String,
    pub name: String,
}

/// Reads and checks a study file: syntax, types, unknown keys, and the meaning of every value
/// that can be checked without a model.
pub fn load(path: &Path) -> Result<Study> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read study file {}: {e}", path.display()))?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, shown: &str) -> Result<Study> {
    let mut file = parse_stored(text, shown)?;
    file.evaluation
        .markers
        .get_or_insert_with(|| crate::evaluate::markers::DEFAULT.to_string());
    let name = file.name.clone().unwrap_or_else(|| {
        Path::new(shown)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "study".into())
    });
    let s = Study {
        file,
        path: shown.to_string(),
        name,
    };
    check(&s, text)?;
    Ok(s)
}

/// The study file's syntax and types only, without the checks that need the files it names:
/// what a stored run's `study.yaml` is read with, so a run folder moved away from its prompt
/// files still renders.
pub fn parse_stored(text: &str, shown: &str) -> Result<StudyFile> {
    let de = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize(de) {
        Ok(f) => Ok(f),
        Err(e) => bail!("{}", describe(shown, text, &e)),
    }
}

/// Known keys of every section, for did-you-mean hints where serde names no expected fields (an
/// unknown key inside an untagged or flattened value); serde's own list comes first.
const KEYS: &[&str] = &[
    "name",
    "model",
    "system_prompt",
    "chat",
    "seed",
    "datasets",
    "detection",
    "dims",
    "draws",
    "ablation",
    "evaluation",
    "variants",
    "sweeps",
    "replicates",
    "output",
    "compare_with",
    "direction",
    "good",
    "bad",
    "count",
    "offset",
    "sample",
    "preset",
    "set",
    "direction_index",
    "attn",
    "mlp",
    "row_norm",
    "orthogonalize",
    "max_weight",
    "max_weight_position",
    "min_weight",
    "min_weight_distance",
    "max_response_tokens",
    "over_refusal_tokens",
    "kl_tokens",
    "batch_size",
    "handling",
    "criteria_subsets",
    "median_scope",
    "thresholds",
    "winsorize",
    "log",
    "tune",
    "search",
    "trials",
    "objective",
    "sampler",
    "max_kl",
    "selection",
    "kl_target",
    "statistics",
    "refusal",
    "headline",
    "judge_threshold",
    "judge_sample",
    "markers",
    "alpha",
    "correction",
    "references",
    "margins",
    "power",
    "kl_scale",
    "redraw",
    "precision",
    "detection_validation",
    "corpus",
    "candidate_ratio",
    "max_candidates",
    "zero_kl",
    "mean_kl",
    "persistence_mode",
    "curves",
    "label_prompts",
    "entries_per_dim",
    "bootstrap",
    "side",
];

fn describe(shown: &str, text: &str, e: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    let inner = e.inner();
    let path = e.path().to_string();
    let loc = inner
        .location()
        .map(|l| format!("{}:{}", l.line(), l.column()));
    let msg = inner.to_string();
    // serde_yaml appends " at line L column C" to its messages; the location leads here instead.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    // serde_yaml may lead with its own "a.b.c: " path; the path is given separately here.
    let msg = match msg.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') && path.starts_with(head) => rest.to_string(),
        _ => msg,
    };
    let mut hint = String::new();
    if let Some(rest) = msg.split_once("unknown field `").map(|x| x.1) {
        let field = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest
            .split("expected ")
            .nth(1)
            .map(|x| {
                x.split(", ")
                    .map(|k| {
                        k.trim_matches(|c| c == '`' || c == ' ' || c == ',')
                            .trim_start_matches("one of ")
                            .trim_matches('`')
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pool: Vec<&str> = if expected.is_empty() {
            KEYS.to_vec()
        } else {
            expected
        };
        if let Some(s) = crate::util::did_you_mean(field, &pool) {
            hint = format!(" (did you mean '{s}'?)");
        }
    }
    let loc = loc
        .or_else(|| locate_path(text, &path))
        .unwrap_or_else(|| "1:1".into());
    let at = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!(" at `{path}`")
    };
    format!("{shown}:{loc}:{at} {msg}{hint}")
}

/// Best-effort line:column of a dotted path in the text: each key is looked for after the line
/// where the previous one was found, in block (`key:`) or flow (`{key: …}`) style.
fn locate_path(text: &str, path: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut line, mut col) = (0usize, 0usize);
    let mut found_any = false;
    for seg in path.split('.') {
        let key = seg.split('[').next().unwrap_or(seg);
        if key.is_empty() {
            continue;
        }
        let pat = format!("{key}:");
        let hit = (line..lines.len()).find_map(|i| {
            let l = lines[i];
            l.match_indices(&pat)
                .find(|(j, _)| {
                    let before = l[..*j].chars().last();
                    matches!(before, None | Some(' ') | Some('{') | Some(',') | Some('-'))
                })
                .map(|(j, _)| (i, j))
        })?;
        line = hit.0;
        col = hit.1;
        found_any = true;
    }
    found_any.then(|| format!("{}:{}", line + 1, col + 1))
}

fn at_key(s: &Study, text: &str, path: &str, msg: String) -> anyhow::Error {
    let loc = locate_path(text, path).unwrap_or_else(|| "1:1".into());
    anyhow::anyhow!("{}:{loc}: at `{path}`: {msg}", s.path)
}

/// Everything serde cannot check, section by section, in the order a reader meets the file; each
/// error names the key it is about (file, line, column).
fn check(s: &Study, text: &str) -> Result<()> {
    check_statistics(s, text)?;
    check_classifiers(s, text)?;
    crate::model::source::ModelSource::parse(&s.file.model)
        .map_err(|e| at_key(s, text, "model", e.to_string()))?;
    let splits = check_datasets_present(s, text)?;
    check_detection_validation(s, text)?;
    check_prompt_sets(s, text, &splits)?;
    check_overlaps(s, text, &splits)?;
    check_selection(s, text)?;
    check_search(s, text)?;
    check_tune(s, text)?;
    check_detection_and_ablation(s, text)?;
    check_variants(s, text)?;
    check_sweeps(s, text)?;
    check_something_to_run(s, text)
}

fn runs_variants(f: &StudyFile) -> bool {
    !(f.variants.is_empty() && f.sweeps.is_empty() && f.tune.is_empty())
}

type Splits<'a> = Vec<(&'static str, &'a PairSpec)>;

/// The study's splits, named; none only for a study of detection validation alone.
fn check_datasets_present<'a>(s: &'a Study, text: &str) -> Result<Splits<'a>> {
    let f = &s.file;
    let mut splits = Vec::new();
    match &f.datasets {
        Some(d) => {
            splits.push(("direction", &d.direction));
            splits.push(("evaluation", &d.evaluation));
            if let Some(sel) = &d.selection {
                splits.push(("selection", sel));
            }
        }
        None if runs_variants(f) => {
            return Err(at_key(
                s,
                text,
                "model",
                "the study has variants but no `datasets:` block: name the direction and evaluation prompts \
                 (datasets.direction.good/bad, datasets.evaluation.good/bad)"
                    .into(),
            ))
        }
        None => {}
    }
    Ok(splits)
}

/// Why `name` is neither a built-in prompt set nor a file, with a did-you-mean; None when it is
/// one of them.
fn unknown_dataset(name: &str) -> Option<String> {
    let known = crate::datasets::names();
    if known.iter().any(|k| k == name) || Path::new(name).is_file() {
        return None;
    }
    let hint =
        crate::util::did_you_mean(name, &known.iter().map(String::as_str).collect::<Vec<_>>())
            .map(|k| format!(" (did you mean '{k}'?)"))
            .unwrap_or_default();
    Some(format!(
        "unknown dataset '{name}'{hint}; expected a built-in set ({}) or a file",
        known.join(", ")
    ))
}

/// The validation block: its settings, and that its corpus sets exist.
fn check_detection_validation(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    if let Some(v) = &f.detection_validation {
        v.check()
            .map_err(|(k, m)| at_key(s, text, &format!("detection_validation.{k}"), m))?;
        for (i, c) in v.corpus.iter().enumerate() {
            if let Some(m) = unknown_dataset(&c.name) {
                return Err(at_key(
                    s,
                    text,
                    &format!("detection_validation.corpus[{i}].name"),
                    m,
                ));
            }
        }
    }
    Ok(())
}

/// Every prompt set of every split exists and takes at least one prompt.
fn check_prompt_sets(s: &Study, text: &str, splits: &Splits) -> Result<()> {
    for (side, pair) in splits {
        for (which, list) in [("good", &pair.good), ("bad", &pair.bad)] {
            if list.0.is_empty() {
                return Err(at_key(
                    s,
                    text,
                    &format!("datasets.{side}.{which}"),
                    "the list of prompt sets is empty: name at least one".into(),
                ));
            }
            for (at, set) in list.located(&format!("datasets.{side}.{which}")) {
                let path = format!("{at}.name");
                if let Some(m) = unknown_dataset(&set.name) {
                    return Err(at_key(s, text, &path, m));
                }
                if set.count == 0 {
                    return Err(at_key(
                        s,
                        text,
                        &format!("{at}.count"),
                        "count must be at least 1".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every two sets of one side, in any splits, are disjoint (checked again on the drawn prompts
/// at run time).
fn check_overlaps(s: &Study, text: &str, splits: &Splits) -> Result<()> {
    let f = &s.file;
    for which in ["good", "bad"] {
        let mut all: Vec<(&str, String, &SetSpec)> = Vec::new();
        for (side, pair) in splits {
            let list = if which == "good" {
                &pair.good
            } else {
                &pair.bad
            };
            for (at, set) in list.located(&format!("datasets.{side}.{which}")) {
                all.push((side, at, set));
            }
        }
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                let (da, _, x) = &all[i];
                let (db, at_b, y) = &all[j];
                // Redrawing the direction side only, the others come from what evaluation leaves.
                if f.redraw == Redraw::Direction
                    && (*da == "evaluation" || *db == "evaluation")
                    && da != db
                {
                    continue;
                }
                if x.name != y.name {
                    continue;
                }
                let ranges = x.offset < y.offset + y.count && y.offset < x.offset + x.count;
                let overlap = if x.sample || y.sample {
                    x.sample != y.sample || ranges
                } else {
                    ranges
                };
                if overlap {
                    return Err(at_key(
                        s,
                        text,
                        &format!("{at_b}.offset"),
                        format!(
                            "{da} prompts ({}, offset {}, count {}) and {db} prompts (offset {}, count {}) overlap; give the {db} prompts an offset of at least {}",
                            x.name, x.offset, x.count, y.offset, y.count, x.offset + x.count
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Tuning and search have a selection split to optimise on.
fn check_selection(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    let needs_selection = f.ablation.search.is_some() || !f.tune.is_empty();
    if needs_selection && f.datasets.as_ref().is_none_or(|d| d.selection.is_none()) {
        let what = if f.tune.is_empty() {
            "ablation.search"
        } else {
            "tune"
        };
        return Err(at_key(
            s,
            text,
            if f.tune.is_empty() { "ablation" } else { "tune" },
            format!("{what} optimises on a selection split: add datasets.selection with good and bad prompts disjoint from the direction and evaluation prompts"),
        ));
    }
    Ok(())
}

/// `ablation.search`: a budget and a bound.
fn check_search(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    if let Some(sr) = &f.ablation.search {
        if sr.trials == 0 {
            return Err(at_key(
                s,
                text,
                "ablation.search.trials",
                "trials must be at least 1".into(),
            ));
        }
        if !(sr.max_kl > 0.0 && sr.max_kl.is_finite()) {
            return Err(at_key(
                s,
                text,
                "ablation.search.max_kl",
                format!("must be a positive number, got {}", sr.max_kl),
            ));
        }
    }
    Ok(())
}

/// `tune` entries: handling, detection, bounds, budget, a name of their own.
fn check_tune(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    for (i, t) in f.tune.iter().enumerate() {
        let at = |k: &str| format!("tune[{i}].{k}");
        Handling::parse_list(&t.handling)
            .map_err(|e| at_key(s, text, &at("handling"), format!("{e:#}")))?;
        let base = match &t.detection {
            Some(d) => d
                .resolve()
                .map_err(|e| at_key(s, text, &at("detection"), format!("{e:#}")))?,
            None => f.detection.resolve()?,
        };
        if t.thresholds.is_empty() {
            return Err(at_key(
                s,
                text,
                &at("thresholds"),
                "name at least one threshold to tune, e.g. {median_ratio: [10, 10000]}".into(),
            ));
        }
        for (k, (lo, hi)) in &t.thresholds {
            if !(*lo > 0.0 && hi > lo) {
                return Err(at_key(
                    s,
                    text,
                    &at(&format!("thresholds.{k}")),
                    format!(
                        "bounds must be 0 < low < high (tuning is in log space), got [{lo}, {hi}]"
                    ),
                ));
            }
            let mut probe = base.clone();
            probe
                .set(&format!("{k}={lo}"))
                .map_err(|e| at_key(s, text, &at(&format!("thresholds.{k}")), e.to_string()))?;
        }
        if t.trials == 0 {
            return Err(at_key(
                s,
                text,
                &at("trials"),
                "trials must be at least 1".into(),
            ));
        }
        if f.variants.iter().any(|v| v.name == t.name) {
            return Err(at_key(
                s,
                text,
                &at("name"),
                format!(
                    "a variant is already named '{}'; names must be unique",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}

/// The study's detection and edit resolve.
fn check_detection_and_ablation(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    f.detection
        .resolve()
        .map_err(|e| at_key(s, text, "detection", format!("{e:#}")))?;
    f.ablation
        .resolve(2)
        .map_err(|e| at_key(s, text, "ablation", format!("{e:#}")))?;
    Ok(())
}

/// `variants`: handlings, detections, draws, named dims, unique names.
fn check_variants(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    for (i, v) in f.variants.iter().enumerate() {
        Handling::parse_list(&v.handling).map_err(|e| {
            at_key(
                s,
                text,
                &format!("variants[{i}].handling"),
                format!("{e:#}"),
            )
        })?;
        if let Some(d) = &v.detection {
            d.resolve().map_err(|e| {
                at_key(
                    s,
                    text,
                    &format!("variants[{i}].detection"),
                    format!("{e:#}"),
                )
            })?;
        }
        if let Some(k) = v.draws {
            let control = matches!(
                Handling::parse_list(&v.handling).as_deref(),
                Ok([Handling::RandomDims { .. }])
            );
            let problem = if !control {
                Some(format!(
                    "variant '{}' asks for draws but its handling '{}' is not a random control; \
                     draws are for `random-dims` (alone)",
                    v.name, v.handling
                ))
            } else if !(2..=1000).contains(&k) {
                Some(format!(
                    "variant '{}': draws must lie in 2..=1000 (a null distribution of {k} draws says nothing)",
                    v.name
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(at_key(s, text, &format!("variants[{i}].draws"), p));
            }
        }
        if let Some(dims) = &v.dims {
            let uses = Handling::parse_list(&v.handling)
                .map(|hs| hs.iter().any(Handling::uses_dims))
                .unwrap_or(false);
            let problem = if !uses {
                Some(format!(
                    "variant '{}' names dims but its handling '{}' does not act on dims; use \
                     zero-residual-dims (pr154-text), protect-output-rows (pr154-code) or random-dims",
                    v.name, v.handling
                ))
            } else if dims.is_empty() {
                Some(format!(
                    "variant '{}' names no dims (dims: []); that is `none` — leave the key out to detect them",
                    v.name
                ))
            } else if v.detection.is_some() {
                Some(format!(
                    "variant '{}' names its dims and a detection; one says which dims, drop the other",
                    v.name
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(at_key(s, text, &format!("variants[{i}].dims"), p));
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    for v in &f.variants {
        if !names.insert(&v.name) {
            return Err(at_key(
                s,
                text,
                "variants",
                format!("two variants are named '{}'; names must be unique", v.name),
            ));
        }
    }
    Ok(())
}

/// `sweeps`: handlings, criteria subsets, scopes, grids, quantiles.
fn check_sweeps(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    for (i, sw) in f.sweeps.iter().enumerate() {
        Handling::parse_list(&sw.handling)
            .map_err(|e| at_key(s, text, &format!("sweeps[{i}].handling"), format!("{e:#}")))?;
        if let Some(Subsets::All(x)) = &sw.criteria_subsets {
            if x != "all" {
                return Err(at_key(
                    s,
                    text,
                    &format!("sweeps[{i}].criteria_subsets"),
                    format!("expected `all` or a list of subsets, got '{x}'"),
                ));
            }
        }
        if let Some(Subsets::Listed(list)) = &sw.criteria_subsets {
            for c in list.iter().flatten() {
                if !CRITERIA.contains(&c.as_str()) {
                    let hint = crate::util::did_you_mean(c, &CRITERIA)
                        .map(|k| format!(" (did you mean '{k}'?)"))
                        .unwrap_or_default();
                    return Err(at_key(
                        s,
                        text,
                        &format!("sweeps[{i}].criteria_subsets"),
                        format!(
                            "unknown criterion '{c}'{hint}; criteria: {}",
                            CRITERIA.join(", ")
                        ),
                    ));
                }
            }
        }
        for m in sw.median_scope.iter().flatten() {
            if m != "position" && m != "layer" {
                return Err(at_key(
                    s,
                    text,
                    &format!("sweeps[{i}].median_scope"),
                    format!("expected position or layer, got '{m}'"),
                ));
            }
        }
        for (k, g) in &sw.thresholds {
            g.values().map_err(|e| {
                at_key(
                    s,
                    text,
                    &format!("sweeps[{i}].thresholds.{k}"),
                    e.to_string(),
                )
            })?;
            let mut probe = detect::preset("pr154")?;
            probe.set(&format!("{k}=1")).map_err(|e| {
                at_key(
                    s,
                    text,
                    &format!("sweeps[{i}].thresholds.{k}"),
                    e.to_string(),
                )
            })?;
        }
        for q in &sw.winsorize {
            if !(0.0..=1.0).contains(q) {
                return Err(at_key(
                    s,
                    text,
                    &format!("sweeps[{i}].winsorize"),
                    format!("quantile {q} is outside 0..1"),
                ));
            }
        }
    }
    Ok(())
}

/// A study runs something.
fn check_something_to_run(s: &Study, text: &str) -> Result<()> {
    let f = &s.file;
    if f.variants.is_empty()
        && f.sweeps.is_empty()
        && f.tune.is_empty()
        && f.detection_validation.is_none()
    {
        return Err(at_key(
            s,
            text,
            "variants",
            "the study has no variants, no sweeps and no detection_validation: nothing to run"
                .into(),
        ));
    }
    Ok(())
}

fn check_classifiers(s: &Study, text: &str) -> Result<()> {
    let e = &s.file.evaluation;
    for (i, c) in e.refusal.iter().enumerate() {
        crate::evaluate::classify::Classifier::parse(c).map_err(|err| {
            at_key(
                s,
                text,
                &format!("evaluation.refusal[{i}]"),
                format!("{err:#}"),
            )
        })?;
    }
    let judges = e.refusal.iter().filter(|c| c.starts_with("judge:")).count();
    if judges > 1 {
        return Err(at_key(
            s,
            text,
            "evaluation.refusal",
            "name at most one judge model".into(),
        ));
    }
    if e.headline != "heretic" && !e.refusal.contains(&e.headline) {
        return Err(at_key(
            s,
            text,
            "evaluation.headline",
            format!(
                "the headline classifier '{}' is not among evaluation.refusal ({})",
                e.headline,
                e.refusal.join(", ")
            ),
        ));
    }
    if let Err(err) = crate::evaluate::MarkerList::resolve(e.markers()) {
        return Err(at_key(s, text, "evaluation.markers", format!("{err:#}")));
    }
    if !(e.judge_sample > 0.0 && e.judge_sample <= 1.0) {
        return Err(at_key(
            s,
            text,
            "evaluation.judge_sample",
            format!("must lie in (0, 1], got {}", e.judge_sample),
        ));
    }
    if e.judge_sample < 1.0 && (judges == 0 || !e.refusal.iter().any(|c| c == "phrases")) {
        return Err(at_key(
            s,
            text,
            "evaluation.judge_sample",
            "two-phase judging reads the replies where `heretic` and `phrases` disagree: name both `phrases` and a `judge:MODEL` in evaluation.refusal, or drop judge_sample".into(),
        ));
    }
    if !(e.judge_threshold > 0.0 && e.judge_threshold < 1.0) {
        return Err(at_key(
            s,
            text,
            "evaluation.judge_threshold",
            format!("must lie in (0, 1), got {}", e.judge_threshold),
        ));
    }
    Ok(())
}

fn check_statistics(s: &Study, text: &str) -> Result<()> {
    let st = &s.file.statistics;
    if let Some((field, msg)) = st.problem() {
        return Err(at_key(s, text, &format!("statistics.{field}"), msg));
    }
    let names: Vec<&str> = s
        .file
        .variants
        .iter()
        .map(|v| v.name.as_str())
        .chain(s.file.tune.iter().map(|t| t.name.as_str()))
        .collect();
    for (i, sel) in st.references.iter().enumerate() {
        if is_handling_selector(sel) || names.contains(&sel.as_str()) {
            continue;
        }
        let hint = crate::util::did_you_mean(sel, &names)
            .map(|k| format!(" (did you mean '{k}'?)"))
            .unwrap_or_default();
        return Err(at_key(
            s,
            text,
            &format!("statistics.references[{i}]"),
            format!(
                "'{sel}' is neither a handling (none, winsorize, winsorize-global, zero-residual-dims, protect-output-rows, random-dims, random-rotation, or one with its argument such as winsorize:0.95) nor the name of a variant{hint}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/study-file.md is the study file's manual: it names every key the parser knows, and
    /// its complete example is a study this parser accepts.
    #[test]
    fn the_manual_names_every_key_and_its_example_parses() {
        let doc = include_str!("../../docs/study-file.md");
        for k in KEYS {
            assert!(
                doc.contains(&format!("`{k}`")) || doc.contains(&format!("{{{k}:")),
                "docs/study-file.md does not name `{k}`"
            );
        }
        let start = doc.find("```yaml\n").expect("an example") + "```yaml\n".len();
        let end = start + doc[start..].find("```").expect("the example ends");
        let study = parse(&doc[start..end], "docs/study-file.md").unwrap();
        assert_eq!(study.name, "my-study");
        assert_eq!(study.file.replicates, vec![0, 1, 2]);
    }
}
