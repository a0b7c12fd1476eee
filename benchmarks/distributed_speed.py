"""Training tokens/s: one process against torchrun with 2 processes (DDP, FSDP), activation checkpointing on/off,
the same model and the same global batch, side by side in one run.

    python benchmarks/distributed_speed.py [--steps 40] [--nproc 2] [--device cpu|cuda] [--out runs/bench-dist]

Prints a table and appends nothing by itself: copy the table into benchmarks/RESULTS.md with the machine line.
Tokens/s is the mean of the Trainer's logged `tokens_per_sec` (global: all ranks' tokens) after the first 5 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmstack.generate.bench import cpu_name  # noqa: E402


def recipe(out: Path, steps: int, device: str, batch: int) -> Path:
    r = {"corpus": "pydocs", "tokenizer": "bpe", "vocab_size": 2048, "device": device, "progress": False,
         "model": {"preset": "gpt2-tiny", "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "dropout": 0.0},
         "batch_size": batch, "max_steps": steps, "warmup_steps": 5, "eval_interval": 10_000, "log_interval": 1,
         "final_eval_windows": 0, "sample_tokens": 0, "keep_best": False, "ckpt_interval": 10_000}
    p = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(r))
    return p


def tokens_per_sec(run: Path, skip: int = 5) -> float:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_sec"] for r in recs if "tokens_per_sec" in r and r["step"] > skip]
    return sum(tps) / len(tps)


def run(name: str, rec: Path, out: Path, nproc: int, threads: int, *sets: str) -> dict:
    base = ["-m", "lmstack", "train", str(rec), "--out-dir", str(out / name), "--no-progress",
            "--set", f"threads={threads}", *[x for s in sets for x in ("--set", s)]]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                             if nproc > 1 else []), *base]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return {"run": name, "processes": nproc, "threads_each": threads, "tokens_per_sec": tokens_per_sec(out / name),
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows of 256 tokens)")
    ap.add_argument("--out", default="runs/bench-dist")
    a = ap.parse_args()
    out = Path(a.out)
    k = a.nproc
    cores = os.cpu_count() or 1
    one = recipe(out / "one", a.steps, a.device, a.batch)
    per = recipe(out / "per", a.steps, a.device, a.batch // k)
    rows = [run("1 process", one, out, 1, cores),
            run("1 process, activation ckpt", one, out, 1, cores, "activation_checkpointing=true"),
            run(f"{k} x DDP", per, out, k, max(1, cores // k), "distributed=ddp"),
            run(f"{k} x FSDP", per, out, k, max(1, cores // k), "distributed=fsdp"),
            run(f"{k} x DDP, activation ckpt", per, out, k, max(1, cores // k), "distributed=ddp",
                "activation_checkpointing=true")]
    base = rows[0]["tokens_per_sec"]
    print(f"machine: {cpu_name()}, {cores} cores; model gpt2-tiny 4x256, block 256, global batch {a.batch}, "
          f"{a.steps} steps, device {a.device}")
    print(f"| run | processes x threads | tokens/s | vs 1 process |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['processes']} x {r['threads_each']} | {r['tokens_per_sec']:,.0f} | "
              f"{r['tokens_per_sec'] / base:.2f}x |")


if __name__ == "__main__":
    main()
