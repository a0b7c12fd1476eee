"""Training speed and time-to-quality for a recipe, measured as a user runs it.

    python benchmarks/train_speed.py [RECIPE ...] [--data-path FILE] [--set KEY=VALUE ...]

For each recipe: runs `lmstack train` in a fresh process (data preparation excluded by a first untimed
`prepare` run, so the timing is the training job itself), then reports wall time for the whole run (evals
included), steady-state ms/step and tokens/s, peak RSS, final validation loss over the whole validation split,
and a forward / backward / optimizer breakdown measured in-process on the same model.
The reference column holds the numbers the issue records for the widely used eager-PyTorch reference of the
same `shakespeare-char` setting on this machine (40 ms/step, 89 s, 372 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {"ms_per_step": 40.0, "wall_s": 89.0, "peak_rss_mb": 372.0, "val_loss": 1.88}


def run_recipe(recipe: str, data_path: str, sets: list[str], out_dir: Path) -> dict:
    base = [sys.executable, "-m", "lmstack.cli", "train", recipe, "--no-progress", "--out-dir", str(out_dir),
            "--set", f"data_path={data_path}"] + [a for s in sets for a in ("--set", s)]
    # untimed pass that only prepares the data (tokenizer + shards), so the timed run measures training
    subprocess.run(base + ["--set", "max_steps=1", "--set", "final_eval_windows=0", "--set", "sample_tokens=0"],
                   check=True, capture_output=True, cwd=ROOT)
    t0 = time.perf_counter()
    with open(out_dir / "stdout.txt", "w+") as out, open(out_dir / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(base + ["--set", "sample_tokens=0"], stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        wall = time.perf_counter() - t0
        out.seek(0)
        stdout = out.read()
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(err.read())
    rss_mb = usage.ru_maxrss / 1024
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]  # skip the warm-up interval
    summary = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
    final = [r for r in rows if "final_val_loss" in r][-1]
    steps = summary["steps"]
    from lmstack.train import load_recipe
    cfg = load_recipe(recipe, [f"data_path={data_path}"] + sets)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * int(cfg.model.get("block_size", 64))
    med_tps = statistics.median(tps)
    return {"recipe": recipe, "steps": steps, "wall_s": wall, "train_elapsed_s": summary.get("elapsed_s"),
            "ms_per_step": 1000 * tokens_per_step / med_tps, "tokens_per_sec": med_tps, "peak_rss_mb": rss_mb,
            "final_val_loss": final["final_val_loss"], "final_val_tokens": final["final_val_tokens"]}


def breakdown(recipe: str, data_path: str, sets: list[str], out_dir: Path, steps: int = 30) -> dict:
    """Forward / backward / optimizer milliseconds per step, in-process, on the recipe's model and batches."""
    import numpy as np
    import torch

    from lmstack.models import Transformer
    from lmstack.train import load_recipe
    from lmstack.train.pretrain import lm_loss, model_config_for, prepare_data
    from lmstack.train.trainer import build_optimizer
    cfg = load_recipe(recipe, [f"data_path={data_path}", f"out_dir={out_dir}"] + sets)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = prepare_data(cfg, log=lambda *a: None)
    mcfg = model_config_for(cfg, ds.tokenizer)
    model = Transformer(mcfg)
    opt = build_optimizer(model.configure_optimizer_groups(cfg.weight_decay), cfg)
    f = b = o = 0.0
    for i in range(steps + 5):
        x, y = ds.batch("train", cfg.batch_size, mcfg.block_size, np.random.default_rng(i))
        t0 = time.perf_counter()
        loss = lm_loss(model, (x, y))
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or 1e9)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= 5:
            f, b, o = f + t1 - t0, b + t2 - t1, o + t3 - t2
    return {"forward_ms": 1000 * f / steps, "backward_ms": 1000 * b / steps, "optimizer_ms": 1000 * o / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*", default=["recipes/shakespeare-char.yaml", "recipes/shakespeare-char-fast.yaml"])
    ap.add_argument("--data-path", default=os.environ.get("LMSTACK_SHAKESPEARE",
                                                           str(ROOT.parent / "shared/data/tinyshakespeare.txt")))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "runs/bench"))
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}")
    results = []
    for r in a.recipes:
        out = Path(a.out) / Path(r).stem
        res = run_recipe(r, a.data_path, a.set, out)
        res.update(breakdown(r, a.data_path, a.set, out))
        results.append(res)
        print(json.dumps(res), flush=True)
    print("\n| recipe | steps | wall s (vs ref 89 s) | ms/step (vs ref 40) | fwd/bwd/opt ms | tokens/s | peak RSS MB | final val loss (full split) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {Path(r['recipe']).name} | {r['steps']} | {r['wall_s']:.1f} ({r['wall_s'] / REFERENCE['wall_s']:.2f}x) | "
              f"{r['ms_per_step']:.1f} ({r['ms_per_step'] / REFERENCE['ms_per_step']:.2f}x) | "
              f"{r['forward_ms']:.1f}/{r['backward_ms']:.1f}/{r['optimizer_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['final_val_loss']:.4f} |")


if __name__ == "__main__":
    main()
