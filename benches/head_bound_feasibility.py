"""Could greedy decoding skip most of the output head and stay exact? A feasibility measurement,
before any kernel is written. The head is 27% of Qwen2.5-0.5B's multiply-adds per token. An exact
shortcut: project the (bf16-rounded) final hidden state h onto an orthonormal basis V of r
directions, compute a_j = (Vᵀw_j)·(Vᵀh) for every vocabulary row w_j (r/896 of the head's work),
and bound the rest by Cauchy–Schwarz, |w_j·h − a_j| ≤ ‖w_j⊥‖·‖h⊥‖. Only rows whose upper bound
reaches the best exact logit among the candidates can be the argmax; only those would need their
exact bf16 logits. This script counts those survivors on real decoding states (greedy replies to
AdvBench prompts), for V = the top principal directions of the head's rows and of the hidden
states themselves (fitted on half the states, counted on the other half). The mean count is what
the shortcut would cost; the shortcut pays only if it is a small fraction of 151,936.

    outlierlab datasets advbench | sed -n 201,260p > bad.txt   # the prompts README's figures used
    OMP_WAIT_POLICY=PASSIVE python benches/head_bound_feasibility.py GGUF_PATH bad.txt \
        [--prompts-used 24] [--tokens 40] [--threads 2]
"""
import argparse

import torch

import decoding_states


def survivors(H, W, V):
    """Per state, how many head rows the projected bound cannot rule out."""
    E = H @ W.T  # exact logits of the rounded operands
    Z = W @ V
    rho = ((W * W).sum(1) - (Z * Z).sum(1)).clamp(min=0).sqrt()
    U = H @ V
    tau = ((H * H).sum(1) - (U * U).sum(1)).clamp(min=0).sqrt()
    A = U @ Z.T
    best = E[torch.arange(len(H)), A.argmax(1)]  # a lower bound on the true maximum
    ub = A + rho[None, :] * tau[:, None]
    return (ub >= best[:, None] - 1e-3).sum(1).double(), tau


def main():
    ap = argparse.ArgumentParser()
    decoding_states.add_args(ap)
    a = ap.parse_args()
    H, W = decoding_states.collect(a)
    fit, test = H[::2], H[1::2]
    bases = {
        "head rows' principal directions": torch.linalg.eigh(W.T @ W)[1].flip(1),
        "hidden states' principal directions": torch.linalg.eigh(fit.T @ fit)[1].flip(1),
    }
    print("| basis | r | mean ‖h⊥‖ | survivors mean | median | max |")
    print("|---|---|---|---|---|---|")
    for name, evecs in bases.items():
        for r in [64, 128, 256, 384]:
            s, tau = survivors(test, W, evecs[:, :r])
            print(f"| {name} | {r} | {tau.mean():.1f} | {s.mean():.0f} | {s.median():.0f} | {s.max():.0f} |")


if __name__ == "__main__":
    main()
