"""BERT masked-LM pretraining on pydocs: masked-token accuracy before and after, and fill-mask examples.

    python benchmarks/bert_mlm.py --train              # lmstack train recipes/pydocs-bert-mlm.yaml, then measure
    python benchmarks/bert_mlm.py --run runs/pydocs-bert-mlm

"Before" is the recipe's model at its initialisation (same seed, same config), "after" the run's best checkpoint;
both on the same masked windows of the whole validation split (the evaluator of lmstack/train/mlm.py: 15% chosen,
80/10/10, masks a pure function of the seed). Writes <run>/mlm_eval.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["The [MASK] statement is used to handle exceptions.",
            "Return a new [MASK] containing the items of the iterable.",
            "The function returns [MASK] if the object is callable."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/pydocs-bert-mlm")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "pydocs-bert-mlm.yaml"))
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="recipe overrides for --train")
    a = ap.parse_args(argv)
    import torch
    from lmstack.checkpoint import load_model
    from lmstack.generate.fill_mask import fill_mask
    from lmstack.models.utils import make_model
    from lmstack.train.config import load_recipe
    from lmstack.train.mlm import MLMMasker, make_mlm_evaluator
    from lmstack.train.pretrain import model_config_for, prepare_data
    train_s = None
    if a.train:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "lmstack", "train", a.recipe, "--out-dir", a.run, "--no-progress"]
        for s in a.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t0
    cfg = load_recipe(a.recipe, a.set + [f"out_dir={a.run}"])
    ds = prepare_data(cfg, log=lambda *_: None)
    tok = ds.tokenizer
    masker = MLMMasker(tok, cfg.mlm_probability, cfg.whole_word_masking)
    mcfg = model_config_for(cfg, tok)
    evaluate = make_mlm_evaluator(ds, mcfg.block_size, cfg.batch_size, cfg.seed, masker)
    torch.manual_seed(cfg.seed)
    before = evaluate(make_model(mcfg).eval(), windows=-1)
    ckpt = Path(a.run) / ("best" if (Path(a.run) / "best").exists() else "last")
    model = load_model(ckpt)[0].eval()
    after = evaluate(model, windows=-1)
    examples = {t: [(f["token_str"], round(f["score"], 4)) for f in fill_mask(model, tok, t, top_k=3)[0]]
                for t in EXAMPLES}
    metrics = [json.loads(ln) for ln in open(Path(a.run) / "metrics.jsonl")]
    res = {"checkpoint": str(ckpt), "params": sum(p.numel() for p in model.parameters()),
           "steps": max(m.get("step", 0) for m in metrics), "masked_tokens": after["val_tokens"],
           "before": {"val_acc": before["val_acc"], "val_loss": before["val_loss"]},
           "after": {"val_acc": after["val_acc"], "val_loss": after["val_loss"]},
           "train_elapsed_s": max(m.get("elapsed_s", 0) for m in metrics), "train_wall_s": train_s,
           "fill_mask": examples}
    (Path(a.run) / "mlm_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
