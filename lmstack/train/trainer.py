"""The one Trainer core: optimizer, LR schedule, accumulation, clipping, autocast, evaluation, JSONL metrics,
best/last checkpoints and exact resume. Objectives (pretraining, SFT, reward, DPO, ...) plug in as a loss
function and a batch function; nothing here knows about language modelling.

Exact resume: batch i is a pure function of (seed, step, micro-step), the LR is a function of the step, and the
checkpoint holds weights, optimizer state and the torch RNG state, so a resumed run repeats the same floats.

Checkpoints (<out>/last, <out>/best), one atomic write each (checkpoint.save_checkpoint):
  full training   config.json, model.safetensors (all weights), tokenizer, train_state.pt
  LoRA (lora=)    the same files, but model.safetensors holds the adapter tensors only (the frozen base is never
                  rewritten; resume rebuilds it from the base model), plus adapter_config.json (recording the base
                  model as base_model_name_or_path) and adapter_model.safetensors, so `lmstack.load(ckpt)` gives the
                  merged model and `merge-lora RUN_DIR` needs nothing else. One layout for every objective.
Objectives with more to save (a reward / value head, a KL coefficient) override `write_extra` / `read_extra` or set
`extra_state` / `load_extra`; they never copy `save` / `load_state`.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import load_train_state, resolve_checkpoint, save_checkpoint
from ..data.jsonl import JsonlLog
from ..errors import LMStackError
from ..models.lora import LoRAConfig, save_adapter
from ..models.utils import eval_mode
from . import distributed
from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    end = cfg.decay_steps or max_steps
    if cfg.lr_schedule == "wsd":
        start = int(end * (1 - cfg.wsd_decay_fraction))
        if step < start:
            return cfg.lr
        frac = min(1.0, (step - start) / max(1, end - start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    if step >= end:
        return cfg.min_lr
    frac = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def resolve_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """The training dtype for `dtype: auto` and why: bfloat16 autocast where the hardware multiplies bf16 natively
    (a GPU that supports it; a CPU with AMX-BF16 or AVX512-BF16), float32 elsewhere (on an AVX2-only CPU bf16 is
    emulated and slower). An explicit float32 / bfloat16 is kept as given."""
    if name != "auto":
        return name, "as set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bf16"
        return "float32", "the GPU has no bf16"
    if device.type == "cpu":
        from ..models.kernels import native_bf16
        native = native_bf16()
        if native:
            return "bfloat16", f"the CPU has {' and '.join(native)}"
        return "float32", "the CPU has no native bf16 matmul (amx_bf16 / avx512_bf16)"
    return "float32", f"bf16 autocast is not used on {device.type}"


def build_optimizer(params: list[dict] | list[torch.nn.Parameter], cfg: TrainConfig,
                    compute_dtype: str = "float32") -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "muon":
        from .optim import Muon
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        split = []
        for g in groups:
            mats = [p for p in g["params"] if getattr(p, "muon_ok", False)]
            rest = [p for p in g["params"] if not getattr(p, "muon_ok", False)]
            if mats:
                split.append({**g, "params": mats, "muon": True, "lr_scale": cfg.muon_lr / cfg.lr})
            if rest:
                split.append({**g, "params": rest, "muon": False})
        return Muon(split, lr=cfg.lr, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                    ns_dtype=torch.bfloat16 if compute_dtype == "bfloat16" else torch.float32)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.eps, weight_decay=cfg.weight_decay,
                               foreach=True)


def base_model_path(model_path: str | Path) -> str:
    """What a LoRA run records as its base model: the absolute path when `model_path` is a local path."""
    return str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path)


def resolve_device(name: str) -> torch.device:
    return distributed.device_for(name)


def setup_device(cfg: TrainConfig) -> torch.device:
    """Every objective's first step: CPU threads, the process group under torchrun (train/distributed.py), and the
    device this process trains on."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    distributed.setup(cfg.distributed, cfg.device)
    return distributed.device_for(cfg.device)


class Trainer:
    """Runs `max_steps` optimizer steps of `loss_fn(model, batch)` over `get_batch(step, micro)`.

    lora: the LoRAConfig of adapters already applied to the model (models.lora.apply_lora; default: the model's
    own `lora_config`, if any) -> adapter-only checkpoints; base_model: the path of the base model they were applied
    to, recorded in the checkpoint so it loads and merges on its own."""

    extra_state: Callable[[], dict] | None = None      # JSON-able objective state saved in train_state.pt
    load_extra: Callable[[dict], None] | None = None   # ... and given back on resume

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, loss_fn: Callable, get_batch: Callable,
                 max_steps: int, evaluate: Callable[[torch.nn.Module], dict] | None = None, tokenizer=None,
                 param_groups: list[dict] | None = None, lora: LoRAConfig | None = None,
                 base_model: str | None = None):
        self.model, self.cfg, self.loss_fn, self.get_batch = model, cfg, loss_fn, get_batch
        self.max_steps, self.evaluate, self.tokenizer = max_steps, evaluate, tokenizer
        self.lora = lora if lora is not None else getattr(self.net, "lora_config", None)
        self.base_model = base_model
        self.out_dir = Path(cfg.out_dir)
        self.device = next(model.parameters()).device
        self.dist = distributed.info()
        if self.dist.strategy == "fsdp" and (cfg.optimizer == "muon" or self.lora is not None):
            raise LMStackError("distributed: fsdp does not run optimizer=muon or LoRA yet; use distributed: ddp (a LoRA "
                               "run's trainable weights are small enough to replicate)")
        self._gathered: dict | None = None  # rank 0, while saving a distributed run: the full weights
        backbone = getattr(model, "backbone", model)
        if hasattr(backbone, "activation_checkpointing"):
            backbone.activation_checkpointing = cfg.activation_checkpointing
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        names = {id(p): n for n, p in model.named_parameters()}
        self.dtype, self.dtype_reason = resolve_dtype(cfg.dtype, self.device)
        wrapped = distributed.wrap(model, self.device, bf16=self.dtype == "bfloat16")
        if self.dist.strategy == "fsdp":  # fully_shard swapped the parameters for sharded ones: same names
            now = dict(model.named_parameters())
            groups = [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in groups]
        self.wrapped = wrapped
        self.optimizer = build_optimizer(groups, cfg, self.dtype)
        if self.dist.enabled:  # each rank its own dropout stream (weights were initialised identically before)
            torch.manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.fwd_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bfloat16"
                         else nullcontext())
        self.step, self.best_val, self.elapsed_before = 0, float("inf"), 0.0
        self.best_metric = ("val_loss", 1)  # (key of evaluate's dict, +1 lower is better | -1 higher is better)
        self.train_s = 0.0  # wall seconds inside optimizer steps only (no evals, checkpoints): `lmstack compare`
        self.history: list[dict] = []

    # ---- state -----------------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        """The Transformer whose weights (or adapters) a checkpoint holds (a head model overrides it)."""
        return self.model

    def write_extra(self, d: Path) -> None:
        """Hook: write more files into checkpoint temp dir `d` (same atomic swap), e.g. a reward head."""

    def read_extra(self, d: Path) -> None:
        """Hook: restore what `write_extra` wrote, on resume."""

    def state_dict(self) -> dict[str, Any]:
        st = {"step": self.step, "best_val": self.best_val,
              # a distributed run keeps the optimizer in the sharded dcp/ directory
              "optimizer": None if self.dist.enabled else self.optimizer.state_dict(),
              "elapsed_s": self.elapsed_before + (time.perf_counter() - self._t0), "train_s": self.train_s,
              "torch_rng": torch.get_rng_state(),
              "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
              "config": json.dumps(self.cfg.to_dict())}
        if self.extra_state is not None:
            st["objective"] = json.dumps(self.extra_state())
        if self.dist.enabled:  # every rank's RNG
            st["world_size"] = self.dist.world
            st["rank_rng"] = distributed.all_gather_object(torch.get_rng_state())
        return st

    def load_state(self, ckpt_dir: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file
        ckpt_dir = resolve_checkpoint(ckpt_dir)
        st = load_train_state(ckpt_dir)
        with safe_open(str(ckpt_dir / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        if self.lora is not None and not all(".lora_" in k for k in keys):
            raise LMStackError(f"--resume: {ckpt_dir} is not a LoRA checkpoint; resume it without --lora")
        if self.lora is None and any(".lora_" in k for k in keys):
            raise LMStackError(f"--resume: {ckpt_dir} is a LoRA checkpoint; resume it with the same --lora")
        if (ckpt_dir / "dcp").is_dir():  # a distributed run's: the whole trained module, resharded to this world
            distributed.load_sharded(ckpt_dir / "dcp", self.model, self.optimizer, self.lora is not None)
        elif self.dist.strategy == "fsdp":
            raise LMStackError(f"--resume: {ckpt_dir} was written by a single process; resume it with "
                               "distributed: ddp (or one process), then later checkpoints resume under fsdp")
        else:
            unexpected = self.net.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")),
                                                  strict=False).unexpected_keys
            if unexpected:
                raise LMStackError(f"--resume: {ckpt_dir} holds tensors this run's model has not (e.g. "
                                   f"{unexpected[0]}); resume with the same model and LoRA settings")
            self.read_extra(ckpt_dir)
            self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.best_val, self.elapsed_before = int(st["step"]), float(st["best_val"]), float(st["elapsed_s"])
        self.train_s = float(st.get("train_s", st["elapsed_s"]))
        torch.set_rng_state(st["torch_rng"])
        rank_rng = st.get("rank_rng") or []
        if self.dist.enabled:
            if len(rank_rng) == self.dist.world:
                torch.set_rng_state(rank_rng[self.dist.rank])
            else:  # another world size: a fresh, deterministic stream per rank
                torch.manual_seed((self.cfg.seed * 1000 + self.dist.rank) * 100_003 + self.step)
        if st.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        if self.load_extra is not None and st.get("objective"):
            self.load_extra(json.loads(st["objective"]))

    def save(self, name: str) -> None:
        if self.dist.enabled:
            return self._save_distributed(name)
        net, weights = self.net, None
        if self.lora is not None:  # adapter-only: the frozen base is never rewritten
            weights = {k: v.detach().contiguous() for k, v in net.state_dict().items() if ".lora_" in k}

        def extra(d: Path) -> None:
            if self.lora is not None:
                save_adapter(net, d, self.lora, self.base_model)
            self.write_extra(d)
        save_checkpoint(self.out_dir / name, net, self.tokenizer, self.state_dict(), weights=weights, extra=extra)

    def _save_distributed(self, name: str) -> None:
        """Every rank writes its shards of model + optimizer (dcp/) into a temp dir; rank 0 gathers the full weights
        into model.safetensors and swaps everything in with one atomic rename (checkpoint.save_checkpoint)."""
        import shutil
        shards = self.out_dir / f".{name}.dcp-tmp"
        if self.dist.is_main and shards.exists():
            shutil.rmtree(shards)
        distributed.barrier()
        distributed.save_sharded(shards, self.model, self.optimizer, self.lora is not None)
        full = distributed.full_model_state(self.model)
        state = self.state_dict()  # collective (every rank's RNG)
        if self.dist.is_main:
            self._gathered = full
            try:
                self._write_gathered(name, full, state, shards)
            finally:
                self._gathered = None
        distributed.barrier()

    def _write_gathered(self, name: str, full: dict, state: dict, shards: Path) -> None:
        net = self.net
        prefix = next((n + "." for n, m in self.model.named_modules() if m is net and n), "")
        weights = {k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}
        if self.lora is not None:
            weights = {k: v for k, v in weights.items() if ".lora_" in k}
        elif getattr(net.config, "tie_embeddings", False):
            weights.pop("lm_head.weight", None)

        def extra(d: Path) -> None:
            shards.rename(d / "dcp")
            if self.lora is not None:
                save_adapter(net, d, self.lora, self.base_model)  # DDP only: the adapters are plain tensors
            self.write_extra(d)
        save_checkpoint(self.out_dir / name, net, self.tokenizer, state, weights=weights, extra=extra)

    # ---- loop ------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        last = self.out_dir / "last"
        resumed = None
        if cfg.resume:
            if not (last.exists() or list(self.out_dir.glob(".last.old-*"))):
                raise LMStackError(f"--resume: no checkpoint at {last}; drop --resume to start a fresh run")
            self.load_state(last)
            resumed = self.step
        main = self.dist.is_main  # metrics, progress and checkpoint files: rank 0 only
        log = JsonlLog(self.out_dir / "metrics.jsonl", truncate=resumed is None,
                       keep=None if resumed is None else (lambda r: r.get("step", 0) <= resumed)) if main else None
        ckpt_every = cfg.ckpt_interval or cfg.eval_interval
        self._t0 = time.perf_counter()
        t_last, tok_since = time.perf_counter(), 0
        progress = _Progress(cfg.progress and main, self.max_steps, self.step)
        self.model.train()
        try:
            while self.step < self.max_steps:
                t_step = time.perf_counter()
                lr = lr_at(self.step, cfg, self.max_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                losses, ntok = [], 0
                for micro in range(cfg.grad_accum):
                    batch = self.get_batch(self.step, micro)
                    with distributed.grad_sync(self.wrapped, micro == cfg.grad_accum - 1):
                        with self.autocast:
                            loss = self.loss_fn(self.fwd_model, batch)
                        (loss / cfg.grad_accum).backward()
                    losses.append(loss.detach())  # no .item() here: no device sync per micro-step
                    ntok += _count_tokens(batch)
                grad_norm = None
                if cfg.grad_clip and cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.train_s += time.perf_counter() - t_step
                tok_since += ntok * self.dist.world
                is_last = self.step == self.max_steps
                logged = self.step % cfg.log_interval == 0 or is_last
                evals = self.evaluate is not None and (self.step % cfg.eval_interval == 0 or is_last)
                loss_sum = (self._step_loss(losses, logged or evals) if (logged or evals or progress.on)
                            else None)
                rec = None
                if logged:
                    now = time.perf_counter()
                    rec = {"step": self.step, "train_loss": loss_sum, "lr": lr,
                           "tokens_per_sec": tok_since / max(now - t_last, 1e-9),
                           "elapsed_s": self.elapsed_before + now - self._t0, "train_s": self.train_s}
                    if grad_norm is not None:
                        rec["grad_norm"] = distributed.as_float(grad_norm)
                    t_last, tok_since = now, 0
                if evals:
                    t_eval = time.perf_counter()
                    ev = distributed.broadcast_object(self.run_eval())  # every rank keeps the same best
                    rec = rec or {"step": self.step, "train_loss": loss_sum, "lr": lr,
                                  "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0,
                                  "train_s": self.train_s}
                    rec.update(ev)
                    key, sign = self.best_metric
                    if cfg.keep_best and key in ev and sign * ev[key] < self.best_val:
                        self.best_val = sign * ev[key]
                        self.save("best")
                    t_last += time.perf_counter() - t_eval  # keep eval time out of tokens/s
                if rec is not None and log is not None:
                    log.append(rec)
                    self.history.append(rec)
                if self.step % ckpt_every == 0 or is_last:
                    self.save("last")
                progress.update(self.step, loss_sum, rec)
        finally:
            progress.close()
            if log is not None:
                log.close()
        return self.history

    def _step_loss(self, losses: list[torch.Tensor], global_mean: bool) -> float:
        """The step's training loss; the mean over ranks when `global_mean` (a collective: the same on all ranks)."""
        if not (self.dist.enabled and global_mean):
            return _mean_loss(losses, self.cfg.grad_accum)
        return float(distributed.mean_across_ranks(torch.stack(losses).float().mean()))

    @torch.no_grad()
    def run_eval(self, **kw) -> dict:
        with eval_mode(self.model), self.autocast:
            return self.evaluate(self.model, **kw)


def _mean_loss(losses: list[torch.Tensor], grad_accum: int) -> float:
    """The step's training loss from its micro-steps' detached losses: one device sync, and the same float the
    old per-micro-step `sum(loss.item() / grad_accum)` gave (same values, same order of additions)."""
    total = 0.0
    for v in torch.stack(losses).tolist():
        total += v / grad_accum
    return total


def _count_tokens(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.numel()) if isinstance(x, torch.Tensor) else 0


class _Progress:
    """Rich progress bar: step, loss, tokens/s, ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        self.on = enabled
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                          TimeRemainingColumn())
        self.task = self.p.add_task("train", total=total, completed=start, info="")
        self.p.start()
        self.tps = 0.0

    def update(self, step: int, loss: float, rec: dict | None) -> None:
        if self.p is None:
            return
        if rec and "tokens_per_sec" in rec:
            self.tps = rec["tokens_per_sec"]
        info = f"loss {loss:.4f}  {self.tps:,.0f} tok/s"
        if rec and "val_loss" in rec:
            info += f"  val {rec['val_loss']:.4f}"
            self.p.console.print(f"step {step}: train {loss:.4f}  val {rec['val_loss']:.4f}  "
                                 f"val_bpb {rec.get('val_bpb', float('nan')):.4f}")
        self.p.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
