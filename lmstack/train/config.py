"""Training configuration: one dataclass, loaded from a YAML recipe plus `--set key=value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (3e-4, 1e5) as numbers; plain YAML 1.1 reads them
    as strings, so `--set lr=3e-4` would reach the optimizer as the string '3e-4'."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """YAML with 1e-3-style floats read as numbers (PyYAML's YAML 1.1 reads them as strings)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class TrainConfig:
    # run
    out_dir: str = "runs/run"
    seed: int = 1337
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int = 0                # torch CPU threads; 0 = PyTorch's default
    resume: bool = False            # continue from <out_dir>/last
    progress: bool = True           # rich progress bar
    # data
    # pydocs | stdlib | shakespeare | hf:NAME[:CONFIG][:SPLIT] | file / directory / glob (.txt .md .jsonl .parquet
    # .arrow .csv); options after '#', e.g. "data/*.parquet#text_column=content" (lmstack/data/corpora.py)
    corpus: str = "pydocs"
    data_path: str | None = None    # local file for a named corpus (e.g. Tiny Shakespeare)
    data_dir: str | None = None     # prepared shards (lmstack prepare); default <out_dir>/data
    tokenizer: str = "bpe"          # bpe | char | path to a tokenizer.json or a directory holding one
    vocab_size: int = 2048          # for tokenizer=bpe
    text_column: str | None = None  # text column/field of table, hf: and .jsonl corpora (default "text")
    tokenize_workers: int | None = None  # tokenizer processes for data preparation; None = min(4, CPUs)
    val_fraction: float = 0.1       # validation = the last fraction of the token stream
    # objective of `lmstack train`: clm = next-token prediction (decoder) | mlm = BERT masked-LM (bidirectional
    # encoder; train/mlm.py): mlm_probability of the tokens chosen, of those 80% -> [MASK], 10% random, 10% kept
    objective: str = "clm"
    mlm_probability: float = 0.15
    whole_word_masking: bool = False  # mlm: choose whole words (all their tokens) instead of single tokens
    # objective: seq2seq (train/seq2seq.py): an encoder-decoder (model.arch: encoder-decoder) on parallel text.
    # src_path/tgt_path: two line-aligned files (.gz ok), or src_path a JSONL file of {src, tgt} records (tgt_path
    # null); val_src_path/val_tgt_path likewise (default: the last val_fraction of the pairs, at most 1000).
    # tokenizer bpe: shared_vocab true = one BPE (vocab_size) over both sides; false = one per side (the source's
    # saved under <checkpoint>/source/). max_tokens: batch by padded tokens (per micro-batch) instead of batch_size.
    src_path: str | None = None
    tgt_path: str | None = None
    val_src_path: str | None = None
    val_tgt_path: str | None = None
    shared_vocab: bool = True
    label_smoothing: float = 0.0
    max_tokens: int | None = None
    max_source_length: int = 128
    max_target_length: int = 128
    # model: a preset name plus ModelConfig overrides, e.g. {preset: tiny-char, n_layer: 6}
    model: dict = field(default_factory=lambda: {"preset": "tiny-char"})
    # optimisation
    optimizer: str = "adamw"        # adamw | sgd | rmsprop | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"     # cosine | linear | constant | wsd (warmup-stable-decay)
    warmup_steps: int = 100
    decay_steps: int | None = None  # step where the schedule reaches min_lr; default max_steps
    wsd_decay_fraction: float = 0.2  # for lr_schedule=wsd: final fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.9           # sgd momentum
    rmsprop_alpha: float = 0.99
    muon_lr: float = 0.02           # optimizer=muon: learning rate of the Muon groups (follows the same schedule)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5          # optimizer=muon: Newton–Schulz iterations per update (each ~ 3 matmuls per matrix)
    grad_clip: float = 1.0          # 0 = off
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int | None = 2000
    epochs: float | None = None     # alternative to max_steps: passes over the training tokens
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20            # batches of random validation windows per periodic eval
    final_eval_windows: int = -1    # at the end: -1 = the whole validation split, N = N windows, 0 = skip
    log_interval: int = 1
    ckpt_interval: int | None = None  # default: every eval
    keep_best: bool = True
    # speed
    dtype: str = "float32"          # float32 | bfloat16 (autocast) | auto (bfloat16 where the hardware has it)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 slower)
    # several processes (torchrun): ddp | fsdp | none | auto (= ddp under torchrun); see train/distributed.py
    distributed: str = "auto"
    # sample printed at the end
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    sample_top_k: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choices = {"optimizer": ("adamw", "sgd", "rmsprop", "muon"), "lr_schedule": ("cosine", "linear", "constant", "wsd"),
                   "dtype": ("float32", "bfloat16", "auto"), "objective": ("clm", "mlm", "seq2seq"),
                   "distributed": ("auto", "none", "ddp", "fsdp")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(f"{k}={getattr(self, k)!r} is not supported; choose one of {', '.join(allowed)}")
        for k in ("batch_size", "grad_accum", "eval_interval", "log_interval", "muon_ns_steps"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("set max_steps or epochs")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not (isinstance(self.mlm_probability, (int, float)) and 0.0 < self.mlm_probability < 1.0):
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing < 1.0):
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise ConfigError(f"max_tokens must be a positive integer (or null for batch_size rows), got "
                              f"{self.max_tokens!r}")
        if not isinstance(self.model, dict):
            raise ConfigError("model must be a mapping, e.g. {preset: tiny-char, n_layer: 4}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in known:
                near = difflib.get_close_matches(k, known, n=1)
                raise ConfigError(f"unknown config key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                                  + "; see lmstack/train/config.py for the keys")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """['lr=3e-3', 'model.n_layer=6'] -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict, over: dict) -> dict:
    """Merge `over` into `base` in place, nested dicts key by key (recipe overrides); returns base."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge_dicts(base[k], v)
        else:
            base[k] = v
    return base


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"recipe {p} does not exist; see recipes/ for examples")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"recipe {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p} must be a YAML mapping of config keys")
    merge_dicts(data, parse_set(overrides or []))
    if "preset" in data and "model" not in data:
        data["model"] = {"preset": data.pop("preset")}
    return TrainConfig.from_dict(data)
