//! Greedy decoding's output head, screened in integers and finished exactly.
//!
//! After its first token, decoding needs only the argmax of each row's logits — on Qwen 0.5B a
//! product with 151,936 head rows, 27% of a token's multiply-adds. The screen computes every
//! logit approximately in integers (the head's rows quantised to int8 with one scale per row,
//! the bf16-rounded state to int16 with one scale per state, multiplied by `vpmaddwd`, whose
//! 8-lane form retires up to twice the multiply-adds per cycle of 8-lane f32 fused multiply-adds
//! on AVX2 cores; or, see [`Flavour`], int8 states with AVX512_VNNI's `vpdpbusd`) along with a
//! bound on how far each approximation can be from the exact logit.
//! Only rows whose upper bound reaches the largest lower bound can be the argmax; those alone
//! are multiplied by the bf16 kernel itself. So the token is the one [`bf16::matmul_argmax`]
//! gives, bit for bit (tested), whatever the bound's slack: a looser bound only leaves more rows
//! to compute. On 960 decoding states of Qwen 0.5B it left 2 rows per state on average, 18 at most
//! (`benches/head_int8_screen_feasibility.py`, run before this was written).
//!
//! For a rounded state x and a head row w (both exact in bf16), with x̂ = t·p and ŵ = s·q,
//!   x·w − x̂·ŵ = x·(w − ŵ) + (x − x̂)·ŵ,
//! each term bounded by the smaller of Hölder's (‖·‖₁ × max) and Cauchy–Schwarz's bounds from
//! norms stored per row and computed per state; added to it, the f32 rounding of the kernel's
//! own sum (at most γ Σ|x_i w_i| ≤ γ ‖x‖₂ ‖w‖₂ with γ = n·2⁻²⁴ for its n ≤ 2k roundings)
//! and of the screen's scaling. int16 states, not int8: with one scale per state set by its
//! largest (massive) dimension, int8 states left 30 rows on average and 3,173 at most.

use crate::model::bf16::{self, Packed};
use crate::model::cpu::features;
use crate::model::pool;
use crate::util::noise;

/// Head rows per panel: one vector of 16 i32 sums (two of 8 on AVX2).
const NR: usize = 16;
/// State rows per tile: 12 accumulators, 2 weight vectors and a broadcast of AVX2's 16 registers.
const MR: usize = 6;
/// Panels per task: the task's candidates are merged once per task.
const GROUP: usize = 64;
/// Above this share of the head's rows left to compute (over the batch), the screen has not
/// paid: the full head is computed instead (same token).
const MAX_SHARE: usize = 8;

/// The screen's two integer forms; either gives the exact token (the bound accounts for its
/// quantisation), they differ in speed and in how many rows they leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// int16 states × int8 rows widened to int16, `vpmaddwd` (AVX2). The states' quantisation
    /// error is negligible: 2 rows left per decoding state on average.
    Int16,
    /// u8 states (int8 + 128) × int8 rows, `vpdpbusd` (AVX512_VNNI): four multiply-adds per
    /// lane and instruction, but the coarser states leave more rows (30 on average).
    Int8,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Int16 => "int16 states × int8 rows (vpmaddwd)",
            Flavour::Int8 => "int8 states × int8 rows (vpdpbusd)",
        }
    }

    /// Whether this CPU has the flavour's vector instructions (without them its sums are
    /// computed one at a time, for tests only).
    pub fn runs_here(self) -> bool {
        let f = features();
        match self {
            Flavour::Int16 => f.avx2,
            Flavour::Int8 => f.vnni,
        }
    }

    /// Inputs per column and step of the tile: a pair (`vpmaddwd`) or a quad (`vpdpbusd`).
    fn step(self) -> usize {
        match self {
            Flavour::Int16 => 2,
            Flavour::Int8 => 4,
        }
    }

    /// The states' integers lie in ±levels: int16's as many as an i32 sum of kp products with
    /// ±127 holds; int8's ±127 (stored + 128).
    fn levels(self, kp: usize) -> i32 {
        match self {
            Flavour::Int16 => ((i32::MAX as i64) / (kp.max(1) as i64 * 127)).min(16383) as i32,
            Flavour::Int8 => {
                if (kp as i64) * 255 * 127 < i32::MAX as i64 {
                    127
                } else {
                    0
                }
            }
        }
    }
}

/// What the bound needs of a panel's head rows (each rounded up), lane by lane so that the
/// bounds of a tile's row are computed in vectors.
#[derive(Debug, Clone, Copy, Default)]
struct PanelTerms {
    scale: [f32; NR],
    /// What the integer sums carry beyond Σ p·q: 128 Σ q for int8 (its states are stored + 128).
    offset: [i32; NR],
    /// max |w − ŵ| and ‖w − ŵ‖₂.
    err_max: [f32; NR],
    err_l2: [f32; NR],
    /// ‖ŵ‖₁ and ‖ŵ‖₂.
    hat_l1: [f32; NR],
    hat_l2: [f32; NR],
    /// ‖w‖₂, for the kernel's rounding.
    w_l2: [f32; NR],
}

/// What the bound needs of one state (each rounded up), and its scale.
#[derive(Debug, Clone, Copy)]
struct StateTerms {
    scale: f32,
    l1: f32,
    l2: f32,
    err_max: f32,
    err_l2: f32,
}

/// The states quantised for one call, rows of `kp` (zero in the padding).
enum States {
    Int16(Vec<i16>),
    Int8(Vec<u8>),
}

/// The head quantised for the screen (built once per model: 136 MB of int8 for Qwen 0.5B).
pub struct Screen {
    flavour: Flavour,
    n: usize,
    k: usize,
    /// k rounded up to the flavour's step.
    kp: usize,
    levels: i32,
    /// The rows as int8 in panels of [`NR`]: per step of the flavour's 2 or 4 inputs, the
    /// panel's rows' values side by side (32 or 64 bytes) — what two `vpmovsxbw` widen into
    /// `vpmaddwd`'s pairs, or one `vpdpbusd` takes as quads.
    q: Vec<i8>,
    terms: Vec<PanelTerms>,
}

/// The screen is used by default where the timing at load puts it under this share of the fused
/// argmax's time.
const PAYS_BELOW: f64 = 0.9;

/// The flavour this process screens the head with, if any: where the screen beats the fused
/// argmax in a timing at first use ([`timed`]: the faster flavour, if under 0.9× the fused
/// argmax's time). `OUTLIERLAB_HEAD_SCREEN=0` turns it off, `=1` on (the timed flavour),
/// `=int16` or `=int8` names one (if the CPU has its instructions).
pub fn chosen() -> Option<Flavour> {
    let if_faster = || timed().filter(|&(_, r)| r < PAYS_BELOW).map(|(f, _)| f);
    let forced = |f: Flavour| {
        if f.runs_here() {
            Some(f)
        } else {
            eprintln!(
                "warning: OUTLIERLAB_HEAD_SCREEN asks for the {} screen, which this CPU cannot run; screening as timed",
                f.name()
            );
            if_faster()
        }
    };
    match std::env::var("OUTLIERLAB_HEAD_SCREEN").as_deref() {
        Ok("0") | Ok("off") => None,
        Ok("1") | Ok("on") => timed().map(|(f, _)| f),
        Ok("int16") => forced(Flavour::Int16),
        Ok("int8") => forced(Flavour::Int8),
        _ => if_faster(),
    }
}

/// The fastest flavour this CPU runs and its time over the fused argmax's, timed once per
/// process (~150 ms per flavour, at the first bf16 model) on a random head of 16,384 rows × 896
/// against 32 states with one large dimension, each warmed up, the two alternated, best of
/// five; `None` where no flavour runs. Where 16-lane f32 fused multiply-adds retire as many
/// multiply-adds as 8-lane `vpmaddwd` (Intel's server cores with two AVX-512 units) int16 cannot
/// pay; on an AVX2-only core it takes well under the fused argmax's time (`examples/head_screen`;
/// CHANGELOG.md, Performance).
pub fn timed() -> Option<(Flavour, f64)> {
    use std::sync::OnceLock;
    static TIMED: OnceLock<Option<(Flavour, f64)>> = OnceLock::new();
    *TIMED.get_or_init(|| {
        if !bf16::available() {
            return None;
        }
        let (m, k, n) = (32, 896, 16384);
        let head = Packed::new(&noise(n * k, 1), n, k);
        // One dimension of each state ten times the others' scale, as in decoding states (Qwen
        // 0.5B's dimension 53: mean |h| 32 against a median of 3.7): it sets the state's scale,
        // and so how many rows int8 states leave.
        let mut x = noise(m * k, 2);
        for row in x.chunks_exact_mut(k) {
            row[0] = 10.0f32.copysign(row[0]);
        }
        [Flavour::Int16, Flavour::Int8]
            .into_iter()
            .filter(|f| f.runs_here())
            .filter_map(|f| {
                let screen = Screen::new(&head, f)?;
                let time = |screened: bool| {
                    let t = std::time::Instant::now();
                    let _ = if screened {
                        screen.argmax(&x, m, &head)
                    } else {
                        bf16::matmul_argmax(&x, m, &head)
                    };
                    t.elapsed()
                };
                let _ = (time(false), time(true));
                let (mut full, mut screened) = (std::time::Duration::MAX, std::time::Duration::MAX);
                for _ in 0..5 {
                    full = full.min(time(false));
                    screened = screened.min(time(true));
                }
                Some((f, screened.as_secs_f64() / full.as_secs_f64()))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
    })
}

/// `v` rounded up to an f32 (for a non-negative bound term computed in f64).
fn up(v: f64) -> f32 {
    let f = v as f32;
    if (f as f64) < v {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

/// A row quantised to integers with one scale: the f64 sums its bound terms come from.
struct Quantised {
    scale: f32,
    /// max |v − v̂| and Σ (v − v̂)².
    err_max: f64,
    err_sq: f64,
    /// Σ |v| and Σ v² of the values.
    l1: f64,
    sq: f64,
    /// Σ |v̂| and Σ v̂² of the quantised values.
    hat_l1: f64,
    hat_sq: f64,
    /// Σ of the integers.
    sum: i32,
}

/// Quantises `row` to integers in ±`levels` with one scale (its largest |value| / levels; 1 for
/// a zero row), handing each to `put(column, integer)`. Head rows and states alike: the bound
/// holds because both are quantised by this one rule.
fn quantise(row: &[f32], levels: i32, mut put: impl FnMut(usize, i32)) -> Quantised {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / levels as f32 } else { 1.0 };
    let (s, lv) = (scale as f64, levels as f64);
    let mut out = Quantised {
        scale,
        err_max: 0.0,
        err_sq: 0.0,
        l1: 0.0,
        sq: 0.0,
        hat_l1: 0.0,
        hat_sq: 0.0,
        sum: 0,
    };
    for (c, &v) in row.iter().enumerate() {
        let p = (v as f64 / s).round().clamp(-lv, lv);
        put(c, p as i32);
        let (v, hat) = (v as f64, p * s);
        let e = (v - hat).abs();
        out.err_max = out.err_max.max(e);
        out.err_sq += e * e;
        out.l1 += v.abs();
        out.sq += v * v;
        out.hat_l1 += hat.abs();
        out.hat_sq += hat * hat;
        out.sum += p as i32;
    }
    out
}

/// f64 sums of ≤ 10⁵ terms are far within this relative pad, added before rounding up.
const PAD: f64 = 1.0 + 1e-6;

impl Screen {
    /// Quantises a packed head for `flavour`; `None` if a value is not finite or the head too
    /// wide for the flavour's sums (the full head then serves).
    pub fn new(head: &Packed, flavour: Flavour) -> Option<Screen> {
        let (n, k) = (head.n, head.k);
        let step = flavour.step();
        let kp = k.div_ceil(step) * step;
        let levels = flavour.levels(kp);
        if levels < 127 {
            return None;
        }
        let panels = n.div_ceil(NR);
        let mut q = vec![0i8; panels * kp * NR];
        let mut terms = vec![PanelTerms::default(); panels];
        // Once per model, so rayon's pool does: nothing else runs.
        use rayon::prelude::*;
        let finite = q
            .par_chunks_mut(kp * NR)
            .zip(terms.par_iter_mut())
            .enumerate()
            .all(|(p, (panel, t))| {
                let ids: Vec<u32> = (p * NR..((p + 1) * NR).min(n)).map(|j| j as u32).collect();
                let w = head.rows(&ids);
                for (lane, row) in w.chunks_exact(k).enumerate() {
                    if row.iter().any(|v| !v.is_finite()) {
                        return false;
                    }
                    let z = quantise(row, 127, |c, p| {
                        panel[(c / step) * NR * step + lane * step + c % step] = p as i8;
                    });
                    t.scale[lane] = z.scale;
                    t.offset[lane] = if flavour == Flavour::Int8 {
                        128 * z.sum
                    } else {
                        0
                    };
                    t.err_max[lane] = up(z.err_max);
                    t.err_l2[lane] = up(z.err_sq.sqrt() * PAD);
                    t.hat_l1[lane] = up(z.hat_l1 * PAD);
                    t.hat_l2[lane] = up(z.hat_sq.sqrt() * PAD);
                    t.w_l2[lane] = up(z.sq.sqrt() * PAD);
                }
                true
            });
        finite.then_some(Screen {
            flavour,
            n,
            k,
            kp,
            levels,
            q,
            terms,
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + self.terms.len() * std::mem::size_of::<PanelTerms>()
    }

    /// For each row of `x [m, k]`, the column of `x · headᵀ` with the largest value, exactly as
    /// [`bf16::matmul_argmax`] returns it (`head` is the matrix this screen was built from).
    pub fn argmax(&self, x: &[f32], m: usize, head: &Packed) -> Vec<u32> {
        assert_eq!((head.n, head.k), (self.n, self.k), "not this screen's head");
        assert_eq!(x.len(), m * self.k, "x is not [m, k]");
        if m == 0 || self.n == 0 || self.k == 0 || !x.iter().all(|v| v.is_finite()) {
            return bf16::matmul_argmax(x, m, head);
        }
        let Some(cands) = self.candidates(x, m) else {
            return bf16::matmul_argmax(x, m, head);
        };
        if cands.iter().map(Vec::len).sum::<usize>() * MAX_SHARE > self.n * m {
            return bf16::matmul_argmax(x, m, head);
        }
        // Each row against its own candidates: a state the screen leaves many rows for costs
        // its own rows only (a union over the batch would multiply them by every state).
        cands
            .iter()
            .enumerate()
            .map(|(r, cs)| {
                let exact = bf16::matmul_t(&x[r * self.k..(r + 1) * self.k], 1, &head.gather(cs));
                // Columns ascending, a later one only on a strictly larger value: the first of
                // equal maxima, as the full head's scan.
                let mut best: Option<(f32, u32)> = None;
                for (&c, &v) in cs.iter().zip(&exact) {
                    if best.is_none_or(|(b, _)| v > b) {
                        best = Some((v, c));
                    }
                }
                best.expect("the argmax is always a candidate").1
            })
            .collect()
    }

    /// Per row of `x [m, k]`, how many head rows the screen leaves to compute exactly (`None`
    /// where the full head would serve instead: a value or bound not finite).
    pub fn rows_left(&self, x: &[f32], m: usize) -> Option<Vec<usize>> {
        assert_eq!(x.len(), m * self.k, "x is not [m, k]");
        if !x.iter().all(|v| v.is_finite()) {
            return None;
        }
        Some(self.candidates(x, m)?.iter().map(Vec::len).collect())
    }

    /// Per row of `x`, the columns (ascending) that the screen cannot rule out; `None` when a
    /// bound is not finite (the full head then serves).
    fn candidates(&self, x: &[f32], m: usize) -> Option<Vec<Vec<u32>>> {
        let (k, kp) = (self.k, self.kp);
        let xr = bf16::rounded(x);
        let rows = m.div_ceil(MR) * MR;
        let mut xq = match self.flavour {
            Flavour::Int16 => States::Int16(vec![0; rows * kp]),
            Flavour::Int8 => States::Int8(vec![128; rows * kp]),
        };
        let mut states = Vec::with_capacity(m);
        for (r, row) in xr.chunks_exact(k).enumerate() {
            let z = quantise(row, self.levels, |c, p| match &mut xq {
                States::Int16(d) => d[r * kp + c] = p as i16,
                States::Int8(d) => d[r * kp + c] = (p + 128) as u8,
            });
            states.push(StateTerms {
                scale: z.scale,
                l1: up(z.l1 * PAD),
                l2: up(z.sq.sqrt() * PAD),
                err_max: up(z.err_max),
                err_l2: up(z.err_sq.sqrt() * PAD),
            });
        }
        if states
            .iter()
            .any(|s| !(s.l1.is_finite() && s.l2.is_finite()) || s.l2 > 1e30)
        {
            return None;
        }
        // γ of the kernel's roundings: k fused multiply-adds, plus one addition per k-block
        // beyond the first when k is long — at most 2k, taken as 2k + 8.
        let gamma = (2 * kp + 8) as f32 * f32::EPSILON / 2.0;
        let panels = self.n.div_ceil(NR);
        let groups = pool::parallel_map(panels.div_ceil(GROUP), |g| {
            let (p0, p1) = (g * GROUP, ((g + 1) * GROUP).min(panels));
            self.scan(&xq, &states, gamma, p0, p1)
        });
        // The best lower bound of each row over every group, then each group's survivors.
        Some(
            (0..m)
                .map(|r| {
                    let lower = groups
                        .iter()
                        .map(|g| g[r].0)
                        .fold(f32::NEG_INFINITY, f32::max);
                    groups
                        .iter()
                        .flat_map(|g| g[r].1.iter())
                        .filter(|&&(_, upper)| upper >= lower)
                        .map(|&(c, _)| c)
                        .collect()
                })
                .collect(),
        )
    }

    /// Panels `p0..p1` against every state: per state, the group's best lower bound and the
    /// columns whose upper bound reaches it, with that bound.
    fn scan(
        &self,
        xq: &States,
        states: &[StateTerms],
        gamma: f32,
        p0: usize,
        p1: usize,
    ) -> Vec<(f32, Vec<(u32, f32)>)> {
        let (m, kp) = (states.len(), self.kp);
        let mut out: Vec<(f32, Vec<(u32, f32)>)> = vec![(f32::NEG_INFINITY, Vec::new()); m];
        let mut sums = [[0i32; NR]; MR];
        for p in p0..p1 {
            let panel = &self.q[p * kp * NR..(p + 1) * kp * NR];
            let cols = (self.n - p * NR).min(NR);
            let mut r0 = 0;
            while r0 < m {
                let rr = (m - r0).min(MR);
                tile_sums(xq, r0, kp, panel, rr, &mut sums);
                for (r, s) in sums.iter().enumerate().take(rr) {
                    let (lower, found) = &mut out[r0 + r];
                    let mut upper = [0f32; NR];
                    *lower = lower.max(bounds(
                        &Panel {
                            sums: s,
                            cols,
                            st: &states[r0 + r],
                            t: &self.terms[p],
                            gamma,
                        },
                        &mut upper,
                    ));
                    for (c, &u) in upper.iter().enumerate().take(cols) {
                        if u >= *lower {
                            found.push(((p * NR + c) as u32, u));
                        }
                    }
                }
                r0 += MR;
            }
        }
        for (lower, found) in &mut out {
            found.retain(|&(_, upper)| upper >= *lower);
        }
        out
    }
}

/// One state's integer sums over one panel, with what its bounds need.
#[derive(Clone, Copy)]
struct Panel<'a> {
    sums: &'a [i32; NR],
    /// The panel's real columns (the rest are padding).
    cols: usize,
    st: &'a StateTerms,
    t: &'a PanelTerms,
    gamma: f32,
}

/// `upper` gets each column's a + b; the largest a − b over the real columns is returned.
fn bounds(a: &Panel, upper: &mut [f32; NR]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        if f.avx512 {
            // SAFETY: the CPU has AVX-512 F and BW.
            return unsafe { bounds_avx512(a, upper) };
        }
        if f.avx2 {
            // SAFETY: the CPU has AVX2.
            return unsafe { bounds_avx2(a, upper) };
        }
    }
    bounds_portable(a, upper)
}

/// `$name`: `bounds_portable` compiled for `$features`' vectors (no fused multiply-adds, so the
/// same values).
macro_rules! bounds_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(a: &Panel, upper: &mut [f32; NR]) -> f32 {
            bounds_portable(a, upper)
        }
    };
}
bounds_for!(bounds_avx2, "avx2");
bounds_for!(bounds_avx512, "avx512f,avx512bw");

#[inline(always)]
fn bounds_portable(a: &Panel, upper: &mut [f32; NR]) -> f32 {
    let Panel {
        sums,
        cols,
        st,
        t,
        gamma,
    } = *a;
    let mut lo = [0f32; NR];
    let g = gamma * st.l2;
    for c in 0..NR {
        let a = (sums[c] - t.offset[c]) as f32 * (st.scale * t.scale[c]);
        let b = ((st.l1 * t.err_max[c]).min(st.l2 * t.err_l2[c])
            + (st.err_max * t.hat_l1[c]).min(st.err_l2 * t.hat_l2[c])
            + g * t.w_l2[c])
            * (1.0 + 1e-5)
            + a.abs() * 1e-6
            + 1e-30;
        lo[c] = if c < cols { a - b } else { f32::NEG_INFINITY };
        upper[c] = a + b;
    }
    lo.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `sums[r][c]` = Σ_i xq[(r0 + r)·kp + i] · q_c[i] for the panel's columns c and `rr` rows from
/// `r0` (for int8, the states as stored: + 128).
fn tile_sums(
    xq: &States,
    r0: usize,
    kp: usize,
    panel: &[i8],
    rr: usize,
    sums: &mut [[i32; NR]; MR],
) {
    assert!(panel.len() == kp * NR && rr <= MR);
    // `$tile::<R>` for this call's R rows, where the CPU has `$has`; else the portable sums.
    macro_rules! by_rows {
        ($x:expr, $step:expr, $has:ident, $tile:ident) => {{
            let x = &$x[r0 * kp..(r0 + rr) * kp];
            #[cfg(target_arch = "x86_64")]
            {
                if features().$has {
                    // SAFETY: the CPU has the tile's features; x holds rr rows of kp, the panel
                    // kp × NR (asserted above).
                    unsafe {
                        match rr {
                            6 => $tile::<6>(x, kp, panel, sums),
                            5 => $tile::<5>(x, kp, panel, sums),
                            4 => $tile::<4>(x, kp, panel, sums),
                            3 => $tile::<3>(x, kp, panel, sums),
                            2 => $tile::<2>(x, kp, panel, sums),
                            _ => $tile::<1>(x, kp, panel, sums),
                        }
                    }
                    return;
                }
            }
            tile_portable(x, $step, kp, panel, rr, sums);
        }};
    }
    match xq {
        States::Int16(x) => by_rows!(x, 2, avx2, tile_int16),
        States::Int8(x) => by_rows!(x, 4, vnni, tile_int8),
    }
}

/// The same sums, one at a time, for a panel laid out in steps of `step` inputs (the reference
/// the tests hold the vector tiles to, and the int8 flavour's sums on a CPU without VNNI).
fn tile_portable<T: Copy + Into<i32>>(
    x: &[T],
    step: usize,
    kp: usize,
    panel: &[i8],
    rr: usize,
    sums: &mut [[i32; NR]; MR],
) {
    for (r, s) in sums.iter_mut().enumerate().take(rr) {
        for (c, out) in s.iter_mut().enumerate() {
            *out = (0..kp)
                .map(|i| {
                    x[r * kp + i].into()
                        * panel[(i / step) * NR * step + c * step + i % step] as i32
                })
                .sum();
        }
    }
}

/// R rows × one panel: per input pair, the panel's 32 int8 values widened to two vectors of 16
/// int16 (`vpmovsxbw`), the row's pair broadcast, `vpmaddwd` into 8 i32 lanes per vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_int16<const R: usize>(
    xq: &[i16],
    kp: usize,
    panel: &[i8],
    sums: &mut [[i32; NR]; MR],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let (x, w) = (xq.as_ptr(), panel.as_ptr());
    for s in 0..kp / 2 {
        let wp = w.add(s * NR * 2) as *const __m128i;
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(1)));
        for (r, a) in acc.iter_mut().enumerate() {
            let pair = (x.add(r * kp + 2 * s) as *const i32).read_unaligned();
            let xv = _mm256_set1_epi32(pair);
            a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(xv, w0));
            a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(xv, w1));
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_si256(sums[r].as_mut_ptr() as *mut __m256i, a[0]);
        _mm256_storeu_si256(sums[r].as_mut_ptr().add(8) as *mut __m256i, a[1]);
    }
}

/// R rows × one panel: per input quad, the panel's 64 int8 values as one vector, the row's
/// quad (u8) broadcast, `vpdpbusd` into 16 i32 lanes (no intermediate saturation: 4 × 255 × 127
/// per lane and step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_int8<const R: usize>(
    xq: &[u8],
    kp: usize,
    panel: &[i8],
    sums: &mut [[i32; NR]; MR],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); R];
    let (x, w) = (xq.as_ptr(), panel.as_ptr());
    for s in 0..kp / 4 {
        let wv = _mm512_loadu_si512(w.add(s * NR * 4) as *const __m512i);
        for (r, a) in acc.iter_mut().enumerate() {
            let quad = (x.add(r * kp + 4 * s) as *const i32).read_unaligned();
            *a = _mm512_dpbusd_epi32(*a, _mm512_set1_epi32(quad), wv);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_si512(sums[r].as_mut_ptr() as *mut __m512i, *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::{test_runs, Isa};

    const FLAVOURS: [Flavour; 2] = [Flavour::Int16, Flavour::Int8];

    #[test]
    fn the_vector_tiles_sum_as_the_portable_one() {
        for f in FLAVOURS.into_iter().filter(|f| f.runs_here()) {
            eprintln!("compared: {}", f.name());
            for (k, seed) in [(4, 1), (8, 2), (896, 3), (1000, 4)] {
                let v = noise(MR * k, seed);
                let xq = match f {
                    Flavour::Int16 => {
                        States::Int16(v.iter().map(|v| (v * 16383.0) as i16).collect())
                    }
                    Flavour::Int8 => {
                        States::Int8(v.iter().map(|v| (v * 127.0 + 128.0) as u8).collect())
                    }
                };
                let panel: Vec<i8> = noise(NR * k, seed + 9)
                    .iter()
                    .map(|v| (v * 127.0) as i8)
                    .collect();
                for rr in 1..=MR {
                    let (mut a, mut b) = ([[0i32; NR]; MR], [[0i32; NR]; MR]);
                    tile_sums(&xq, 0, k, &panel, rr, &mut a);
                    match &xq {
                        States::Int16(x) => tile_portable(x, 2, k, &panel, rr, &mut b),
                        States::Int8(x) => tile_portable(x, 4, k, &panel, rr, &mut b),
                    }
                    assert_eq!(a[..rr], b[..rr], "{f:?}, k {k}, rows {rr}");
                }
            }
        }
    }

    /// The token is the full head's, for both flavours (int8's sums one at a time where the
    /// CPU lacks VNNI), on shapes with every tail, on heads with exact ties (a row repeated: the
    /// first must win), a dominant input dimension (the massive-activation case: the state's
    /// scale is set by one value), a zero state (every logit 0: column 0 wins) and every logit
    /// negative.
    #[test]
    fn gives_the_full_heads_argmax() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        // The tiles fall back to portable code without these; where they are required they must run.
        let _ = (test_runs(Isa::Avx2), test_runs(Isa::Vnni));
        for f in FLAVOURS {
            for (m, k, n, seed) in [
                (1, 1, 1, 1),
                (3, 31, 5, 2),
                (7, 64, 100, 3),
                (13, 127, 333, 4),
                (100, 96, 2000, 5),
            ] {
                let mut wf = noise(n * k, seed);
                if n > 10 {
                    // Rows 3 and 9 equal: whenever 9 wins, 3 must.
                    let (a, b) = wf.split_at_mut(9 * k);
                    b[..k].copy_from_slice(&a[3 * k..4 * k]);
                }
                let head = Packed::new(&wf, n, k);
                let screen = Screen::new(&head, f).expect("finite");
                let mut x = noise(m * k, seed + 50);
                let tied = |r: usize| r.is_multiple_of(4) && r % 3 != 1;
                for r in 0..m {
                    if r % 3 == 1 {
                        x[r * k] *= 500.0;
                    }
                    if r % 5 == 2 {
                        x[r * k..(r + 1) * k].fill(0.0);
                    }
                    if n > 10 && tied(r) {
                        // Make row 3 (and so 9) the winner.
                        let w3: Vec<f32> = wf[3 * k..4 * k].to_vec();
                        for (v, w) in x[r * k..(r + 1) * k].iter_mut().zip(&w3) {
                            *v += 4.0 * w;
                        }
                    }
                }
                let want = bf16::matmul_argmax(&x, m, &head);
                assert_eq!(screen.argmax(&x, m, &head), want, "{f:?} ({m},{k},{n})");
                if n > 10 {
                    assert!(
                        (0..m).filter(|&r| tied(r)).all(|r| want[r] == 3),
                        "ties set up"
                    );
                }
                // Every logit negative (and n not a multiple of a panel): a padding lane's zero
                // must not pass for a lower bound.
                let neg: Vec<f32> = wf.iter().map(|v| -v.abs() - 0.01).collect();
                let pos: Vec<f32> = x.iter().map(|v| v.abs() + 0.01).collect();
                let head = Packed::new(&neg, n, k);
                let screen = Screen::new(&head, f).expect("finite");
                let want = bf16::matmul_argmax(&pos, m, &head);
                assert_eq!(
                    screen.argmax(&pos, m, &head),
                    want,
                    "{f:?} negative ({m},{k},{n})"
                );
            }
        }
    }

    /// The bound holds: with the bound alone deciding, the exact argmax always survives, and
    /// on random data few others do.
    #[test]
    fn leaves_few_rows_and_always_the_argmax() {
        if !test_runs(Isa::Avx2Fma) {
            return;
        }
        // The tiles fall back to portable code without these; where they are required they must run.
        let _ = (test_runs(Isa::Avx2), test_runs(Isa::Vnni));
        let (m, k, n) = (20, 896, 4096);
        let head = Packed::new(&noise(n * k, 7), n, k);
        let x = noise(m * k, 8);
        let want = bf16::matmul_argmax(&x, m, &head);
        for f in FLAVOURS {
            let screen = Screen::new(&head, f).expect("finite");
            let cands = screen.candidates(&x, m).expect("finite");
            for (r, cs) in cands.iter().enumerate() {
                assert!(
                    cs.contains(&want[r]),
                    "{f:?} row {r}: {} not among {cs:?}",
                    want[r]
                );
                assert!(cs.len() < n / 20, "{f:?} row {r}: {} candidates", cs.len());
            }
        }
    }
}
