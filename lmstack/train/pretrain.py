"""Pretraining by next-token prediction (objective: clm) or BERT masked-LM (objective: mlm, train/mlm.py):
tokenizer + shards + model + the Trainer core."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken

from ..config import ModelConfig, preset
from ..data.corpora import iter_texts
from ..data.jsonl import JsonlLog
from ..data.shards import TokenDataset, prepare_dataset
from ..errors import ConfigError, LMStackError
from ..models.utils import make_model
from ..tokenizer import DEFAULT_SPECIALS, MASK, Tokenizer, train_bpe, train_char
from .config import TrainConfig
from .losses import masked_lm_loss
from .mlm import MLMMasker, make_mlm_evaluator, mlm_loss
from . import distributed
from .trainer import Trainer, setup_device


def _quiet(*_a, **_k) -> None:
    """The log of ranks other than 0."""


def lm_loss(model, batch) -> torch.Tensor:
    """Trainer loss_fn for pretraining: mean next-token cross-entropy (nats/token) of `model(x)` against y
    (losses.masked_lm_loss: targets of -100 are ignored)."""
    x, y = batch
    return masked_lm_loss(model(x), y)


def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    mlm = cfg.objective == "mlm"  # a [MASK] token; in byte-level BPE it absorbs the space before it (as RoBERTa's
    # <mask> does), so "is [MASK]." asks for the token " Paris" that training masked, space included
    if cfg.tokenizer == "char":
        return train_char(iter_texts(cfg.corpus, cfg.data_path, cfg.text_column),
                          special_tokens=DEFAULT_SPECIALS + [MASK] if mlm else None)
    if cfg.tokenizer == "bpe":
        mask = AddedToken(MASK, lstrip=True, special=True, normalized=False)
        return train_bpe(iter_texts(cfg.corpus, cfg.data_path, cfg.text_column), cfg.vocab_size,
                         special_tokens=DEFAULT_SPECIALS + [mask] if mlm else None)
    return Tokenizer.load(cfg.tokenizer)


def prepare_data(cfg: TrainConfig, log=print) -> TokenDataset:
    """The run's token shards: `data_dir` if given, else <out_dir>/data (built once, reused when the spec matches)."""
    if cfg.data_dir:
        return TokenDataset(cfg.data_dir)
    d = Path(cfg.out_dir) / "data"
    spec = {"corpus": cfg.corpus, "data_path": cfg.data_path, "tokenizer": cfg.tokenizer,
            "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None, "val_fraction": cfg.val_fraction}
    if cfg.text_column:
        spec["text_column"] = cfg.text_column
    if cfg.objective == "mlm" and cfg.tokenizer in ("bpe", "char"):
        spec["mask_token"] = MASK
    spec_file = d / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return TokenDataset(d)
    if cfg.resume:
        raise LMStackError(f"--resume: the prepared data in {d} is missing or was built from other settings")
    log(f"tokenizer: {cfg.tokenizer} on corpus {cfg.corpus!r}")
    tok = build_tokenizer(cfg)
    log(f"tokenizing {cfg.corpus!r} (vocab {tok.vocab_size}) -> {d}")
    prepare_dataset(cfg.corpus, tok, d, cfg.val_fraction, cfg.data_path, text_column=cfg.text_column,
                    workers=cfg.tokenize_workers)
    spec_file.write_text(json.dumps(spec))
    ds = TokenDataset(d)
    log(f"data: {ds.num_tokens('train'):,} train tokens, {ds.num_tokens('val'):,} val tokens")
    return ds


def model_config_for(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    m = dict(cfg.model)
    name = m.pop("preset", None)
    if "vocab_size" in m:
        if m["vocab_size"] < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={m['vocab_size']} is smaller than the tokenizer's vocabulary "
                              f"({tokenizer.vocab_size}); raise it or drop it to size it automatically")
    else:
        m["vocab_size"] = 64 * math.ceil(tokenizer.vocab_size / 64)  # pad for fast matmuls
    m.setdefault("eos_token_id", tokenizer.eos_id)
    m.setdefault("bos_token_id", tokenizer.bos_id)
    if cfg.objective == "mlm":  # a bidirectional encoder with BERT's masked-LM head unless the recipe says otherwise
        m.setdefault("causal", False)
        m.setdefault("mlm_head", True)
    mcfg = preset(name, **m) if name else ModelConfig.from_dict(m)
    if mcfg.arch == "encoder-decoder":
        raise ConfigError("model.arch: encoder-decoder trains on parallel text: set objective: seq2seq (with src_path/"
                          "tgt_path; see recipes/multi30k-de-en.yaml)")
    if cfg.objective == "mlm" and (mcfg.causal or getattr(mcfg, "arch", "transformer") != "transformer"):
        raise ConfigError("objective: mlm trains a bidirectional Transformer encoder; set model.causal: false "
                          "(and model.arch: transformer)")
    return mcfg


def make_evaluator(ds: TokenDataset, block: int, batch_size: int, seed: int, byte_lengths: list[int] | None):
    """Returns evaluate(model, windows=None) -> {val_loss, val_bpb}.

    windows=None: `eval_iters` batches of random windows, the same windows every call (low-noise comparisons).
    windows=-1: every non-overlapping window of the validation split; windows=N: the first N of them.
    """
    blen = torch.tensor(byte_lengths, dtype=torch.float64) if byte_lengths else None

    def evaluate(model, iters: int = 20, windows: int | None = None) -> dict[str, Any]:
        device = next(model.parameters()).device
        if windows is None:
            rng = np.random.default_rng([seed, 0xE7A1])
            batches = [ds.batch("val", batch_size, block, rng) for _ in range(iters)]
        else:  # whole windows: larger batches than training's where the logits stay small (fewer, bigger calls)
            wins = list(ds.eval_windows("val", block, None if windows < 0 else windows))
            n = max(batch_size, min(256, (1 << 25) // max(1, block * ds.tokenizer.vocab_size)))
            batches = [(torch.stack([w[0] for w in wins[i:i + n]]),
                        torch.stack([w[1] for w in wins[i:i + n]])) for i in range(0, len(wins), n)]
        nll, ntok, nbytes = 0.0, 0, 0.0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
            nll += float(loss)
            ntok += y.numel()
            if blen is not None:
                nbytes += float(blen[y.cpu().reshape(-1)].sum())
        out = {"val_loss": nll / ntok, "val_tokens": ntok}
        if nbytes > 0:
            out["val_bpb"] = nll / (math.log(2) * nbytes)
        return out
    return evaluate


def pretrain(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Run a pretraining recipe end to end. Returns a summary (final metrics, paths)."""
    device = setup_device(cfg)
    rank = distributed.info()
    if not rank.is_main:
        log = _quiet
    if rank.enabled:  # rank 0 tokenizes; the others open what it wrote
        if rank.is_main:
            prepare_data(cfg, log)
        distributed.barrier()
    ds = prepare_data(cfg, log)
    tok = ds.tokenizer
    mcfg = model_config_for(cfg, tok)
    torch.manual_seed(cfg.seed)
    model = make_model(mcfg).to(device)
    block, bs = mcfg.block_size, cfg.batch_size
    tokens_per_step = bs * block * cfg.grad_accum * rank.world
    if cfg.epochs is not None:
        max_steps = max(1, math.ceil(cfg.epochs * ds.num_tokens("train") / tokens_per_step))
    else:
        max_steps = int(cfg.max_steps)
    n_params = model.num_params()
    log(f"model: {n_params:,} parameters ({mcfg.n_layer} layers, {mcfg.n_embd} wide, "
        f"{mcfg.pos_emb}/{mcfg.norm}/{mcfg.mlp}), {max_steps} steps of {tokens_per_step:,} tokens on {device}"
        + (f", {rank.world} processes ({rank.strategy})" if rank.enabled else ""))
    a, b = ds.split_range("train")
    if b - a < block + 1:
        ds.batch("train", 1, block, np.random.default_rng(0))  # raises the clear "split too small" error

    def get_batch(step: int, micro: int):
        # the step's global batch (all micro-steps of all ranks) is a pure function of (seed, step)
        lo, hi, n = distributed.global_rows(bs, micro, cfg.grad_accum)
        starts = np.random.default_rng([cfg.seed, step]).integers(a, b - block, size=n)[lo:hi]
        t = torch.from_numpy(np.stack([ds.read(int(s), block + 1) for s in starts]).astype(np.int64))
        if masker is not None:  # mlm: the same windows, masked; the mask is a pure function of (seed, step, row)
            x, y = masker(t[:, :-1], [(cfg.seed, step, r) for r in range(lo, hi)])
            return x.to(device), y.to(device)
        return t[:, :-1].to(device), t[:, 1:].to(device)

    masker = (MLMMasker(tok, cfg.mlm_probability, cfg.whole_word_masking) if cfg.objective == "mlm" else None)
    evaluator = (make_mlm_evaluator(ds, block, bs, cfg.seed, masker) if masker is not None
                 else make_evaluator(ds, block, bs, cfg.seed, tok.byte_lengths()))
    trainer = Trainer(model, cfg, lm_loss if masker is None else mlm_loss, get_batch, max_steps,
                      evaluate=lambda m, **kw: evaluator(m, iters=cfg.eval_iters, **kw), tokenizer=tok,
                      param_groups=model.configure_optimizer_groups(cfg.weight_decay))
    if cfg.dtype == "auto":
        log(f"dtype auto: {trainer.dtype} ({trainer.dtype_reason})")
    history = trainer.fit()
    summary: dict[str, Any] = {"out_dir": cfg.out_dir, "steps": trainer.step, "params": n_params,
                               "dtype": trainer.dtype}
    if rank.enabled:  # what follows reads the consolidated checkpoint in one process
        summary["world_size"] = rank.world
        if not rank.is_main:  # waits in shutdown's barrier for rank 0's single-process tail below
            del trainer, model
            distributed.shutdown()
            return {**summary, "rank": rank.rank}
        from ..checkpoint import load_model
        model = load_model(Path(cfg.out_dir) / "last", device=device)[0]
        trainer.model = model
    if history:
        summary.update({k: v for k, v in history[-1].items() if k in ("train_loss", "val_loss", "val_bpb", "val_acc",
                                                                          "elapsed_s")})
    if cfg.final_eval_windows:
        final = trainer.run_eval(windows=cfg.final_eval_windows)
        summary.update({"final_" + k: v for k, v in final.items()})
        last = (f"val_acc {final['val_acc']:.4f}" if "val_acc" in final  # mlm: masked-token accuracy
                else f"val_bpb {final.get('val_bpb', float('nan')):.4f}")
        log(f"final eval on {final['val_tokens']:,} validation tokens: val_loss {final['val_loss']:.4f}  {last}")
        with JsonlLog(Path(cfg.out_dir) / "metrics.jsonl") as f:
            f.append({"step": trainer.step, "final_val_loss": final["val_loss"],
                      "final_val_bpb": final.get("val_bpb"), "final_val_tokens": final["val_tokens"]})
    from .plot import plot_run
    summary["plot"] = str(plot_run(cfg.out_dir))
    if cfg.sample_tokens and masker is None:  # an encoder does not generate
        from ..generate import SamplingParams, generate_text
        n = min(cfg.sample_tokens, block - 1)
        sp = SamplingParams(max_new_tokens=n, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                            seed=cfg.seed)
        summary["sample"] = cfg.sample_prompt + generate_text(model, tok, cfg.sample_prompt, sp, truncate="left")
    if rank.enabled:
        del trainer, model
        distributed.shutdown()
    return summary

