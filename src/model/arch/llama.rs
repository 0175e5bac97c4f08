//! Llama decoder block (SmolLM2, Llama 2/3): pre-RMSNorm, grouped-query attention with rotary
//! embeddings (half-rotation layout, as transformers), SwiGLU MLP.

use crate::model::{Config, DecoderLayer, KvCache, Linear, StepContext, Weights, Writer};
use anyhow::Result;
use candle_core::Tensor;

pub struct LlamaLayer {
    pub input_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl LlamaLayer {
    /// `qkv_bias`: Qwen2 adds biases to the q, k and v projections; Llama has none.
    pub fn load(cfg: &Config, w: &mut Weights, i: usize, qkv_bias: bool) -> Result<LlamaLayer> {
        let d = cfg.hidden_size;
        let (h, kv, hd, ff) = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        );
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = w.take_shaped(&format!("{p}.{name}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(w.take_shaped(&format!("{p}.{name}.bias"), &[out])?)
            } else {
                None
            };
            Linear::new(weight, bias)
        };
        let q_proj = lin("self_attn.q_proj", h * hd, d, qkv_bias)?;
        let k_proj = lin("self_attn.k_proj", kv * hd, d, qkv_bias)?;
        let v_proj = lin("self_attn.v_proj", kv * hd, d, qkv_bias)?;
        let o_proj = lin("self_attn.o_proj", d, h * hd, false)?;
        let gate_proj = lin("mlp.gate_proj", ff, d, false)?;
        let up_proj = lin("mlp.up_proj", ff, d, false)?;
        let down_proj = lin("mlp.down_proj", d, ff, false)?;
        Ok(LlamaLayer {
            input_layernorm: w.take_shaped(&format!("{p}.input_layernorm.weight"), &[d])?,
            post_attention_layernorm: w
                .take_shaped(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
        })
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
        let (q, k, v) = (heads(q, h)?, heads(k, kv)?, heads(v, kv)?);
        let q = candle_nn::rotary_emb::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let y =
            crate::model::attention::attend(&q, &k, &v, &ctx.mask, 1.0 / (hd as f64).sqrt(), None)?;
        let y = match &ctx.attends {
            Some(keep) => y.broadcast_mul(keep)?,
            None => y,
        };
        self.o_proj.forward(&y)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let [g, u] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj
            .forward(&crate::model::swiglu::silu_mul(&g, &u)?)
    }
}

impl DecoderLayer for LlamaLayer {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = crate::model::norm::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.attention(&h, ctx, cache)?)?;
        let h = crate::model::norm::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        Ok((&x + self.mlp(&h)?)?)
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

    fn named_tensors(&self, i: usize) -> Vec<(String, Tensor)> {
        let p = format!("model.layers.{i}");
        let mut out = vec![
            (
                format!("{p}.input_layernorm.weight"),
                self.input_layernorm.clone(),
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                self.post_attention_layernorm.clone(),
            ),
        ];
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
