"""Would int8 (AVX512_VNNI) weights keep outlierlab's bf16 agreement bounds? A feasibility
measurement, before any kernel is written: the model's linear layers are fake-quantised in
PyTorch (computed in f32 on quantised values) and compared with f32 on the benchmark prompts,
with the same measures tests/bf16.rs applies to bf16 — first-token KL(f32 ‖ x) per prompt and
greedy 16-token replies. VNNI's vpdpbusd multiplies u8 by s8, so int8 weights alone (W8A16) would
have to be widened to bf16 in the kernel, and only W8A8 (activations quantised per token) runs at
int8 speed; both are measured. Also printed: the largest |x| / median |x| of each linear layer's
input rows, the ratio that decides how much per-token int8 quantisation loses.

    OMP_WAIT_POLICY=PASSIVE python benches/int8_feasibility.py GGUF_PATH [--threads 2]
"""
import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM = "You are a helpful assistant."
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")) as f:
    PROMPTS = [line.rstrip("\n") for line in f if line.strip()]


def bf16(x):
    return x.to(torch.bfloat16).to(torch.float32)


def q8_rows(x, asymmetric=False):
    """Per-row int8 quantisation of the last axis (rows = output channels or tokens)."""
    if asymmetric:
        lo = x.amin(-1, keepdim=True)
        hi = x.amax(-1, keepdim=True)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        return (q - zero) * scale
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS]
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                  return_tensors="pt", return_dict=True)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    ratios = {}

    def measure(name):
        def hook(_m, args):
            x = args[0].detach()
            mask = enc["attention_mask"].bool()
            if x.dim() == 3 and x.shape[1] == mask.shape[1]:
                rows = x[mask]
                r = (rows.abs().amax(-1) / rows.abs().median(-1).values.clamp(min=1e-12)).max().item()
                ratios[name] = max(ratios.get(name, 0.0), r)
        return hook

    def run(label, weight=None, act=None):
        hooks = []
        for n, m in linears.items():
            m.weight.data = weight(originals[n]) if weight else originals[n].clone()
            if act:
                hooks.append(m.register_forward_pre_hook(lambda _m, args, f=act: (f(args[0]),)))
        with torch.no_grad():
            logits = model(**enc).logits[:, -1, :].float()
            out = model.generate(**enc, max_new_tokens=a.new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for h in hooks:
            h.remove()
        return label, torch.log_softmax(logits, -1), out[:, enc["input_ids"].shape[1]:]

    hooks = [m.register_forward_pre_hook(measure(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    _, ref, ref_out = run("f32")
    rows = [
        run("bf16 weights and inputs (what outlierlab runs)", bf16, bf16),
        run("int8 weights per channel, bf16 inputs (W8A16)", q8_rows, bf16),
        run("int8 weights, int8 inputs per token, symmetric (W8A8)", q8_rows, q8_rows),
        run("int8 weights, u8 inputs per token with zero point (W8A8, vpdpbusd's u8 x s8)",
            q8_rows, lambda x: q8_rows(x, asymmetric=True)),
    ]
    print(f"{os.path.basename(a.gguf)}: {len(PROMPTS)} benchmark prompts, against f32")
    print("| precision | first-token KL mean | max | first tokens equal | "
          f"{a.new_tokens}-token replies equal |")
    print("|---|---|---|---|---|")
    for label, lp, out in rows:
        kl = (ref.exp() * (ref - lp)).sum(-1)
        first = (out[:, 0] == ref_out[:, 0]).sum().item()
        full = sum(bool(torch.equal(o, r)) for o, r in zip(out, ref_out))
        print(f"| {label} | {kl.mean().item():.2e} | {kl.max().item():.2e} | "
              f"{first}/{len(PROMPTS)} | {full}/{len(PROMPTS)} |")
    kinds = {}
    for n, r in ratios.items():
        kind = n.split(".")[-1]
        kinds[kind] = max(kinds.get(kind, 0.0), r)
    print("\nlargest |x| / median |x| of an input row, per kind of linear layer (over all layers):")
    for kind, r in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<10} {r:,.0f}")


if __name__ == "__main__":
    main()
