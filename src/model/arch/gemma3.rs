//! Gemma 3 decoder block (Gemma-3-270M and up, text): RMSNorms that scale by (1 + w) before *and*
//! after attention and the MLP, RMSNorm on every query and key head, queries scaled by
//! `query_pre_attn_scalar`^−½, GeGLU MLP (tanh-approximated GELU), and two kinds of layer —
//! local ones attend within a sliding window with their own rotary base, every
//! `sliding_pattern`-th layer attends globally. Embeddings are scaled by √d (in `Model`).
//!
//! Weights are held under Hugging Face names and in its convention (norm weights centred on 0);
//! the (1 + w) each norm multiplies by is formed once at load time.

use crate::model::{Config, DecoderLayer, KvCache, Linear, StepContext, Weights, Writer};
use anyhow::Result;
use candle_core::Tensor;

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
    pub fn load(cfg: &Config, w: &mut Weights, i: usize) -> Result<Gemma3Layer> {
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
            .expect("every Gemma 3 norm is loaded");
        crate::model::norm::rms_norm(x, scale, self.eps)
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
        let q = self.norm("self_attn.q_norm", &heads(q, h)?)?;
        let k = self.norm("self_attn.k_norm", &heads(k, kv)?)?;
        let v = heads(v, kv)?;
        let (cos, sin, mask) = match (&ctx.local, self.sliding) {
            (Some(l), true) => (&l.cos, &l.sin, &l.mask),
            _ => (&ctx.cos, &ctx.sin, &ctx.mask),
        };
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
