//! The bf16 weight path: `y = x Wᵀ` with `W` stored as bf16 and `x`, `y` in f32, multiplied
//! in pairs of exact bf16 products accumulated in f32 (AVX512_BF16's `vdpbf16ps`, or the same
//! arithmetic written with AVX-512 or AVX2 fused multiply-adds).
//!
//! Its unsafe code (vector intrinsics) stays in this module, as attention's and the head
//! screen's stay in theirs. `x` is rounded to bf16 once per call (round to nearest even, as
//! PyTorch's bf16 casts); every product and sum is in f32 and `y` stays f32, so the residual
//! stream is never rounded.
//!
//! Layout ([`Packed`]): the weight rows (output features) in panels of 32; within a panel, for each
//! pair of inputs `(2p, 2p+1)`, the 32 rows' two values side by side — 128 bytes, two vectors,
//! exactly what `vdpbf16ps` multiplies against an input pair broadcast to every lane. So the
//! micro-kernel needs no horizontal sums: an 8 × 32 block of outputs lives in 16 accumulators,
//! each step loads two weight vectors and broadcasts eight input pairs. The rounded inputs are
//! laid out by blocks of up to 8 rows (5 for the 8-lane kernel, [`blocks`]), pair by pair
//! ([`round_rows`]), so one step's broadcasts read consecutive bytes (one line for 8 rows).
//! Inputs are walked in blocks of [`KC`] ([`KC8`] in the 8-lane kernel) so that a panel's slice
//! (half of it in the 8-lane kernel) stays in L1 while every block of input rows passes over it
//! (a short k in one block, see [`WHOLE_K`]), and rows in passes of [`MC`] that stay in L2; a
//! later k-block's accumulators start from the sums the earlier ones stored, so each output is
//! one chain of multiply-adds over the whole k, whatever the block length. Weights are packed
//! once, when the model is converted (or a matrix edited).
//!
//! Three micro-kernels read that layout and give bit-identical results: `Kernel::Dot` multiplies
//! with `vdpbf16ps`; `Kernel::Widen` widens each weight pair to two f32 vectors (a shift and a
//! mask) and uses two `vfmadd231ps`, odd input first, which is exactly how `vdpbf16ps` is
//! specified (two fused f32 multiply-adds of exact bf16 products, odd element first) — except with subnormal operands or sums, which
//! `vdpbf16ps` flushes to zero and the widening kernel keeps (inputs are rounded by
//! `vcvtneps2bf16`, which flushes them too). Which is faster depends on the CPU: where a core
//! retires f32 fused multiply-adds at twice `vdpbf16ps`'s rate (`cargo run --release --example
//! peak` tells), widening wins; [`kernel`] times both once and keeps the faster. `Kernel::Widen8` is the widening kernel in AVX2's
//! 8-lane registers, for CPUs without AVX-512 (AMD before Zen 4, Intel client cores): each
//! output lane sees the same fused multiply-adds in the same order, and the inputs are rounded
//! by [`round_bits`], bit for bit what `vcvtneps2bf16` does, so a bf16 result does not depend on
//! which of the three ran.

use crate::model::cpu::{features, Isa};
use crate::model::pool;
use half::bf16;

/// Whether this CPU runs one of the kernels (AVX2 with FMA at least; checked once): elsewhere
/// the binary runs f32.
pub fn available() -> bool {
    let f = features();
    f.avx512 || f.avx2_fma
}

/// The micro-kernel `matmul_t` runs; all give the same bits (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` on bf16 pairs (AVX512_BF16).
    Dot,
    /// Weights widened to f32 in 16-lane registers, `vfmadd231ps` (AVX-512).
    Widen,
    /// The same widening in 8-lane registers (AVX2 and FMA): half a panel's columns and up to
    /// four rows at a time, which is what sixteen registers hold.
    Widen8,
}

/// The kernel this process uses: `OUTLIERLAB_BF16_KERNEL=dot|widen|widen8` if set (and the CPU
/// has it), else the fastest this CPU has. With AVX512_BF16 the two 16-lane kernels are timed
/// once (~20 ms) at first use on a product of Qwen2.5-0.5B's attention shape; with AVX-512 alone
/// it is the 16-lane widening kernel, with AVX2 the 8-lane one.
///
/// The timing runs on one thread, each kernel warmed up first and the two alternated, best of
/// five: timed once each on the thread pool, the first-timed kernel paid the pool's wake-up and
/// its buffers' first touch, and start-ups picked the slower kernel now and then.
pub fn kernel() -> Kernel {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<Kernel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let asked = match std::env::var("OUTLIERLAB_BF16_KERNEL").as_deref() {
            Ok("dot") => Some(Kernel::Dot),
            Ok("widen") => Some(Kernel::Widen),
            Ok("widen8") => Some(Kernel::Widen8),
            _ => None,
        };
        match asked {
            Some(k) if k.runs_here() => k,
            Some(k) => {
                eprintln!(
                    "warning: OUTLIERLAB_BF16_KERNEL asks for the {} kernel, which this CPU cannot run; choosing another",
                    k.name()
                );
                fastest_kernel()
            }
            None => fastest_kernel(),
        }
    })
}

fn fastest_kernel() -> Kernel {
    let f = features();
    if !f.avx512bf16 {
        return if f.avx512 {
            Kernel::Widen
        } else {
            Kernel::Widen8
        };
    }
    let (m, k, n) = (64, 896, 896);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1e3)
        .collect();
    let w = Packed::new(&x[..k * m].repeat(n / m), n, k);
    let mut y = vec![0f32; m * n];
    // The product's panels on this thread alone (rounding x is the same for both kernels).
    let mut time = |kern| {
        with_rounded(&x, m, &w, kern, |xs| {
            let t = std::time::Instant::now();
            // SAFETY: every panel of an m × n output, into y of m × n.
            unsafe { xs.panels(m, &w, 0, n.div_ceil(NR), y.as_mut_ptr(), n) };
            t.elapsed()
        })
    };
    let _ = (time(Kernel::Widen), time(Kernel::Dot));
    let (mut widen, mut dot) = (std::time::Duration::MAX, std::time::Duration::MAX);
    for _ in 0..5 {
        widen = widen.min(time(Kernel::Widen));
        dot = dot.min(time(Kernel::Dot));
    }
    if widen <= dot {
        Kernel::Widen
    } else {
        Kernel::Dot
    }
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Dot => "vdpbf16ps",
            Kernel::Widen => "widened to f32, vfmadd231ps",
            Kernel::Widen8 => "widened to f32, 8-lane vfmadd231ps (AVX2)",
        }
    }

    /// The most input rows per block of its micro-kernel ([`blocks`]): the rounding's layout and
    /// the walker both take it from here.
    const fn block_rows(self) -> usize {
        match self {
            Kernel::Dot | Kernel::Widen => MR,
            Kernel::Widen8 => MR8,
        }
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        self.isa().here()
    }

    /// The instruction-set path the kernel needs.
    pub fn isa(self) -> Isa {
        match self {
            Kernel::Dot => Isa::Avx512Bf16,
            Kernel::Widen => Isa::Avx512,
            Kernel::Widen8 => Isa::Avx2Fma,
        }
    }

    /// Every kernel this CPU can run, for the tests that compare them bit for bit; a kernel
    /// whose path `OUTLIERLAB_REQUIRE_ISA` requires and this CPU lacks fails instead
    /// ([`crate::model::cpu::test_runs`]).
    pub fn all_here() -> Vec<Kernel> {
        [Kernel::Dot, Kernel::Widen, Kernel::Widen8]
            .into_iter()
            .filter(|k| crate::model::cpu::test_runs(k.isa()))
            .collect()
    }
}

/// Rounds to bf16, nearest even (NaN stays NaN).
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Weight rows per panel (two vectors of 16 lanes). Wider tiles (fewer broadcasts per product)
/// did not pay on the benchmark shapes (CHANGELOG.md, Performance).
const NR: usize = 32;
/// The most input rows per block of the AVX-512 micro-kernels (16 accumulators of 16 lanes).
const MR: usize = 8;
/// The most input rows per block of the 8-lane kernel (see [`tile_widen8`]).
const MR8: usize = 5;
/// Inputs (k) per block: a panel's slice is KC × 32 × 2 bytes = 16 KB. A k of at most
/// `WHOLE_K` is done in one block instead: the output is then written once, which matters for
/// the head (151,936 columns); on the benchmark shapes blocks of KC won for the MLP's long k and
/// one block for the model width.
const KC: usize = 256;
const WHOLE_K: usize = 1024;
/// The 8-lane kernel's k-block. Its tiles stream their half of the panel's slice from L1 or L2,
/// so a longer block costs little there, and the output is read and written 5 times instead of
/// 19 for the MLP's k (beyond L2 at 512 rows). `examples/bf16_kernel` chose it on an AVX2-only
/// core (CHANGELOG.md, Performance).
const KC8: usize = 1024;
/// Input rows per pass over the panels: 256 rows of a whole k = 896 are 917 KB of rounded
/// inputs, which stay in L2 while every panel passes over them; a prefill pass of 1,617 rows
/// would otherwise stream 5.8 MB from L3 once per panel.
const MC: usize = 256;

/// The k-block length for a (padded) k, in blocks of `kc` where it exceeds [`WHOLE_K`].
fn k_block(k2: usize, kc: usize) -> usize {
    if k2 <= WHOLE_K {
        k2.max(2)
    } else {
        kc
    }
}

/// A `[n, k]` weight, rounded to bf16 and packed for the kernel.
#[derive(Debug, Clone)]
pub struct Packed {
    pub n: usize,
    pub k: usize,
    /// k rounded up to even (the last pair is zero-padded).
    k2: usize,
    data: Vec<bf16>,
}

impl Packed {
    /// Packs a row-major `[n, k]` f32 matrix.
    pub fn new(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(w.len(), n * k, "w is not [n, k]");
        let k2 = k.div_ceil(2) * 2;
        let panels = n.div_ceil(NR);
        let pairs = k2 / 2;
        let mut data = vec![bf16::ZERO; panels * pairs * NR * 2];
        // Once per matrix, at load or after an edit, so rayon's pool does: nothing else runs.
        use rayon::prelude::*;
        data.par_chunks_mut(pairs * NR * 2)
            .enumerate()
            .for_each(|(q, panel)| {
                for lane in 0..NR {
                    let row = q * NR + lane;
                    if row >= n {
                        break;
                    }
                    let src = &w[row * k..(row + 1) * k];
                    for (c, &v) in src.iter().enumerate() {
                        panel[(c / 2) * NR * 2 + lane * 2 + c % 2] = bf16::from_f32(v);
                    }
                }
            });
        Packed { n, k, k2, data }
    }

    /// Rows `ids` of the matrix, widened to f32 (an embedding lookup from a tied head).
    pub fn rows(&self, ids: &[u32]) -> Vec<f32> {
        let pairs = self.k2 / 2;
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let (q, lane) = (id as usize / NR, id as usize % NR);
            let panel = &self.data[q * pairs * NR * 2..(q + 1) * pairs * NR * 2];
            out.extend((0..self.k).map(|c| panel[(c / 2) * NR * 2 + lane * 2 + c % 2].to_f32()));
        }
        out
    }

    /// Rows `ids` as a packed matrix of their own, the values copied as they are: the kernel
    /// gives each of its columns the bits it gives that row here (every output lane sees the
    /// same operations whatever its panel).
    pub(super) fn gather(&self, ids: &[u32]) -> Packed {
        let pairs = self.k2 / 2;
        let panels = ids.len().div_ceil(NR);
        let mut data = vec![bf16::ZERO; panels * pairs * NR * 2];
        for (to, &id) in ids.iter().enumerate() {
            let (q, lane) = (id as usize / NR, id as usize % NR);
            let (tq, tlane) = (to / NR, to % NR);
            for p in 0..pairs {
                let from = q * pairs * NR * 2 + p * NR * 2 + lane * 2;
                let at = tq * pairs * NR * 2 + p * NR * 2 + tlane * 2;
                data[at..at + 2].copy_from_slice(&self.data[from..from + 2]);
            }
        }
        Packed {
            n: ids.len(),
            k: self.k,
            k2: self.k2,
            data,
        }
    }

    /// The whole matrix, widened to f32, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        self.rows(&(0..self.n as u32).collect::<Vec<_>>())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// A pointer to `y` shared by the tasks, each of which writes its own columns only.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y[m, n] = x[m, k] · Wᵀ`, split over the thread pool by panels. Panics if `x` is not `[m, k]`
/// or the CPU lacks the instructions (callers check [`available`] when choosing bf16).
pub fn matmul_t(x: &[f32], m: usize, w: &Packed) -> Vec<f32> {
    matmul_with(x, m, w, kernel())
}

/// `matmul_t` with a given micro-kernel.
pub fn matmul_with(x: &[f32], m: usize, w: &Packed, kern: Kernel) -> Vec<f32> {
    matmul_many_with(x, m, &[w], kern)
        .pop()
        .expect("one product per weight")
}

/// `[x · W₁ᵀ, x · W₂ᵀ, …]` for weights of one input width: `x` is rounded once and the
/// products' panels are split over the thread pool in one hand-off — the attention's q, k and v
/// projections, and the MLP's gate and up, read one input. Each product's values are those
/// `matmul_t` gives it alone (a panel's arithmetic does not depend on its neighbours).
pub fn matmul_many(x: &[f32], m: usize, ws: &[&Packed]) -> Vec<Vec<f32>> {
    matmul_many_with(x, m, ws, kernel())
}

fn matmul_many_with(x: &[f32], m: usize, ws: &[&Packed], kern: Kernel) -> Vec<Vec<f32>> {
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.k == first.k),
        "weights multiplied by one input differ in input width"
    );
    if m == 0 || first.k == 0 {
        check(x, m, first, kern);
        return ws.iter().map(|w| vec![0.0; m * w.n]).collect();
    }
    // Every element of each y is stored by the first k-block (`first`), so it starts
    // uninitialised: zeroing it first would only touch each page twice.
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // Enough tasks to balance, each a run of whole panels of one product.
    let panels: Vec<usize> = ws.iter().map(|w| w.n.div_ceil(NR)).collect();
    let per = panels
        .iter()
        .sum::<usize>()
        .div_ceil(pool::threads() * 2)
        .max(1);
    let tasks: Vec<(usize, usize, usize)> = panels
        .iter()
        .enumerate()
        .flat_map(|(i, &p)| (0..p.div_ceil(per)).map(move |t| (i, t * per, ((t + 1) * per).min(p))))
        .collect();
    with_rounded(x, m, first, kern, |xs| {
        pool::parallel_for(tasks.len(), |t| {
            let (i, q0, q1) = tasks[t];
            let (w, out) = (ws[i], outs[i]);
            // SAFETY: each task writes only the columns of its own panels, within its y's m × n.
            unsafe { xs.panels(m, w, q0, q1, out.0.add(q0 * NR), w.n) };
        });
    });
    for (y, w) in ys.iter_mut().zip(ws) {
        // SAFETY: the panels cover all n columns and the row blocks all m rows, and the first
        // k-block stores (not adds) each of them.
        unsafe { y.set_len(m * w.n) };
    }
    ys
}

/// For each row of `x`, the column of `x · Wᵀ` with the largest value — what candle's `argmax`
/// returns on `matmul_t`'s output (the first of equal maxima; NaN never wins unless it is in
/// column 0), computed by the same tiles, so bit-identical values, without writing the `[m, n]`
/// product: greedy decoding needs only this from the output head (151,936 columns on Qwen).
pub fn matmul_argmax(x: &[f32], m: usize, w: &Packed) -> Vec<u32> {
    let n = w.n;
    if m == 0 || n == 0 || w.k == 0 {
        check(x, m, w, kernel());
        return vec![0; m];
    }
    // Column groups small enough that a group's products for all rows stay in L2 until
    // they are scanned.
    const GROUP: usize = 64;
    let panels = n.div_ceil(NR);
    let kern = kernel();
    // Per group and row: the group's first value and its largest non-NaN value with its column.
    type Row = (f32, Option<(f32, u32)>);
    let groups: Vec<Vec<Row>> = with_rounded(x, m, w, kern, |xs| {
        pool::parallel_map(panels.div_ceil(GROUP), |g| {
            let (q0, q1) = (g * GROUP, ((g + 1) * GROUP).min(panels));
            let width = (q1 - q0) * NR;
            let live = (n - q0 * NR).min(width);
            let mut buf = Scratch::take(&OUT_SCRATCH);
            let y = buf.sized(m * width);
            // SAFETY: panels q0..q1 into a buffer of m rows × `width`.
            unsafe { xs.panels(m, w, q0, q1, y.as_mut_ptr(), width) };
            (0..m)
                .map(|r| {
                    let row = &y[r * width..r * width + live];
                    let mut top: Option<(f32, u32)> = None;
                    for (c, &v) in row.iter().enumerate() {
                        if top.is_none_or(|(b, _)| b < v) && !v.is_nan() {
                            top = Some((v, (q0 * NR + c) as u32));
                        }
                    }
                    (row[0], top)
                })
                .collect()
        })
    });
    (0..m)
        .map(|r| {
            // candle's scan starts from column 0, whatever it holds.
            let (mut val, mut at) = (groups[0][r].0, 0u32);
            for (v, c) in groups.iter().filter_map(|g| g[r].1) {
                if val < v {
                    (val, at) = (v, c);
                }
            }
            at
        })
        .collect()
}

fn check(x: &[f32], m: usize, w: &Packed, kern: Kernel) {
    assert_eq!(x.len(), m * w.k, "x is not [m, k]");
    assert!(
        kern.runs_here(),
        "the {} kernel called on a CPU without its instructions",
        kern.name()
    );
}

/// x rounded for one kernel, ready to multiply panels with.
enum RoundedX<'a> {
    Dot(&'a [bf16]),
    Widen(&'a [f32]),
    Widen8(&'a [f32]),
}

impl RoundedX<'_> {
    /// Panels `q0..q1` of `x · Wᵀ` into `y` (row stride `ldy`, column 0 = panel q0's first).
    ///
    /// # Safety
    /// `y` must hold m rows of `ldy ≥ (q1 − q0) · NR` columns, written by no one else.
    unsafe fn panels(&self, m: usize, w: &Packed, q0: usize, q1: usize, y: *mut f32, ldy: usize) {
        for (i0, rows) in passes(m) {
            let (at, y) = (i0 * w.k2, y.add(i0 * ldy));
            match *self {
                RoundedX::Dot(xb) => panels_range(&xb[at..], rows, w, q0, q1, y, ldy),
                RoundedX::Widen(xw) => panels_range_widen(&xw[at..], rows, w, q0, q1, y, ldy),
                RoundedX::Widen8(xw) => panels_range_widen8(&xw[at..], rows, w, q0, q1, y, ldy),
            }
        }
    }
}

/// Runs `f` with x rounded to bf16 once, with an even row stride (a zero in the padding): as
/// bf16 pairs for the dot kernel, widened back to f32 for the widening one (which broadcasts
/// f32s). The buffer is kept per thread: a fresh one per call is a fresh mapping from the
/// allocator, and its page faults cost more than the rounding.
fn with_rounded<R>(
    x: &[f32],
    m: usize,
    w: &Packed,
    kern: Kernel,
    f: impl FnOnce(&RoundedX) -> R,
) -> R {
    check(x, m, w, kern);
    let (k, k2, mr) = (w.k, w.k2, kern.block_rows());
    let len = m * k2;
    match kern {
        Kernel::Dot => {
            let mut xb = Scratch::take(&BF16_SCRATCH);
            round_rows(x, k, xb.sized(len), k2, mr);
            f(&RoundedX::Dot(xb.slice()))
        }
        Kernel::Widen | Kernel::Widen8 => {
            let mut xw = Scratch::take(&F32_SCRATCH);
            round_rows(x, k, xw.sized(len), k2, mr);
            f(&if kern == Kernel::Widen {
                RoundedX::Widen(xw.slice())
            } else {
                RoundedX::Widen8(xw.slice())
            })
        }
    }
}

/// m input rows as the passes over the panels: (first row, rows) of each, [`MC`] rows but the
/// last. [`round_rows`] lays each pass out in its own [`blocks`], as the walk takes them.
fn passes(m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(MC).map(move |i0| (i0, (m - i0).min(MC)))
}

/// `rows` input rows (at most [`MC`], one pass over the panels) as blocks of at most `mr`:
/// (first row, rows) of each, as few blocks as that allows, their sizes as even as they go —
/// 16 rows in blocks of at most 5 are 4 × 4, not 5 + 5 + 5 + 1.
fn blocks(rows: usize, mr: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = rows.div_ceil(mr);
    (0..n).scan(0, move |i, b| {
        let len = (rows - *i).div_ceil(n - b);
        let at = *i;
        *i += len;
        Some((at, len))
    })
}

/// Where input pair `p` of the block of `rows` rows that starts at row `i` starts in
/// [`round_rows`]' layout (rows of `k2` inputs).
fn x_at(i: usize, p: usize, k2: usize, rows: usize) -> usize {
    i * k2 + p * 2 * rows
}

/// `d` (m rows of `k2`) = the m rows of `s` (rows of `k`) rounded to bf16 in the kernel's
/// layout: each of the [`passes`] in the [`blocks`] of at most `mr` rows that the kernel's
/// tiles take; within a block pair by pair, the block's rows side by side, so that the 2·rows
/// inputs one step of a tile broadcasts are contiguous (one 64-byte line for 8 rows in f32)
/// rather than separate streams; the padding (odd k) is zero.
fn round_rows<T: Rounded>(s: &[f32], k: usize, d: &mut [T], k2: usize, mr: usize) {
    let m = s.len() / k;
    debug_assert_eq!(d.len(), m * k2);
    let spans: Vec<(usize, usize)> = passes(m)
        .flat_map(|(i0, rows)| blocks(rows, mr).map(move |(i, n)| (i0 + i, n)))
        .collect();
    // One lock per block, each taken once by the one task that writes it.
    let mut rest = d;
    let mut parts = Vec::with_capacity(spans.len());
    for &(_, n) in &spans {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(n * k2);
        parts.push(std::sync::Mutex::new(part));
        rest = tail;
    }
    pool::parallel_for(spans.len(), |b| {
        let mut d = parts[b].lock().unwrap_or_else(|e| e.into_inner());
        let (i0, n) = spans[b];
        let mut row = vec![T::ZERO; k2];
        // The block's steps, pair p's at x_at(0, p, ..): row r's pair is 2r into each.
        let step = x_at(0, 1, k2, n);
        for r in 0..n {
            round_row(&s[(i0 + r) * k..(i0 + r + 1) * k], &mut row[..k]);
            for (at, pair) in d.chunks_exact_mut(step).zip(row.chunks_exact(2)) {
                at[2 * r..2 * r + 2].copy_from_slice(pair);
            }
        }
    });
}

thread_local! {
    static BF16_SCRATCH: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
    static F32_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static OUT_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's input buffer, taken for one call and put back after it (a call nested on the same
/// thread finds it taken and uses a new one).
struct Scratch<T: 'static> {
    buf: Vec<T>,
    home: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
}

impl<T: Copy + Default + 'static> Scratch<T> {
    fn take(home: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>) -> Scratch<T> {
        let buf = home.with(|c| {
            c.try_borrow_mut()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default()
        });
        Scratch { buf, home }
    }

    /// The first `len` elements (their old contents: every caller overwrites them).
    fn sized(&mut self, len: usize) -> &mut [T] {
        if self.buf.len() < len {
            self.buf.resize(len, T::default());
        }
        &mut self.buf[..len]
    }

    fn slice(&self) -> &[T] {
        &self.buf
    }
}

/// A buffer larger than this is freed after its call rather than kept: a forward pass over a
/// whole long batch (a direction pass) would otherwise hold hundreds of MB for the process's life.
const SCRATCH_KEEP_BYTES: usize = 64 << 20;

impl<T: 'static> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() * std::mem::size_of::<T>() > SCRATCH_KEEP_BYTES {
            return;
        }
        let _ = self.home.try_with(|c| {
            if let Ok(mut b) = c.try_borrow_mut() {
                if b.capacity() < buf.capacity() {
                    *b = buf;
                }
            }
        });
    }
}

/// What x is rounded into: bf16 pairs for the dot kernel, the same values as f32 for the
/// widening one.
trait Rounded: Copy + Send + Sync {
    /// Stored as f32 (the bf16 bits shifted into the high half).
    const WIDE: bool;
    const ZERO: Self;
    fn from_bf16_bits(b: u16) -> Self;
}

impl Rounded for bf16 {
    const WIDE: bool = false;
    const ZERO: bf16 = bf16::ZERO;
    fn from_bf16_bits(b: u16) -> bf16 {
        bf16::from_bits(b)
    }
}

impl Rounded for f32 {
    const WIDE: bool = true;
    const ZERO: f32 = 0.0;
    fn from_bf16_bits(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }
}

/// `x` as every kernel reads it: each value rounded to bf16 (and widened back).
pub fn rounded(x: &[f32]) -> Vec<f32> {
    let mut d = vec![0f32; x.len()];
    round_row(x, &mut d);
    d
}

/// `d[..s.len()] = s` rounded to bf16 as `vcvtneps2bf16` rounds: by that instruction where the
/// CPU has it, else by [`round_bits`] (in 8 lanes with AVX2, for f32 outputs) — the same bits,
/// so every kernel reads the same inputs.
fn round_row<T: Rounded>(s: &[f32], d: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if f.avx512bf16 {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { round_row_avx512(s, d) };
        }
        if T::WIDE && f.avx2 {
            // SAFETY: as above; T is f32 (WIDE).
            return unsafe { round_row_avx2(s, d) };
        }
    }
    round_row_portable(s, d)
}

fn round_row_portable<T: Rounded>(s: &[f32], d: &mut [T]) {
    for (o, &v) in d.iter_mut().zip(s) {
        *o = T::from_bf16_bits(round_bits(v));
    }
}

/// `vcvtneps2bf16`'s rounding of one value, as Intel's pseudo-code gives it: zero and subnormals
/// to a zero of their sign, NaN quieted, infinities kept, everything else to nearest even.
/// (`half`'s conversion keeps subnormals, which `vdpbf16ps` would read as zero.)
pub fn round_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) | 0x0040) as u16
    } else if b & 0x7f80_0000 == 0 {
        ((b >> 16) & 0x8000) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// [`round_bits`] in 8 lanes of integer arithmetic, widened back to f32 (`T` must be f32): the
/// inputs of the 8-lane kernel. Each row's pairs are written step by step rather than through an
/// offset computed per pair, which halved [`round_rows`]' share of a score's decoding
/// (CHANGELOG.md, Performance, "Outside the kernel").
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_row_avx2<T: Rounded>(s: &[f32], d: &mut [T]) {
    use std::arch::x86_64::*;
    assert!(T::WIDE && d.len() >= s.len());
    let n = s.len() / 8 * 8;
    let (one, half) = (_mm256_set1_epi32(1), _mm256_set1_epi32(0x7fff));
    let (exponent, sign) = (_mm256_set1_epi32(0x7f80_0000), _mm256_set1_epi32(0x8000));
    let quiet = _mm256_set1_epi32(0x0040);
    let mut i = 0;
    while i < n {
        let v = _mm256_loadu_ps(s.as_ptr().add(i));
        let b = _mm256_castps_si256(v);
        let high = _mm256_srli_epi32(b, 16);
        let odd = _mm256_and_si256(high, one);
        let nearest = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, half), odd), 16);
        let tiny = _mm256_cmpeq_epi32(_mm256_and_si256(b, exponent), _mm256_setzero_si256());
        let r = _mm256_blendv_epi8(nearest, _mm256_and_si256(high, sign), tiny);
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let r = _mm256_blendv_epi8(r, _mm256_or_si256(high, quiet), nan);
        let wide = _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
        _mm256_storeu_ps(d.as_mut_ptr().add(i) as *mut f32, wide);
        i += 8;
    }
    round_row_portable(&s[n..], &mut d[n..]);
}

/// `d[..s.len()] = s` rounded to bf16 by `vcvtneps2bf16` (nearest even; subnormals to zero, as
/// `vdpbf16ps` would read them), 16 at a time, the tail under a mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row_avx512<T: Rounded>(s: &[f32], d: &mut [T]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < s.len() {
        let live = (s.len() - i).min(16);
        let m: __mmask16 = (((1u32 << live) - 1) & 0xffff) as u16;
        let v = _mm512_maskz_loadu_ps(m, s.as_ptr().add(i));
        let r: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        let at = d.as_mut_ptr().add(i);
        if T::WIDE {
            let wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16);
            _mm512_mask_storeu_ps(at as *mut f32, m, _mm512_castsi512_ps(wide));
        } else {
            _mm256_mask_storeu_epi16(at as *mut i16, m, r);
        }
        i += live;
    }
}

/// One micro-kernel call: R rows of x from `x` (a block of [`round_rows`]' layout, at its first
/// step) against one panel over `steps` input pairs, into the R × 32 block of y at `y` (row
/// stride `ldy`), `cols` of the 32 columns real; unless `first`, `y` holds the earlier k-blocks'
/// sums, which the tile goes on from.
#[derive(Clone, Copy)]
struct Tile<T> {
    x: *const T,
    panel: *const bf16,
    /// The next panel's slice, fetched into L2 while this one is multiplied (null: none).
    ahead: *const bf16,
    /// Which of the panel's columns: all 32 (0) in the 16-lane kernels; `16·part ..` + 16 in the
    /// 8-lane one.
    part: usize,
    steps: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    first: bool,
}

/// Panels `q0..q1` of the output into `y` (row stride `ldy`, its column 0 panel q0's first),
/// each of a panel's `$parts` column parts (its tile's width) with each [`blocks`] of at most
/// `$mr` input rows handed to `$tile(tile, rows)`: k-blocks outermost, so each panel slice (or
/// part of it) is reused from L1 by every block of input rows. A macro, not a function taking
/// the kernel, so that each tile is inlined into its own walker, which is compiled with that
/// kernel's target features.
macro_rules! walk_panels {
    ($x:expr, $m:expr, $k2:expr, $w:expr, $q0:expr, $q1:expr, $y:expr, $ldy:expr, $tile:ident, $kc:expr, $mr:expr, $parts:expr) => {{
        let (x, m, k2, w, y, ldy) = ($x, $m, $k2, $w, $y, $ldy);
        let pairs = k2 / 2;
        let mut p0 = 0;
        while p0 < pairs {
            let p1 = (p0 + k_block(k2, $kc) / 2).min(pairs);
            for (q, part) in ($q0..$q1).flat_map(|q| (0..$parts).map(move |part| (q, part))) {
                let cols = (w.n - q * NR).min(NR);
                if cols <= part * NR / $parts {
                    continue;
                }
                for (i, rows) in blocks(m, $mr) {
                    let t = Tile {
                        x: x.as_ptr().add(x_at(i, p0, k2, rows)),
                        panel: w.data.as_ptr().add(q * pairs * NR * 2 + p0 * NR * 2),
                        ahead: if i == 0 && part == 0 && q + 1 < $q1 {
                            w.data.as_ptr().add((q + 1) * pairs * NR * 2 + p0 * NR * 2)
                        } else {
                            std::ptr::null()
                        },
                        part,
                        steps: p1 - p0,
                        y: y.add(i * ldy + (q - $q0) * NR),
                        ldy,
                        cols,
                        first: p0 == 0,
                    };
                    $tile(t, rows);
                }
            }
            p0 = p1;
        }
    }};
}

/// Defines `$name`, panels `q0..q1` of the output through `walk_panels!` with `$tile`, compiled
/// for `$features` (and, off x86-64, a stub: `available()` is false there).
macro_rules! walker {
    ($(#[$doc:meta])* $name:ident, $features:literal, $t:ty, $tile:ident, $kc:expr, $mr:expr, $parts:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            x: &[$t],
            m: usize,
            w: &Packed,
            q0: usize,
            q1: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            walk_panels!(x, m, w.k2, w, q0, q1, y, ldy, $tile, $kc, $mr, $parts)
        }

        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $name(_: &[$t], _: usize, _: &Packed, _: usize, _: usize, _: *mut f32, _: usize) {
            unreachable!("available() is false off x86_64")
        }
    };
}

walker!(
    /// With the `vdpbf16ps` kernel; `x` holds the rounded inputs as bf16 pairs.
    panels_range,
    "avx512f,avx512bw,avx512bf16",
    bf16,
    tile_rows,
    KC,
    Kernel::Dot.block_rows(),
    1
);
walker!(
    /// With the widening kernel; `x` holds the rounded inputs as f32.
    panels_range_widen,
    "avx512f,avx512bw",
    f32,
    tile_widen_rows,
    KC,
    Kernel::Widen.block_rows(),
    1
);
walker!(
    /// With the 8-lane widening kernel; `x` holds the rounded inputs as f32.
    panels_range_widen8,
    "avx2,fma",
    f32,
    tile_widen8,
    KC8,
    Kernel::Widen8.block_rows(),
    2
);

/// `$tile::<R>(t)` for R = `rows`, 1 to [`MR`].
macro_rules! by_rows {
    ($tile:ident, $t:expr, $rows:expr) => {
        match $rows {
            8 => $tile::<8>($t),
            7 => $tile::<7>($t),
            6 => $tile::<6>($t),
            5 => $tile::<5>($t),
            4 => $tile::<4>($t),
            3 => $tile::<3>($t),
            2 => $tile::<2>($t),
            _ => $tile::<1>($t),
        }
    };
}

/// `rows` rows (at most [`MR`]) × one panel with the `vdpbf16ps` kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile_rows(t: Tile<bf16>, rows: usize) {
    by_rows!(tile, t, rows)
}

/// `rows` rows (at most [`MR`]) × one panel with the 16-lane widening kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile_widen_rows(t: Tile<f32>, rows: usize) {
    by_rows!(tile_widen, t, rows)
}

/// R rows × one panel (32 columns, `cols` of them real) over `steps` input pairs, going on from
/// the sums in `y` unless `first`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize>(t: Tile<bf16>) {
    let (x, panel, steps) = (t.x, t.panel, t.steps);
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    let mut acc = start_tile::<R, NV, _>(&t);
    let x32 = x as *const i32;
    for s in 0..steps {
        prefetch_ahead(t.ahead, s);
        let wp = panel.add(s * NR * 2) as *const __m512i;
        let mut w = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); NV];
        for (v, wv) in w.iter_mut().enumerate() {
            *wv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(v)));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x32.add(s * R + r)));
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm512_dpbf16_ps(*c, a, w[v]);
            }
        }
    }
    store_tile(&acc, &t);
}

/// Asks for step `s` of the next panel (its two cache lines) to be brought into L2, so that the
/// first block of rows over that panel does not wait on memory: with few rows (batch-16
/// decoding) each panel is used twice and its first pass is most of its time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(ahead: *const bf16, s: usize) {
    use std::arch::x86_64::*;
    if !ahead.is_null() {
        let p = ahead.add(s * NR * 2) as *const i8;
        _mm_prefetch::<_MM_HINT_T1>(p);
        _mm_prefetch::<_MM_HINT_T1>(p.add(64));
    }
}

/// As `tile`, each weight pair widened to f32 (the even element is the low half of a 32-bit
/// lane: shifted up; the odd one the high half: masked) and accumulated odd first, as
/// `vdpbf16ps` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile_widen<const R: usize>(t: Tile<f32>) {
    let (x, panel, steps) = (t.x, t.panel, t.steps);
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    let mut acc = start_tile::<R, NV, _>(&t);
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for s in 0..steps {
        prefetch_ahead(t.ahead, s);
        let wp = panel.add(s * NR * 2) as *const __m512i;
        let mut even = [_mm512_setzero_ps(); NV];
        let mut odd = [_mm512_setzero_ps(); NV];
        for v in 0..NV {
            let raw = _mm512_loadu_si512(wp.add(v));
            even[v] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            odd[v] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xo = _mm512_set1_ps(*x.add(s * 2 * R + r * 2 + 1));
            let xe = _mm512_set1_ps(*x.add(s * 2 * R + r * 2));
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm512_fmadd_ps(xo, odd[v], *c);
                *c = _mm512_fmadd_ps(xe, even[v], *c);
            }
        }
    }
    store_tile(&acc, &t);
}

/// As `tile_widen`, in 8-lane registers, for a block of `rows` rows (at most [`MR8`]) × half a
/// panel (16 columns, `t.part`): an R × 32 tile does not fit in sixteen of them (at 5 rows × 16
/// columns: 10 accumulators, 4 widened weight vectors, a broadcast). Each output lane sees the
/// same operations in the same order as in the 16-lane kernel, so the bits are the same.
///
/// Each accumulator takes two dependent multiply-adds per step (odd input, then even): with the
/// 8 of a 4-row tile a step waits on their latency as long as on the FMA units, so blocks are of
/// 5 rows where they can be, which also spreads a step's 4 widening instructions over 20
/// multiply-adds instead of 16; and the walker runs each half of a panel over every block before
/// the other half, so that half's slice (28 KB at k = 896) stays in L1. Against blocks of 8 rows
/// run as 4-row tiles this was faster on an AVX2-only core for prefill, batch-100 decoding and a
/// whole score, with the same refusals and KL (CHANGELOG.md, Performance, "Without AVX-512").
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_widen8(t: Tile<f32>, rows: usize) {
    match rows {
        1 => half_tile_widen8::<1>(&t),
        2 => half_tile_widen8::<2>(&t),
        3 => half_tile_widen8::<3>(&t),
        4 => half_tile_widen8::<4>(&t),
        _ => half_tile_widen8::<5>(&t),
    }
}

/// `tile_widen8` for R rows: the tile's rows × the panel's columns `16·half ..` + 16, `half`
/// being the tile's part.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn half_tile_widen8<const R: usize>(t: &Tile<f32>) {
    use std::arch::x86_64::*;
    let (x, steps, half) = (t.x, t.steps, t.part);
    // As `start_tile`: later k-blocks go on from the sums in `y`.
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let live = |v: usize| {
        let n = t.cols.saturating_sub(half * 16 + v * 8).min(8);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes)
    };
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if !t.first {
        for (r, row) in acc.iter_mut().enumerate() {
            let yr = t.y.add(r * t.ldy + half * 16);
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm256_maskload_ps(yr.add(v * 8), live(v));
            }
        }
    }
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    for s in 0..steps {
        prefetch_ahead(t.ahead, s);
        // A step's 32 pairs are 128 bytes; this half's 16 are the 64 from `32 · half` bf16s.
        let wp = t.panel.add(s * NR * 2 + half * 32) as *const __m256i;
        let mut even = [_mm256_setzero_ps(); 2];
        let mut odd = [_mm256_setzero_ps(); 2];
        for v in 0..2 {
            let raw = _mm256_loadu_si256(wp.add(v));
            even[v] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
            odd[v] = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let at = s * 2 * R + r * 2;
            let xo = _mm256_set1_ps(*x.add(at + 1));
            let xe = _mm256_set1_ps(*x.add(at));
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm256_fmadd_ps(xo, odd[v], *c);
                *c = _mm256_fmadd_ps(xe, even[v], *c);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let yr = t.y.add(r * t.ldy + half * 16);
        for (v, c) in row.iter().enumerate() {
            if t.cols <= half * 16 + v * 8 {
                break;
            }
            _mm256_maskstore_ps(yr.add(v * 8), live(v), *c);
        }
    }
}

/// The accumulators an R × 32 block starts from: zero in the first k-block, else the sums the
/// earlier blocks left in `y` — so each output is one chain of multiply-adds over the whole k,
/// the same bits whatever the block length (which differs between kernels, [`KC8`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn start_tile<const R: usize, const NV: usize, T>(
    t: &Tile<T>,
) -> [[std::arch::x86_64::__m512; NV]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    if !t.first {
        for (r, row) in acc.iter_mut().enumerate() {
            let yr = t.y.add(r * t.ldy);
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm512_maskz_loadu_ps(live_mask(t.cols, v), yr.add(v * 16));
            }
        }
    }
    acc
}

/// Which of the 16 columns from `16 · v` of a 32-column block with `cols` real ones are real.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn live_mask(cols: usize, v: usize) -> u16 {
    match cols.saturating_sub(v * 16).min(16) {
        16 => 0xffff,
        live => ((1u32 << live) - 1) as u16,
    }
}

/// Writes an R × 32 block of accumulators to `y`, `cols` of the 32 columns real.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize, const NV: usize, T>(
    acc: &[[std::arch::x86_64::__m512; NV]; R],
    t: &Tile<T>,
) {
    use std::arch::x86_64::*;
    for (r, row) in acc.iter().enumerate() {
        let yr = t.y.add(r * t.ldy);
        for (v, c) in row.iter().enumerate() {
            let m = live_mask(t.cols, v);
            if m == 0 {
                break;
            }
            _mm512_mask_storeu_ps(yr.add(v * 16), m, *c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::test_runs;
    use crate::util::noise;

    #[test]
    fn blocks_cover_the_rows_in_the_fewest_blocks_as_even_as_they_go() {
        for mr in [MR, MR8] {
            for rows in 1..=MC {
                let b: Vec<(usize, usize)> = blocks(rows, mr).collect();
                assert_eq!(b.len(), rows.div_ceil(mr), "{rows} rows in blocks of {mr}");
                let mut next = 0;
                for &(at, n) in &b {
                    assert_eq!(at, next, "{rows} rows: blocks {b:?} leave a gap");
                    assert!((1..=mr).contains(&n), "{rows} rows: a block of {n}");
                    next += n;
                }
                assert_eq!(next, rows);
                let (lo, hi) = (b.iter().map(|x| x.1).min(), b.iter().map(|x| x.1).max());
                assert!(hi.unwrap() - lo.unwrap() <= 1, "{rows} rows: {b:?}");
            }
        }
        assert_eq!(
            blocks(16, MR8).map(|b| b.1).collect::<Vec<_>>(),
            [4, 4, 4, 4]
        );
    }

    /// Every kernel computes each output as one chain of fused multiply-adds over the whole k,
    /// pair by pair, odd input first — whatever its k-block length ([`KC`], [`KC8`]): the same
    /// bits as that chain written out in scalar code.
    #[test]
    fn every_output_is_one_chain_of_fused_multiply_adds() {
        // 263 rows: a pass of MC rows and one of 7 (blocks of 4 + 3 in the 8-lane kernel).
        for (m, k, n, seed) in [
            (9, 33, 33, 11),
            (5, 1100, 40, 12),
            (6, 2501, 35, 13),
            (263, 1100, 40, 14),
        ] {
            let x = rounded(&noise(m * k, seed));
            let w = Packed::new(&noise(n * k, seed + 100), n, k);
            let wr = w.unpack();
            let mut want = vec![0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    let (xr, wc) = (&x[r * k..(r + 1) * k], &wr[c * k..(c + 1) * k]);
                    let mut acc = 0f32;
                    for p in (0..k).step_by(2) {
                        if p + 1 < k {
                            acc = xr[p + 1].mul_add(wc[p + 1], acc);
                        }
                        acc = xr[p].mul_add(wc[p], acc);
                    }
                    want[r * n + c] = acc;
                }
            }
            for kern in Kernel::all_here() {
                let got = matmul_with(&x, m, &w, kern);
                let diff = (0..m * n).filter(|&i| got[i].to_bits() != want[i].to_bits());
                assert_eq!(diff.count(), 0, "({m},{k},{n}): {kern:?} is not the chain");
            }
        }
    }

    /// Against an f64 product of the same bf16-rounded operands, on shapes with every tail (m
    /// not a multiple of 8, n not of 32, odd k, k across several k-blocks, m across two chunks
    /// of MC rows).
    #[test]
    fn agrees_with_the_exact_product_of_the_rounded_operands() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        let kernels = Kernel::all_here();
        eprintln!("kernels compared: {kernels:?}");
        for (m, k, n, seed) in [
            (1, 1, 1, 1),
            (3, 31, 5, 2),
            (8, 32, 32, 3),
            (9, 33, 33, 4),
            (16, 576, 64, 5),
            (13, 700, 70, 6),
            (17, 896, 97, 7),
            (5, 1100, 40, 8),
            (300, 70, 33, 9),
            (6, 2501, 35, 10),
        ] {
            let x = noise(m * k, seed);
            let wf = noise(n * k, seed + 100);
            let w = Packed::new(&wf, n, k);
            let y = matmul_with(&x, m, &w, kernels[0]);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for &kern in &kernels[1..] {
                let other = matmul_with(&x, m, &w, kern);
                assert_eq!(
                    bits(&y),
                    bits(&other),
                    "({m},{k},{n}): {:?} and {kern:?} differ",
                    kernels[0]
                );
            }
            let xr = to_bf16(&x);
            let wr = to_bf16(&wf);
            assert_eq!(
                w.unpack(),
                wr.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
            );
            for r in 0..m {
                for c in 0..n {
                    let terms = (0..k).map(|p| xr[r * k + p].to_f64() * wr[c * k + p].to_f64());
                    let exact: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum();
                    let err = (y[r * n + c] as f64 - exact).abs();
                    assert!(
                        err <= 1e-5 * scale.max(1.0),
                        "({m},{k},{n}) at ({r},{c}): {} vs {exact} (scale {scale})",
                        y[r * n + c]
                    );
                }
            }
        }
    }

    /// Subnormal inputs count as zero in both kernels, in a full group of 16 and in the tail
    /// (what `vdpbf16ps` does with them), and every other input is rounded to nearest even.
    #[test]
    fn subnormal_inputs_are_zero_in_every_kernel() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        let (m, k, n) = (3, 19, 40);
        let mut x = noise(m * k, 21);
        let w = Packed::new(&noise(n * k, 22), n, k);
        let mut zeroed = x.clone();
        for at in [3, k + 17, 2 * k + 18] {
            x[at] = f32::from_bits(0x0001_2345) * if at % 2 == 0 { 1.0 } else { -1.0 };
            zeroed[at] = 0.0;
        }
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for kern in Kernel::all_here() {
            assert_eq!(
                bits(matmul_with(&x, m, &w, kern)),
                bits(matmul_with(&zeroed, m, &w, kern)),
                "{kern:?}"
            );
        }
        let mut d = vec![0f32; 19];
        round_row(&x[k..2 * k], &mut d);
        for (j, (&r, &v)) in d.iter().zip(&x[k..2 * k]).enumerate() {
            let want = if v.is_subnormal() {
                0.0
            } else {
                bf16::from_f32(v).to_f32()
            };
            assert_eq!(
                r.abs().to_bits(),
                want.abs().to_bits(),
                "element {j}: {v:e}"
            );
        }
    }

    /// Products of one input computed together (one rounding, one hand-off, tasks that mix
    /// products) are bit for bit each product computed alone, for shapes whose panel counts
    /// split unevenly across the tasks (k across k-blocks, n not a multiple of 32, one panel).
    #[test]
    fn products_of_one_input_together_equal_each_alone() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        for (m, k, ns) in [
            (3, 37, vec![70, 5, 200]),
            (17, 1100, vec![33, 32, 1]),
            (100, 64, vec![896, 128, 128]),
        ] {
            let x = noise(m * k, 31);
            let ws: Vec<Packed> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| Packed::new(&noise(n * k, 40 + i as u64), n, k))
                .collect();
            let together = matmul_many(&x, m, &ws.iter().collect::<Vec<_>>());
            assert_eq!(together.len(), ws.len());
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (w, y) in ws.iter().zip(&together) {
                assert_eq!(
                    bits(y),
                    bits(&matmul_t(&x, m, w)),
                    "m {m}, k {k}, n {}",
                    w.n
                );
            }
        }
        assert!(matmul_many(&[], 0, &[]).is_empty());
    }

    /// The fused argmax returns what candle's argmax returns on the full product: shapes across
    /// column groups (64 panels = 2,048 columns) with tails, exact ties (duplicated weight rows:
    /// the first wins), a maximum in column 0, and a NaN row.
    #[test]
    fn fused_argmax_equals_argmax_of_the_product() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        let argmax = |y: Vec<f32>, m: usize, n: usize| -> Vec<u32> {
            let t = candle_core::Tensor::from_vec(y, (m, n), &candle_core::Device::Cpu).unwrap();
            t.argmax(candle_core::D::Minus1).unwrap().to_vec1().unwrap()
        };
        for (m, k, n, seed) in [
            (1, 2, 1, 1),
            (3, 31, 33, 2),
            (9, 64, 2049, 3),
            (17, 96, 4100, 4),
            (100, 40, 6000, 5),
        ] {
            let x = noise(m * k, seed);
            let mut wf = noise(n * k, seed + 100);
            // Ties: a later copy of an earlier row, in another column group where there is one.
            let (a, b) = (n / 3, n - 1);
            if a != b {
                let row: Vec<f32> = wf[a * k..(a + 1) * k].to_vec();
                wf[b * k..(b + 1) * k].copy_from_slice(&row);
            }
            // Row 0 of W far above the rest wins for every x row with positive weight on it.
            for v in &mut wf[..k] {
                *v *= 8.0;
            }
            let w = Packed::new(&wf, n, k);
            let want = argmax(matmul_with(&x, m, &w, kernel()), m, n);
            assert_eq!(matmul_argmax(&x, m, &w), want, "({m},{k},{n})");
        }
        // Equal maxima: every column the same.
        let (m, k, n) = (4, 8, 3000);
        let w = Packed::new(&vec![0.5; n * k], n, k);
        let x = noise(m * k, 9);
        assert_eq!(matmul_argmax(&x, m, &w), vec![0; m]);
        // Equal maxima in every group but column 0's: the first of them, column 1.
        let mut wf = vec![0.5; n * k];
        wf[..k].fill(0.125);
        let w = Packed::new(&wf, n, k);
        let x: Vec<f32> = noise(m * k, 12).iter().map(|v| v.abs() + 0.01).collect();
        assert_eq!(matmul_argmax(&x, m, &w), vec![1; m]);
        // A NaN input makes a row all NaN: candle keeps column 0.
        let mut x = noise(m * k, 10);
        x[k] = f32::NAN;
        let w = Packed::new(&noise(n * k, 11), n, k);
        let want = argmax(matmul_with(&x, m, &w, kernel()), m, n);
        assert_eq!(want[1], 0);
        assert_eq!(matmul_argmax(&x, m, &w), want);
    }

    /// The portable rounding is `vcvtneps2bf16`'s: on special values and 200,000 random bit
    /// patterns against the instruction where the CPU has it, and everywhere against `half`'s
    /// nearest-even rounding on normal numbers, zero for subnormals and a quiet NaN for NaN;
    /// its 8-lane form gives its bits, where the CPU has AVX2.
    #[test]
    fn portable_rounding_is_the_instructions() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc0_1234),
            f32::MIN_POSITIVE,
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x8040_0000),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            values.push(f32::from_bits((seed >> 16) as u32));
        }
        for &v in &values {
            let r = round_bits(v);
            let want = if v.is_nan() {
                assert!(bf16::from_bits(r).is_nan(), "{:#x}", v.to_bits());
                assert_eq!(r & 0x0040, 0x0040, "{:#x}: NaN not quiet", v.to_bits());
                continue;
            } else if v.is_subnormal() || v == 0.0 {
                if v.is_sign_negative() {
                    0x8000
                } else {
                    0
                }
            } else {
                bf16::from_f32(v).to_bits()
            };
            assert_eq!(r, want, "{v:e} ({:#x})", v.to_bits());
        }
        #[cfg(target_arch = "x86_64")]
        if features().avx2 {
            // One value short of a multiple of 8: the tail too.
            let cut = &values[..values.len() / 8 * 8 - 1];
            let mut got = vec![0f32; cut.len()];
            // SAFETY: the CPU has AVX2; f32 outputs.
            unsafe { round_row_avx2(cut, &mut got) };
            for (v, g) in cut.iter().zip(got) {
                assert_eq!(
                    g.to_bits(),
                    (round_bits(*v) as u32) << 16,
                    "{:#x}",
                    v.to_bits()
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if features().avx512bf16 {
            let mut got = vec![bf16::ZERO; values.len()];
            // SAFETY: the CPU has AVX512_BF16.
            unsafe { round_row_avx512(&values, &mut got) };
            for (v, g) in values.iter().zip(got) {
                assert_eq!(g.to_bits(), round_bits(*v), "{:#x}", v.to_bits());
            }
        } else {
            eprintln!("the instruction itself not compared: this CPU has no AVX512_BF16");
        }
    }
}
