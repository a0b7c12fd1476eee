"""The one JSONL reader: every data file with one JSON object per line (SFT records, preference pairs, prompts,
benchmark data) goes through it, so a bad line is always reported the same way: `file:line: what is wrong`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import LMStackError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object raises LMStackError naming
    the file and line. The caller checks that the file exists (its message knows what the file was for)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMStackError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                                   "JSON object") from None
            if not isinstance(obj, dict):
                raise LMStackError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
