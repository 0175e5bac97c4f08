//! Llama decoder block (SmolLM2, Llama 2/3.x): pre-RMSNorm, grouped-query attention with rotary
//! embeddings (half-rotation layout, as transformers; Llama 3's `llama3` scaling), SwiGLU MLP.
//! Mistral, Qwen2, Qwen3 and Phi-3 are this block with a variation each, named in
//! [`LlamaOptions`] and chosen in their own files.

use crate::model::arch::{self, Arch, Family};
use crate::model::{Config, DecoderLayer, KvCache, Linear, StepContext, Weights, Writer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{Map, Value};

pub const ARCH: Arch = Arch {
    family: Family::Llama,
    name: "llama",
    model_types: &["llama"],
    hf_class: "LlamaForCausalLM",
    hf_model_type: "llama",
    gemma_conventions: false,
    read_hf,
    write_hf,
    load_layer,
    gguf: Some(arch::Gguf {
        norm_names: arch::LLAMA_GGUF_NORMS,
        rope_interleaved: true,
        norm_plus_one: false,
        read_meta: arch::no_gguf_meta,
    }),
};

/// The plain block (Llama, Mistral).
pub(crate) fn load_layer(cfg: &Config, w: &mut Weights, i: usize) -> Result<Box<dyn DecoderLayer>> {
    Ok(Box::new(LlamaLayer::load(
        cfg,
        w,
        i,
        LlamaOptions::default(),
    )?))
}

fn read_hf(v: &Value, cfg: &mut Config) -> Result<()> {
    read_silu(v)?;
    arch::read_attention_bias(v, cfg)?;
    arch::read_rope_scaling(v, cfg)
}

fn write_hf(cfg: &Config, j: &mut Map<String, Value>) {
    j.insert("attention_bias".into(), cfg.attention_bias.into());
    arch::write_rope_scaling(cfg, j);
}

/// The Llama-like families' MLP activation is SiLU; another one is refused rather than run wrong.
pub(crate) fn read_silu(v: &Value) -> Result<()> {
    match v.get("hidden_act").and_then(|x| x.as_str()) {
        None | Some("silu") => Ok(()),
        Some(other) => bail!(
            "config.json: `hidden_act: {other}` is not implemented for this family (its MLP is SwiGLU with silu)"
        ),
    }
}

/// Llama 3.x's rotary scaling: frequencies whose wavelength exceeds the original context over
/// `low_freq_factor` are divided by `factor`, those below it over `high_freq_factor` kept, the
/// band between interpolated (transformers' `_compute_llama3_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3Rope {
    /// `inv_freq` rescaled, in f32 as transformers computes it.
    pub fn apply(&self, inv_freq: &mut [f32]) {
        let old = self.original_max_position_embeddings as f32;
        let (lo, hi, factor) = (
            self.low_freq_factor as f32,
            self.high_freq_factor as f32,
            self.factor as f32,
        );
        let low_freq_wavelen = old / lo;
        let high_freq_wavelen = old / hi;
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            let scaled = if wavelen > low_freq_wavelen {
                *f / factor
            } else {
                *f
            };
            let smooth = (old / wavelen - lo) / (hi - lo);
            let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            // Finite frequencies: the band between the two wavelengths, both ends included.
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            *f = if medium { smoothed } else { scaled };
        }
    }

    /// As config.json's `rope_scaling` writes it.
    pub fn to_hf(&self) -> serde_json::Value {
        serde_json::json!({
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        })
    }

    /// From config.json's `rope_scaling` (or transformers 5's `rope_parameters`): `None` for
    /// the default rotary embedding, an error for a kind this runtime does not implement.
    pub(crate) fn from_hf(v: &Value) -> Result<Option<Llama3Rope>> {
        let Some(r) = v
            .get("rope_scaling")
            .filter(|r| !r.is_null())
            .or_else(|| v.get("rope_parameters"))
        else {
            return Ok(None);
        };
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(|x| x.as_str())
            .unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let f = |k: &str| -> Result<f64> {
                    r.get(k).and_then(|x| x.as_f64()).with_context(|| {
                        format!("config.json: rope scaling `llama3` needs a number `{k}`")
                    })
                };
                Ok(Some(Llama3Rope {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                }))
            }
            other => anyhow::bail!(
                "config.json: rope scaling `{other}` is not implemented (only the default rotary embedding and Llama 3's `llama3` are); this checkpoint would run with wrong positions"
            ),
        }
    }
}

/// How a family's block differs from Llama's.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaOptions {
    /// Biases on q, k and v (Qwen2); `attention_bias` in the config adds them to o as well.
    pub qkv_bias: bool,
    /// RMSNorm over each query and key head before the rotation (Qwen3).
    pub qk_norm: bool,
    /// q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj` (Phi-3); split at load,
    /// fused again for export.
    pub fused: bool,
}

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
    /// Qwen3's per-head norms of queries and keys.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    fused: bool,
    /// Attends within the sliding window (Mistral, Phi-3 with `sliding_window` set).
    sliding: bool,
}

impl LlamaLayer {
    pub fn load(cfg: &Config, w: &mut Weights, i: usize, o: LlamaOptions) -> Result<LlamaLayer> {
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
        let qkv_bias = o.qkv_bias || cfg.attention_bias;
        let ([q_proj, k_proj, v_proj], [gate_proj, up_proj]) = if o.fused {
            let qkv = lin("self_attn.qkv_proj", (h + 2 * kv) * hd, d, qkv_bias)?;
            let gate_up = lin("mlp.gate_up_proj", 2 * ff, d, false)?;
            (
                qkv.split_rows([h * hd, kv * hd, kv * hd])?,
                gate_up.split_rows([ff, ff])?,
            )
        } else {
            (
                [
                    lin("self_attn.q_proj", h * hd, d, qkv_bias)?,
                    lin("self_attn.k_proj", kv * hd, d, qkv_bias)?,
                    lin("self_attn.v_proj", kv * hd, d, qkv_bias)?,
                ],
                [
                    lin("mlp.gate_proj", ff, d, false)?,
                    lin("mlp.up_proj", ff, d, false)?,
                ],
            )
        };
        let o_proj = lin("self_attn.o_proj", d, h * hd, cfg.attention_bias)?;
        let down_proj = lin("mlp.down_proj", d, ff, false)?;
        let (q_norm, k_norm) = if o.qk_norm {
            (
                Some(w.take_shaped(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                Some(w.take_shaped(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
            )
        } else {
            (None, None)
        };
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
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
            fused: o.fused,
            sliding: cfg.is_sliding(i),
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
        let (mut q, mut k, v) = (heads(q, h)?, heads(k, kv)?, heads(v, kv)?);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = crate::model::norm::rms_norm(&q, qn, self.eps)?;
            k = crate::model::norm::rms_norm(&k, kn, self.eps)?;
        }
        let (cos, sin, mask) = ctx.tables(self.sliding);
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let y = crate::model::attention::attend(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt(), None)?;
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
        for (name, t) in [("q_norm", &self.q_norm), ("k_norm", &self.k_norm)] {
            if let Some(t) = t {
                out.push((format!("{p}.self_attn.{name}.weight"), t.clone()));
            }
        }
        let mut linears = vec![
            ("self_attn.o_proj", self.o_proj.clone()),
            ("mlp.down_proj", self.down_proj.clone()),
        ];
        if self.fused {
            let fuse = |ls: &[&Linear]| Linear::fuse_rows(ls).expect("fused at load, so fusable");
            linears.push((
                "self_attn.qkv_proj",
                fuse(&[&self.q_proj, &self.k_proj, &self.v_proj]),
            ));
            linears.push(("mlp.gate_up_proj", fuse(&[&self.gate_proj, &self.up_proj])));
        } else {
            for (name, l) in [
                ("self_attn.q_proj", &self.q_proj),
                ("self_attn.k_proj", &self.k_proj),
                ("self_attn.v_proj", &self.v_proj),
                ("mlp.gate_proj", &self.gate_proj),
                ("mlp.up_proj", &self.up_proj),
            ] {
                linears.push((name, l.clone()));
            }
        }
        for (name, l) in linears {
            out.extend(l.named(&format!("{p}.{name}")));
        }
        out
    }
}
