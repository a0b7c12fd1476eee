"""JSONL: the one reader of data files (`read_jsonl`) and the one append log (`JsonlLog`, `read_log`).

The one JSONL reader: every data file with one JSON object per line (SFT records, preference pairs, prompts,
benchmark data) goes through it, so a bad line is always reported the same way: `file:line: what is wrong`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from ..atomic import fsync_dir
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


def read_log(path: str | Path) -> list[dict]:
    """The records of an append log (`JsonlLog`): every complete line that is a JSON object. A torn last line (a
    crash in the middle of a write) is skipped; so is a line that is not a JSON object. A missing file is empty."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class JsonlLog:
    """The one append-only JSONL log (training metrics, votes, resumable eval answers): one JSON object per line,
    flushed at once; fsync=True also fsyncs every record (and a new file's directory) before `append` returns.
    The torn-line rule is the same everywhere: a last line left without its newline by a crash is cut off when the
    log is opened again (so the next record starts on its own line and the torn one is never half-read).
    keep(record) -> bool, when given, drops the records it rejects when opening (a resumed run drops the steps
    after its checkpoint)."""

    def __init__(self, path: str | Path, fsync: bool = False, truncate: bool = False, keep=None):
        self.path, self.fsync = Path(path), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        if truncate or new:
            self.path.write_bytes(b"")
        else:
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1  # the end of the last complete line
            if keep is not None:
                lines = [ln for ln in data[:cut].decode("utf-8", errors="replace").splitlines() if ln.strip()]
                kept = []
                for ln in lines:
                    try:
                        rec = json.loads(ln)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and keep(rec):
                        kept.append(ln + "\n")
                self.path.write_text("".join(kept), encoding="utf-8")
            elif cut != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self._f = open(self.path, "a", encoding="utf-8")
        if new and fsync:
            os.fsync(self._f.fileno())
            fsync_dir(self.path.parent)

    def records(self) -> list[dict]:
        return read_log(self.path)

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
