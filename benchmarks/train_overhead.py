"""Training hot-path overhead, old code path vs new, side by side in one process (issue 11 item 8).

    .venv/bin/python benchmarks/train_overhead.py [--threads 2] [--reps 5]

1. LoRA step (forward + backward + AdamW on the adapters) of a small Llama-style model with adapters on every
   target (q,k,v share the fused qkv layer, gate/up the fused fc layer): the old LoRALinear._factors (a zeros
   tensor + one slice copy per adapter, every forward) vs the new one (one torch.block_diag).
2. LoRA no-grad forward (generation / evaluation / PPO rollouts with unmerged adapters): old rebuild vs the new
   cache (A and B reused until an adapter tensor changes).
3. Trainer.fit per step (pretraining-style loop, grad_accum=4): the old loop read `loss.item()` after every
   micro-step (a device sync on CUDA); the new one keeps detached losses and reads them once per logged step. The
   "old" variant here adds the per-micro-step `.item()` back through the loss function; on a CPU a sync is free,
   so this row mostly shows that the change costs nothing there.
Runs alternate old/new and report the median ms/step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.models.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters  # noqa: E402
from lmstack.models.transformer import Transformer  # noqa: E402
from lmstack.generate.bench import cpu_name


def old_factors(self):
    """LoRALinear._factors before issue 11: rebuilt from zeros with one slice copy per adapter, every call."""
    names = list(self.segments)
    if len(names) == 1:
        (s, e), = self.segments.values()
        if s == 0 and e == self.out_features:
            return self.lora_A[names[0]], self.lora_B[names[0]]
    A = torch.cat([self.lora_A[n] for n in names]) if len(names) > 1 else self.lora_A[names[0]]
    B = A.new_zeros(self.out_features, self.r * len(names))
    for j, (n, (s, e)) in enumerate(self.segments.items()):
        B[s:e, j * self.r:(j + 1) * self.r] = self.lora_B[n]
    return A, B


NEW_FACTORS = LoRALinear._factors



def lora_model() -> Transformer:
    cfg = ModelConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, pos_emb="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    m = Transformer(cfg)
    apply_lora(m, LoRAConfig.parse("r=8,alpha=16,dropout=0,targets=all"))
    return m


def time_lora(mode: str, grad: bool, steps: int = 20, tokens: int = 8) -> float:
    LoRALinear._factors = old_factors if mode == "old" else NEW_FACTORS
    m = lora_model()
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3)
    x = torch.randint(0, 512, (4, 64))

    def one():
        if grad:
            logits = m(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                m(x[:1, :tokens])  # short forward: a decode-sized call, where the per-layer overhead shows
    for _ in range(3):
        one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    LoRALinear._factors = NEW_FACTORS
    return 1000 * (time.perf_counter() - t) / steps


def time_trainer(mode: str, steps: int = 30) -> float:
    from lmstack.train import Trainer, TrainConfig
    from lmstack.train.pretrain import lm_loss
    cfg_m = ModelConfig(vocab_size=128, block_size=64, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = Transformer(cfg_m)
    data = torch.randint(0, 128, (64, 65))

    def get_batch(step, micro):
        i = (step * 4 + micro) % 56
        return data[i:i + 8, :-1], data[i:i + 8, 1:]

    def loss_fn(m, b):
        loss = lm_loss(m, b)
        if mode == "old":
            loss.item()  # the old loop's per-micro-step sync
        return loss
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(out_dir=d, max_steps=steps, grad_accum=4, batch_size=8, eval_interval=10_000,
                          log_interval=1, progress=False, warmup_steps=0, ckpt_interval=10_000)
        tr = Trainer(model, cfg, loss_fn, get_batch, steps)
        tr.save = lambda name: None  # time the loop, not the checkpoint writes
        t = time.perf_counter()
        tr.fit()
        return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, load average {load}); torch {torch.__version__}; "
          f"{a.threads} threads; median of {a.reps} alternating runs")
    rows = [("LoRA train step (4 layers, d=128, r=8, all targets, 4x63 tokens)", lambda m: time_lora(m, True)),
            ("LoRA no-grad forward (1x8 tokens)", lambda m: time_lora(m, False, 200)),
            ("LoRA no-grad forward (1x1 token, decode-sized)", lambda m: time_lora(m, False, 300, tokens=1)),
            ("Trainer.fit step (grad_accum=4, 2 layers, d=64, 8x64 tokens)", time_trainer)]
    for name, fn in rows:
        res = {"old": [], "new": []}
        for _ in range(a.reps):
            for mode in ("old", "new"):
                res[mode].append(fn(mode))
        o, n = statistics.median(res["old"]), statistics.median(res["new"])
        print(f"{name}: old {o:.2f} ms/step, new {n:.2f} ms/step ({(o - n) / o * 100:+.1f}% time saved)")


if __name__ == "__main__":
    main()
