//! The run directory: its layout and every read and write of it. A user can read a run folder
//! with this description and no code.
//!
//! ```text
//! RUN/
//!   study.yaml                  the study file as run (its `statistics:` block decides the report)
//!   plan.json                   the planned variants (ids hash their settings) and replicate seeds
//!   assignments[-shard-I-of-N].json   per replicate and variant: its dims and score key
//!   provenance[-shard-I-of-N].json    tool version, git revision, model sha256, prompt hashes,
//!                               precision, the CPU's vector paths and the bf16 micro-kernel
//!   partial.json                only after `merge --allow-partial` left scores out: which ones
//!   results/r<seed>/
//!     <key>.json                one distinct score: key, dims, variant ids, per-prompt outcome
//!                               (refused, replies, reply tokens, KL, over-refused, seconds), and
//!                               the searched edit when there was a search
//!     reference.json            the unedited model's outcome on the evaluation prompts
//!     prompts.json              the evaluation prompts, harmless and harmful, in scoring order,
//!                               and each one's prompt set
//!     detection.json            the detection summary the report's figures need
//!   results/classifiers.json    with several refusal classifiers: each one's accuracy on the
//!                               labelled replies (datasets/refusal-judgements.jsonl), the judge's cost
//!   tune/r<seed>/<variant id>.json      a tuning: chosen thresholds, dims, every trial
//!   tune/r<seed>/<variant id>.partial   while it runs: the scores so far (the memo)
//!   search/r<seed>/<key>.json   an edit search: best kernel, every trial (.partial while it runs)
//!   cache/ (cache-shard-I-of-N/)  content-addressed caches, safe to delete at any time:
//!     direction-<hash>/         good.f32, bad.f32 (residuals: little-endian u64 n, states, d,
//!                               then n·states·d f32), dims.json, candidates.parquet,
//!                               detection.json, done
//!     reference-<hash>.json     the unedited model's outcome on one prompt split
//!     judge-<model>.json        a judge's P(refusal) by (judge, prompt, reply) hash
//!   validation/                 with `detection_validation:` (run once, before the variants):
//!     validation.json           settings, corpus, every candidate's damages and label, every
//!                               configuration's dims and dim- / entry-level precision, recall, F1
//!     candidates.parquet        one row per candidate (dim, damages, label, instances, tokens)
//!     scores.parquet            one row per scored configuration
//!   variants.parquet            one row per variant and replicate (rebuilt from results/)
//!   outcomes.parquet            one row per prompt and score (rebuilt from results/), with the
//!                               prompt's set as `source`; with several classifiers,
//!                               refused_by_<name> and p_refusal_<judge>
//!   .lock                       held while a run or a merge writes here
//! ```
//!
//! `RunDir` is this layout in code: every path above is one of its methods.
//!
//! Every file is written through a temporary file and a rename, so a killed run leaves whole
//! files only; a score's file is its completion marker.

mod cache;
mod merge;
mod read;
mod records;
mod tables;

pub use cache::*;
pub use merge::*;
pub use read::*;
pub use records::*;
pub use tables::*;

use super::plan::{Plan, PlannedVariant};
use crate::ablate::AblationParams;
use crate::detect;
use crate::direction::Residuals;
use crate::evaluate::Outcome;
use crate::fs::write_atomic;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn hash_json<T: Serialize>(v: &T) -> String {
    sha_hex(serde_json::to_string(v).expect("serialisable").as_bytes())[..16].to_string()
}

/// Holds the run directory for this process; dropped, the lock goes with it.
pub struct RunLock {
    _file: File,
}

/// A run directory, and the shard this process writes it as: every path of the layout above is
/// one of its methods, so the layout is written down once.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
    shard: Option<(usize, usize)>,
}

impl RunDir {
    /// The run directory at `root`, read or written whole (not as a shard).
    pub fn at(root: impl Into<PathBuf>) -> RunDir {
        RunDir {
            root: root.into(),
            shard: None,
        }
    }

    /// The run directory at `root`, written as shard `(index, count)` when one is given.
    pub fn sharded(root: impl Into<PathBuf>, shard: Option<(usize, usize)>) -> RunDir {
        RunDir {
            root: root.into(),
            shard,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shard(&self) -> Option<(usize, usize)> {
        self.shard
    }

    /// Creates the directory and holds its lock, or says who holds it.
    pub fn lock(&self) -> Result<RunLock> {
        let dir = &self.root;
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create run directory {}", dir.display()))?;
        let path = dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match f.try_lock() {
            Ok(()) => Ok(RunLock { _file: f }),
            Err(_) => bail!(
                "run directory {} is in use by another outlierlab run; wait for it to finish or use another output folder",
                dir.display()
            ),
        }
    }

    /// The directory's own name (`run` where it has none): the name its report takes when the
    /// study names none.
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "run".into())
    }

    pub fn plan(&self) -> PathBuf {
        self.root.join("plan.json")
    }

    /// The plan the directory holds.
    pub fn read_plan(&self) -> Result<Plan> {
        let p = self.plan();
        serde_json::from_slice(&fs::read(&p).with_context(|| {
            format!(
                "{} is not a run directory (no plan.json)",
                self.root.display()
            )
        })?)
        .with_context(|| format!("{} is unreadable", p.display()))
    }

    pub fn study_file(&self) -> PathBuf {
        self.root.join("study.yaml")
    }

    /// Written by `merge --allow-partial`: the scores it left out.
    pub fn partial(&self) -> PathBuf {
        self.root.join("partial.json")
    }

    fn tagged(&self, stem: &str) -> PathBuf {
        self.root
            .join(format!("{stem}{}.json", shard_tag(self.shard)))
    }

    pub fn assignments(&self) -> PathBuf {
        self.tagged("assignments")
    }

    pub fn provenance(&self) -> PathBuf {
        self.tagged("provenance")
    }

    /// The last `run` invocation's phase times (not read by the report: they differ run to run).
    pub fn timings(&self) -> PathBuf {
        self.tagged("timings")
    }

    pub fn results(&self) -> PathBuf {
        self.root.join("results")
    }

    /// Where replicate `replicate`'s per-replicate files live.
    pub fn replicate(&self, replicate: u64) -> PathBuf {
        self.results().join(format!("r{replicate}"))
    }

    pub fn result(&self, replicate: u64, key: &str) -> PathBuf {
        self.replicate(replicate).join(format!("{key}.json"))
    }

    /// The unedited model's outcome on replicate `replicate`'s evaluation prompts.
    pub fn reference(&self, replicate: u64) -> PathBuf {
        self.replicate(replicate).join("reference.json")
    }

    /// Replicate `replicate`'s evaluation prompts and their sets.
    pub fn prompts(&self, replicate: u64) -> PathBuf {
        self.replicate(replicate).join("prompts.json")
    }

    /// Each classifier's accuracy on the labelled replies and the judge's cost.
    pub fn classifiers(&self) -> PathBuf {
        self.results().join("classifiers.json")
    }

    pub fn tune(&self, replicate: u64, variant_id: &str) -> PathBuf {
        self.root
            .join("tune")
            .join(format!("r{replicate}"))
            .join(format!("{variant_id}.json"))
    }

    pub fn search(&self, replicate: u64, key: &str) -> PathBuf {
        self.root
            .join("search")
            .join(format!("r{replicate}"))
            .join(format!("{key}.json"))
    }

    pub fn validation_dir(&self) -> PathBuf {
        self.root.join("validation")
    }

    pub fn validation(&self) -> PathBuf {
        self.validation_dir().join("validation.json")
    }

    /// A parquet table rebuilt from the results (`variants`, `outcomes`).
    pub fn table(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.parquet"))
    }

    /// The content-addressed caches this process writes (one per shard, so shards never share
    /// a file).
    pub fn cache(&self) -> PathBuf {
        match self.shard {
            Some((i, n)) => self.root.join(format!("cache-shard-{i}-of-{n}")),
            None => self.root.join("cache"),
        }
    }

    /// A judge's cache: P(refusal) by (judge, prompt, reply) hash.
    pub fn judge_cache(&self, judge: &str) -> PathBuf {
        let safe: String = judge
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.cache().join(format!("judge-{safe}.json"))
    }

    /// The cached outcome of the unedited model on one prompt split.
    pub fn reference_cache(&self, key: &str) -> PathBuf {
        self.cache().join(format!("reference-{key}.json"))
    }

    /// The cached direction pass with content hash `key`.
    pub fn direction_cache(&self, key: &str) -> DirectionCache {
        DirectionCache::new(&self.cache(), key)
    }
}

pub(super) fn shard_tag(shard: Option<(usize, usize)>) -> String {
    shard
        .map(|(i, n)| format!("-shard-{i}-of-{n}"))
        .unwrap_or_default()
}
