"""outlierlab against PyTorch/transformers on this machine, in f32 and bf16, in one run: prefill and
batch-16 decode (`outlierlab bench` vs benches/torch_baseline.py) and, with --score, one
variant's score on 100 + 100 prompts (`outlierlab abliterate` vs benches/heretic_trial.py,
heretic's two scoring steps). Prints one table with the ratios and the fraction of each
precision's matmul peak measured in the same run. A benchmark: it asserts nothing.

    OMP_WAIT_POLICY=PASSIVE python benches/compare.py --model qwen2.5-coder-0.5b-instruct [--score] [--rounds 3]

Needs torch, transformers and gguf (pip install torch transformers gguf) and a release build
(cargo build --release, or .ci/run's build in ~/.cache/outlierlab-target; or
OUTLIERLAB=path/to/outlierlab).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GGUF = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}


def run(cmd, env=None):
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def num(pattern, text):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", choices=sorted(GGUF))
    ap.add_argument("--gguf", default=None,
                    help="time this GGUF file (same architecture as --model) instead of the alias's "
                         "cached one, e.g. benches/synth_gguf.py's random-weight copy on a machine "
                         "the real file cannot reach")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--score", action="store_true", help="also time one variant's score")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run both sides this many times, alternating which goes first")
    ap.add_argument("--precisions", default="f32,bf16",
                    help="comma-separated, of f32 and bf16: outlierlab's (and PyTorch's, unless "
                         "--pytorch-precisions says otherwise); ratios are against each PyTorch "
                         "precision run")
    ap.add_argument("--pytorch-precisions", default=None,
                    help="PyTorch's precisions, if not the same: on a CPU without AVX512_BF16, "
                         "PyTorch's bf16 runs on one thread and takes hours to score")
    a = ap.parse_args()
    # A plain `cargo build --release`, else where .ci/run builds (CARGO_TARGET_DIR's default there).
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = os.path.join(target, "release", "outlierlab")
    if not os.path.exists(exe):
        exe = os.path.expanduser("~/.cache/outlierlab-target/release/outlierlab")
    exe = os.environ.get("OUTLIERLAB", exe)
    cache = os.environ.get("OUTLIERLAB_CACHE", os.path.expanduser("~/.cache/outlierlab"))
    gguf = a.gguf or os.path.join(cache, "models", GGUF[a.model])
    model = a.gguf or a.model
    # Both sides on a.threads threads: OpenMP's for PyTorch, candle's pool (RAYON_NUM_THREADS) for us.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads))
    py = sys.executable
    rows = {}
    wanted = set(a.precisions.split(","))
    torch_wanted = set((a.pytorch_precisions or a.precisions).split(","))
    if not wanted or not (wanted | torch_wanted) <= {"f32", "bf16"}:
        sys.exit("--precisions, --pytorch-precisions: comma-separated lists of f32 and bf16")

    def ours(prec, files):
        o = run([exe, "--precision", prec, "bench", "--model", model], env)
        r = {
            "matmul": num(rf"{prec} matmul \(\w+\)\s+([\d.]+)", o),
            "prefill": num(r"prefill\s+([\d.]+) tokens/s", o),
            "decode": num(r"decode \(batch 16\)\s+([\d.]+) tokens/s", o),
            "mb": num(r"resident after loading: ([\d.]+) MB", o),
        }
        if files:
            o = run([exe, "--precision", prec, "abliterate", "--model", model,
                     "--over-refusal-tokens", "0", "--batch-size", "100"], env)
            r["score"] = num(r"scored none in ([\d.]+) s", o)
        return r

    def theirs(prec, files):
        dtype = {"f32": "float32", "bf16": "bfloat16"}[prec]
        t = run([py, os.path.join(HERE, "torch_baseline.py"), gguf, "--threads", str(a.threads),
                 "--dtype", dtype], env)
        r = {
            "matmul": num(r"matmul \(torch\)\s+([\d.]+)", t),
            "prefill": num(r"prefill\s+([\d.]+) tokens/s", t),
            "decode": num(r"decode \(batch 16\)\s+([\d.]+) tokens/s", t),
            "mb": num(r"resident after load\s+([\d.]+) MB", t),
        }
        if files:
            t = run([py, os.path.join(HERE, "heretic_trial.py"), gguf, files["good"],
                     files["bad"], "--batch", "100", "--threads", str(a.threads),
                     "--dtype", dtype], env)
            r["score"] = num(r"one trial's scoring: ([\d.]+) s", t)
        return r

    # Every round runs both sides, in alternating order, so that a drift of the machine's speed
    # (it moves by tens of percent over minutes here) falls on both; each figure is the best of
    # the rounds, and each ratio is also given per round.
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        files = {}
        if a.score:
            for side, name in [("good", "harmless-outlierlab"), ("bad", "advbench")]:
                lines = run([exe, "datasets", name]).splitlines()[128:228]
                files[side] = os.path.join(d, f"{side}.txt")
                with open(files[side], "w") as f:
                    f.write("\n".join(lines) + "\n")
        for i in range(a.rounds):
            for prec in [p for p in ["f32", "bf16"] if p in wanted | torch_wanted]:
                sides = [(w, fn) for w, fn, on in [("outlierlab", ours, wanted),
                                                   ("pytorch", theirs, torch_wanted)] if prec in on]
                for who, fn in sides if i % 2 == 0 else sides[::-1]:
                    r = fn(prec, files)
                    # Each run as it completes, so an interrupted comparison still says something.
                    print(f"round {i + 1}: {who} {prec}: {r}", file=sys.stderr, flush=True)
                    runs.setdefault((who, prec), []).append(r)
    best = {"matmul": max, "prefill": max, "decode": max, "mb": min, "score": min}
    for key, rs in runs.items():
        rows[key] = {f: pick(r[f] for r in rs) for f, pick in best.items() if f in rs[0]}
    print(f"\n{a.model}" + (f" (weights from {a.gguf})" if a.gguf else "") + f", {a.threads} threads, batch 16 x 32 new tokens (bench prompts)"
          + (f", best of {a.rounds} alternating rounds" if a.rounds > 1 else "")
          + (", score = 100 + 100 prompts, <= 100 tokens" if a.score else ""))
    head = "| run | matmul GFLOP/s | prefill tok/s | decode tok/s | resident MB |" + (
        " one score, s |" if a.score else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (who, prec), r in rows.items():
        line = f"| {who} {prec} | {r['matmul']:.0f} | {r['prefill']:.0f} | {r['decode']:.0f} | {r['mb']:.0f} |"
        if a.score:
            line += f" {r.get('score', float('nan')):.1f} |"
        print(line)
    for tp in [p for p in ["bf16", "f32"] if ("pytorch", p) in rows]:
        ref = rows[("pytorch", tp)]
        print(f"\nratios against PyTorch {tp} (higher is better; for the score, PyTorch's time / ours):")
        for (who, prec), r in rows.items():
            if who != "outlierlab":
                continue
            parts = [f"prefill {r['prefill'] / ref['prefill']:.2f}x", f"decode {r['decode'] / ref['decode']:.2f}x"]
            if a.score:
                parts.append(f"score {ref['score'] / r['score']:.2f}x (time {r['score'] / ref['score']:.2f} of PyTorch {tp}'s)")
            print(f"  outlierlab {prec}: " + ", ".join(parts))
            if a.rounds > 1:
                mine, base = runs[("outlierlab", prec)], runs[("pytorch", tp)]
                for f in ["prefill", "decode"] + (["score"] if a.score else []):
                    per = [(b[f] / m[f]) if f == "score" else (m[f] / b[f]) for m, b in zip(mine, base)]
                    print(f"    {f} per round: " + ", ".join(f"{x:.2f}x" for x in per))


if __name__ == "__main__":
    main()
