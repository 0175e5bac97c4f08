//! The threads every parallel step of the runtime runs on: candle's own pool, which runs its
//! element-wise ops between the products. Work split over a second pool (rayon's) ran beside
//! candle's worker, which spins for ~1 ms after each op waiting for the next one, on a core the
//! other pool's threads needed (batch-100 decoding on Qwen 0.5B ran 12–20% slower).

/// Values per task of an element-wise pass (SwiGLU, RMSNorm): enough to pay for a hand-off to
/// the other thread.
pub const VALUES_PER_TASK: usize = 16 * 1024;

/// How many threads share the work (the calling thread included).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// `f(0)`, …, `f(n − 1)`, spread over [`threads`].
pub fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
}

/// `[f(0), …, f(n − 1)]`, computed over [`threads`].
pub fn parallel_map<T: Send + Sync>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<std::sync::OnceLock<T>> = (0..n).map(|_| std::sync::OnceLock::new()).collect();
    parallel_for(n, |i| {
        let _ = slots[i].set(f(i));
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("every task ran"))
        .collect()
}

/// `f(i, piece)` for the `len`-long pieces of `y` (the last may be shorter), computed over
/// [`threads`]: each task writes its own piece only.
pub fn parallel_chunks_mut<T: Send>(y: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    // One uncontended lock per piece hands each task its piece without unsafe code.
    let pieces: Vec<std::sync::Mutex<&mut [T]>> = y
        .chunks_mut(len.max(1))
        .map(std::sync::Mutex::new)
        .collect();
    parallel_for(pieces.len(), |i| {
        let mut piece = pieces[i]
            .lock()
            .expect("a piece's task does not panic holding it");
        f(i, &mut piece)
    });
}
