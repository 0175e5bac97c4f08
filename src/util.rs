//! Small helpers shared by several stages.

/// Progress of `len` items of work, labelled `msg`. On a terminal, a bar with an ETA; otherwise
/// (a study run under nohup, a CI log) a plain line at most every 30 s and one at the end, so a
/// log shows how far a long run is without filling up with redraws.
pub fn progress_bar(len: u64, msg: &str) -> Progress {
    use std::io::IsTerminal;
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:<40} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    let plain = (!std::io::stderr().is_terminal()).then(|| {
        std::sync::Mutex::new(PlainLog {
            msg: msg.to_string(),
            start: std::time::Instant::now(),
            last: std::time::Instant::now(),
        })
    });
    Progress { pb, plain }
}

pub struct Progress {
    pb: indicatif::ProgressBar,
    plain: Option<std::sync::Mutex<PlainLog>>,
}

struct PlainLog {
    msg: String,
    start: std::time::Instant,
    last: std::time::Instant,
}

impl Progress {
    pub fn inc(&self, n: u64) {
        self.pb.inc(n);
        self.log(false);
    }

    pub fn set_length(&self, len: u64) {
        self.pb.set_length(len);
    }

    /// A new phase of the work: its label, and (off a terminal) a line when the label changes.
    pub fn set_message(&self, msg: &str) {
        if let Some(Ok(mut p)) = self.plain.as_ref().map(|m| m.lock()) {
            if p.msg == msg {
                return;
            }
            p.msg = msg.to_string();
            p.last = std::time::Instant::now() - std::time::Duration::from_secs(30);
        }
        self.pb.set_message(msg.to_string());
    }

    pub fn set_position(&self, pos: u64) {
        self.pb.set_position(pos);
        self.log(false);
    }

    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.pb.suspend(f)
    }

    pub fn finish_and_clear(&self) {
        self.log(true);
        self.pb.finish_and_clear();
    }

    fn log(&self, done: bool) {
        let Some(plain) = &self.plain else { return };
        let Ok(mut p) = plain.lock() else { return };
        if !done && p.last.elapsed().as_secs() < 30 {
            return;
        }
        p.last = std::time::Instant::now();
        let len = self.pb.length().unwrap_or(0);
        eprintln!(
            "{}: {}/{len}{} ({:.0} s)",
            p.msg,
            self.pb.position(),
            if done { ", done" } else { "" },
            p.start.elapsed().as_secs_f64()
        );
    }
}

/// Edit distance, for did-you-mean hints on unknown keys.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `choices` to `word`, when close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, choices: &[&'a str]) -> Option<&'a str> {
    choices
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Dims for a one-line summary: all of them when few, else the first few and the count.
pub fn dims_summary(dims: &[u32]) -> String {
    if dims.len() <= 8 {
        format!("{dims:?}")
    } else {
        let head: Vec<String> = dims[..6].iter().map(|d| d.to_string()).collect();
        format!("[{}, … {} dims]", head.join(", "), dims.len())
    }
}

/// `s` cut to `n` characters with an ellipsis.
pub fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Asks glibc's allocator to keep freed memory for reuse. Every tensor of a forward pass is a
/// fresh allocation of the same few sizes; by default glibc maps the large ones anew and returns
/// heap tops to the kernel, so each is faulted in page by page again (millions of page faults in
/// a batch-100 bench).
/// Called once by `main`, before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads exist.
    unsafe {
        // The largest threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): tensors up to
        // 32 MiB come from the heap; a fixed value also stops glibc raising it by itself.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Never give the heap's top back, and grow it in 64 MiB steps.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Gives the allocator's free memory back to the kernel now: after a model is loaded, whose
/// loading freed more than decoding will reuse.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `n` values uniform in [−1, 1) from a seed (xorshift): deterministic data for the kernels'
/// timings at load and their tests.
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// A YAML scalar as a `key=value` setting spells it (`null` is `none`).
pub fn yaml_scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::Null => "none".into(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(
            did_you_mean("median_ration", &["median_ratio", "mad_ratio"]),
            Some("median_ratio")
        );
        assert_eq!(did_you_mean("zzzzzz", &["median_ratio", "mad_ratio"]), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}
