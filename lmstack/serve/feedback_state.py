"""FeedbackState: everything the feedback page's routes share — the LM and its name, the prompts (by id, in
order), the sampling settings of both completions, the votes log and the ids voted in it, the pairs already shown
(so a reload shows the same pair), the prompts skipped this session, and the locks that keep one generation and
one append at a time. Its methods do the work (sample a pair, build and save a vote record, progress); the routes
in feedback_routes.py only read requests and shape answers. A bad request raises `FeedbackError(status, message)`.
"""
from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from ..errors import LMStackError
from ..generate.sampling import SamplingParams
from .feedback_store import VoteLog, load_prompts

CHOICES = ("a", "b", "tie", "both_bad")
DEFAULT_SAMPLING = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95}
MAX_TEXT = 200_000  # characters of an edited completion
MAX_NAME = 200      # characters of an annotator name


class FeedbackError(Exception):
    """A request the page can't serve: answered as {"error": {"message", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Vote(NamedTuple):
    """One checked vote request: the prompt id, the choice, the edited text (or None) and the annotator's name."""
    id: str
    choice: str
    edited_text: str | None
    annotator: str


def pair_seeds(pid: str, base: int, attempt: int) -> tuple[int, int]:
    """The seeds of completions A and B of prompt `pid` (fixed by the id, so a restart shows the same pair)."""
    h = int(hashlib.sha256(f"{base}:{pid}".encode()).hexdigest()[:8], 16)
    return h + 2 * attempt, h + 2 * attempt + 1


def check_sampling(sampling: dict | None) -> dict:
    """The decoding settings of both completions (defaults filled in, no "seed": A and B get their own);
    bad settings fail here, with the fix, not on the first request."""
    sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
    sampling.pop("seed", None)
    SamplingParams(**sampling)
    return sampling


class FeedbackState:
    """The shared state of one feedback app (see the module docstring and `create_feedback_app`)."""

    def __init__(self, lm, prompts: list[dict] | str | Path, out_path: str | Path, annotator: str | None = None,
                 sampling: dict | None = None, model_name: str | None = None, chat: bool | None = None,
                 seed: int = 0, max_resample: int = 3):
        if not isinstance(prompts, list):
            prompts = load_prompts(prompts)
        out_path = Path(out_path)
        if out_path.parent and not out_path.parent.exists():
            raise LMStackError(f"the folder of the votes file does not exist: {out_path.parent}")
        self.sampling = check_sampling(sampling)
        self.model_name = model_name or str(getattr(lm, "path", None) or "model")
        self.lm, self.tokenizer = lm, lm.tokenizer
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not self.has_template:
            raise LMStackError("chat=True (--chat) needs a model with a chat template; this one has none")
        self.annotator, self.chat, self.seed, self.max_resample = annotator, chat, seed, max_resample
        self.out_path = out_path
        self.by_id = {p["id"]: p for p in prompts}
        self.order = [p["id"] for p in prompts]
        self.votes = VoteLog(out_path)
        self.voted = self.votes.ids()
        self.skipped: set = set()
        self.session_votes = 0
        self.cache: dict[str, dict] = {}     # prompt id -> the pair shown (so a reload shows the same pair)
        self.model_lock = threading.Lock()  # one generation at a time (the model and its KV cache aren't thread-safe)
        self.file_lock = threading.Lock()   # one append at a time, and the voted set changes with the file

    # ------------------------------------------------------------------------------------------------ progress
    def progress(self) -> dict:
        done = sum(1 for i in self.order if i in self.voted)
        return {"total": len(self.order), "done": done, "remaining": len(self.order) - done,
                "skipped": len(self.skipped - self.voted), "session_votes": self.session_votes}

    def next_id(self) -> str | None:
        """The first prompt neither voted nor skipped (None: all done)."""
        for i in self.order:
            if i not in self.voted and i not in self.skipped:
                return i
        return None

    def config(self) -> dict:
        return {"model": self.model_name, "annotator": self.annotator, "sampling": self.sampling,
                "out": str(self.out_path), "progress": self.progress()}

    def skip(self, pid) -> None:
        if not isinstance(pid, str) or pid not in self.by_id:
            raise FeedbackError(404, f"unknown prompt id {pid!r}")
        self.skipped.add(pid)

    def unskip(self) -> None:
        self.skipped.clear()

    # -------------------------------------------------------------------------------------------------- pairs
    def render(self, p: dict) -> tuple[str, list | None]:
        """(the text the model continues, the chat messages when it is a chat turn else None)."""
        if "messages" in p:
            if self.has_template and self.chat is not False:
                return self.lm.chat_prompt(p["messages"]), p["messages"]
            return "\n".join(m["content"] for m in p["messages"]) + "\n", None
        if self.chat and self.has_template:
            msgs = [{"role": "user", "content": p["prompt"]}]
            return self.lm.chat_prompt(msgs), msgs
        return p["prompt"], None

    def complete(self, text: str, stop_ids, seed: int) -> str:
        return "".join(self.lm.stream(text, truncate="left", stop_ids=stop_ids, seed=seed, **self.sampling))

    def sample_two(self, pid: str, text: str, stop_ids) -> tuple[str, str, int, int]:
        """Completions A and B of `text` and their seeds; an identical pair is resampled up to max_resample times."""
        tries = 1 if self.sampling.get("temperature") == 0 else self.max_resample + 1  # greedy: seeds change nothing
        for attempt in range(tries):
            sa, sb = pair_seeds(pid, self.seed, attempt)
            a = self.complete(text, stop_ids, sa)
            b = self.complete(text, stop_ids, sb)
            if a != b:
                break
        return a, b, sa, sb

    def sample_pair(self, pid: str) -> dict:
        """The pair shown for prompt `pid` (sampled at its first showing, then the cached one). Blocking."""
        with self.model_lock:
            if pid in self.cache:
                return self.cache[pid]
            p = self.by_id[pid]
            text, msgs = self.render(p)
            stop_ids = self.tokenizer.end_of_turn_ids if msgs is not None else None
            a, b, sa, sb = self.sample_two(pid, text, stop_ids)
            pair = {"id": pid, "prompt": text, "chat": msgs is not None, "completion_a": a, "completion_b": b,
                    "seed_a": sa, "seed_b": sb}
            if msgs is not None or "messages" in p:
                pair["messages"] = msgs or p["messages"]
            self.cache[pid] = pair
            return pair

    # -------------------------------------------------------------------------------------------------- votes
    def shown_pair(self, pid: str) -> dict:
        """The pair the page was shown for `pid` (404 for an unknown id, 409 before it was shown)."""
        if pid not in self.by_id:
            raise FeedbackError(404, f"unknown prompt id {pid!r}")
        pair = self.cache.get(pid)
        if pair is None:
            raise FeedbackError(409, f"prompt {pid} has not been shown yet; GET /api/next first")
        return pair

    def vote_record(self, pair: dict, vote: Vote) -> dict:
        """The line a vote writes to the votes file (the fields of the module docstring of feedback.py)."""
        rec = {"id": vote.id, "prompt": pair["prompt"], "chat": pair["chat"]}
        if "messages" in pair:
            rec["messages"] = pair["messages"]
        rec.update(completion_a=pair["completion_a"], completion_b=pair["completion_b"], choice=vote.choice,
                   chosen=None, rejected=None, edited=False)
        if vote.choice in ("a", "b"):
            win, lose = ("completion_a", "completion_b") if vote.choice == "a" else ("completion_b", "completion_a")
            rec["chosen"], rec["rejected"] = pair[win], pair[lose]
            if vote.edited_text is not None and vote.edited_text != pair[win]:
                rec.update(chosen=vote.edited_text, edited=True, original_chosen=pair[win])
        rec.update(annotator=vote.annotator, timestamp=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   sampling={**self.sampling, "seed_a": pair["seed_a"], "seed_b": pair["seed_b"]},
                   model=self.model_name)
        return rec

    def save_vote(self, rec: dict) -> bool:
        """Append `rec` to the votes file, fsync'ed before this returns; False when its prompt already has a vote.
        Blocking; raises OSError when the write fails."""
        with self.file_lock:
            if rec["id"] in self.voted:
                return False
            self.votes.append(rec)  # fsync'ed before the page hears "saved"
            self.voted.add(rec["id"])
            self.session_votes += 1
            return True

    def close(self) -> None:
        self.votes.close()
