"""Sequence-to-sequence training (objective: seq2seq): an encoder-decoder Transformer (models/seq2seq.py) on
parallel text (data/parallel.py), on the one Trainer.

  data      src_path/tgt_path (two aligned files, .gz ok) or a JSONL of {src, tgt}; validation from
            val_src_path/val_tgt_path, else the last val_fraction of the pairs (at most 1000).
  vocab     tokenizer: bpe -> byte-level BPE of vocab_size trained on the training pairs: one shared by both sides
            (shared_vocab: true; one embedding matrix for source, target and output head) or one per side
            (shared_vocab: false; model.src_vocab_size is set; the source tokenizer is saved in
            <checkpoint>/source/). Specials: <|endoftext|> (EOS, id 0), <s> (decoder start), <pad>. Or a path to
            an existing tokenizer (shared). Built once into <out_dir>/tokenizer[-src] and reused on resume.
  batches   right-padded (src, src_mask, tgt_in, labels); batch_size pairs per micro-batch (data.sampler's
            epoch_batch), or by tokens (max_tokens padded tokens per micro-batch, length-bucketed,
            data.parallel.TokenBatcher). Either way micro-batch i is a pure function of (seed, i), with
            i = distributed.stream_index(step, micro, grad_accum): exact resume, and per-rank slices under torchrun.
  loss      teacher forcing, token-level cross-entropy over the target tokens (pads ignored) with
            label_smoothing; the evaluator reports val_loss without smoothing (nats/target token) and val_ppl.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig, preset
from ..data.parallel import IGNORE, ParallelDataset, TokenBatcher, collate_pairs, load_pairs
from ..data.sampler import epoch_batch
from ..errors import ConfigError, LMStackError
from ..tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe, train_char
from . import distributed
from .config import TrainConfig
from .trainer import Trainer, setup_device

BOS, PAD = "<s>", "<pad>"
SOURCE_DIR = "source"  # <checkpoint>/source/tokenizer.json: the source tokenizer of a separate-vocabulary model


def seq2seq_loss_fn(label_smoothing: float = 0.0) -> Callable:
    """Trainer loss_fn: batch (src, src_mask, tgt_in, labels) -> mean smoothed cross-entropy per target token."""
    def loss(model, batch) -> torch.Tensor:
        src, src_mask, tgt_in, labels = batch
        logits = model(src, tgt_in, src_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, label_smoothing=label_smoothing)
    return loss


def _train_tok(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    if kind == "char":
        return train_char(texts, special_tokens=list(DEFAULT_SPECIALS), bos_token=BOS, pad_token=PAD)
    return train_bpe(texts, vocab_size, special_tokens=list(DEFAULT_SPECIALS), bos_token=BOS, pad_token=PAD)


def build_tokenizers(cfg: TrainConfig, pairs: list[tuple[str, str]], log=print) -> tuple[Tokenizer, Tokenizer]:
    """(source tokenizer, target tokenizer): the same object when the vocabulary is shared."""
    out = Path(cfg.out_dir)
    if cfg.tokenizer not in ("bpe", "char"):
        tok = Tokenizer.load(cfg.tokenizer)
        return tok, tok
    spec = {"tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size, "shared": cfg.shared_vocab,
            "src_path": cfg.src_path, "tgt_path": cfg.tgt_path}
    spec_file = out / "tokenizer" / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        tgt = Tokenizer.load(out / "tokenizer")
        src = Tokenizer.load(out / "tokenizer-src") if not cfg.shared_vocab else tgt
        return src, tgt
    if cfg.resume:
        raise LMStackError(f"--resume: the tokenizer in {out / 'tokenizer'} is missing or was built from other "
                           "settings")
    if cfg.shared_vocab:
        log(f"tokenizer: shared {cfg.tokenizer} ({cfg.vocab_size}) on {len(pairs):,} pairs")
        src = tgt = _train_tok(cfg.tokenizer, [s for s, _ in pairs] + [t for _, t in pairs], cfg.vocab_size)
    else:
        log(f"tokenizer: separate {cfg.tokenizer} vocabularies ({cfg.vocab_size} each) on {len(pairs):,} pairs")
        src = _train_tok(cfg.tokenizer, [s for s, _ in pairs], cfg.vocab_size)
        tgt = _train_tok(cfg.tokenizer, [t for _, t in pairs], cfg.vocab_size)
        src.save(out / "tokenizer-src")
    tgt.save(out / "tokenizer")
    spec_file.write_text(json.dumps(spec))
    return src, tgt


def seq2seq_model_config(cfg: TrainConfig, src_tok: Tokenizer, tgt_tok: Tokenizer) -> ModelConfig:
    m = dict(cfg.model)
    name = m.pop("preset", None)
    m.setdefault("arch", "encoder-decoder")
    m.setdefault("vocab_size", 64 * math.ceil(tgt_tok.vocab_size / 64))
    if src_tok is not tgt_tok:
        m.setdefault("src_vocab_size", 64 * math.ceil(src_tok.vocab_size / 64))
    m.setdefault("eos_token_id", tgt_tok.eos_id)
    m.setdefault("bos_token_id", tgt_tok.bos_id)
    m.setdefault("pad_token_id", tgt_tok.pad_id)
    m.setdefault("decoder_start_token_id", tgt_tok.bos_id if tgt_tok.bos_id is not None else tgt_tok.eos_id)
    m.setdefault("block_size", max(cfg.max_source_length, cfg.max_target_length))
    mcfg = preset(name, **m) if name else ModelConfig.from_dict(m)
    if mcfg.arch != "encoder-decoder":
        raise ConfigError("objective: seq2seq trains an encoder-decoder; set model.arch: encoder-decoder")
    if mcfg.vocab_size < tgt_tok.vocab_size or (mcfg.src_vocab_size or mcfg.vocab_size) < src_tok.vocab_size:
        raise ConfigError("model.vocab_size / src_vocab_size is smaller than the tokenizer's vocabulary; drop it to "
                          "size it automatically")
    return mcfg


def load_data(cfg: TrainConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if not cfg.src_path:
        raise ConfigError("objective: seq2seq needs src_path (and tgt_path, or a JSONL src_path with src/tgt)")
    train = load_pairs(cfg.src_path, cfg.tgt_path)
    if cfg.val_src_path:
        val = load_pairs(cfg.val_src_path, cfg.val_tgt_path)
    else:
        n = min(1000, max(1, int(len(train) * cfg.val_fraction)))
        train, val = train[:-n], train[-n:]
    return train, val


def make_seq2seq_evaluator(ds: ParallelDataset, batch_size: int, pad_id: int, start_id: int) -> Callable:
    """evaluate(model) -> {val_loss (nats per target token, no smoothing), val_ppl, val_tokens} over all of `ds`."""
    order = sorted(range(len(ds)), key=lambda i: int(ds.lengths()[i]))
    batches = [collate_pairs(ds, order[i:i + batch_size], pad_id, start_id) for i in range(0, len(order), batch_size)]

    @torch.no_grad()
    def evaluate(model, **_) -> dict[str, Any]:
        device = next(model.parameters()).device
        nll, n = 0.0, 0
        for src, mask, tgt_in, labels in batches:
            logits = model(src.to(device), tgt_in.to(device), mask.to(device))
            labels = labels.to(device)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                         ignore_index=IGNORE, reduction="sum"))
            n += int((labels != IGNORE).sum())
        return {"val_loss": nll / max(n, 1), "val_ppl": math.exp(min(50.0, nll / max(n, 1))), "val_tokens": n}
    return evaluate


class Seq2SeqTrainer(Trainer):
    """The Trainer, plus the source tokenizer of a separate-vocabulary model in <checkpoint>/source/."""
    src_tokenizer: Tokenizer | None = None

    def write_extra(self, d: Path) -> None:
        if self.src_tokenizer is not None:
            self.src_tokenizer.save(d / SOURCE_DIR)


def train_seq2seq(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Run an `objective: seq2seq` recipe end to end. Returns a summary (final metrics, paths)."""
    if cfg.objective != "seq2seq":
        raise ConfigError(f"train_seq2seq runs objective: seq2seq, not {cfg.objective!r}")
    device = setup_device(cfg)
    rank = distributed.info()
    if not rank.is_main:
        log = lambda *a, **k: None  # noqa: E731
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    train_pairs, val_pairs = load_data(cfg)
    if rank.enabled and not rank.is_main:
        distributed.barrier()  # rank 0 trains the tokenizer first
    src_tok, tgt_tok = build_tokenizers(cfg, train_pairs, log)
    if rank.enabled and rank.is_main:
        distributed.barrier()
    mcfg = seq2seq_model_config(cfg, src_tok, tgt_tok)
    train_ds = ParallelDataset(train_pairs, src_tok, tgt_tok, cfg.max_source_length, cfg.max_target_length)
    val_ds = ParallelDataset(val_pairs, src_tok, tgt_tok, cfg.max_source_length, cfg.max_target_length)
    pad_id = tgt_tok.pad_id if tgt_tok.pad_id is not None else tgt_tok.eos_id
    src_pad = src_tok.pad_id if src_tok.pad_id is not None else src_tok.eos_id
    start = mcfg.decoder_start_token_id
    torch.manual_seed(cfg.seed)
    from ..models.utils import make_model
    model = make_model(mcfg).to(device)

    batcher = TokenBatcher(train_ds.lengths(), cfg.max_tokens, cfg.seed) if cfg.max_tokens else None
    per_epoch = (batcher.size(0) if batcher is not None else math.ceil(len(train_ds) / cfg.batch_size))
    per_epoch = max(1, math.ceil(per_epoch / (cfg.grad_accum * rank.world)))
    max_steps = max(1, math.ceil(cfg.epochs * per_epoch)) if cfg.epochs is not None else int(cfg.max_steps)

    def get_batch(step: int, micro: int):
        i = distributed.stream_index(step, micro, cfg.grad_accum)
        idx = batcher(i) if batcher is not None else epoch_batch(len(train_ds), cfg.batch_size, cfg.seed, i)
        src, mask, tgt_in, labels = collate_pairs(train_ds, idx, pad_id, start)
        if src_pad != pad_id:
            src = src.masked_fill(~mask, src_pad)
        return src.to(device), mask.to(device), tgt_in.to(device), labels.to(device)

    log(f"model: {model.num_params():,} parameters (encoder {mcfg.n_encoder_layer or mcfg.n_layer} + decoder "
        f"{mcfg.n_layer} layers, {mcfg.n_embd} wide, vocab {mcfg.vocab_size}"
        + (f"/{mcfg.src_vocab_size}" if mcfg.src_vocab_size else " shared") + f"), {len(train_ds):,} train pairs, "
        f"{len(val_ds):,} val pairs, {per_epoch} steps/epoch, {max_steps} steps on {device}")
    evaluator = make_seq2seq_evaluator(val_ds, max(cfg.batch_size, 64), pad_id, start)
    trainer = Seq2SeqTrainer(model, cfg, seq2seq_loss_fn(cfg.label_smoothing), get_batch, max_steps,
                             evaluate=evaluator, tokenizer=tgt_tok,
                             param_groups=model.configure_optimizer_groups(cfg.weight_decay))
    trainer.src_tokenizer = None if src_tok is tgt_tok else src_tok
    history = trainer.fit()
    summary: dict[str, Any] = {"out_dir": cfg.out_dir, "steps": trainer.step, "params": model.num_params(),
                               "steps_per_epoch": per_epoch}
    if history:
        summary.update({k: v for k, v in history[-1].items() if k in ("train_loss", "val_loss", "val_ppl",
                                                                          "elapsed_s")})
    if rank.enabled:
        del trainer, model
        distributed.shutdown()
    return summary
