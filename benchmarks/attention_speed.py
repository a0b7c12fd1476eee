"""CPU attention for short sequences: the flash kernel (SDPA) against matmul + softmax + matmul, side by side.

    .venv/bin/python benchmarks/attention_speed.py [--threads 2] [--reps 7]

1. Attention alone, forward + backward, at the shapes a small CPU pretraining run has (and two longer ones), in
   float32 and under bf16 autocast. "sdpa" is what `models.attention.attend` did before: the flash kernel, run in
   float32 under autocast; "matmul" is `attention._matmul_attention`.
2. One training step (forward + backward) of recipes/shakespeare-char-fast.yaml's model (4 x 128, RoPE, RMSNorm,
   SwiGLU, batch 12 x 64 tokens, bf16 autocast where the recipe's `dtype: auto` picks it), with `attend` forced to
   the flash kernel against `attend` as it is.
Runs alternate the two variants and report the median ms.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.generate.bench import cpu_name  # noqa: E402
from lmstack.models import attention  # noqa: E402
from lmstack.models.transformer import Transformer  # noqa: E402
from lmstack.train.trainer import resolve_dtype  # noqa: E402


def timed(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def _sdpa_fp32(q, k, v):
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)


def attention_rows(reps: int) -> list[str]:
    rows = ["| B, H, T, D | autocast | sdpa fwd+bwd ms | matmul fwd+bwd ms | speed-up |", "|---|---|---|---|---|"]
    for b, h, t, d in [(12, 4, 64, 32), (24, 4, 64, 32), (8, 6, 128, 64), (4, 6, 256, 64), (2, 12, 512, 64)]:
        for bf16 in (False, True):
            q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
            g = torch.randn(b, h, t, d)

            def run(fn):
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    y = fn(q, k, v)
                y.float().backward(g)
            fns = {"sdpa": lambda q, k, v: _sdpa_fp32(q, k, v) if bf16 else
                   F.scaled_dot_product_attention(q, k, v, is_causal=True),
                   "matmul": lambda q, k, v: attention._matmul_attention(q, k, v, is_causal=True)}
            ms = {n: [] for n in fns}
            for _ in range(reps):
                for n, fn in fns.items():
                    ms[n].append(timed(lambda: run(fn), 10))
            a, m = statistics.median(ms["sdpa"]), statistics.median(ms["matmul"])
            rows.append(f"| {b}, {h}, {t}, {d} | {'bf16' if bf16 else 'off'} | {a:.2f} | {m:.2f} | {a / m:.2f}x |")
    return rows


def step_rows(reps: int) -> list[str]:
    cfg = ModelConfig(vocab_size=128, n_layer=4, n_head=4, n_embd=128, block_size=64, pos_emb="rope", norm="rmsnorm",
                      mlp="swiglu", intermediate_size=384, bias=False, dropout=0.0)
    model = Transformer(cfg).train()
    dtype, why = resolve_dtype("auto", torch.device("cpu"))
    x, y = torch.randint(0, 128, (12, 64)), torch.randint(0, 128, (12, 64))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
    real = attention._matmul_path
    ms = {"flash kernel": [], "as it is": []}
    for _ in range(reps):
        for name in ms:
            attention._matmul_path = real if name == "as it is" else (lambda *a: False)
            ms[name].append(timed(step, 20))
    attention._matmul_path = real
    a, b = statistics.median(ms["flash kernel"]), statistics.median(ms["as it is"])
    return [f"Training step (fwd + bwd) of the fast recipe's model, `dtype: auto` -> {dtype} ({why}):",
            "", "| attend | ms/step |", "|---|---|", f"| flash kernel (before) | {a:.2f} |",
            f"| as it is | {b:.2f} |", "", f"speed-up {a / b:.2f}x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{cpu_name()}, {a.threads} threads, torch {torch.__version__}\n")
    print("\n".join(attention_rows(a.reps)))
    print()
    print("\n".join(step_rows(a.reps)))


if __name__ == "__main__":
    main()
