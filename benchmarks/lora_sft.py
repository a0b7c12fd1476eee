"""LoRA SFT of SmolLM2-135M-Instruct on CPU: does held-out loss go down, and how fast / how much memory.

    python benchmarks/lora_sft.py                 # demo + speed, SmolLM2 GGUF from $LMSTACK_GGUF or ../shared/models
    python benchmarks/lora_sft.py --quick         # short settings (a smoke run: ~2-3 minutes on 2 cores)
    python benchmarks/lora_sft.py --only speed    # or --only demo
    python benchmarks/lora_sft.py --only peer     # transformers + PEFT on the same model and setting (pip install peft)

demo:  a generated instruction set in a checkable format (arithmetic, upper-casing, first letters, word counts;
       200 train + 40 held-out examples, fixed seed), `lmstack finetune --lora r=16,alpha=32,dropout=0.05,
       targets=q,k,v,o`; reports held-out loss (response tokens only) before and after, and exact-match accuracy
       of greedy chat replies on held-out prompts for the base and the merged model.
speed: the same LoRA setting on packed rows of 256 tokens (batch 4): steady-state tokens/s (median over steps,
       first step excluded) and peak RSS of the training process (its own rusage; each run is a fresh process).
peer:  transformers (the same GGUF, dequantised by transformers) + PEFT LoRA with the same r/alpha/dropout/targets,
       AdamW, batch 4 x 256 tokens of the same packed training text, full causal-LM loss, in its own process:
       tokens/s (median, first step excluded) and peak RSS, and the ratio lmstack / peer when both ran.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmstack.data.synthetic import instruction  # noqa: E402  (the same generated set as `lmstack demo-data`)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = "r=16,alpha=32,dropout=0.05,targets=q,k,v,o"
def write_data(d: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    r = random.Random(seed)
    rows = [instruction(r) for _ in range(n_train + n_val)]
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
    ap.add_argument("--only", help="comma-separated subset of demo,speed,peer (default: all)")
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="short settings: a smoke test of the script")
    ap.add_argument("--epochs", type=float, default=2.0, help="demo epochs over the 200 training examples")
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--gen", type=int, default=20, help="held-out prompts for the exact-match check (0 = skip)")
    a = ap.parse_args()
    only = set((a.only or "demo,speed,peer").split(","))
    if a.peer_worker:
        return peer_worker(a.model, Path(a.peer_worker), a.speed_steps, a.threads)
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

    if "demo" in only:
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

    if "speed" in only:
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
    if "peer" in only:
        steps = 3 if a.quick else a.speed_steps
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--peer-worker", str(train), "--model", a.model,
                            "--speed-steps", str(steps), "--threads", str(a.threads)], capture_output=True, text=True)
        if r.returncode != 0:
            res["peer"] = {"error": r.stderr[-800:]}
        else:
            res["peer"] = json.loads(r.stdout.strip().splitlines()[-1])
            res["peer"]["wall_s"] = time.perf_counter() - t0
            if "speed" in res:
                res["peer"]["lmstack_over_peer_tokens_per_sec"] = res["speed"]["tokens_per_sec"] / \
                    res["peer"]["tokens_per_sec"]
        print(json.dumps(res["peer"], indent=2), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def peer_worker(model: str, train: Path, steps: int, threads: int) -> None:
    """transformers + PEFT LoRA training steps at batch 4 x 256 (prints one JSON line)."""
    import resource

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p = Path(model)
    tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    net = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                            torch_dtype=torch.float32)
    net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = sum(x.numel() for x in net.parameters() if x.requires_grad)
    text = "\n".join(json.loads(line)["output"] + " " + json.loads(line)["instruction"]
                     for line in train.read_text().splitlines() if line.strip())
    ids = tok(text, return_tensors="pt").input_ids[0]
    opt = torch.optim.AdamW([x for x in net.parameters() if x.requires_grad], lr=1e-3)
    net.train()
    tps = []
    for step in range(steps):
        i = (step * 4 * 256) % max(1, len(ids) - 4 * 256 - 1)
        x = ids[i:i + 4 * 256].view(4, 256)
        t = time.perf_counter()
        loss = net(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in net.parameters() if q.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tps.append(4 * 256 / (time.perf_counter() - t))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import peft
    print(json.dumps({"engine": f"transformers {transformers.__version__} + peft {peft.__version__}",
                      "tokens_per_sec": statistics.median(tps[1:] or tps), "peak_rss_mb": rss,
                      "trainable_params": trainable, "steps": steps}))


if __name__ == "__main__":
    main()
