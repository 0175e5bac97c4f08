//! Gemma 3 decoder block (Gemma-3-270M and up, text): RMSNorms that scale by (1 + w) before *and*
//! after attention and the MLP, RMSNorm on every query and key head, queries scaled by
//! `query_pre_attn_scalar`^−½, GeGLU MLP (tanh-approximated GELU), and two kinds of layer —
//! local ones attend within a sliding window with their own rotary base, every
//! `sliding_pattern`-th layer attends globally. Embeddings are scaled by √d (in `Model`).
//!
//! Weights are held under Hugging Face names and in its convention (norm weights centred on 0);
//! the (1 + w) each norm multiplies by is formed once at load time.

use crate::model::arch::{self, Arch, Family, Gguf};
use crate::model::{Config, DecoderLayer, KvCache, Linear, StepContext, Weights, Writer};
use anyhow::Result;
use candle_core::Tensor;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Gemma3,
    name: "gemma3",
    model_types: &["gemma3", "gemma3_text"],
    hf_class: "Gemma3ForCausalLM",
    hf_model_type: "gemma3_text",
    gemma_conventions: true,
    read_hf,
    write_hf,
    load_layer: |cfg, w, i| Ok(Box::new(Gemma3Layer::load(cfg, w, i, true)?)),
    gguf: Some(Gguf {
        norm_names: GGUF_NORMS,
        rope_interleaved: false,
        norm_plus_one: true,
        read_meta: read_gguf_meta,
    }),
};

/// Every sixth layer is global and local layers rotate with base 10,000 unless config.json says
/// otherwise (GGUF metadata never does).
const GEMMA3_SLIDING_PATTERN: usize = 6;
const GEMMA3_LOCAL_THETA: f64 = 10_000.0;

/// llama.cpp's names for the Gemma 3 block's norms: on both sides of attention and the MLP, so its
/// `ffn_norm` is the one before the MLP (Llama's `ffn_norm` is transformers' post-attention norm).
const GGUF_NORMS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

/// What the GGUF metadata leaves out, filled in as llama.cpp and transformers do: the sliding
/// pattern, the local rotary base, queries scaled by head_dim^−½.
fn read_gguf_meta(meta: &arch::GgufNumber, cfg: &mut Config) {
    cfg.sliding_window = meta("attention.sliding_window").map(|x| x as usize);
    cfg.sliding_pattern = GEMMA3_SLIDING_PATTERN;
    cfg.rope_local_theta = Some(GEMMA3_LOCAL_THETA);
    cfg.query_pre_attn_scalar = Some(cfg.head_dim as f64);
}

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    read_gemma_attention(v, cfg, GEMMA3_SLIDING_PATTERN);
    cfg.rope_local_theta = crate::model::arch::number(v, "rope_local_base_freq")
        .or_else(|| {
            v.pointer("/rope_parameters/sliding_attention/rope_theta")
                .and_then(|x| x.as_f64())
        })
        .or(Some(GEMMA3_LOCAL_THETA));
    if let Some(t) = v
        .pointer("/rope_parameters/full_attention/rope_theta")
        .and_then(|x| x.as_f64())
    {
        cfg.rope_theta = t;
    }
    Ok(())
}

/// The keys Gemma 2 and 3 share: the sliding window and which layers use it (newer configs
/// list each layer's type, older ones give the pattern), the query scale, the soft-caps.
pub(crate) fn read_gemma_attention(v: &Value, cfg: &mut Config, default_pattern: usize) {
    let f = |k: &str| crate::model::arch::number(v, k);
    cfg.sliding_window = crate::model::arch::sliding_window(v);
    cfg.sliding_pattern = match v.get("layer_types").and_then(|x| x.as_array()) {
        Some(types) => types
            .iter()
            .position(|t| t.as_str() == Some("full_attention"))
            .map_or(0, |i| i + 1),
        None => v
            .get("sliding_window_pattern")
            .and_then(|x| x.as_u64())
            .map_or(default_pattern, |x| x as usize),
    };
    cfg.query_pre_attn_scalar = f("query_pre_attn_scalar");
    cfg.final_logit_softcapping = f("final_logit_softcapping");
    cfg.attn_logit_softcapping = f("attn_logit_softcapping");
}

/// The keys Gemma 2 and 3 share, for export.
pub(crate) fn write_gemma_attention(cfg: &Config, j: &mut Map<String, Value>) {
    let types: Vec<&str> = (0..cfg.num_layers)
        .map(|i| {
            if cfg.is_sliding(i) {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    j.remove("hidden_act");
    j.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    j.insert("sliding_window".into(), cfg.sliding_window.into());
    j.insert("layer_types".into(), types.into());
    // transformers' Gemma 2 config takes only a whole number here.
    let scalar = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
    j.insert(
        "query_pre_attn_scalar".into(),
        if scalar.fract() == 0.0 {
            (scalar as u64).into()
        } else {
            scalar.into()
        },
    );
    j.insert(
        "final_logit_softcapping".into(),
        cfg.final_logit_softcapping.into(),
    );
    j.insert(
        "attn_logit_softcapping".into(),
        cfg.attn_logit_softcapping.into(),
    );
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    write_gemma_attention(cfg, j);
    j.insert(
        "rope_parameters".into(),
        serde_json::json!({
            "full_attention": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "sliding_attention": {"rope_theta": cfg.rope_local_theta.unwrap_or(GEMMA3_LOCAL_THETA), "rope_type": "default"},
        }),
    );
}

pub struct Gemma3Layer {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// Norm weights as the checkpoint holds them (w); `scale` holds 1 + w.
    norms: Vec<(&'static str, Tensor, Tensor)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    query_scale: f64,
    attn_softcap: Option<f64>,
    /// Local (sliding-window) attention with the local rotary base.
    pub sliding: bool,
}

const NORMS: [&str; 6] = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_norm",
    "self_attn.k_norm",
];

impl Gemma3Layer {
    /// `qk_norm`: Gemma 3 norms every query and key head; Gemma 2 does not.
    pub fn load(cfg: &Config, w: &mut Weights, i: usize, qk_norm: bool) -> Result<Gemma3Layer> {
        let d = cfg.hidden_size;
        let (h, kv, hd, ff) = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        );
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Linear::new(
                w.take_shaped(&format!("{p}.{name}.weight"), &[out, inp])?,
                None,
            )
        };
        let q_proj = lin("self_attn.q_proj", h * hd, d)?;
        let k_proj = lin("self_attn.k_proj", kv * hd, d)?;
        let v_proj = lin("self_attn.v_proj", kv * hd, d)?;
        let o_proj = lin("self_attn.o_proj", d, h * hd)?;
        let gate_proj = lin("mlp.gate_proj", ff, d)?;
        let up_proj = lin("mlp.up_proj", ff, d)?;
        let down_proj = lin("mlp.down_proj", d, ff)?;
        let mut norms = Vec::new();
        for name in NORMS {
            if !qk_norm && name.starts_with("self_attn") {
                continue;
            }
            let size = if name.starts_with("self_attn") { hd } else { d };
            let raw = w.take_shaped(&format!("{p}.{name}.weight"), &[size])?;
            let scale = (&raw + 1.0)?;
            norms.push((name, raw, scale));
        }
        Ok(Gemma3Layer {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            norms,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
            query_scale: cfg.query_pre_attn_scalar.unwrap_or(hd as f64).powf(-0.5),
            attn_softcap: cfg.attn_logit_softcapping,
            sliding: cfg.is_sliding(i),
        })
    }

    fn norm(&self, which: &str, x: &Tensor) -> Result<Tensor> {
        let (_, _, scale) = self
            .norms
            .iter()
            .find(|n| n.0 == which)
            .expect("every norm of the block is loaded");
        crate::model::norm::rms_norm(x, scale, self.eps)
    }

    /// Gemma 3's norm of each query or key head; Gemma 2 has none.
    fn head_norm(&self, which: &str, x: Tensor) -> Result<Tensor> {
        match self.norms.iter().any(|n| n.0 == which) {
            true => self.norm(which, &x),
            false => Ok(x),
        }
    }

    fn attention(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = self.head_norm("self_attn.q_norm", heads(q, h)?)?;
        let k = self.head_norm("self_attn.k_norm", heads(k, kv)?)?;
        let v = heads(v, kv)?;
        let (cos, sin, mask) = ctx.tables(self.sliding);
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let y =
            crate::model::attention::attend(&q, &k, &v, mask, self.query_scale, self.attn_softcap)?;
        let y = match &ctx.attends {
            Some(keep) => y.broadcast_mul(keep)?,
            None => y,
        };
        self.o_proj.forward(&y)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (transformers' gelu_pytorch_tanh).
        let [g, u] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj.forward(&(g.gelu()? * u)?)
    }
}

impl DecoderLayer for Gemma3Layer {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.norm("input_layernorm", x)?;
        let a = self.attention(&h, ctx, cache)?;
        let x = (x + self.norm("post_attention_layernorm", &a)?)?;
        let h = self.norm("pre_feedforward_layernorm", &x)?;
        let m = self.mlp(&h)?;
        Ok((&x + self.norm("post_feedforward_layernorm", &m)?)?)
    }

    fn writer(&self, which: Writer) -> &Linear {
        match which {
            Writer::AttnOut => &self.o_proj,
            Writer::MlpDown => &self.down_proj,
        }
    }

    fn writer_mut(&mut self, which: Writer) -> &mut Linear {
        match which {
            Writer::AttnOut => &mut self.o_proj,
            Writer::MlpDown => &mut self.down_proj,
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }

    fn named_tensors(&self, layer: usize) -> Vec<(String, Tensor)> {
        let p = format!("model.layers.{layer}");
        let mut out: Vec<(String, Tensor)> = self
            .norms
            .iter()
            .map(|(n, raw, _)| (format!("{p}.{n}.weight"), raw.clone()))
            .collect();
        for (name, l) in [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
        ] {
            out.extend(l.named(&format!("{p}.{name}")));
        }
        out
    }
}
