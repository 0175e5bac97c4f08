"""PyTorch eager-CPU baseline for `outlierlab bench`: the same GGUF, prompts, batch and token
counts through Hugging Face transformers (which dequantises GGUF to float32).

    pip install torch transformers gguf
    OMP_WAIT_POLICY=PASSIVE python benches/torch_baseline.py GGUF_PATH [--threads 2]

Without OMP_WAIT_POLICY=PASSIVE and an explicit thread count, PyTorch's OpenMP threads spin and
it runs many times slower on this 2-core machine.
"""
import argparse
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# The prompts `outlierlab bench` uses (src/bench.rs reads the same file).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt")) as f:
    PROMPTS = [line.rstrip("\n") for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16: what heretic's dtype=auto loads a bf16 checkpoint as")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, a.dtype)).eval()
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
    n = 4096
    dt = getattr(torch, a.dtype)
    x, y = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    x @ y
    t0 = time.perf_counter()
    x @ y
    mm = 2 * n**3 / (time.perf_counter() - t0) / 1e9
    texts = [
        tok.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}],
            tokenize=False, add_generation_prompt=True)
        for p in (PROMPTS * 4)[: a.batch]
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    real = int(enc["attention_mask"].sum())
    with torch.inference_mode():
        model(**enc)
        prefill = min(_timed(lambda: model(**enc)) for _ in range(a.repeats))
        gen = lambda: model.generate(**enc, max_new_tokens=a.new_tokens + 1, min_new_tokens=a.new_tokens + 1,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
        decode = min(_timed(gen) - prefill for _ in range(a.repeats))
    print(f"torch {torch.__version__}, {a.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"resident after load   {rss:.0f} MB")
    print(f"{'f32' if a.dtype == 'float32' else 'bf16'} matmul (torch)   {mm:.1f} GFLOP/s")
    print(f"prefill               {real / prefill:.0f} tokens/s  ({a.batch} prompts, {real} tokens)")
    print(f"decode (batch {a.batch:>2})     {a.batch * a.new_tokens / decode:.0f} tokens/s  ({a.new_tokens} new tokens each)")


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
