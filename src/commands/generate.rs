//! `outlierlab generate`: greedy replies, batched with left padding.

use crate::model::chat::DEFAULT_SYSTEM_PROMPT;
use crate::model::{self, Precision};
use anyhow::{bail, Result};

/// Print greedy replies to prompts, batched with left padding.
///
/// Each prompt is rendered with the model's own chat template (system prompt first), then
/// decoded greedily until EOS or --max-new-tokens. Use "-" as the only prompt to read one
/// prompt per line from standard input.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model alias, path, or hf:ORG/NAME[@REVISION].
    #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub model: String,
    /// System prompt; pass --system "" to leave it out.
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    /// Prompts per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// One JSON object per prompt: prompt, rendered, input_ids, output_ids, reply.
    #[arg(long)]
    pub json: bool,
    /// Raw text (BOS + prompt) instead of a chat turn: for base models, which have no chat
    /// template (the system prompt is then not used).
    #[arg(long)]
    pub raw: bool,
    /// The user prompts.
    pub prompts: Vec<String>,
}

pub fn run(args: Args, precision: Precision) -> Result<()> {
    let Args {
        model,
        system,
        max_new_tokens,
        batch_size,
        json,
        raw,
        prompts,
    } = args;
    use crate::model::generate::{self, GenerateOptions};
    let prompts = read_prompts(prompts)?;
    let mut lm = model::load_with(&model, precision)?;
    lm.raw = raw;
    let system = (!system.is_empty()).then_some(system.as_str());
    let encoded = prompts
        .iter()
        .map(|p| lm.encode_chat(system, p))
        .collect::<Result<Vec<_>>>()?;
    for (i, e) in encoded.iter().enumerate() {
        if e.ids.len() + max_new_tokens > lm.model.config.context_length {
            bail!(
                "prompt {} has {} tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's context of {}; shorten it or lower --max-new-tokens",
                i + 1,
                e.ids.len(),
                lm.model.config.context_length
            );
        }
    }
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: lm.tokenizer.stop_ids.clone(),
        pad_id: lm.tokenizer.pad_id,
        use_cache: true,
    };
    let pb = crate::util::progress_bar(encoded.len() as u64, "generating");
    for chunk in encoded.chunks(batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|e| e.ids.clone()).collect();
        let outs = generate::greedy(&lm.model, &ids, &opts)?;
        pb.inc(chunk.len() as u64);
        for (e, out) in chunk.iter().zip(outs) {
            let reply = lm.tokenizer.decode(&out)?;
            pb.suspend(|| {
                if json {
                    let v = serde_json::json!({
                        "prompt": e.prompt, "rendered": e.rendered,
                        "input_ids": e.ids, "output_ids": out, "reply": reply,
                    });
                    println!("{v}");
                } else {
                    println!("### {}\n{}\n", e.prompt, reply.trim_end());
                }
            });
        }
    }
    pb.finish_and_clear();
    Ok(())
}

fn read_prompts(prompts: Vec<String>) -> Result<Vec<String>> {
    let prompts = if prompts.len() == 1 && prompts[0] == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect()
    } else {
        prompts
    };
    if prompts.is_empty() {
        bail!("no prompts given; pass them as arguments, or \"-\" to read one per line from stdin");
    }
    if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
        bail!("prompt {} is empty; every prompt needs some text", i + 1);
    }
    Ok(prompts)
}
