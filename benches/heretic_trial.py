"""The work of one heretic trial's scoring (Evaluator.get_score in heretic 1.x), re-run with
Hugging Face transformers on the same GGUF, prompts and response length as
`outlierlab abliterate`, for a side-by-side time. Not heretic itself: heretic needs the Hub for
its datasets; this reproduces its two steps exactly as its code does them —
first-token log-probabilities of the harmless prompts (generate 1 token, output_scores) and greedy
replies of up to max_response_length tokens to the harmful prompts, batched, left-padded.

    OMP_WAIT_POLICY=PASSIVE python benches/heretic_trial.py GGUF GOOD.txt BAD.txt [--batch 64]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM = "You are a helpful assistant."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("good")
    ap.add_argument("bad")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-response-length", type=int, default=100)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16: what heretic's dtype=auto loads a bf16 checkpoint as")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, a.dtype)).eval()
    good = [l.strip() for l in open(a.good) if l.strip()]
    bad = [l.strip() for l in open(a.bad) if l.strip()]

    def gen(prompts, **kw):
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]
        texts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        enc = tok(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
        return enc, model.generate(**enc, **kw, pad_token_id=tok.eos_token_id, do_sample=False)

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(good), a.batch):
            _, out = gen(good[i:i + a.batch], max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
            F.log_softmax(out.scores[0], dim=-1)
        t1 = time.perf_counter()
        for i in range(0, len(bad), a.batch):
            enc, out = gen(bad[i:i + a.batch], max_new_tokens=a.max_response_length)
            tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    t2 = time.perf_counter()
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}")
    print(f"first-token logprobs ({len(good)} prompts): {t1 - t0:.1f} s")
    print(f"replies ({len(bad)} prompts, up to {a.max_response_length} tokens): {t2 - t1:.1f} s")
    print(f"one trial's scoring: {t2 - t0:.1f} s")


if __name__ == "__main__":
    main()
