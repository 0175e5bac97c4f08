"""A GGUF with a real model's metadata (architecture, tokenizer, chat template) and tensor shapes
but random weights, for timing on a machine the real file cannot reach (the device machine takes
64 MiB, a 0.5B model is 491 MB). Speed only: the replies are noise, so nothing stops early at a
refusal marker and every reply runs to its token limit, on both sides of a comparison.

    python benches/synth_gguf.py skeleton REAL.gguf SKELETON.json.gz   # here: a few MB
    python benches/synth_gguf.py build SKELETON.json.gz OUT.gguf         # there: F16 weights

Each tensor's values are normal with the real tensor's mean and standard deviation, so that
activations have the real model's scale; vectors (norms, biases) stay F32 as in the original.
"""
import argparse
import gzip
import json
import sys

import numpy as np
import gguf


def skeleton(real, out):
    r = gguf.GGUFReader(real)
    kv = []
    for name, f in r.fields.items():
        # The reader's own header fields, and the architecture GGUFWriter writes itself.
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        value = f.contents()
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        kv.append({"key": name, "type": int(vtype), "sub": None if sub is None else int(sub),
                   "value": value})
    tensors = []
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        tensors.append({"name": t.name, "shape": [int(d) for d in reversed(t.shape)],
                        "mean": float(x.mean()), "std": float(x.std())})
        print(f"{t.name} {tensors[-1]['shape']} mean {x.mean():.4g} std {x.std():.4g}",
              file=sys.stderr)
    arch = r.fields["general.architecture"].contents()
    with gzip.open(out, "wt") as f:
        json.dump({"arch": arch, "kv": kv, "tensors": tensors}, f)


def build(skel, out, seed):
    with gzip.open(skel, "rt") as f:
        s = json.load(f)
    w = gguf.GGUFWriter(out, s["arch"])
    for e in s["kv"]:
        vtype = gguf.GGUFValueType(e["type"])
        sub = None if e["sub"] is None else gguf.GGUFValueType(e["sub"])
        w.add_key_value(e["key"], e["value"], vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    for t in s["tensors"]:
        x = rng.standard_normal(t["shape"], dtype=np.float32) * t["std"] + t["mean"]
        w.add_tensor(t["name"], x.astype(np.float16 if len(t["shape"]) > 1 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("skeleton")
    p.add_argument("real")
    p.add_argument("out")
    p = sub.add_parser("build")
    p.add_argument("skeleton")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "skeleton":
        skeleton(a.real, a.out)
    else:
        build(a.skeleton, a.out, a.seed)


if __name__ == "__main__":
    main()
