//! Content-addressed caches of one replicate: residuals, detected dims, the candidate table.

use super::*;

pub fn save_residuals(path: &Path, r: &Residuals) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + r.data.len() * 4);
    for v in [r.n as u64, r.states as u64, r.d as u64] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for x in &r.data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

pub fn load_residuals(path: &Path) -> Result<Residuals> {
    let b = fs::read(path)?;
    if b.len() < 24 {
        bail!("{} is truncated", path.display());
    }
    let u =
        |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize;
    let (n, states, d) = (u(0), u(1), u(2));
    if b.len() != 24 + n * states * d * 4 {
        bail!("{} is truncated", path.display());
    }
    let data = b[24..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(Residuals { n, states, d, data })
}

/// One direction pass's cache folder: residuals, detected dims per detection config, the
/// candidate table and the detection summary; `done` marks it whole.
pub struct DirectionCache {
    dir: PathBuf,
}

impl DirectionCache {
    pub(super) fn new(cache: &Path, key: &str) -> DirectionCache {
        DirectionCache {
            dir: cache.join(format!("direction-{key}")),
        }
    }

    /// Detected dims by detection-config hash (empty when none are cached).
    pub fn dims(&self) -> BTreeMap<String, Vec<u32>> {
        fs::read(self.dir.join("dims.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Whether a finished pass is here (with its detection summary when the run detects).
    pub fn is_complete(&self, with_summary: bool) -> bool {
        self.dir.join("done").exists()
            && (!with_summary || self.dir.join("detection.json").exists())
    }

    pub fn residuals(&self) -> Result<(Residuals, Residuals)> {
        Ok((
            load_residuals(&self.dir.join("good.f32"))?,
            load_residuals(&self.dir.join("bad.f32"))?,
        ))
    }

    pub fn store(
        &self,
        good: &Residuals,
        bad: &Residuals,
        dims: &BTreeMap<String, Vec<u32>>,
        detected: Option<(DataFrame, detect::summary::Summary)>,
    ) -> Result<()> {
        save_residuals(&self.dir.join("good.f32"), good)?;
        save_residuals(&self.dir.join("bad.f32"), bad)?;
        if let Some((mut table, summary)) = detected {
            detect::table::write_parquet(&mut table, &self.dir.join("candidates.parquet"))?;
            write_atomic(
                &self.dir.join("detection.json"),
                &serde_json::to_vec(&summary)?,
            )?;
        }
        write_atomic(
            &self.dir.join("dims.json"),
            &serde_json::to_vec_pretty(dims)?,
        )?;
        write_atomic(&self.dir.join("done"), b"ok\n")
    }

    /// Copies the detection summary into the replicate's results, where reports read it.
    pub fn publish_summary(&self, replicate_dir: &Path) -> Result<()> {
        if let Ok(b) = fs::read(self.dir.join("detection.json")) {
            write_atomic(&replicate_dir.join("detection.json"), &b)?;
        }
        Ok(())
    }
}
