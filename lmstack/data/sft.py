"""Supervised fine-tuning data: load instruction/chat/plain-text files, render with the model's chat template,
mask everything but the assistant's replies, pack, split, batch.

Input formats (detected per record):
  * Alpaca JSON (a .json array) or JSONL: {"instruction", "input" (optional), "output", "system" (optional)}
    -> user = instruction (+ "\n\n" + input), assistant = output
  * chat JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  * prompt/completion JSONL: {"prompt", "completion"} -> one user turn, one assistant turn
  * {"text": "..."} JSONL, or any other file (.txt, .md): plain text, every token trained; in a text file,
    documents are separated by blank lines
A malformed record raises LMStackError naming the file and line.

Rendering: with a chat template, the text is exactly `tokenizer.apply_chat_template(messages)` and the trained
(labelled) tokens are each assistant message's content plus the end-of-turn token that closes it
(<|im_end|>, <|eot_id|>, ... or EOS); system/user turns and the template's role headers are masked (label -100).
Without a chat template the fallback format is the one `Tokenizer.apply_chat_template` uses,
"user: {content}\n" ... "assistant: {content}<EOS>\n", with the EOS token (when the vocabulary has one) closing
each assistant reply so the model learns to stop.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import LMStackError
from .jsonl import read_jsonl
from .sampler import epoch_batch
from ..tokenizer import END_OF_TURN

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One training example before tokenization: a conversation or a plain text."""
    messages: list[dict] | None = None
    text: str | None = None
    where: str = ""


@dataclass
class Example:
    """Tokenized example: input_ids and per-token labels (NOT shifted: labels[i] = input_ids[i] where trained,
    -100 elsewhere). `collate` shifts them into (x, y) next-token batches."""
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


# ---- reading files -----------------------------------------------------------------------------------------------
def _record_from_obj(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise LMStackError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LMStackError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise LMStackError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                   "\"content\": string}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise LMStackError(f"{where}: the conversation has no assistant message to train on")
        return Record(messages=[{"role": m["role"], "content": m["content"]} for m in msgs], where=where)
    if "instruction" in obj or "output" in obj:
        ins, inp, out = obj.get("instruction"), obj.get("input") or "", obj.get("output")
        if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, str):
            raise LMStackError(f"{where}: an Alpaca record needs string 'instruction' and 'output' "
                               "(and optional string 'input')")
        msgs = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) else []
        msgs += [{"role": "user", "content": ins + ("\n\n" + inp if inp else "")},
                 {"role": "assistant", "content": out}]
        return Record(messages=msgs, where=where)
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise LMStackError(f"{where}: 'prompt' and 'completion' must be strings")
        return Record(messages=[{"role": "user", "content": obj["prompt"]},
                                {"role": "assistant", "content": obj["completion"]}], where=where)
    if isinstance(obj.get("text"), str):
        return Record(text=obj["text"], where=where)
    raise LMStackError(f"{where}: unknown record; expected 'messages' (chat), 'instruction'/'output' (Alpaca), "
                       f"'prompt'/'completion' or 'text' keys, got {sorted(obj)[:6]}")


def load_records(path: str | Path) -> list[Record]:
    """Read an SFT data file (format detected from the extension and the records; see the module doc)."""
    p = Path(path)
    if not p.is_file():
        raise LMStackError(f"no SFT data file at {p}; pass an Alpaca .json, a chat/Alpaca .jsonl or a .txt file")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LMStackError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); an Alpaca file is one JSON array of "
                               "{instruction, input, output} objects (use .jsonl for one object per line)") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise LMStackError(f"{p}: expected a JSON array of records")
        recs = [_record_from_obj(o, f"{p}: record {i}") for i, o in enumerate(data)]
    elif suffix == ".jsonl":
        recs = [_record_from_obj(obj, f"{p}:{n}") for n, obj in read_jsonl(p)]
    else:
        docs = [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n")]
        recs = [Record(text=d, where=f"{p}: document {i}") for i, d in enumerate(docs) if d.strip()]
    if not recs:
        raise LMStackError(f"{p} holds no training records")
    return recs


# ---- rendering and masking ---------------------------------------------------------------------------------------
def _eot_strings(tokenizer) -> list[str]:
    names = [t for t in END_OF_TURN if tokenizer.token_id(t) is not None]
    if tokenizer.eos_token:
        names.append(tokenizer.eos_token)
    return names


def render_chat(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans to train on): each assistant message's content plus its end-of-turn marker."""
    if not tokenizer.chat_template:
        eos = tokenizer.eos_token or ""
        parts, spans, pos = [], [], 0
        for m in messages:
            head = f"{m['role']}: "
            body = m["content"] + (eos if m["role"] == "assistant" else "")
            if m["role"] == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            piece = head + body + "\n"
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    eots = _eot_strings(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, content = None, m["content"]
        try:
            head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else None
        except LMStackError:  # e.g. a template that insists on a final user turn
            head = None
        if head is not None and full.startswith(head) and full.startswith(content, len(head)):
            start = len(head)
        else:  # the template trims the content or rewrites earlier turns: search after the prompt / previous reply
            frm = len(head) if head is not None and full.startswith(head) else cursor
            for c in (content, content.strip()):
                k = full.find(c, frm) if c else -1
                if k >= 0:
                    start, content = k, c
                    break
        if start is None:
            raise LMStackError(f"{where}: the chat template does not reproduce assistant message {i} verbatim, so "
                               "its tokens cannot be located for loss masking")
        end = start + len(content)
        rest = full[end:]
        stripped = rest.lstrip(" \t")  # some templates put a space before the end-of-turn marker
        for e in eots:
            if stripped.startswith(e):
                end += len(rest) - len(stripped) + len(e)
                break
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_record(tokenizer, rec: Record, add_eos_to_text: bool = True) -> Example:
    """Tokenize one record; labels = ids inside the trained character spans (a token overlapping a span counts)."""
    if rec.text is not None:
        ids = tokenizer.encode(rec.text)
        if add_eos_to_text and tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        return Example(ids, list(ids))
    text, spans = render_chat(tokenizer, rec.messages, rec.where)
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    labels = []
    si = 0
    for tid, (a, b) in zip(enc.ids, enc.offsets):
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        inside = si < len(spans) and a < spans[si][1] and b > spans[si][0]
        labels.append(tid if inside else IGNORE_INDEX)
    return Example(list(enc.ids), labels)


# ---- dataset -------------------------------------------------------------------------------------------------------
def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic shuffle (by seed) then the last `val_fraction` (at least 1 record when > 0) is validation."""
    if not 0 <= val_fraction < 1:
        raise LMStackError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 else max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise LMStackError(f"{len(records)} records are too few to hold out a validation split; add data, pass "
                           "--val-data, or set --val-fraction 0")
    return [records[i] for i in order[:len(records) - n_val]], [records[i] for i in order[len(records) - n_val:]]


@dataclass
class SFTDataset:
    """Rows of at most seq_len + 1 tokens (inputs + the shifted target), each with at least one trained label."""
    rows: list[Example]
    seq_len: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for t in r.labels[1:] if t != IGNORE_INDEX) for r in self.rows)


def build_dataset(tokenizer, records: Iterable[Record], seq_len: int, pack: bool = False) -> SFTDataset:
    """Tokenize, truncate to seq_len + 1 tokens (the end is dropped), drop examples left with nothing to train on,
    and with pack=True place whole examples greedily into rows of up to seq_len + 1 tokens (no example is split;
    packed examples attend to the ones before them in their row, the usual simple packing)."""
    rows, n, truncated, dropped = [], 0, 0, 0
    for rec in records:
        n += 1
        ex = tokenize_record(tokenizer, rec)
        if len(ex.input_ids) > seq_len + 1:
            truncated += 1
            ex = Example(ex.input_ids[:seq_len + 1], ex.labels[:seq_len + 1])
        if not any(t != IGNORE_INDEX for t in ex.labels[1:]):
            dropped += 1
            continue
        rows.append(ex)
    stats = {"records": n, "truncated": truncated, "dropped": dropped, "examples": len(rows)}
    if pack and rows:
        packed: list[Example] = []
        cur_ids: list[int] = []
        cur_lab: list[int] = []
        for ex in rows:
            if cur_ids and len(cur_ids) + len(ex.input_ids) > seq_len + 1:
                packed.append(Example(cur_ids, cur_lab))
                cur_ids, cur_lab = [], []
            cur_ids = cur_ids + ex.input_ids
            cur_lab = cur_lab + ex.labels
        if cur_ids:
            packed.append(Example(cur_ids, cur_lab))
        rows = packed
    stats["rows"] = len(rows)
    return SFTDataset(rows, seq_len, stats)


def collate(rows: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded next-token batch: x = ids[:-1], y = labels[1:] (-100 on prompt and padding), shape (B, T)
    with T = longest row - 1."""
    T = max(len(r.input_ids) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids) - 1
        x[i, :n] = torch.tensor(r.input_ids[:-1], dtype=torch.long)
        y[i, :n] = torch.tensor(r.labels[1:], dtype=torch.long)
    return x, y


def batch_indices(n_rows: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Rows of global batch number `index` (lmstack.data.sampler.epoch_batch, the one epoch sampler)."""
    return epoch_batch(n_rows, batch_size, seed, index)
