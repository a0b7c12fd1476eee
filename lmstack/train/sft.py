"""Supervised fine-tuning (full or LoRA) on the one Trainer core.

    finetune(model, data, out_dir, lora="r=16,alpha=32,dropout=0.05,targets=q,k,v,o")

loads any model `lmstack.load` reads (checkpoint dir, HF dir, GGUF), renders the data with its chat template
(lmstack.data.sft), masks the prompt, and trains with the Trainer (schedule, accumulation, clipping, metrics.jsonl,
progress, best/last checkpoints, exact resume). Output directory:

    <out>/last, <out>/best  Trainer checkpoints (resume with resume=True). Full fine-tuning: plain checkpoints that
                            lmstack.load reads. LoRA: adapter tensors + adapter files naming the base model (the
                            Trainer's one LoRA layout; lmstack.load gives the merged model).
    <out>/adapter/          LoRA only: adapter_model.safetensors + adapter_config.json (PEFT names/fields)
    <out>/merged/           LoRA only (merge=True): a plain checkpoint with the adapters folded in
    <out>/metrics.jsonl     train_loss / lr / tokens_per_sec / val_loss per step
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import write_text
from ..checkpoint import resolve_checkpoint, save_checkpoint
from ..convert.load import adapter_base, load_any
from ..data.sft import SFTDataset, batch_indices, build_dataset, collate, load_records, split_records
from ..errors import ConfigError, LMStackError
from ..models.lora import (ADAPTER_CONFIG, LoRAConfig, apply_lora, load_adapter, lora_parameters, merge_lora,
                           save_adapter, trainable_summary)
from .config import TrainConfig
from .losses import labelled_logits, sft_loss
from . import distributed
from .trainer import Trainer, base_model_path, setup_device

# SFT defaults on top of TrainConfig's (pretraining) defaults; --set / explicit arguments override them
SFT_DEFAULTS: dict[str, Any] = {"batch_size": 8, "max_steps": None, "epochs": 1.0, "warmup_steps": 10,
                                "lr_schedule": "cosine", "weight_decay": 0.0, "eval_interval": 50,
                                "log_interval": 1, "keep_best": False, "grad_clip": 1.0}
LORA_LR, FULL_LR = 2e-4, 2e-5


def sft_config(out_dir: str | Path, lora: bool, overrides: list[str] | None = None,
               recipe: str | Path | None = None, **fields) -> TrainConfig:
    """TrainConfig for SFT: SFT_DEFAULTS (lr 2e-4 LoRA / 2e-5 full, min_lr = lr / 10), then a YAML recipe of
    TrainConfig keys, then `fields`, then `--set key=value` overrides."""
    from .config import merge_dicts, yaml_load, parse_set
    lr = LORA_LR if lora else FULL_LR
    data: dict[str, Any] = {**SFT_DEFAULTS, "lr": lr, "min_lr": lr / 10, "out_dir": str(out_dir)}
    if recipe is not None:
        p = Path(recipe)
        if not p.is_file():
            raise ConfigError(f"recipe {p} does not exist")
        rec = yaml_load(p.read_text()) or {}
        if not isinstance(rec, dict):
            raise ConfigError(f"recipe {p} must be a YAML mapping of TrainConfig keys")
        data.update(rec)
    else:
        rec = {}
    sets = parse_set(overrides or [])
    if fields.get("max_steps") is not None and "epochs" not in fields:
        fields["epochs"] = None  # a step count replaces the default of one epoch
    data.update(fields)
    merge_dicts(data, sets)
    if not any("min_lr" in d for d in (rec, fields, sets)):
        data["min_lr"] = data["lr"] / 10  # the schedule decays to a tenth of whatever lr was chosen
    return TrainConfig.from_dict(data)


def make_sft_evaluator(ds: SFTDataset, batch_size: int, pad_id: int) -> Callable:
    """evaluate(model) -> {val_loss: mean NLL per trained token over the whole validation set, val_tokens}."""
    batches = [collate(ds.rows[i:i + batch_size], pad_id) for i in range(0, len(ds.rows), batch_size)]

    @torch.no_grad()
    def evaluate(model, **_) -> dict:
        device = next(model.parameters()).device
        nll, n = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits, mask = labelled_logits(model, x, y)
            nll += float(torch.nn.functional.cross_entropy(logits.float(), y[mask], reduction="sum"))
            n += int(mask.sum())
        return {"val_loss": nll / max(n, 1), "val_tokens": n}
    return evaluate


def make_sft_batches(ds: SFTDataset, batch_size: int, seed: int, grad_accum: int, pad_id: int,
                     device) -> Callable:
    """get_batch(step, micro) -> (x, y) on `device`: the rows of micro-batch step * grad_accum + micro."""
    def get_batch(step: int, micro: int):
        idx = batch_indices(len(ds), batch_size, seed, distributed.stream_index(step, micro, grad_accum))
        x, y = collate([ds.rows[i] for i in idx], pad_id)
        return x.to(device), y.to(device)
    return get_batch


def load_sft_model(model: str | Path, cfg: TrainConfig, seq_len: int | None):
    """(model on the run's device, tokenizer, device, seq_len): float32 weights when the run trains in float32;
    seq_len defaults to min(512, context window)."""
    device = setup_device(cfg)
    net, tok = load_any(model)
    if tok is None:
        raise LMStackError(f"{model} has no tokenizer (tokenizer.json); fine-tuning needs one")
    if cfg.dtype != "bfloat16" and next(net.parameters()).dtype != torch.float32:
        net = net.float()  # train in float32 (bfloat16 training: dtype=bfloat16 autocast over float32 weights)
    net.to(device)
    seq_len = int(seq_len or min(512, net.config.block_size))
    if seq_len > net.config.block_size and net.config.pos_emb == "learned":
        raise LMStackError(f"seq_len {seq_len} does not fit the model's context window ({net.config.block_size})")
    return net, tok, device, seq_len


def load_sft_data(tok, data: str | Path, seq_len: int, pack: bool, val_data: str | Path | None,
                  val_fraction: float, max_records: int | None, seed: int,
                  log: Callable = print) -> tuple[SFTDataset, SFTDataset | None]:
    """(train dataset, validation dataset or None): `val_data`, else a `val_fraction` split of `data`."""
    records = load_records(data)
    if max_records:
        records = records[:max_records]
    if val_data is not None:
        train_recs, val_recs = records, load_records(val_data)
    else:
        train_recs, val_recs = split_records(records, val_fraction, seed)
    train_ds = build_dataset(tok, train_recs, seq_len, pack=pack)
    val_ds = build_dataset(tok, val_recs, seq_len, pack=False) if val_recs else None
    if not train_ds.rows:
        raise LMStackError(f"{data}: no training example has a response token within seq_len={seq_len}")
    log(f"data: {train_ds.stats['examples']} train examples -> {len(train_ds)} rows of <= {seq_len} tokens "
        f"({train_ds.num_trained_tokens:,} trained tokens; {train_ds.stats['truncated']} truncated, "
        f"{train_ds.stats['dropped']} dropped)" + (f", {len(val_ds)} validation examples" if val_ds else ""))
    return train_ds, val_ds


def trainable_groups(net: torch.nn.Module, lora: LoRAConfig | None, cfg: TrainConfig,
                     log: Callable = print) -> tuple[list[dict], dict[str, Any]]:
    """(optimizer param groups, trainable_summary): LoRA adapters only, or every weight. Applying LoRA draws on the
    torch RNG, so call it right after torch.manual_seed."""
    if lora is not None:
        apply_lora(net, lora)
        groups = [{"params": lora_parameters(net), "weight_decay": cfg.weight_decay}]
    else:
        for p in net.parameters():
            p.requires_grad_(True)
        groups = net.configure_optimizer_groups(cfg.weight_decay)
    counts = trainable_summary(net)
    log(f"model: {counts['total']:,} parameters, {counts['trainable']:,} trainable ({counts['percent']:.3f}%)"
        + (f", LoRA r={lora.r} alpha={lora.alpha:g} on {','.join(lora.targets)}" if lora else
           ", full fine-tuning"))
    return groups, counts


def sft_max_steps(cfg: TrainConfig, n_rows: int) -> int:
    """cfg.epochs over `n_rows` rows (at least one step) when set, else cfg.max_steps."""
    steps_per_epoch = math.ceil(n_rows / (cfg.batch_size * cfg.grad_accum * distributed.info().world))
    return max(1, math.ceil(cfg.epochs * steps_per_epoch)) if cfg.epochs is not None else int(cfg.max_steps)


def save_sft_outputs(summary: dict[str, Any], history: list[dict], net: torch.nn.Module, tok, out: Path,
                     lora: LoRAConfig | None, base: str, merge: bool) -> None:
    """Fill `summary` from the run's last record; LoRA: write <out>/adapter (and <out>/merged); write
    <out>/sft_summary.json."""
    if history:
        summary.update({k: v for k, v in history[-1].items() if k in ("train_loss", "val_loss", "elapsed_s")})
        tps = [h["tokens_per_sec"] for h in history if "tokens_per_sec" in h]
        if tps:
            summary["tokens_per_sec"] = sum(tps) / len(tps)
    if lora is not None:
        save_adapter(net, out / "adapter", lora, base)
        summary["adapter_dir"] = str(out / "adapter")
        if merge:
            merge_lora(net.eval())
            save_checkpoint(out / "merged", net, tok)
            summary["model_dir"] = str(out / "merged")
    else:
        summary["model_dir"] = str(out / "last")
    write_text(out / "sft_summary.json", json.dumps(summary, indent=2))


def finetune(model: str | Path, data: str | Path, out_dir: str | Path | None = None,
             lora: LoRAConfig | str | None = None, cfg: TrainConfig | None = None, seq_len: int | None = None,
             pack: bool = False, val_data: str | Path | None = None, val_fraction: float = 0.1,
             merge: bool = True, max_records: int | None = None, log: Callable = print) -> dict[str, Any]:
    """Fine-tune `model` on `data` (see lmstack.data.sft for the formats); full fine-tuning unless `lora` is
    given (a LoRAConfig or its 'r=16,alpha=32,...' string). `cfg`: a TrainConfig (default `sft_config`), whose
    out_dir is used unless `out_dir` is given. Returns a summary: trainable parameters, initial/final
    validation loss, paths."""
    lora_cfg = LoRAConfig.parse(lora) if isinstance(lora, str) else lora
    if cfg is None:
        cfg = sft_config(out_dir or "runs/sft", lora_cfg is not None)
    elif out_dir is not None:
        cfg.out_dir = str(out_dir)
    out = Path(cfg.out_dir)
    net, tok, device, seq_len = load_sft_model(model, cfg, seq_len)
    train_ds, val_ds = load_sft_data(tok, data, seq_len, pack, val_data, val_fraction, max_records, cfg.seed, log)
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    torch.manual_seed(cfg.seed)
    groups, counts = trainable_groups(net, lora_cfg, cfg, log)
    max_steps = sft_max_steps(cfg, len(train_ds))
    get_batch = make_sft_batches(train_ds, cfg.batch_size, cfg.seed, cfg.grad_accum, pad_id, device)
    evaluator = make_sft_evaluator(val_ds, cfg.batch_size, pad_id) if val_ds and val_ds.rows else None
    base = base_model_path(model)
    trainer = Trainer(net, cfg, sft_loss, get_batch, max_steps, evaluate=evaluator, tokenizer=tok,
                      param_groups=groups, lora=lora_cfg, base_model=base)
    summary: dict[str, Any] = {"out_dir": str(out), "steps": max_steps, "trainable_params": counts["trainable"],
                               "total_params": counts["total"], "trainable_percent": counts["percent"],
                               "train_rows": len(train_ds), "seq_len": seq_len,
                               **({"lora": lora_cfg.to_dict()} if lora_cfg else {})}
    if evaluator is not None and not cfg.resume:
        summary["initial_val_loss"] = trainer.run_eval()["val_loss"]
        log(f"initial validation loss {summary['initial_val_loss']:.4f}")
    history = trainer.fit()
    if distributed.info().is_main:  # the run's files: rank 0 only
        save_sft_outputs(summary, history, net, tok, out, lora_cfg, base, merge)
    return summary


def resolve_adapter(run_or_adapter: str | Path) -> Path:
    """The adapter directory of a LoRA run directory (<run>/last), a LoRA checkpoint, or an adapter directory."""
    p = Path(run_or_adapter)
    if (p / ADAPTER_CONFIG).exists():
        return p
    if (p / "last").exists() or list(p.glob(".last.old-*")):
        last = resolve_checkpoint(p / "last")
        if (last / ADAPTER_CONFIG).exists():
            return last
        raise LMStackError(f"{p} is not a LoRA run: {last} has no {ADAPTER_CONFIG} (a full fine-tuning run's "
                           "last/ is already a plain checkpoint)")
    raise LMStackError(f"no LoRA adapter at {p}: pass a LoRA run directory (with last/), a LoRA checkpoint or an "
                       f"adapter directory (with {ADAPTER_CONFIG})")


def merge_adapter(model: str | Path | None = None, adapter: str | Path | None = None, out: str | Path = "merged",
                  check: bool = True, run: str | Path | None = None) -> dict[str, Any]:
    """Base model + LoRA adapter -> a plain checkpoint at `out` (adapters folded into the weights).

    `run`: a LoRA run directory (its last/ checkpoint is the adapter, and the base model is the one the run
    recorded in adapter_config.json); or give `adapter` (an adapter dir or LoRA checkpoint) and optionally `model`
    (default: the base the adapter records). check=True compares the logits of the adapter model and the merged
    model on a short input (`max_logit_diff` in the result)."""
    if adapter is None:
        if run is None:
            raise LMStackError("merge-lora needs a LoRA run directory or --adapter DIR")
        adapter = run
    adapter = resolve_adapter(adapter)
    base = model if model is not None else adapter_base(adapter)
    net, tok = load_any(base)
    net = net.float()
    if tok is None and (adapter / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer
        tok = Tokenizer.load(adapter)
    load_adapter(net, adapter)
    res: dict[str, Any] = {"out": str(out), "base_model": str(base), "adapter": str(adapter)}
    x = None
    if check:
        ids = (tok.encode("The quick brown fox jumps over the lazy dog.") if tok is not None else [])
        x = torch.tensor([ids[: net.config.block_size] or [0]])
        with torch.no_grad():
            before = net(x)
    merge_lora(net)
    if check:
        with torch.no_grad():
            res["max_logit_diff"] = float((net(x) - before).abs().max())
    save_checkpoint(out, net, tok)
    return res
