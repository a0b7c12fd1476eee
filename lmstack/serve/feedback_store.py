"""The feedback page's files: the prompts it shows (`load_prompts`), the votes log it appends to (`VoteLog`, one
`lmstack.data.jsonl.JsonlLog` with fsync) and the exports (`export_votes`: preference pairs, ratings, SFT data).

Prompts file: `.txt` (one prompt per line, blank lines skipped, a literal `\\n` becomes a newline: the one rule of
`lmstack.data.prefs.load_prompts`) or `.jsonl` (one object per line with "prompt": str or "messages":
[{"role", "content"}, ...], and an optional "id"). A prompt's id is its "id" field, else a hash of its content.

Votes file: one JSON object per line, appended and fsync'ed before `VoteLog.append` returns; read back with
`lmstack.data.jsonl.read_log`, which skips a torn last line (a crash in the middle of a write); the log cuts that
line off when it is opened again, so the next vote starts on its own line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import write_text
from ..data.jsonl import JsonlLog, read_jsonl, read_log
from ..data.prefs import load_prompts as load_text_prompts
from ..errors import LMStackError


# ------------------------------------------------------------------------------------------------------ prompts
def prompt_id(item: dict) -> str:
    """The id of a prompt without an "id" field: a hash of its "messages" (else its "prompt")."""
    body = item["messages"] if "messages" in item else item["prompt"]
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _jsonl_prompts(path: Path) -> list[dict]:
    """The raw prompts of a .jsonl file (the page keeps "messages" as messages, to render or show them)."""
    items = []
    for n, obj in read_jsonl(path):
        if isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in msgs):
                raise LMStackError(f"{path}:{n}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
            item = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
        elif isinstance(obj.get("prompt"), str):
            item = {"prompt": obj["prompt"]}
        else:
            raise LMStackError(f"{path}:{n}: needs a string \"prompt\" or a non-empty \"messages\" list")
        item["id"] = str(obj["id"]) if obj.get("id") is not None else prompt_id(item)
        items.append(item)
    return items


def load_prompts(path: str | Path) -> list[dict]:
    """Prompts from a .txt (one per line) or .jsonl ("prompt" or "messages", optional "id") file:
    [{"id", "prompt"} | {"id", "messages"}]. Repeated prompts (same id) are kept once."""
    path = Path(path)
    if not path.is_file():
        raise LMStackError(f"prompts file not found: {path} (give a .txt with one prompt per line or a .jsonl)")
    if path.suffix.lower() in (".jsonl", ".json"):
        items = _jsonl_prompts(path)
    else:
        items = [{"prompt": p, "id": prompt_id({"prompt": p})} for p in load_text_prompts(path)]
    seen: dict[str, dict] = {}
    for it in items:
        old = seen.get(it["id"])
        if old is not None and old != it:
            raise LMStackError(f"{path}: id {it['id']!r} is used by two different prompts; ids must be unique")
        seen.setdefault(it["id"], it)
    if not seen:
        raise LMStackError(f"{path}: no prompts found")
    return list(seen.values())


# -------------------------------------------------------------------------------------------------------- votes
class VoteLog:
    """The votes file: `append(record)` writes one JSON line and fsyncs it (and a new file's directory) before it
    returns. The file is opened (created) at the first vote, so a session that saves nothing leaves nothing; a
    failed write reopens the log, which cuts a partly written line, so the next vote still starts on its own line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._log: JsonlLog | None = None

    def ids(self) -> set:
        """The prompt ids voted on in the file (a torn last line is skipped)."""
        return {v.get("id") for v in read_log(self.path)}

    def append(self, record: dict) -> None:
        if self._log is None:
            self._log = JsonlLog(self.path, fsync=True)
        try:
            self._log.append(record)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            try:
                log.close()
            except OSError:  # the failed write's buffer cannot be flushed either; the file is closed anyway
                pass


EXPORT_FORMATS = ("pairs", "ratings", "sft")


def latest_votes(votes_path: str | Path, out_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(every vote in the file, the last vote per (prompt id, annotator)) for an export to `out_path`; a missing
    votes file, or an export that would overwrite it, raises LMStackError."""
    votes_path, out_path = Path(votes_path), Path(out_path)
    if not votes_path.is_file():
        raise LMStackError(f"votes file not found: {votes_path}")
    if out_path.resolve() == votes_path.resolve():
        raise LMStackError(f"the export would overwrite the votes file {votes_path}; pick another output name")
    votes = read_log(votes_path)
    last: dict[tuple, dict] = {}
    for v in votes:
        last[(v.get("id"), v.get("annotator"))] = v
    return votes, list(last.values())


def export_prompt(v: dict):
    """How an exported row names a vote's prompt: a chat prompt as its messages, a plain one as its text."""
    return v["messages"] if v.get("chat") and isinstance(v.get("messages"), list) else v["prompt"]


def write_rows(out_path: str | Path, rows: list[dict]) -> None:
    write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def export_preferences(votes_path: str | Path, out_path: str | Path, include_edited: bool = True) -> dict:
    """Write the standard preference JSONL ({"prompt", "chosen", "rejected"} per line) from a votes file; a chat
    prompt is written as its messages (lmstack.data.prefs renders them with the chat template and ends the
    completions with the end-of-turn token), a plain prompt as its text. Ties and
    both-bad votes carry no preference and are skipped; when a prompt was voted more than once the last vote wins
    per annotator. include_edited=False drops pairs whose chosen text the annotator edited. Written atomically.
    Returns counts: {"votes", "written", "tie", "both_bad", "edited", "skipped_edited", "duplicates"}."""
    votes, last = latest_votes(votes_path, out_path)
    counts = {"votes": len(votes), "written": 0, "tie": 0, "both_bad": 0, "edited": 0, "skipped_edited": 0,
              "duplicates": len(votes) - len(last)}
    rows = []
    for v in last:
        choice = v.get("choice")
        if choice in ("tie", "both_bad"):
            counts[choice] += 1
            continue
        if choice not in ("a", "b") or not isinstance(v.get("chosen"), str) or not isinstance(v.get("rejected"), str):
            continue
        if v.get("edited"):
            if not include_edited:
                counts["skipped_edited"] += 1
                continue
            counts["edited"] += 1
        rows.append({"prompt": export_prompt(v), "chosen": v["chosen"], "rejected": v["rejected"]})
    write_rows(out_path, rows)
    counts["written"] = len(rows)
    return counts


def export_ratings(votes_path: str | Path, out_path: str | Path) -> dict:
    """Write one {"prompt", "completion", "rating", "tags", "critique"} line per rated completion (the sampled
    text the annotator read and rated; the vote's tags of that side and its critique), the format
    `lmstack.data.prefs.load_ratings` reads for `lmstack reward train --objective regression`. Votes without
    ratings (and old vote files, which have none) add nothing; the last vote per annotator wins. Written
    atomically. Returns counts: {"votes", "written", "rated_votes", "duplicates"}."""
    votes, last = latest_votes(votes_path, out_path)
    rows, rated = [], 0
    for v in last:
        ratings = v.get("ratings") if isinstance(v.get("ratings"), dict) else {}
        tags = v.get("tags") if isinstance(v.get("tags"), dict) else {}
        got = 0
        for side in ("a", "b"):
            r, text = ratings.get(side), v.get(f"completion_{side}")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not isinstance(text, str):
                continue
            side_tags = tags.get(side) if isinstance(tags.get(side), list) else []
            rows.append({"prompt": export_prompt(v), "completion": text, "rating": float(r),
                         "tags": [t for t in side_tags if isinstance(t, str)],
                         "critique": v.get("critique") if isinstance(v.get("critique"), str) else ""})
            got += 1
        rated += got > 0
    write_rows(out_path, rows)
    return {"votes": len(votes), "written": len(rows), "rated_votes": rated, "duplicates": len(votes) - len(last)}


def export_sft(votes_path: str | Path, out_path: str | Path) -> dict:
    """Write SFT data from the answers the annotators edited (the edited text is what the model should have said):
    a plain prompt as {"prompt", "completion"}, a chat prompt as {"messages": [...the prompt's turns, the
    assistant's edited reply]} (both formats `lmstack.data.sft.load_records` reads). The last vote per annotator
    wins. Written atomically. Returns counts: {"votes", "written", "duplicates"}."""
    votes, last = latest_votes(votes_path, out_path)
    rows = []
    for v in last:
        if not v.get("edited") or v.get("choice") not in ("a", "b") or not isinstance(v.get("chosen"), str):
            continue
        prompt = export_prompt(v)
        if isinstance(prompt, list):
            rows.append({"messages": [*prompt, {"role": "assistant", "content": v["chosen"]}]})
        else:
            rows.append({"prompt": prompt, "completion": v["chosen"]})
    write_rows(out_path, rows)
    return {"votes": len(votes), "written": len(rows), "duplicates": len(votes) - len(last)}


def export_votes(votes_path: str | Path, out_path: str | Path, format: str = "pairs",
                 include_edited: bool = True) -> dict:
    """The export of `lmstack feedback --export OUT --format pairs|ratings|sft` (see the three functions above)."""
    if format == "pairs":
        return export_preferences(votes_path, out_path, include_edited=include_edited)
    if format == "ratings":
        return export_ratings(votes_path, out_path)
    if format == "sft":
        return export_sft(votes_path, out_path)
    raise LMStackError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
