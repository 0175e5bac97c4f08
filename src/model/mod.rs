//! The model runtime: a decoder-only transformer on the CPU in f32, with every residual-stream
//! state exposed and the matrices that write into the residual stream editable in place.
//!
//! Weights are held under Hugging Face names (`model.layers.3.self_attn.o_proj.weight`) whatever
//! file they came from, so that GGUF and safetensors checkpoints build the same model and an
//! edited model can be exported for transformers.

pub mod arch;
pub mod batching;
pub mod config;
pub mod generate;
pub mod kernels;
pub mod load;

// The paths the rest of the crate (and the tests) name, whichever folder holds the file.
pub use arch::{gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3};
pub use kernels::{attention, bf16, cpu, norm, pool, screen, swiglu};
pub use load::{chat, export, gguf, hf, source, tokenizer};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

pub use config::{Config, Family};
pub use source::{load, load_with, LoadedModel};

/// Reads one tensor by its Hugging Face name from a checkpoint, in f32 (`None`: the checkpoint
/// has no such tensor).
pub type TensorReader = Box<dyn FnMut(&str) -> Result<Option<Tensor>> + Send>;

/// Tensors by Hugging Face name, f32 on the CPU: held in memory, or read one at a time from
/// the checkpoint when the model takes it (so that a bf16 model never holds the whole
/// checkpoint in f32: each layer is packed as soon as it is built).
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub origin: String,
    reader: Option<TensorReader>,
    /// Makes the tensors a model asks for by name and shape (random checkpoints: `load::synth`).
    maker: Option<TensorMaker>,
}

/// Makes a tensor of a given name and shape.
pub type TensorMaker = Box<dyn FnMut(&str, &[usize]) -> Result<Tensor> + Send>;

impl Weights {
    /// Tensors already in memory.
    pub fn in_memory(tensors: HashMap<String, Tensor>, origin: String) -> Weights {
        Weights {
            tensors,
            origin,
            reader: None,
            maker: None,
        }
    }

    /// Tensors read from the checkpoint as they are taken.
    pub fn reading(reader: TensorReader, origin: String) -> Weights {
        Weights {
            tensors: HashMap::new(),
            origin,
            reader: Some(reader),
            maker: None,
        }
    }

    /// `tensors`, and every other tensor with a known shape made by `maker` when taken.
    pub fn making(tensors: HashMap<String, Tensor>, maker: TensorMaker, origin: String) -> Weights {
        Weights {
            tensors,
            origin,
            reader: None,
            maker: Some(maker),
        }
    }

    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.take_read(name)?.with_context(|| {
            format!("{} has no tensor '{name}': the checkpoint is incomplete or of another architecture", self.origin)
        })
    }

    /// A tensor the checkpoint may lack; a tensor it has but cannot read is an error.
    pub fn take_opt(&mut self, name: &str) -> Result<Option<Tensor>> {
        self.take_read(name)
    }

    fn take_read(&mut self, name: &str) -> Result<Option<Tensor>> {
        if let Some(t) = self.tensors.remove(name) {
            return Ok(Some(t));
        }
        match &mut self.reader {
            Some(read) => read(name),
            None => Ok(None),
        }
    }

    pub fn take_shaped(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        if let Some(make) = &mut self.maker {
            if !self.tensors.contains_key(name) {
                return make(name, dims);
            }
        }
        let t = self.take(name)?;
        if t.dims() != dims {
            bail!(
                "{}: tensor '{name}' has shape {:?}, expected {:?}",
                self.origin,
                t.dims(),
                dims
            );
        }
        Ok(t)
    }
}

/// `y = x Wᵀ + b`, like `torch.nn.Linear`, with `W` stored as `[out, in]`. (Storing `Wᵀ`
/// contiguous instead decoded no faster and made loading slower.)
/// Under [`Precision::Bf16`] the weight is only held packed for the bf16 kernel: an edit reads
/// it widened to f32, is computed in f32 and rounded back when set — as heretic edits a model
/// loaded in bf16. (Keeping the writers' f32 originals as well would cost a third more memory.)
#[derive(Clone)]
pub struct Linear {
    /// The f32 weight, under f32.
    w: Option<Tensor>,
    packed: Option<std::sync::Arc<bf16::Packed>>,
    out: usize,
    inp: usize,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// From a `[out, in]` f32 weight.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let (out, inp) = weight.dims2()?;
        Ok(Linear {
            w: Some(weight),
            packed: None,
            out,
            inp,
            bias,
        })
    }

    /// The weight in f32, `[out, in]` (exact for an f32 or edited matrix; the bf16 values
    /// widened otherwise).
    pub fn weight(&self) -> Tensor {
        match (&self.w, &self.packed) {
            (Some(w), _) => w.clone(),
            (None, Some(p)) => unpack(p),
            (None, None) => unreachable!("a Linear always holds a weight"),
        }
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Rounds the weight to bf16 and packs it for the kernel; the f32 values are dropped.
    pub fn to_bf16(&mut self) -> Result<()> {
        if self.packed.is_none() {
            self.packed = Some(pack(&self.weight())?);
        }
        self.w = None;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = Linear::forward_shared([self], x)?;
        Ok(y)
    }

    /// Each linear's `forward` of one input: where all are bf16, as one product of the kernel
    /// (the input rounded once, one hand-off to the threads), with the same values.
    pub fn forward_shared<const N: usize>(ls: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let dims = x.dims().to_vec();
        let n_in = *dims.last().context("linear input has no dimensions")?;
        let rows = x.elem_count() / n_in;
        let x2 = x.reshape((rows, n_in))?;
        let packed: Option<Vec<&bf16::Packed>> = ls.iter().map(|l| l.packed.as_deref()).collect();
        let ys: Vec<Tensor> = match packed {
            Some(ps) => matmul_packed(&x2, &ps)?,
            None => ls
                .iter()
                .map(|l| match (&l.packed, &l.w) {
                    (Some(p), _) => Ok(matmul_packed(&x2, &[p])?.remove(0)),
                    (None, Some(w)) => Ok(x2.matmul(&w.t()?)?),
                    (None, None) => unreachable!("a Linear always holds a weight"),
                })
                .collect::<Result<_>>()?,
        };
        let out: Vec<Tensor> = ys
            .into_iter()
            .zip(ls)
            .map(|(mut y, l)| -> Result<Tensor> {
                if let Some(b) = &l.bias {
                    y = y.broadcast_add(b)?;
                }
                let mut out_dims = dims.clone();
                *out_dims.last_mut().expect("non-empty") = l.out_features();
                Ok(y.reshape(out_dims)?)
            })
            .collect::<Result<_>>()?;
        Ok(out.try_into().expect("one output per linear"))
    }
}

/// A `[n, k]` f32 matrix rounded and packed for the bf16 kernel.
fn pack(t: &Tensor) -> Result<std::sync::Arc<bf16::Packed>> {
    let (n, k) = t.dims2()?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(std::sync::Arc::new(bf16::Packed::new(&v, n, k)))
}

/// A packed matrix's values widened back to an `[n, k]` f32 tensor.
fn unpack(p: &bf16::Packed) -> Tensor {
    Tensor::from_vec(p.unpack(), (p.n, p.k), &Device::Cpu)
        .expect("a packed matrix has n × k values")
}

/// `x [rows, k] · Wᵢᵀ` for each weight, through the bf16 kernel in one call.
pub fn matmul_packed(x: &Tensor, ws: &[&bf16::Packed]) -> Result<Vec<Tensor>> {
    let (rows, k) = x.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.k != k) {
        bail!("input width {k} does not match the weight's {}", w.k);
    }
    with_rows(x, |data| bf16::matmul_many(data, rows, ws))?
        .into_iter()
        .zip(ws)
        .map(|(y, w)| Ok(Tensor::from_vec(y, (rows, w.n), x.device())?))
        .collect()
}

/// The greedy token of each row of `[rows, vocab]` logits (candle's argmax: the first maximum).
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// `f` on the values of a `[rows, k]` f32 tensor on the CPU, read where they lie (a copy only
/// when the tensor is not contiguous).
fn with_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        bail!("the bf16 kernel takes f32 inputs on the CPU");
    };
    let start = layout.start_offset();
    Ok(f(&data[start..start + x.elem_count()]))
}

/// How the large matrices are stored and multiplied. f32 is the reference the transformers
/// tests compare with; bf16 halves their memory and what decoding reads, where the CPU has
/// AVX-512 or AVX2 with FMA (elsewhere the model stays f32).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// The precision a user asks for: `auto` (the default) is bf16 where this CPU has a bf16 kernel
/// path (AVX512_BF16, AVX-512, or AVX2 with FMA: every CPU this project has measured scores
/// faster in bf16 than in f32), f32 elsewhere; `f32` and `bf16` are taken as said.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl PrecisionSetting {
    pub fn name(self) -> &'static str {
        match self {
            PrecisionSetting::Auto => "auto",
            PrecisionSetting::F32 => "f32",
            PrecisionSetting::Bf16 => "bf16",
        }
    }

    /// The precision this setting means on this CPU.
    pub fn on_this_cpu(self) -> Precision {
        match self {
            PrecisionSetting::F32 => Precision::F32,
            PrecisionSetting::Bf16 => Precision::Bf16,
            PrecisionSetting::Auto if bf16::available() => Precision::Bf16,
            PrecisionSetting::Auto => Precision::F32,
        }
    }

    /// As [`on_this_cpu`](Self::on_this_cpu); `auto` says on stderr what it chose and why.
    pub fn resolve(self) -> Precision {
        let p = self.on_this_cpu();
        if self == PrecisionSetting::Auto {
            match p {
                Precision::Bf16 => eprintln!("precision auto: bf16 (this CPU has the bf16 kernels)"),
                Precision::F32 => eprintln!(
                    "precision auto: f32 (this CPU has neither AVX-512 nor AVX2 with FMA for the bf16 kernels)"
                ),
            }
        }
        p
    }
}

impl From<Precision> for PrecisionSetting {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => PrecisionSetting::F32,
            Precision::Bf16 => PrecisionSetting::Bf16,
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What cache keys append for this precision: nothing for f32, so that keys made before
    /// precision existed stay valid.
    pub fn cache_tag(self) -> &'static str {
        match self {
            Precision::F32 => "",
            Precision::Bf16 => "-bf16",
        }
    }
}

impl Linear {
    /// A fused projection split by output rows (Phi-3's `qkv_proj`, `gate_up_proj`), in order.
    pub fn split_rows<const N: usize>(&self, rows: [usize; N]) -> Result<[Linear; N]> {
        if rows.iter().sum::<usize>() != self.out {
            bail!(
                "a fused matrix of {} rows cannot be split into {rows:?}",
                self.out
            );
        }
        let (w, mut start) = (self.weight(), 0);
        let mut out = Vec::with_capacity(N);
        for n in rows {
            let bias = self
                .bias
                .as_ref()
                .map(|b| b.narrow(0, start, n))
                .transpose()?;
            out.push(Linear::new(w.narrow(0, start, n)?.contiguous()?, bias)?);
            start += n;
        }
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("N parts")))
    }

    /// The matrices stacked by rows again, in f32 (export of a fused projection).
    pub fn fuse_rows(parts: &[&Linear]) -> Result<Linear> {
        let ws: Vec<Tensor> = parts.iter().map(|l| l.weight()).collect();
        let biases: Option<Vec<Tensor>> = parts.iter().map(|l| l.bias.clone()).collect();
        let bias = match biases {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None => None,
        };
        Linear::new(Tensor::cat(&ws, 0)?, bias)
    }

    /// Its weight (and bias, if any) under `{prefix}.weight` / `{prefix}.bias`, for export.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{prefix}.weight"), self.weight())];
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.clone()));
        }
        out
    }
}

/// The two matrices of a layer that write into the residual stream; abliteration edits these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Writer {
    /// Attention output projection, `[d_model, heads × head_dim]`.
    AttnOut,
    /// MLP down projection, `[d_model, intermediate]`.
    MlpDown,
}

impl Writer {
    pub const ALL: [Writer; 2] = [Writer::AttnOut, Writer::MlpDown];

    pub fn hf_name(self, layer: usize) -> String {
        match self {
            Writer::AttnOut => format!("model.layers.{layer}.self_attn.o_proj.weight"),
            Writer::MlpDown => format!("model.layers.{layer}.mlp.down_proj.weight"),
        }
    }
}

/// Keys and values seen so far, `[batch, kv_heads, slots, head_dim]`. Decoding first calls
/// [`KvCache::reserve`]: each step then writes its keys into spare slots in place instead of
/// concatenating, which copied the whole cache at every step — a cost that grows with the square
/// of a reply's length (24 layers × 15 MB per step at batch 100 and 150 positions on Qwen 0.5B).
#[derive(Default, Clone)]
pub struct KvCache {
    /// The stored tensors; slots past `len` are unset room (read through [`KvCache::used`]).
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
    /// Slots in use, the rest spare room; None: every slot is in use.
    len: Option<usize>,
}

impl KvCache {
    /// A cache holding `k` and `v`, every slot in use.
    pub fn holding(k: Option<Tensor>, v: Option<Tensor>) -> KvCache {
        KvCache { k, v, len: None }
    }

    /// The keys and values in use (views: no copy).
    pub fn used(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => {
                let len = self.len.unwrap_or(k.dim(2)?);
                Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)))
            }
            _ => Ok(None),
        }
    }

    /// Adds `k`, `v` `[batch, kv_heads, new, head_dim]` after the slots in use and returns every
    /// key and value in use — in place where there is room.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        if let (Some(pk), Some(pv), Some(len)) = (&self.k, &self.v, self.len) {
            if len + new <= pk.dim(2)? {
                pk.slice_set(&k.contiguous()?, 2, len)?;
                pv.slice_set(&v.contiguous()?, 2, len)?;
                self.len = Some(len + new);
                return Ok((pk.narrow(2, 0, len + new)?, pv.narrow(2, 0, len + new)?));
            }
        }
        let (k, v) = match self.used()? {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *self = KvCache::holding(Some(k.clone()), Some(v.clone()));
        Ok((k, v))
    }

    /// Makes room for `extra` more slots, so the next appends write in place.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let Some((k, v)) = self.used()? else {
            return Ok(());
        };
        let (len, slots) = (k.dim(2)?, self.k.as_ref().map_or(Ok(0), |t| t.dim(2))?);
        if slots >= len + extra {
            return Ok(());
        }
        let grow = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let room = Tensor::zeros((b, h, len + extra, d), t.dtype(), t.device())?;
            room.slice_set(&t.contiguous()?, 2, 0)?;
            Ok(room)
        };
        *self = KvCache {
            k: Some(grow(&k)?),
            v: Some(grow(&v)?),
            len: Some(len),
        };
        Ok(())
    }

    /// Keeps rows `idx` of the batch, in that order.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            self.k = Some(k.index_select(idx, 0)?);
            self.v = Some(v.index_select(idx, 0)?);
        }
        Ok(())
    }
}

/// What one layer needs besides its input: rotary tables for these positions, the additive
/// attention mask `[batch, 1, 1, queries, keys]` (0 or −∞), and which queries get an attention
/// output at all (`[batch, queries, 1]`, 1 or 0; None = all).
pub struct StepContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    pub attends: Option<Tensor>,
    /// For layers with local attention (Gemma 3): their own rotary tables and windowed mask.
    pub local: Option<LocalAttention>,
}

pub struct LocalAttention {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

impl StepContext {
    /// The rotary tables and mask a layer attends with: the local ones for a sliding layer.
    pub fn tables(&self, sliding: bool) -> (&Tensor, &Tensor, &Tensor) {
        match (&self.local, sliding) {
            (Some(l), true) => (&l.cos, &l.sin, &l.mask),
            _ => (&self.cos, &self.sin, &self.mask),
        }
    }
}

/// How the rows of padding positions are computed. Real tokens never attend to padding, so this
/// changes nothing but the hidden states *at* pad positions — which only a detector that scans
/// padding (PR #154's code) ever reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PadRows {
    /// A pad row is a sequence's first token: position 0, attending to itself.
    #[default]
    SelfOnly,
    /// As transformers 5 computes them under `generate` (checked against 5.24 with torch 2.15):
    /// position id 0, and no key to attend to. Transformers passes the fully-masked row to
    /// torch's SDPA, which (torch ≥ 2.5) returns a zero attention output for it, so a pad row is
    /// its embedding plus the MLP updates alone.
    Transformers,
}

/// One decoder block. A new family implements this in its own file.
pub trait DecoderLayer: Send + Sync {
    fn forward(&self, x: &Tensor, ctx: &StepContext, cache: Option<&mut KvCache>)
        -> Result<Tensor>;
    fn writer(&self, which: Writer) -> &Linear;
    fn writer_mut(&mut self, which: Writer) -> &mut Linear;
    /// Every parameter under its Hugging Face name (for export).
    fn named_tensors(&self, layer: usize) -> Vec<(String, Tensor)>;
    /// Every matrix, for a change of precision.
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
}

/// A left-padded batch of token ids. `mask[b][t]` is 1 for real tokens, 0 for padding.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u8>>,
    pub pad_rows: PadRows,
}

impl Batch {
    /// Left-pads sequences to the longest one.
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32) -> Batch {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len());
        let mut mask = Vec::with_capacity(seqs.len());
        for s in seqs {
            let pad = t - s.len();
            let mut row = vec![pad_id; pad];
            row.extend_from_slice(s);
            ids.push(row);
            let mut m = vec![0u8; pad];
            m.extend(std::iter::repeat_n(1u8, s.len()));
            mask.push(m);
        }
        Batch {
            ids,
            mask,
            pad_rows: PadRows::SelfOnly,
        }
    }

    pub fn with_pad_rows(mut self, pad_rows: PadRows) -> Batch {
        self.pad_rows = pad_rows;
        self
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map_or(0, |r| r.len())
    }

    /// Position ids that ignore left padding, so a padded prompt sees the same positions as alone.
    pub fn positions(&self) -> Vec<Vec<u32>> {
        self.mask
            .iter()
            .map(|m| {
                let mut c = 0u32;
                m.iter()
                    .map(|&x| {
                        if x == 1 {
                            c += 1;
                            c - 1
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// Which convention the last hidden state follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenConvention {
    /// Every entry is the raw residual stream: the last is the output of the last layer.
    Residual,
    /// Hugging Face transformers' `output_hidden_states`: the last entry is taken after the
    /// final RMSNorm (heretic and PR #154 run on this).
    Transformers,
}

/// Which positions to compute logits at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
    /// Only the greedy next token at the last position (`ForwardOutput::next`): what decoding
    /// reads after the first step, without writing a `[batch, vocab]` tensor.
    LastArgmax,
}

pub struct ForwardOutput {
    /// `[batch, vocab]` for `Logits::Last`, `[batch, seq, vocab]` for `Logits::All`.
    pub logits: Option<Tensor>,
    /// The argmax of the last position's logits, for `Logits::LastArgmax`.
    pub next: Option<Vec<u32>>,
    /// `residual[0]` is the embedding output, `residual[i]` the output of layer `i`;
    /// `[batch, seq, d_model]` each. Empty unless asked for.
    pub residual: Vec<Tensor>,
    /// The last layer's output after the final RMSNorm, `[batch, seq, d_model]`.
    pub final_normed: Option<Tensor>,
}

impl ForwardOutput {
    /// The L+1 hidden states in the chosen convention.
    pub fn hidden_states(&self, convention: HiddenConvention) -> Vec<Tensor> {
        let mut hs = self.residual.clone();
        if convention == HiddenConvention::Transformers {
            if let (Some(last), Some(normed)) = (hs.last_mut(), &self.final_normed) {
                *last = normed.clone();
            }
        }
        hs
    }
}

pub struct Model {
    pub config: Config,
    pub device: Device,
    /// f32; bf16 under [`Precision::Bf16`]; `None` when tied and packed into `packed_head`.
    embed: Option<Tensor>,
    layers: Vec<Box<dyn DecoderLayer>>,
    norm: Tensor,
    /// `None` when the output head is tied to the embeddings.
    lm_head: Option<Tensor>,
    /// The output head packed for the bf16 kernel (under [`Precision::Bf16`]).
    packed_head: Option<std::sync::Arc<bf16::Packed>>,
    /// The packed head quantised for greedy decoding's screen (where [`screen::chosen`]).
    head_screen: Option<std::sync::Arc<screen::Screen>>,
    inv_freq: Vec<f32>,
    /// Local layers' rotary frequencies where their base differs from the global one (Gemma 3).
    inv_freq_local: Option<Vec<f32>>,
    /// Embeddings are multiplied by this (Gemma: √d, rounded to f32 as transformers does).
    embed_scale: Option<f32>,
    /// Gemma's final norm multiplies by 1 + w; `norm` then holds 1 + w and this is 1.
    norm_offset: f64,
}

/// The output head packed for the bf16 kernel, and the embeddings the lookups then read: an
/// untied head packed and the embeddings kept in bf16; a tied one packed once, serving both.
fn pack_head_of(
    embed: Option<Tensor>,
    lm_head: Option<Tensor>,
) -> Result<(Option<Tensor>, std::sync::Arc<bf16::Packed>)> {
    match lm_head {
        Some(h) => {
            let packed = pack(&h)?;
            let embed = embed.map(|e| e.to_dtype(DType::BF16)).transpose()?;
            Ok((embed, packed))
        }
        None => {
            let e = embed.context("the embeddings are missing")?;
            Ok((None, pack(&e)?))
        }
    }
}

impl Model {
    /// A model in f32 (the reference precision).
    pub fn new(config: Config, w: Weights) -> Result<Model> {
        Model::new_in(config, w, Precision::F32)
    }

    /// A model whose matrices are stored in `precision` as each layer is built: a bf16 model
    /// packs its head (and embeddings) first, then holds at most one layer in f32 while it loads. Where the CPU has no
    /// bf16 kernel the model stays f32 (`precision()` says which).
    pub fn new_in(config: Config, mut w: Weights, precision: Precision) -> Result<Model> {
        let bf16 = precision == Precision::Bf16 && Self::bf16_here();
        config.validate()?;
        let d = config.hidden_size;
        let embed = w.take("model.embed_tokens.weight")?;
        let (vocab, d_embed) = embed.dims2()?;
        if d_embed != d {
            bail!(
                "{}: embedding width {d_embed} differs from hidden size {d}",
                w.origin
            );
        }
        let mut config = config;
        config.vocab_size = vocab;
        let lm_head = if config.tie_word_embeddings {
            w.take_opt("lm_head.weight")?;
            None
        } else {
            match w.take_opt("lm_head.weight")? {
                Some(h) => Some(h),
                None => {
                    config.tie_word_embeddings = true;
                    None
                }
            }
        };
        // In bf16 the head (and the embeddings) are packed before the layers are read, so the
        // f32 embeddings are not held while the checkpoint is.
        let (embed, lm_head, packed_head) = if bf16 {
            let (e, p) = pack_head_of(Some(embed), lm_head)?;
            (e, None, Some(p))
        } else {
            (Some(embed), lm_head, None)
        };
        let mut layers: Vec<Box<dyn DecoderLayer>> = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut layer = (config.family.arch().load_layer)(&config, &mut w, i)?;
            if bf16 {
                for lin in layer.linears_mut() {
                    lin.to_bf16()?;
                }
            }
            layers.push(layer);
        }
        let gemma = config.family.arch().gemma_conventions;
        let norm_offset = if gemma { 1.0 } else { 0.0 };
        let norm = (w.take_shaped("model.norm.weight", &[d])? + norm_offset)?;
        let hd = config.head_dim;
        let theta = config.rope_theta as f32;
        // Computed in f32 as transformers does, so positions rotate by bit-identical angles.
        let freqs = |theta: f32| -> Vec<f32> {
            (0..hd / 2)
                .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / hd as f32))
                .collect()
        };
        let mut inv_freq = freqs(theta);
        if let Some(r) = &config.rope_scaling {
            r.apply(&mut inv_freq);
        }
        // Local layers rotate as the global ones unless they have their own base (Gemma 3).
        let inv_freq_local = config
            .sliding_window
            .and(config.rope_local_theta)
            .filter(|t| *t != config.rope_theta)
            .map(|t| freqs(t as f32));
        let embed_scale = gemma.then(|| (d as f32).sqrt());
        let mut m = Model {
            config,
            device: Device::Cpu,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
            embed_scale,
            norm_offset,
            packed_head,
            head_screen: None,
        };
        if bf16 {
            m.set_head_screen(screen::chosen());
        }
        Ok(m)
    }

    /// Whether the bf16 kernels run here (printing their path), else a warning that the model
    /// stays f32.
    fn bf16_here() -> bool {
        if !bf16::available() {
            eprintln!(
                "warning: this CPU has neither AVX-512 nor AVX2 with FMA, so the model runs in f32 (bf16 was asked for)"
            );
            return false;
        }
        eprintln!("bf16: {}", cpu::describe(true));
        true
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// The weight `[d_model, in]` of a residual writer (a view; cheap).
    pub fn writer(&self, layer: usize, which: Writer) -> Tensor {
        self.layers[layer].writer(which).weight()
    }

    /// Replaces a writer's weight (`[d_model, in]`, f32). The old tensor is not overwritten —
    /// tensors are immutable and shared — so a snapshot taken before restores it bit for bit.
    pub fn set_writer(&mut self, layer: usize, which: Writer, weight: Tensor) -> Result<()> {
        if layer >= self.layers.len() {
            bail!(
                "layer {layer} out of range (model has {})",
                self.layers.len()
            );
        }
        let bf16_model = self.precision() == Precision::Bf16;
        let slot = self.layers[layer].writer_mut(which);
        // The shape from the slot itself: a packed weight is not unpacked to learn it.
        let want = [slot.out, slot.inp];
        if weight.dims() != want.as_slice() || weight.dtype() != DType::F32 {
            bail!(
                "new {which:?} weight for layer {layer} is {:?} {:?}, expected {:?} F32",
                weight.dims(),
                weight.dtype(),
                want
            );
        }
        *slot = Linear::new(weight, slot.bias.clone())?;
        if bf16_model {
            slot.to_bf16()?;
        }
        Ok(())
    }

    /// bf16 once `set_precision` has packed the matrices (the head is packed last).
    pub fn precision(&self) -> Precision {
        if self.packed_head.is_some() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// Stores every matrix (and the embeddings) in `p`. bf16 is one-way: the f32 values are not
    /// kept. Where the CPU has no kernel for it (neither AVX-512 nor AVX2 with FMA) the model stays f32; the precision in effect is
    /// returned.
    pub fn set_precision(&mut self, p: Precision) -> Result<Precision> {
        if p == self.precision() {
            return Ok(p);
        }
        if p == Precision::F32 {
            bail!("a bf16 model cannot go back to f32 (its f32 weights are gone): load it again");
        }
        if !Self::bf16_here() {
            return Ok(Precision::F32);
        }
        for l in &mut self.layers {
            for lin in l.linears_mut() {
                lin.to_bf16()?;
            }
        }
        self.pack_head()?;
        Ok(p)
    }

    /// The output head (and the embeddings it is tied to) packed for the bf16 kernel, last:
    /// the model is bf16 from here on.
    fn pack_head(&mut self) -> Result<()> {
        let (e, p) = pack_head_of(self.embed.take(), self.lm_head.take())?;
        self.embed = e;
        self.packed_head = Some(p);
        self.set_head_screen(screen::chosen());
        Ok(())
    }

    /// How greedy decoding screens the packed head in integers ([`screen`]; the same tokens
    /// either way), or `None` for the fused argmax. Set from [`screen::chosen`] when the model
    /// turns bf16; returns the flavour now in use (none under f32, for a soft-capped head, or
    /// for a head with non-finite values).
    pub fn set_head_screen(&mut self, flavour: Option<screen::Flavour>) -> Option<screen::Flavour> {
        let current = self.head_screen.as_ref().map(|s| s.flavour());
        if current != flavour {
            // A soft-capped head is not reduced as it is computed (`greedy_next`), so not
            // screened either.
            let capped = self.config.final_logit_softcapping.is_some();
            self.head_screen = match (&self.packed_head, flavour) {
                (Some(p), Some(f)) if !capped => screen::Screen::new(p, f).map(std::sync::Arc::new),
                _ => None,
            };
        }
        self.head_screen.as_ref().map(|s| s.flavour())
    }

    /// The head's screen, when in use.
    pub fn head_screen(&self) -> Option<&screen::Screen> {
        self.head_screen.as_deref()
    }

    /// All writers as they are now; `restore_writers` puts them back exactly.
    pub fn snapshot_writers(&self) -> WriterSnapshot {
        WriterSnapshot {
            weights: (0..self.layers.len())
                .flat_map(|l| Writer::ALL.map(|w| ((l, w), self.layers[l].writer(w).clone())))
                .collect(),
        }
    }

    pub fn restore_writers(&mut self, snap: &WriterSnapshot) -> Result<()> {
        for (&(l, w), lin) in &snap.weights {
            *self.layers[l].writer_mut(w) = lin.clone();
        }
        Ok(())
    }

    /// Every parameter under its Hugging Face name, for export.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("widening on the CPU");
        let embed = match (&self.embed, &self.packed_head) {
            (Some(e), _) => f32(e),
            (None, Some(p)) => unpack(p),
            (None, None) => unreachable!("embeddings are held one way or the other"),
        };
        let mut out = vec![("model.embed_tokens.weight".to_string(), embed)];
        for (i, l) in self.layers.iter().enumerate() {
            out.extend(l.named_tensors(i));
        }
        out.push((
            "model.norm.weight".to_string(),
            (&self.norm - self.norm_offset).expect("same shape"),
        ));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), f32(h)));
        } else if let (Some(p), Some(_)) = (&self.packed_head, &self.embed) {
            out.push(("lm_head.weight".to_string(), unpack(p)));
        }
        out
    }

    fn rope_tables(&self, positions: &[Vec<u32>], inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, t, half), &self.device)?,
            Tensor::from_vec(sin, (b, t, half), &self.device)?,
        ))
    }

    /// Additive mask for `t` new queries after `past` cached keys. `key_mask` covers all
    /// `past + t` keys. A query may always see itself, so padding rows never softmax over an
    /// empty set (their values are never used).
    fn attention_mask(
        &self,
        key_mask: &[Vec<u8>],
        past: usize,
        t: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let b = key_mask.len();
        let tk = past + t;
        let mut m = vec![0f32; b * t * tk];
        for (bi, km) in key_mask.iter().enumerate() {
            for i in 0..t {
                let q = past + i;
                let row = &mut m[(bi * t + i) * tk..(bi * t + i + 1) * tk];
                for (j, v) in row.iter_mut().enumerate() {
                    let in_window = window.is_none_or(|w| q - j < w);
                    let ok = j == q || (j < q && km[j] == 1 && in_window);
                    if !ok {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, 1, t, tk), &self.device)?)
    }

    fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.first().map_or(0, |r| r.len());
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&x| x as usize >= self.config.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        let d = self.config.hidden_size;
        let x = match (&self.embed, &self.packed_head) {
            (Some(e), _) => {
                let idx = Tensor::from_vec(flat, b * t, &self.device)?;
                e.index_select(&idx, 0)?.to_dtype(DType::F32)?
            }
            (None, Some(p)) => Tensor::from_vec(p.rows(&flat), (b * t, d), &self.device)?,
            (None, None) => unreachable!("embeddings are held one way or the other"),
        }
        .reshape((b, t, d))?;
        Ok(match self.embed_scale {
            Some(s) => (x * s as f64)?,
            None => x,
        })
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        // The head stays [vocab, d] and is used transposed: for this wide matrix that layout
        // measured faster than a contiguous transpose.
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        let x2 = x.reshape((rows, d))?;
        let (y, vocab) = match (&self.packed_head, &self.lm_head, &self.embed) {
            (Some(p), _, _) => (matmul_packed(&x2, &[p])?.remove(0), p.n),
            (None, Some(w), _) | (None, None, Some(w)) => (x2.matmul(&w.t()?)?, w.dim(0)?),
            (None, None, None) => unreachable!("the head is held one way or another"),
        };
        let y = match self.config.final_logit_softcapping {
            Some(c) => ((y / c)?.tanh()? * c)?,
            None => y,
        };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("non-empty") = vocab;
        Ok(y.reshape(dims)?)
    }

    /// The argmax of `self.head(x)` per row of `x [rows, d]`. A packed head without
    /// soft-capping is reduced as it is computed, or screened in integers and finished on the
    /// few rows that can win (the same values, so the same token).
    fn greedy_next(&self, x: &Tensor) -> Result<Vec<u32>> {
        match (&self.packed_head, self.config.final_logit_softcapping) {
            (Some(p), None) => {
                let rows = x.dim(0)?;
                with_rows(x, |data| match &self.head_screen {
                    Some(s) => s.argmax(data, rows, p),
                    None => bf16::matmul_argmax(data, rows, p),
                })
            }
            _ => argmax_rows(&self.head(x)?),
        }
    }

    /// Rotary tables and masks for `t` new queries after `past` cached keys.
    fn context(
        &self,
        positions: &[Vec<u32>],
        key_mask: &[Vec<u8>],
        past: usize,
        t: usize,
    ) -> Result<StepContext> {
        let (cos, sin) = self.rope_tables(positions, &self.inv_freq)?;
        let mask = self.attention_mask(key_mask, past, t, None)?;
        // Sliding layers: the windowed mask, and their own rotary tables only where their base
        // differs (otherwise the global tables, shared).
        let local = match self.config.sliding_window {
            Some(window) => {
                let (cos, sin) = match &self.inv_freq_local {
                    Some(f) => self.rope_tables(positions, f)?,
                    None => (cos.clone(), sin.clone()),
                };
                let mask = self.attention_mask(key_mask, past, t, Some(window))?;
                Some(LocalAttention { cos, sin, mask })
            }
            None => None,
        };
        Ok(StepContext {
            cos,
            sin,
            mask,
            attends: None,
            local,
        })
    }

    /// One pass over `ids` (new tokens) given `past` cached positions.
    /// `positions` has the same shape as `ids`; `key_mask` covers past and new keys.
    pub fn step(
        &self,
        ids: &[Vec<u32>],
        positions: &[Vec<u32>],
        key_mask: &[Vec<u8>],
        caches: Option<&mut [KvCache]>,
        keep_residual: bool,
        logits: Logits,
    ) -> Result<ForwardOutput> {
        let t = ids.first().map_or(0, |r| r.len());
        let past = key_mask.first().map_or(0, |r| r.len()) - t;
        let ctx = self.context(positions, key_mask, past, t)?;
        self.run_layers(ids, &ctx, caches, keep_residual, logits)
    }

    fn run_layers(
        &self,
        ids: &[Vec<u32>],
        ctx: &StepContext,
        caches: Option<&mut [KvCache]>,
        keep_residual: bool,
        logits: Logits,
    ) -> Result<ForwardOutput> {
        self.run_layers_with(ids, ctx, caches, keep_residual, logits, None)
    }

    fn run_layers_with(
        &self,
        ids: &[Vec<u32>],
        ctx: &StepContext,
        mut caches: Option<&mut [KvCache]>,
        keep_residual: bool,
        logits: Logits,
        iv: Option<&Intervention>,
    ) -> Result<ForwardOutput> {
        let t = ids.first().map_or(0, |r| r.len());
        let mut x = self.embed(ids)?;
        if let Some(iv) = iv {
            x = iv.apply(0, &x)?;
        }
        let mut residual = Vec::new();
        if keep_residual {
            residual.push(x.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = layer.forward(&x, ctx, cache)?;
            if let Some(iv) = iv {
                x = iv.apply(i + 1, &x)?;
            }
            if keep_residual {
                residual.push(x.clone());
            }
        }
        let normed = norm::rms_norm(&x, &self.norm, self.config.rms_norm_eps as f32)?;
        let last = || normed.narrow(1, t - 1, 1)?.squeeze(1);
        let (logits, next) = match logits {
            Logits::None => (None, None),
            Logits::All => (Some(self.head(&normed)?), None),
            Logits::Last => (Some(self.head(&last()?)?), None),
            Logits::LastArgmax => (None, Some(self.greedy_next(&last()?)?)),
        };
        Ok(ForwardOutput {
            logits,
            next,
            residual,
            final_normed: if keep_residual { Some(normed) } else { None },
        })
    }

    /// A forward pass over `batch` (pad rows as transformers computes them) with entries of the
    /// residual stream held at set values from one hidden state on: the logits at every position.
    pub fn forward_intervened(&self, batch: &Batch, iv: &Intervention) -> Result<Tensor> {
        let t = batch.seq_len();
        let ctx = self.context(&batch.positions(), &batch.mask, 0, t)?;
        let out = self.run_layers_with(&batch.ids, &ctx, None, false, Logits::All, Some(iv))?;
        Ok(out.logits.expect("asked for logits"))
    }

    /// Full forward pass over a padded batch: logits and, when asked, all hidden states.
    pub fn forward(&self, batch: &Batch, hidden: bool, logits: Logits) -> Result<ForwardOutput> {
        if batch.is_empty() || batch.seq_len() == 0 {
            bail!("forward pass on an empty batch");
        }
        match batch.pad_rows {
            PadRows::SelfOnly => self.step(
                &batch.ids,
                &batch.positions(),
                &batch.mask,
                None,
                hidden,
                logits,
            ),
            PadRows::Transformers => {
                let (b, t) = (batch.len(), batch.seq_len());
                let mut ctx = self.context(&batch.positions(), &batch.mask, 0, t)?;
                let keep: Vec<f32> = batch.mask.iter().flatten().map(|&m| m as f32).collect();
                ctx.attends = Some(Tensor::from_vec(keep, (b, t, 1), &self.device)?);
                self.run_layers(&batch.ids, &ctx, None, hidden, logits)
            }
        }
    }

    /// Log-softmax of the next-token logits at the last position, `[batch, vocab]`.
    pub fn next_token_logprobs(&self, batch: &Batch) -> Result<Tensor> {
        let out = self.forward(batch, false, Logits::Last)?;
        let logits = out.logits.expect("asked for logits");
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    pub fn new_caches(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.layers.len()]
    }
}

/// Entries of the residual stream (one dim at some positions) held at set values from hidden
/// state `from_state` on (0 = the embedding output): Sun et al.'s intervention on a massive
/// activation.
pub struct Intervention {
    pub from_state: usize,
    /// Per hidden state from `from_state` on: `[batch, seq, d_model]`, 1 at the entries held
    /// there; the last one serves any later state.
    masks: Vec<Tensor>,
    /// The same states: each held entry's value (0 elsewhere).
    held: Vec<Tensor>,
}

/// One entry an [`Intervention`] holds: `values[k]` at hidden state `from_state + k`, the last
/// value at every later state.
#[derive(Debug, Clone)]
pub struct Held {
    pub row: usize,
    pub position: usize,
    pub dim: usize,
    pub from_state: usize,
    pub values: Vec<f32>,
}

impl Intervention {
    /// Holds dim `dim` at the (row, position)s `at` of a `[b, t, d]` batch; `values[k][i]` is
    /// entry i's value at hidden state `from_state + k` (a list of one value per entry holds it
    /// at every state).
    pub fn new(
        shape: (usize, usize, usize),
        at: &[(usize, usize)],
        dim: usize,
        from_state: usize,
        values: Vec<Vec<f32>>,
    ) -> Result<Intervention> {
        if values.is_empty() || values.iter().any(|v| v.len() != at.len()) {
            bail!("an intervention needs one value per held entry at every state it lists");
        }
        let held: Vec<Held> = at
            .iter()
            .enumerate()
            .map(|(i, &(row, position))| Held {
                row,
                position,
                dim,
                from_state,
                values: values.iter().map(|v| v[i]).collect(),
            })
            .collect();
        Intervention::held(shape, &held)
    }

    /// Holds each entry of `entries` in a `[b, t, d]` batch, each from its own first state.
    pub fn held(shape: (usize, usize, usize), entries: &[Held]) -> Result<Intervention> {
        let (b, t, d) = shape;
        if entries.is_empty() || entries.iter().any(|e| e.values.is_empty()) {
            bail!("an intervention needs at least one held entry, with a value");
        }
        for e in entries {
            if e.row >= b || e.position >= t || e.dim >= d {
                bail!(
                    "intervention at row {}, position {}, dim {} is outside [{b}, {t}, {d}]",
                    e.row,
                    e.position,
                    e.dim
                );
            }
        }
        let from = entries.iter().map(|e| e.from_state).min().unwrap_or(0);
        let states = entries
            .iter()
            .map(|e| e.from_state - from + e.values.len())
            .max()
            .unwrap_or(1);
        let (mut masks, mut held) = (Vec::with_capacity(states), Vec::with_capacity(states));
        for k in 0..states {
            let state = from + k;
            let mut m = vec![0f32; b * t * d];
            let mut h = vec![0f32; b * t * d];
            for e in entries.iter().filter(|e| e.from_state <= state) {
                let i = (e.row * t + e.position) * d + e.dim;
                m[i] = 1.0;
                h[i] = e.values[(state - e.from_state).min(e.values.len() - 1)];
            }
            masks.push(Tensor::from_vec(m, (b, t, d), &Device::Cpu)?);
            held.push(Tensor::from_vec(h, (b, t, d), &Device::Cpu)?);
        }
        Ok(Intervention {
            from_state: from,
            masks,
            held,
        })
    }

    fn apply(&self, state: usize, x: &Tensor) -> Result<Tensor> {
        if state < self.from_state {
            return Ok(x.clone());
        }
        let k = (state - self.from_state).min(self.held.len() - 1);
        // x − m·x + held: the held entries become their values, the others stay bit for bit.
        Ok(((x - self.masks[k].mul(x)?)? + &self.held[k])?)
    }
}

pub struct WriterSnapshot {
    weights: HashMap<(usize, Writer), Linear>,
}
