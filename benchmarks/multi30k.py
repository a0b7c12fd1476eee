"""Multi30k German -> English: train the encoder-decoder recipe (or take a trained run), translate
test_2016_flickr with beam search, and score it with sacreBLEU (cased, 13a tokenisation; and -lc, lowercased, the
figure published small-Transformer results usually quote).

    python benchmarks/multi30k.py --train                      # lmstack train recipes/multi30k-de-en.yaml, then score
    python benchmarks/multi30k.py --run runs/multi30k-de-en    # score a trained run (its best/ checkpoint)
    python benchmarks/multi30k.py --run R --split val --limit 200 --num-beams 1

Data: ../shared/data/multi30k (or --data / $MULTI30K_DIR): {train,val,test_2016_flickr}.{de,en}.gz.
Writes <run>/translations.<split>.en and <run>/bleu.<split>.json; prints one JSON line.
Needs sacrebleu (pip install 'lmstack[seq2seq]').
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/multi30k-de-en", help="run directory (best/ or last/ inside) or checkpoint")
    ap.add_argument("--train", action="store_true", help="train the recipe into --run first")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "multi30k-de-en.yaml"))
    ap.add_argument("--set", action="append", default=[], help="recipe overrides for --train (KEY=VALUE)")
    ap.add_argument("--data", default=os.environ.get("MULTI30K_DIR", str(ROOT.parent / "shared" / "data" / "multi30k")))
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--src", default="de")
    ap.add_argument("--tgt", default="en")
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, help="only the first N sentences")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)

    import sacrebleu
    import torch
    import lmstack
    from lmstack.cli.translate import resolve_model_dir
    from lmstack.data.parallel import read_lines
    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data)
    train_s = None
    if a.train:
        cmd = [sys.executable, "-m", "lmstack", "train", a.recipe, "--out-dir", a.run, "--no-progress",
               "--set", f"src_path={data / f'train.{a.src}.gz'}", "--set", f"tgt_path={data / f'train.{a.tgt}.gz'}",
               "--set", f"val_src_path={data / f'val.{a.src}.gz'}", "--set", f"val_tgt_path={data / f'val.{a.tgt}.gz'}"]
        for s in a.set:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t0
    path = resolve_model_dir(a.run)
    lm = lmstack.load(path)
    srcs = read_lines(data / f"{a.split}.{a.src}.gz")
    refs = read_lines(data / f"{a.split}.{a.tgt}.gz")
    if a.limit:
        srcs, refs = srcs[: a.limit], refs[: a.limit]
    t0 = time.perf_counter()
    hyps = lm.translate(srcs, num_beams=a.num_beams, length_penalty=a.length_penalty, batch_size=a.batch_size)
    decode_s = time.perf_counter() - t0
    bleu, bleu_lc = sacrebleu.BLEU(), sacrebleu.BLEU(lowercase=True)  # 13a tokenisation (the default)
    cased, lower = bleu.corpus_score(hyps, [refs]), bleu_lc.corpus_score(hyps, [refs])
    metrics = [json.loads(line) for line in open(Path(a.run) / "metrics.jsonl")] if (Path(a.run) / "metrics.jsonl").exists() else []
    train_elapsed = max((m.get("elapsed_s", 0) for m in metrics), default=None)
    res = {"split": a.split, "sentences": len(srcs), "checkpoint": path, "num_beams": a.num_beams,
           "length_penalty": a.length_penalty, "bleu_cased": round(cased.score, 2), "bleu_lc": round(lower.score, 2),
           "signature": str(bleu.get_signature()), "detail": str(cased), "decode_s": round(decode_s, 1),
           "train_elapsed_s": train_elapsed, "train_wall_s": None if train_s is None else round(train_s, 1),
           "steps": max((m.get("step", 0) for m in metrics), default=None),
           "best_val_loss": min((m["val_loss"] for m in metrics if "val_loss" in m), default=None),
           "params": lm.model.num_params()}
    out = Path(a.run) if Path(a.run).is_dir() else Path(path)
    (out / f"translations.{a.split}.{a.tgt}").write_text("".join(h + "\n" for h in hyps))
    (out / f"bleu.{a.split}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
