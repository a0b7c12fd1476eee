"""`lmstack compare RECIPE --archs transformer,lstm,gru,gcnn --budget-seconds S | --budget-flops F`: the same data,
the same budget and the same training recipe for several architectures, side by side.

Conventions (one place each):

* Data: the recipe's corpus and tokenizer, tokenized once into <out>/data; every architecture reads the same shards,
  the same batches (a pure function of (seed, step)) and is scored on the same validation split.
* Sizes: the recipe's model is the Transformer; every other architecture gets about the same number of non-embedding
  parameters (`matched_model`): LSTM/GRU 2 layers at the recipe's embedding width with the hidden size chosen to
  match, the gated CNN 2x the recipe's layers (dilations 1, 2, 4, 8, ...) with the width chosen to match. Same
  parameters, so the budget decides how many tokens each one sees.
* Budget -> steps: `--budget-flops F`: steps = F / (tokens per step x training FLOPs per token), FLOPs per token =
  ModelConfig.flops_per_token (6 x matmul weights incl. the head, + attention scores for the Transformer).
  `--budget-seconds S`: a short timing probe (PROBE_STEPS optimizer steps of the real model on the real batches)
  measures seconds per step on this machine, steps = S / that. The LR schedule (warmup capped at 10% of the run)
  ends at each run's own last step.
* Time: `train_s`, the seconds inside optimizer steps (the Trainer's, without evaluations and checkpoints), so the
  periodic evaluations that draw the curves do not eat the budget.
* Score: validation loss on the recipe's eval batches during the run (the curves) and, at the end, the recipe's
  final evaluation (the whole validation split by default) in bits per byte.

Layout: <out>/data, <out>/runs/<arch>/ (a normal run directory), <out>/probe/<arch>/, <out>/compare.json (settings
and one record per architecture; finished runs with the same settings are reused), <out>/compare.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_text
from ..config import ModelConfig
from ..data.jsonl import read_log
from ..errors import ConfigError, LMStackError
from ..train.config import TrainConfig, load_recipe
from ..train.pretrain import model_config_for, prepare_data, pretrain
from .laws import human

ARCHS = ("transformer", "lstm", "gru", "gcnn")
PROBE_STEPS = 30   # timing probe: steps 1..PROBE_WARM are warm-up, the rest are timed
PROBE_WARM = 6
EVAL_POINTS = 12   # validation evaluations per run (the curves)


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise ConfigError(f"--archs takes a comma-separated list of {', '.join(ARCHS)}; got {text!r}")
    if len(set(archs)) != len(archs):
        raise ConfigError(f"--archs lists an architecture twice: {text!r}")
    return archs


def _nearest(target: float, build: Callable[[int], ModelConfig], sizes: range) -> ModelConfig:
    """The config among build(s) for s in sizes whose non-embedding parameter count is nearest target (in log)."""
    return min((build(s) for s in sizes),
               key=lambda m: abs(math.log(max(m.num_params(include_embeddings=False), 1) / target)))


def matched_model(base: ModelConfig, arch: str) -> ModelConfig:
    """A model of `arch` with about `base`'s (the recipe's Transformer) non-embedding parameter count."""
    if arch == "transformer":
        if base.arch != "transformer":
            raise ConfigError(f"the recipe's model is arch {base.arch!r}; `lmstack compare` sizes the others against "
                              "a Transformer recipe (model.arch: transformer)")
        return base
    target = max(base.num_params(include_embeddings=False), 1)
    common = dict(arch=arch, conv_dilations=None)
    if arch in ("lstm", "gru"):
        return _nearest(target, lambda h: dataclasses.replace(base, **common, n_layer=2, rnn_hidden=h),
                        range(4, 4097, 4))
    layers = 2 * base.n_layer
    return _nearest(target, lambda d: dataclasses.replace(base, **common, n_layer=layers, n_embd=d, n_head=1,
                                                          n_kv_head=None), range(4, 4097, 4))


def shape_of(m: ModelConfig) -> str:
    if m.arch in ("lstm", "gru"):
        return f"{m.n_layer} x {m.hidden_size} (emb {m.n_embd})"
    if m.arch == "gcnn":
        return f"{m.n_layer} x {m.n_embd} (k {m.conv_kernel}, field {m.receptive_field})"
    return f"{m.n_layer} x {m.n_embd} ({m.n_head} heads)"


def _run_config(cfg: TrainConfig, out: Path, name: str, model: ModelConfig, steps: int, probe: bool) -> TrainConfig:
    d = cfg.to_dict()
    d.update(out_dir=str(out / ("probe" if probe else "runs") / name), data_dir=str(out / "data"), model=model.to_dict(),
             max_steps=steps, epochs=None, decay_steps=None, resume=False, keep_best=False, sample_tokens=0,
             warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)), ckpt_interval=steps)
    if probe:
        d.update(eval_interval=10 ** 9, final_eval_windows=0, log_interval=1, progress=False)
    else:
        d.update(eval_interval=max(1, steps // EVAL_POINTS), log_interval=max(1, steps // 50))
    return TrainConfig.from_dict(d)


def seconds_per_step(cfg: TrainConfig, out: Path, arch: str, model: ModelConfig, log: Callable) -> float:
    """Measured seconds per optimizer step of `model` on this machine (steps PROBE_WARM+1..PROBE_STEPS)."""
    rc = _run_config(cfg, out, arch, model, PROBE_STEPS, probe=True)
    pretrain(rc, log=lambda *_a, **_k: None)
    recs = {r["step"]: r for r in read_log(Path(rc.out_dir) / "metrics.jsonl") if "train_s" in r}
    s = (recs[PROBE_STEPS]["train_s"] - recs[PROBE_WARM]["train_s"]) / (PROBE_STEPS - PROBE_WARM)
    log(f"{arch}: {s * 1000:.1f} ms/step (timing probe)")
    return s


def _curve(run_dir: Path, tokens_per_step: int, fpt: int) -> list[dict]:
    return [{"step": r["step"], "train_s": r["train_s"], "flops": float(r["step"] * tokens_per_step * fpt),
             "val_loss": r["val_loss"]}
            for r in read_log(run_dir / "metrics.jsonl") if "val_loss" in r and "train_s" in r]


def compare(recipe: str | Path, archs: list[str], budget_seconds: float | None = None,
            budget_flops: float | None = None, out: str | Path | None = None, overrides: list[str] | None = None,
            progress: bool | None = None, log: Callable = print) -> dict[str, Any]:
    """Train each architecture on the recipe's data for the same budget; returns {settings, runs: [record, ...]}
    and writes <out>/compare.json and <out>/compare.png."""
    if (budget_seconds is None) == (budget_flops is None):
        raise ConfigError("give one budget: --budget-seconds S or --budget-flops F")
    budget = float(budget_seconds if budget_seconds is not None else budget_flops)
    if not budget > 0:
        raise ConfigError(f"the budget must be positive, got {budget:g}")
    cfg = load_recipe(recipe, list(overrides or []) + (["progress=false"] if progress is False else []))
    if cfg.objective != "clm":
        raise ConfigError(f"`lmstack compare` compares language models (objective: clm); the recipe has objective: "
                          f"{cfg.objective}")
    out = Path(out or f"runs/compare-{Path(recipe).stem}")
    ds = prepare_data(TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(out), "data_dir": None,
                                             "resume": False}), log)
    base = model_config_for(cfg, ds.tokenizer)
    tokens_per_step = cfg.batch_size * base.block_size * cfg.grad_accum
    settings = {"recipe": str(recipe), "overrides": list(overrides or []), "budget_kind":
                "seconds" if budget_seconds is not None else "flops", "budget": budget,
                "tokens_per_step": tokens_per_step, "train_tokens": ds.num_tokens("train")}
    done = _finished(out, settings)
    records, kept = [], dict(done)
    for arch in archs:
        model = matched_model(base, arch)
        fpt = model.flops_per_token(model.block_size)
        if arch in done and done[arch]["shape"] == shape_of(model):
            log(f"{arch}: done before ({out / 'runs' / arch})")
            records.append(done[arch])
            continue
        sps = seconds_per_step(cfg, out, arch, model, log) if budget_seconds is not None else None
        steps = int(budget / sps) if sps is not None else int(budget // (tokens_per_step * fpt))
        if steps < 1:
            raise LMStackError(f"{arch}: the budget buys no optimizer step ({budget:g} "
                               f"{settings['budget_kind']}; one step costs "
                               f"{sps if sps is not None else tokens_per_step * fpt:.3g}); raise it")
        rc = _run_config(cfg, out, arch, model, steps, probe=False)
        log(f"{arch}: {human(model.num_params())} params ({shape_of(model)}), {steps:,} steps")
        summary = pretrain(rc, log=log if progress is not False else (lambda *_a, **_k: None))
        run_dir = Path(rc.out_dir)
        curve = _curve(run_dir, tokens_per_step, fpt)
        train_s = curve[-1]["train_s"] if curve else float("nan")
        records.append({"arch": arch, "shape": shape_of(model), "params": model.num_params(),
                        "non_embedding_params": model.num_params(include_embeddings=False), "steps": steps,
                        "tokens": steps * tokens_per_step, "flops": float(steps * tokens_per_step * fpt),
                        "flops_per_token": fpt, "probe_s_per_step": sps, "train_s": train_s,
                        "wall_s": summary.get("elapsed_s"), "tokens_per_sec": steps * tokens_per_step / train_s,
                        "final_val_loss": summary.get("final_val_loss", summary.get("val_loss")),
                        "final_val_bpb": summary.get("final_val_bpb", summary.get("val_bpb")),
                        "run_dir": str(run_dir), "curve": curve})
        kept[arch] = records[-1]
        _write(out, settings, list(kept.values()))  # a later call with the same settings reuses finished runs
    result = {"settings": settings, "runs": records}
    result["plot"] = str(plot_compare(records, out / "compare.png", settings))
    return result


def _finished(out: Path, settings: dict) -> dict[str, dict]:
    f = out / "compare.json"
    if not f.exists():
        return {}
    old = json.loads(f.read_text())
    return {r["arch"]: r for r in old.get("runs", [])} if old.get("settings") == settings else {}


def _write(out: Path, settings: dict, records: list[dict]) -> None:
    write_text(out / "compare.json", json.dumps({"settings": settings, "runs": records}, indent=2) + "\n")


def compare_table(result: dict) -> str:
    rows = ["| arch | shape | params | non-emb | steps | tokens | FLOPs | train s | tok/s | val loss | val bpb |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['arch']} | {r['shape']} | {human(r['params'])} | {human(r['non_embedding_params'])} | "
                    f"{r['steps']:,} | {human(r['tokens'])} | {r['flops']:.3g} | {r['train_s']:.1f} | "
                    f"{r['tokens_per_sec']:,.0f} | {r['final_val_loss']:.4f} | "
                    f"{(r['final_val_bpb'] if r['final_val_bpb'] is not None else float('nan')):.4f} |")
    return "\n".join(rows)


def plot_compare(records: list[dict], path: str | Path, settings: dict) -> Path:
    """PNG: validation loss against training seconds (left) and against training FLOPs (right), one line per
    architecture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.NullFormatter below)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in records:
        c = r["curve"]
        for ax, key in zip(axes, ("train_s", "flops")):
            ax.plot([p[key] for p in c], [p["val_loss"] for p in c], marker="o", ms=3,
                    label=f"{r['arch']} ({human(r['params'])})")
    b = settings["budget"]
    axes[0].set_xlabel("training wall time (s, evaluations excluded)")
    axes[1].set_xlabel("training FLOPs")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels collide
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(settings['recipe']).stem}: same data, budget "
                 f"{b:g} {'s' if settings['budget_kind'] == 'seconds' else 'FLOPs'} each")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
