"""IsoFLOP sweeps on your own machine (Hoffmann et al. 2022, approach 2) and a check of their prediction.

`sweep` trains, for each compute budget C, `sizes` models whose sizes bracket the compute-optimal size, each for
exactly as many tokens as C buys; `check` fits the sweep (fit.fit_runs), predicts the loss at a larger budget,
trains that one model and compares. Every run goes through `lmstack.train.pretrain` (the one Trainer).

Conventions (one place each):

* Training FLOPs per token: `flops_per_token(model)` = ModelConfig.flops_per_token(block_size)
  = 6 * (non-embedding params + vocab * n_embd) + 6 * n_layer * block_size * n_embd, i.e. forward + backward of
  every matmul including the output head (the tied embedding costs a matmul there, its lookup is free) plus the
  attention scores (Kaplan et al. 2020 / Chinchilla style). For the sweep's tied-embedding, RoPE models
  vocab * n_embd + non-embedding params == params, so flops_per_token = 6 N + 6 L T d: the fit's C = 6ND holds up to
  the attention term (a few percent at block 128).
* N (the `params` the fit sees) is the total parameter count, embeddings included (Chinchilla); the record also
  carries `non_embedding_params` (Kaplan).
* A run's tokens = C / flops_per_token, trained in steps = ceil(tokens / tokens_per_step) optimizer steps (one step
  fewer when the overshoot would move the run out of its budget's 2-significant-digit group); the record holds the
  tokens and flops actually spent.
* Shape rule (`shape_for_width`): width d is a multiple of `head_dim` (16), heads = d / head_dim, depth
  L = max(1, round(d / aspect)) with aspect = 32 (d/L ~ 32: 2 x 64, 3 x 96, 4 x 128, ...). Params grow
  monotonically with d; `shape_ladder` lists the shapes and `model_for_params` picks the one nearest a target N
  (in log N).
* Size grid (`size_grid`): centred on N_c = sqrt(C / (6 r)) with r = tokens_per_param (default 20, Chinchilla's
  rule), targets N_c * factor^k for k = -(sizes-1)/2 .. (sizes-1)/2 (factor 2.0 by default), each mapped to the
  nearest unused ladder shape.
* LR schedule: the recipe's (cosine by default) decaying to min_lr at each run's own last step, warmup a fixed
  fraction (`warmup_fraction`) of the run.
* Final loss: the same first `final_eval_windows` windows of the validation split for every run.

Layout of a sweep directory:
    sweep.json        the settings every run shares (checked when the sweep is resumed)
    data/             the one tokenized dataset all runs read
    runs/<name>/      one pretrain run each (checkpoints, metrics.jsonl)
    runs.jsonl        one record per finished run (read by `lmstack scaling fit` and `check`)
    sweep.png         loss vs N per budget (+ the fitted frontier when the fit succeeds)
    check.json        `check`'s prediction and measurement
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from ..atomic import write_text
from ..config import ModelConfig
from ..data.jsonl import JsonlLog, read_log
from ..errors import ConfigError, LMStackError
from ..train.config import TrainConfig, load_recipe, merge_dicts, parse_set, yaml_load
from ..train.pretrain import model_config_for, prepare_data, pretrain
from .fit import budget_key
from .laws import human
from .report import plot_sweep

#: the base recipe of a sweep (recipes/scaling-sweep.yaml holds the same values; a test keeps them equal)
BASE: dict[str, Any] = {
    "out_dir": "runs/scaling-sweep",
    "corpus": "stdlib",
    "tokenizer": "bpe",
    "vocab_size": 2048,
    "val_fraction": 0.1,
    "model": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "gelu", "activation": "gelu", "bias": False,
              "tie_embeddings": True, "block_size": 128, "dropout": 0.0},
    "optimizer": "adamw",
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "lr_schedule": "cosine",
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.99,
    "grad_clip": 1.0,
    "batch_size": 16,
    "eval_iters": 2,
    "final_eval_windows": 512,
    "log_interval": 50,
    "keep_best": False,
    "threads": 0,
    "sample_tokens": 0,
    "max_steps": 1,  # replaced per run
}

MIN_STEPS = 10
ASPECT = 32
HEAD_DIM = 16
FACTOR = 2.0
TOKENS_PER_PARAM = 20.0
WARMUP_FRACTION = 0.05
#: TrainConfig keys that do not change what a run computes (free to differ between sessions of one sweep)
_FREE_KEYS = ("out_dir", "resume", "progress", "threads", "device", "log_interval", "data_dir", "max_steps",
              "epochs", "warmup_steps", "decay_steps", "eval_interval", "ckpt_interval")


# ---- shapes, FLOPs, grids ------------------------------------------------------------------------
def flops_per_token(model: ModelConfig) -> int:
    """Training FLOPs per token of `model` at its own context (the one definition every sweep number uses)."""
    return model.flops_per_token(model.block_size)


def shape_for_width(d: int, aspect: int = ASPECT, head_dim: int = HEAD_DIM) -> dict[str, int]:
    """The shape rule: {n_layer, n_embd, n_head} for width d (a positive multiple of head_dim)."""
    if d <= 0 or d % head_dim:
        raise ConfigError(f"width {d} must be a positive multiple of head_dim={head_dim}")
    return {"n_layer": max(1, math.floor(d / aspect + 0.5)), "n_embd": d, "n_head": d // head_dim}


def model_with_shape(base: ModelConfig, shape: dict[str, int]) -> ModelConfig:
    return ModelConfig.from_dict({**base.to_dict(), **shape, "n_kv_head": None, "intermediate_size": None})


def shape_ladder(base: ModelConfig, aspect: int = ASPECT, head_dim: int = HEAD_DIM,
                 max_width: int = 4096) -> list[ModelConfig]:
    """Every shape of the rule from the narrowest up to max_width, in increasing size."""
    return [model_with_shape(base, shape_for_width(d, aspect, head_dim))
            for d in range(head_dim, max_width + 1, head_dim)]


def model_for_params(target: float, base: ModelConfig, aspect: int = ASPECT, head_dim: int = HEAD_DIM) -> ModelConfig:
    """The shape-rule model whose total parameter count is nearest `target` (in log N)."""
    if not (math.isfinite(target) and target > 0):
        raise LMStackError(f"a model size must be a positive parameter count, got {target}")
    ladder = shape_ladder(base, aspect, head_dim)
    return min(ladder, key=lambda m: abs(math.log(m.num_params() / target)))


def centre_params(budget: float, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """N_c with C = 6 N D and D = r N: sqrt(C / (6 r))."""
    return math.sqrt(budget / (6 * tokens_per_param))


def size_grid(budget: float, sizes: int, base: ModelConfig, tokens_per_param: float = TOKENS_PER_PARAM,
              factor: float = FACTOR, aspect: int = ASPECT, head_dim: int = HEAD_DIM) -> list[ModelConfig]:
    """`sizes` distinct shape-rule models bracketing N_c(budget), spaced by ~`factor` in N, smallest first."""
    _check_budget(budget)
    if not isinstance(sizes, int) or sizes < 3:
        raise LMStackError(f"--sizes must be at least 3 (an IsoFLOP parabola needs 3 sizes per budget), got {sizes}")
    if not factor > 1:
        raise LMStackError(f"--factor (the size ratio between neighbouring models) must be > 1, got {factor}")
    if not tokens_per_param > 0:
        raise LMStackError(f"--tokens-per-param must be positive, got {tokens_per_param}")
    ladder = shape_ladder(base, aspect, head_dim)
    logs = [math.log(m.num_params()) for m in ladder]
    nc = centre_params(budget, tokens_per_param)
    chosen: list[int] = []
    for k in range(sizes):
        t = math.log(nc) + (k - (sizes - 1) / 2) * math.log(factor)
        lo = chosen[-1] + 1 if chosen else 0
        if lo >= len(ladder):
            raise LMStackError(f"budget {budget:.3g}: the grid runs past the largest shape ({human(ladder[-1].num_params())} "
                               "params); lower the budget or --factor")
        chosen.append(min(range(lo, len(ladder)), key=lambda i: abs(logs[i] - t)))
    return [ladder[i] for i in chosen]


def _check_budget(c: float) -> None:
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise LMStackError(f"compute budgets must be positive FLOP counts like 3e12, got {c}")


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LMStackError(f"--budgets takes comma-separated FLOP counts like 1e12,3e12,1e13, got {text!r}") from None
    if not budgets:
        raise LMStackError("--budgets is empty; give FLOP counts like 1e12,3e12,1e13")
    for c in budgets:
        _check_budget(c)
    return sorted(set(budgets))


def budget_name(c: float) -> str:
    """3e12 -> '3e12', 1.5e13 -> '1.5e13'."""
    m, e = f"{c:.2g}".split("e") if "e" in f"{c:.2g}" else (f"{c:.2g}", "0")
    return f"{m}e{int(e)}"


@dataclass
class RunPlan:
    """One run of a sweep: a model trained for `steps` steps so that it spends ~`budget` FLOPs."""
    name: str
    budget: float
    model: ModelConfig
    steps: int
    tokens_per_step: int
    kind: str = "sweep"

    @property
    def flops_per_token(self) -> int:
        return flops_per_token(self.model)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return float(self.tokens) * self.flops_per_token

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"name": self.name, "budget": self.budget, "params": m.num_params(),
                "non_embedding_params": m.num_params(include_embeddings=False), "n_layer": m.n_layer,
                "n_embd": m.n_embd, "n_head": m.n_head, "block_size": m.block_size, "vocab_size": m.vocab_size,
                "flops_per_token": self.flops_per_token, "tokens_per_step": self.tokens_per_step,
                "steps": self.steps, "tokens": self.tokens, "flops": self.flops}


def plan_run(budget: float, model: ModelConfig, tokens_per_step: int, kind: str = "sweep") -> RunPlan:
    """steps = ceil(C / flops_per_token / tokens_per_step), one fewer if the overshoot changes the budget group."""
    _check_budget(budget)
    fpt = flops_per_token(model)
    name = f"{budget_name(budget)}-L{model.n_layer}-d{model.n_embd}" + ("" if kind == "sweep" else f"-{kind}")
    steps = math.ceil(budget / fpt / tokens_per_step)
    if budget_key(steps * tokens_per_step * fpt) != budget_key(budget) and steps > 1:
        steps -= 1
    if steps < MIN_STEPS or budget_key(steps * tokens_per_step * fpt) != budget_key(budget):
        raise LMStackError(f"budget {budget:.3g} FLOPs buys {budget / fpt:,.0f} tokens of the "
                           f"{human(model.num_params())}-param model ({fpt:,} FLOPs/token): {steps} steps of "
                           f"{tokens_per_step:,} tokens, fewer than {MIN_STEPS}; raise the budget or lower "
                           "batch_size / block_size")
    return RunPlan(name, budget, model, steps, tokens_per_step, kind)


# ---- settings shared by all runs -----------------------------------------------------------------
@dataclass
class SweepSettings:
    aspect: int = ASPECT
    head_dim: int = HEAD_DIM
    warmup_fraction: float = WARMUP_FRACTION

    def validate(self) -> None:
        if not isinstance(self.aspect, int) or self.aspect <= 0:
            raise ConfigError(f"aspect (width per layer) must be a positive integer, got {self.aspect!r}")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim!r}")
        if not 0 <= self.warmup_fraction < 0.5:
            raise ConfigError(f"warmup_fraction must be in [0, 0.5), got {self.warmup_fraction}")


def base_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """BASE, then the recipe file's keys (when given), then `--set key=value` overrides."""
    data = json.loads(json.dumps(BASE))
    if recipe is not None:
        load_recipe(recipe)  # validates the file (clear errors for a missing file, bad YAML, unknown keys)
        merge_dicts(data, yaml_load(Path(recipe).read_text()) or {})
    merge_dicts(data, parse_set(overrides or []))
    cfg = TrainConfig.from_dict(data)
    for k in ("n_layer", "n_embd", "n_head"):
        cfg.model.pop(k, None)  # set by the shape rule
    return cfg


def _shared_spec(cfg: TrainConfig, settings: SweepSettings) -> dict[str, Any]:
    return {"train": cfg.to_dict(), "shape": {"aspect": settings.aspect, "head_dim": settings.head_dim},
            "warmup_fraction": settings.warmup_fraction}


def _compared(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a sweep spec every run must share (keys that do not change what a run computes dropped)."""
    return {**spec, "train": {k: v for k, v in spec.get("train", {}).items() if k not in _FREE_KEYS}}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def _open_sweep(out: Path, cfg: TrainConfig, settings: SweepSettings) -> None:
    spec = _shared_spec(cfg, settings)
    f = out / "sweep.json"
    if f.exists():
        old = json.loads(f.read_text())
        changed = _diff(_compared({k: old.get(k) for k in spec}), _compared(spec))
        if changed:
            raise LMStackError(f"{out} holds a sweep with other settings ({'; '.join(changed[:4])}); every run of a "
                               "sweep must share them: give the same recipe/--set values or a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text(f, json.dumps(spec, indent=2) + "\n")


def load_sweep(out: str | Path) -> tuple[TrainConfig, SweepSettings]:
    out = Path(out)
    f = out / "sweep.json"
    if not f.exists():
        raise LMStackError(f"{out} is not a sweep directory (no sweep.json); run `lmstack scaling sweep --out {out}` "
                           "first")
    spec = json.loads(f.read_text())
    cfg = TrainConfig.from_dict({**spec["train"], "out_dir": str(out)})
    return cfg, SweepSettings(spec["shape"]["aspect"], spec["shape"]["head_dim"], spec["warmup_fraction"])


def sweep_data(out: Path, cfg: TrainConfig, log: Callable = print):
    """The one tokenized dataset of the sweep, prepared once into <out>/data (pretrain.prepare_data)."""
    dcfg = TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(out), "data_dir": None, "resume": False})
    return prepare_data(dcfg, log)


def base_model(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The model settings every shape shares (vocab sized to the tokenizer); n_layer/n_embd/n_head are placeholders."""
    m = {**cfg.model, "n_layer": 1, "n_embd": 64, "n_head": 1}
    return model_config_for(TrainConfig.from_dict({**cfg.to_dict(), "model": m}), tokenizer)


# ---- running ----------------------------------------------------------------------------------------
def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "last").exists() or any(run_dir.glob(".last.old-*"))


def run_config(plan: RunPlan, cfg: TrainConfig, settings: SweepSettings, out: Path, run_dir: Path,
               max_steps: int | None = None) -> TrainConfig:
    """The TrainConfig of one run: the shared settings, this run's shape, steps and schedule."""
    m = plan.model
    model = {**cfg.model, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "vocab_size": m.vocab_size}
    d = cfg.to_dict()
    d.update(out_dir=str(run_dir), data_dir=str(out / "data"), model=model, max_steps=plan.steps, epochs=None,
             warmup_steps=max(1, round(settings.warmup_fraction * plan.steps)) if settings.warmup_fraction else 0,
             decay_steps=None, eval_interval=plan.steps, ckpt_interval=max(1, math.ceil(plan.steps / 10)),
             resume=_has_checkpoint(run_dir))
    rc = TrainConfig.from_dict(d)
    if max_steps is not None:  # stop early (tests, interruption); the LR schedule still spans plan.steps
        rc.decay_steps = plan.steps
        rc.max_steps = max_steps
    return rc


def run_one(plan: RunPlan, cfg: TrainConfig, settings: SweepSettings, out: Path, log: Callable = print,
            max_steps: int | None = None) -> dict[str, Any] | None:
    """Train one planned run (resuming from its checkpoint when one exists); its record, or None when stopped early."""
    run_dir = out / "runs" / plan.name
    rc = run_config(plan, cfg, settings, out, run_dir, max_steps)
    t0 = time.perf_counter()
    summary = pretrain(rc, log=log)
    wall = time.perf_counter() - t0
    if summary["steps"] != plan.steps:
        return None
    rec = plan.describe()
    train_s = summary.get("elapsed_s") or wall
    ds_train = _train_tokens(out)
    rec.update({"kind": plan.kind, "budget_key": budget_key(plan.budget), "final_loss": summary["final_val_loss"],
                "final_bpb": summary.get("final_val_bpb"), "final_eval_tokens": summary.get("final_val_tokens"),
                "train_loss": summary.get("train_loss"), "wall_s": wall, "train_s": train_s,
                "tokens_per_sec": plan.tokens / train_s if train_s else None,
                "epochs": plan.tokens / ds_train if ds_train else None, "lr": rc.lr, "resumed": rc.resume,
                "out_dir": str(run_dir)})
    return rec


def _train_tokens(out: Path) -> int | None:
    try:
        meta = json.loads((out / "data" / "meta.json").read_text())
        return int(meta["split"])
    except (OSError, KeyError, ValueError):
        return None


def read_records(out: str | Path) -> list[dict]:
    """The finished runs of a sweep (runs.jsonl; a torn last line from a crash is skipped)."""
    return read_log(Path(out) / "runs.jsonl")


def run_sweep(out: str | Path, budgets: list[float], sizes: int, corpus: str | None = None,
          recipe: str | Path | None = None, overrides: list[str] | None = None,
          tokens_per_param: float = TOKENS_PER_PARAM, factor: float = FACTOR, settings: SweepSettings | None = None,
          progress: bool | None = None, log: Callable = print, max_steps: int | None = None,
          plot: str | None = "fit") -> list[dict]:
    """Run (or resume) an IsoFLOP sweep into `out`; returns the records of this grid's runs (done ones included).

    plot: "fit" writes <out>/sweep.png with the fitted parabolas and frontier (fit.plot_fit; falls back to the raw
    points when the runs do not fit yet), "raw" only the points (no fit: fast), None no plot.

    max_steps stops every unfinished run after that many steps (no record is written for it): a way to
    interrupt a sweep on purpose; the next call resumes from the checkpoint."""
    out = Path(out)
    for c in budgets:
        _check_budget(c)
    if not budgets:
        raise LMStackError("give at least one compute budget (--budgets 1e12,3e12,...)")
    settings = settings or SweepSettings()
    settings.validate()
    over = list(overrides or [])
    if corpus:
        over.append(f"corpus={corpus}")
    cfg = base_config(recipe, over)
    if progress is not None:
        cfg.progress = progress
    # validate the grid before any work
    if not isinstance(sizes, int) or sizes < 3:
        raise LMStackError(f"--sizes must be at least 3 (an IsoFLOP parabola needs 3 sizes per budget), got {sizes}")
    _open_sweep(out, cfg, settings)
    ds = sweep_data(out, cfg, log)
    base = base_model(cfg, ds.tokenizer)
    tps = cfg.batch_size * base.block_size * cfg.grad_accum
    plans = [plan_run(c, m, tps) for c in sorted(budgets)
             for m in size_grid(c, sizes, base, tokens_per_param, factor, settings.aspect, settings.head_dim)]
    done = {r["name"]: r for r in read_records(out)}
    records = []
    for i, p in enumerate(plans, 1):
        head = (f"[{i}/{len(plans)}] {p.name}: {human(p.model.num_params())} params "
                f"({human(p.model.num_params(False))} non-emb), {p.steps:,} steps, {human(p.tokens)} tokens, "
                f"{p.flops:.3g} FLOPs")
        if p.name in done:
            log(f"{head}: done, loss {done[p.name]['final_loss']:.4f} (skipped)")
            records.append(done[p.name])
            continue
        log(f"{head}: {'resuming' if _has_checkpoint(out / 'runs' / p.name) else 'training'}")
        rec = run_one(p, cfg, settings, out, log=quiet_log(log, cfg.progress), max_steps=max_steps)
        if rec is None:
            log(f"{head}: stopped at max_steps={max_steps}; run again to resume")
            continue
        with JsonlLog(out / "runs.jsonl", fsync=True) as f:
            f.append(rec)
        log(f"{head}: loss {rec['final_loss']:.4f}, bpb {rec.get('final_bpb') or float('nan'):.4f}, "
            f"{rec['wall_s']:.0f} s, {rec['tokens_per_sec']:,.0f} tok/s")
        records.append(rec)
    if plot and records:
        plot_sweep(read_records(out), out / "sweep.png", fit=plot == "fit")
    return records


def quiet_log(log: Callable, verbose: bool) -> Callable:
    """pretrain's own log lines (model summary, final eval) only when progress is on."""
    return log if verbose else (lambda *a, **k: None)
