"""LoRA SFT of SmolLM2-135M-Instruct on CPU: does held-out loss go down, and how fast / how much memory.

    python benchmarks/lora_sft.py                 # demo + speed, SmolLM2 GGUF from $LMSTACK_GGUF or ../shared/models
    python benchmarks/lora_sft.py --quick         # short settings (a smoke run: ~2-3 minutes on 2 cores)
    python benchmarks/lora_sft.py --only speed    # or --only demo

demo:  a generated instruction set in a checkable format (arithmetic, upper-casing, first letters, word counts;
       200 train + 40 held-out examples, fixed seed), `lmstack finetune --lora r=16,alpha=32,dropout=0.05,
       targets=q,k,v,o`; reports held-out loss (response tokens only) before and after, and exact-match accuracy
       of greedy chat replies on held-out prompts for the base and the merged model.
speed: the same LoRA setting on packed rows of 256 tokens (batch 4): steady-state tokens/s (median over steps,
       first step excluded) and peak RSS of the training process (its own rusage; each run is a fresh process).
Results go to stdout as JSON and to <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = "r=16,alpha=32,dropout=0.05,targets=q,k,v,o"
WORDS = ("apple river stone cloud green music paper light window garden silver candle forest orange tiger "
         "bread planet yellow castle ocean").split()


def make_example(r: random.Random) -> dict:
    kind = r.randrange(4)
    if kind == 0:
        a, b = r.randint(10, 99), r.randint(10, 99)
        return {"instruction": f"Add {a} and {b}.", "output": f"{a} + {b} = {a + b}."}
    words = [r.choice(WORDS) for _ in range(r.randint(2, 5))]
    if kind == 1:
        return {"instruction": "Write this in capital letters.", "input": " ".join(words),
                "output": " ".join(words).upper()}
    if kind == 2:
        return {"instruction": f"What is the first letter of the word '{words[0]}'?",
                "output": f"The first letter is '{words[0][0]}'."}
    return {"instruction": "How many words are in this text?", "input": " ".join(words),
            "output": f"There are {len(words)} words."}


def write_data(d: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    r = random.Random(seed)
    rows = [make_example(r) for _ in range(n_train + n_val)]
    tr, va = d / "train.jsonl", d / "heldout.jsonl"
    tr.write_text("".join(json.dumps(x) + "\n" for x in rows[:n_train]))
    va.write_text("".join(json.dumps(x) + "\n" for x in rows[n_train:]))
    return tr, va


def run_finetune(args: list[str], out: Path, threads: int) -> tuple[dict, float, float]:
    """`lmstack finetune ARGS --out OUT` in a fresh process: (summary, wall seconds, peak RSS MB of that process)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "lmstack.cli", "finetune", *args, "--out", str(out), "--no-progress",
           "--set", f"threads={threads}"]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.stdout", "w+") as so, open(out.parent / f"{out.name}.stderr", "w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        so.seek(0)
        text = so.read()
        if os.waitstatus_to_exitcode(status):
            se.seek(0)
            raise SystemExit(f"finetune failed:\n{se.read()[-3000:]}")
    summary = json.loads(text[text.index("{\n"):])
    return summary, wall, usage.ru_maxrss / 1024


def accuracy(model_path: str, heldout: Path, n: int) -> float:
    import lmstack
    from lmstack.data.sft import load_records
    lm = lmstack.load(model_path)
    recs = load_records(heldout)[:n]
    ok = 0
    for rec in recs:
        want = rec.messages[-1]["content"].strip()
        got = lm.chat(rec.messages[:-1], max_new_tokens=24, temperature=0).strip()
        ok += got == want
    return ok / max(len(recs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("LMSTACK_GGUF", str(DEFAULT_GGUF)))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_lora_sft"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=["demo", "speed"])
    ap.add_argument("--quick", action="store_true", help="short settings: a smoke test of the script")
    ap.add_argument("--epochs", type=float, default=2.0, help="demo epochs over the 200 training examples")
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--gen", type=int, default=20, help="held-out prompts for the exact-match check (0 = skip)")
    a = ap.parse_args()
    if not Path(a.model).exists():
        raise SystemExit(f"model not found at {a.model} (set LMSTACK_GGUF or pass --model)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_val = (64, 16) if a.quick else (200, 40)
    train, heldout = write_data(out, n_train, n_val)
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, threads={a.threads}",
                 "model": a.model, "lora": LORA}
    import torch
    res["torch"] = torch.__version__

    if a.only in (None, "demo"):
        epochs = 0.5 if a.quick else a.epochs
        s, wall, rss = run_finetune(["--model", a.model, "--data", str(train), "--val-data", str(heldout),
                                     "--lora", LORA, "--epochs", str(epochs), "--batch-size", "8", "--lr", "1e-3",
                                     "--seq-len", "256", "--set", "eval_interval=1000"], out / "demo", a.threads)
        res["demo"] = {"train_examples": n_train, "heldout_examples": n_val, "epochs": epochs, "steps": s["steps"],
                       "trainable_params": s["trainable_params"], "trainable_percent": s["trainable_percent"],
                       "heldout_loss_before": s["initial_val_loss"], "heldout_loss_after": s["val_loss"],
                       "wall_s": wall, "peak_rss_mb": rss}
        n_gen = min(a.gen, 4) if a.quick else a.gen
        if n_gen:
            res["demo"]["exact_match_base"] = accuracy(a.model, heldout, n_gen)
            res["demo"]["exact_match_lora"] = accuracy(s["model_dir"], heldout, n_gen)
            res["demo"]["exact_match_prompts"] = n_gen
        print(json.dumps(res["demo"], indent=2), flush=True)

    if a.only in (None, "speed"):
        steps = 3 if a.quick else a.speed_steps
        s, wall, rss = run_finetune(["--model", a.model, "--data", str(train), "--val-fraction", "0", "--pack",
                                     "--lora", LORA, "--max-steps", str(steps), "--batch-size", "4",
                                     "--seq-len", "256", "--no-merge"], out / "speed", a.threads)
        rows = [json.loads(x) for x in (out / "speed" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:] or [rows[-1]["tokens_per_sec"]]
        res["speed"] = {"seq_len": 256, "batch_size": 4, "steps": steps, "tokens_per_sec": statistics.median(tps),
                        "ms_per_step": 1000 * 4 * 256 / statistics.median(tps), "peak_rss_mb": rss,
                        "wall_s": wall, "trainable_params": s["trainable_params"]}
        print(json.dumps(res["speed"], indent=2), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
