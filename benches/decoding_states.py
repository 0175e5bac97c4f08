"""Decoding states of a GGUF model in transformers, for the head feasibility scripts: greedy
replies to the first prompts of a file, and the final-normed hidden state (what the head
multiplies) at every step, rounded to bf16 as outlierlab's kernel rounds its inputs."""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM = "You are a helpful assistant."


def add_args(ap):
    ap.add_argument("gguf")
    ap.add_argument("prompts")
    ap.add_argument("--prompts-used", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)


def collect(a):
    """(H, W): the states [steps × prompts, d] and the head [vocab, d], both bf16 values in f64."""
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    bad = [line.strip() for line in open(a.prompts) if line.strip()][: a.prompts_used]
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in bad]
    texts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=a.tokens, do_sample=False,
                             output_hidden_states=True, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
    # transformers' last hidden state is after the final norm: what the head multiplies.
    H = torch.cat([hs[-1][:, -1, :] for hs in out.hidden_states], 0)
    H = H.to(torch.bfloat16).double()
    W = model.lm_head.weight.detach().to(torch.bfloat16).double()
    print(f"{H.shape[0]} decoding states, head {tuple(W.shape)}")
    return H, W
