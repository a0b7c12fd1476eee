"""Preference data for reward models, DPO and PPO.

Preference pairs: JSONL, one object per line, {"prompt": ..., "chosen": ..., "rejected": ...} (the format the
feedback page writes). `prompt` is a string or a chat (a list of {"role", "content"} messages, rendered with the
tokenizer's chat template, ready for the assistant's reply); `chosen`/`rejected` are strings, an assistant message
{"role": "assistant", "content": ...}, or a list of messages whose last one is the reply.

Ratings (`load_ratings`, for `lmstack reward train --objective regression`): JSONL, {"prompt": str | chat,
"completion": str, "rating": 1-7, "tags": [str] (optional), "critique": str (optional)} (the feedback page's
`--format ratings` export). The regression target of a rating is `rating_target(r) = (r - 4) / 1.5` (1..7 -> -2..+2).

Prompts for PPO: JSONL with a "prompt" field (string or chat) or a "messages" chat (the feedback page's prompt
format), or a plain text file with one prompt per line (a literal \n in a line becomes a newline).

Encoding: prompt ids + completion ids + an end token (EOS, or the end-of-turn token for chat prompts); the
completion mask marks the completion tokens (the ones a policy is scored on). Over-long examples lose prompt tokens
from the left first, then completion tokens from the right.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LMStackError
from .jsonl import read_jsonl


@dataclass
class PrefExample:
    prompt: str
    chosen: str
    rejected: str
    chat: bool = False  # the prompt came as a chat (completions end with the end-of-turn token)


def _render_prompt(value: Any, tokenizer, where: str) -> tuple[str, bool]:
    if isinstance(value, str):
        return value, False
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if tokenizer is None:
            raise LMStackError(f"{where}: a chat prompt needs a tokenizer to render it")
        return tokenizer.apply_chat_template(value, add_generation_prompt=True), True
    raise LMStackError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def _completion_text(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise LMStackError(f"{where}: {key!r} must be a string or an assistant message {{role, content}}")


def _jsonl_rows(path: Path):
    if not path.exists():
        raise LMStackError(f"no data file at {path}; pass a JSONL file of prompt/chosen/rejected objects")
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def load_prefs(path: str | Path, tokenizer=None) -> list[PrefExample]:
    """Read a prompt/chosen/rejected JSONL file. A malformed line raises LMStackError naming file and line."""
    path = Path(path)
    out = []
    for where, row in _jsonl_rows(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise LMStackError(f"{where}: missing {', '.join(repr(k) for k in missing)} "
                               "(each line needs prompt, chosen and rejected)")
        prompt, chat = _render_prompt(row["prompt"], tokenizer, where)
        out.append(PrefExample(prompt, _completion_text(row["chosen"], "chosen", where),
                               _completion_text(row["rejected"], "rejected", where), chat))
    if not out:
        raise LMStackError(f"{path} holds no preference pairs")
    return out


RATING_MIN, RATING_MAX = 1.0, 7.0


@dataclass
class RatingExample:
    prompt: str
    completion: str
    rating: float          # 1..7
    chat: bool = False
    tags: tuple[str, ...] = ()
    critique: str = ""


def rating_target(rating):
    """The regression target of a 1-7 rating: (rating - 4) / 1.5, so 1..7 maps to -2..+2 (4, "neutral", is 0); a
    reward gap of 2 (3 rating points) is then a Bradley-Terry preference of sigmoid(2) = 0.88. Works on floats and
    tensors."""
    return (rating - 4.0) / 1.5


def check_rating(value: Any, where: str = "rating") -> float:
    """A 1-7 rating as a float; anything else raises LMStackError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise LMStackError(f"{where}: 'rating' must be a number from 1 to 7, got {value!r}")
    if not RATING_MIN <= float(value) <= RATING_MAX:
        raise LMStackError(f"{where}: 'rating' must be from 1 to 7, got {value:g}")
    return float(value)


def load_ratings(path: str | Path, tokenizer=None) -> list[RatingExample]:
    """Read a ratings JSONL file (prompt, completion, rating 1-7, optional tags and critique). A malformed line
    raises LMStackError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise LMStackError(f"no ratings file at {path}; pass a JSONL file of prompt/completion/rating objects "
                           "(`lmstack feedback --export OUT --format ratings` writes one)")
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("prompt", "completion", "rating") if k not in row]
        if missing:
            raise LMStackError(f"{where}: missing {', '.join(repr(k) for k in missing)} "
                               "(each line needs prompt, completion and rating)")
        prompt, chat = _render_prompt(row["prompt"], tokenizer, where)
        tags = row.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise LMStackError(f"{where}: 'tags' must be a list of strings")
        critique = row.get("critique") or ""
        if not isinstance(critique, str):
            raise LMStackError(f"{where}: 'critique' must be a string")
        out.append(RatingExample(prompt, _completion_text(row["completion"], "completion", where),
                                 check_rating(row["rating"], where), chat, tuple(tags), critique))
    if not out:
        raise LMStackError(f"{path} holds no ratings")
    return out


def load_prompts(path: str | Path, tokenizer=None) -> list[str]:
    """The one prompts-file reader (PPO prompts, the feedback page's prompt list), a list of prompt strings.

    * `.jsonl`: one object per line with a "prompt" (a string, or a chat: a list of {role, content} messages,
      rendered with `tokenizer`'s chat template ready for the assistant's reply) or a "messages" chat (same
      rendering); blank lines are skipped, a bad line raises LMStackError naming file and line.
    * any other file (.txt): one prompt per line; blank (whitespace-only) lines are skipped; a literal backslash-n
      (the two characters `\\n`) in a line becomes a newline, so a multi-line prompt fits on one line.

    An empty result (or a missing file) raises LMStackError."""
    path = Path(path)
    if not path.exists():
        raise LMStackError(f"no prompts file at {path}; pass a .jsonl file with 'prompt' fields or a text file")
    if path.suffix == ".jsonl":
        out = []
        for where, row in _jsonl_rows(path):
            value = row.get("prompt", row.get("messages"))
            if value is None:
                raise LMStackError(f"{where}: missing 'prompt' (a string or chat) or 'messages'")
            out.append(_render_prompt(value, tokenizer, where)[0])
    else:
        out = [ln.rstrip("\n").replace("\\n", "\n") for ln in path.read_text(encoding="utf-8").splitlines()
               if ln.strip()]
    if not out:
        raise LMStackError(f"{path} holds no prompts")
    return out


def split_prefs(examples: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Shuffled (train, val) split; val gets at least one example when val_fraction > 0 and there are >= 2."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(1, min(n_val, len(examples) - 1))
    return [examples[i] for i in idx[n_val:]], [examples[i] for i in idx[:n_val]]


def end_token(tokenizer, chat: bool = False) -> int | None:
    """The token that closes a completion: the end-of-turn token for chat prompts (when there is one), else EOS."""
    if chat:
        other = sorted(tokenizer.end_of_turn_ids - {tokenizer.eos_id})
        if other:
            return other[0]
    return tokenizer.eos_id


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int, chat: bool = False,
                add_end: bool = True) -> tuple[list[int], int]:
    """(ids, prompt_len): prompt tokens then completion tokens (+ end token). The prompt keeps >= 1 token (the
    BOS/EOS token when empty) so the first completion token has a context to be predicted from."""
    p = tokenizer.encode_prompt(prompt)  # an empty prompt becomes [BOS or EOS] (Tokenizer.start_id)
    c = tokenizer.encode(completion)
    end = end_token(tokenizer, chat)
    if add_end and end is not None:
        c = c + [end]
    if len(p) + len(c) > max_length:
        p = p[-max(1, max_length - len(c)):]
        c = c[:max_length - len(p)]
    if not c:
        raise LMStackError(f"max_length={max_length} leaves no room for the completion")
    return p + c, len(p)


def collate(seqs: list[tuple[list[int], int]], pad_id: int = 0,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, completion_mask), each (B, T); completion_mask marks completion tokens."""
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.bool)
    comp = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (s, plen) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn[b, :len(s)] = True
        comp[b, plen:len(s)] = True
    return ids.to(device), attn.to(device), comp.to(device)
