"""FeedbackState: everything the feedback page's routes share — the LM and its name, the prompts (by id, in
order), the sampling settings of both completions, the votes log and the ids voted in it, the pairs already shown
(so a reload shows the same pair), the prompts skipped this session, and the locks that keep one generation and
one append at a time, and (strategy "active") the `ActiveSession` of feedback_active.py with the candidates
sampled per prompt. Its methods do the work (choose the next prompt, sample a pair, build and save a vote record,
progress); the routes in feedback_routes.py only read requests and shape answers. A bad request raises
`FeedbackError(status, message)`.
"""
from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from ..data.jsonl import read_log
from ..errors import LMStackError
from ..generate.sampling import SamplingParams
from ..train.active import ActiveLearner, Featurizer
from .feedback_active import ActiveSession, order_prompts
from .feedback_store import VoteLog, load_prompts

CHOICES = ("a", "b", "tie", "both_bad")
DEFAULT_SAMPLING = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95}
MAX_TEXT = 200_000  # characters of an edited completion
MAX_NAME = 200      # characters of an annotator name
MAX_CRITIQUE = 4000  # characters of a critique
DEFAULT_TAGS = ("unsafe", "wrong", "off-topic", "unhelpful", "verbose")
SIDES = ("a", "b")


class FeedbackError(Exception):
    """A request the page can't serve: answered as {"error": {"message", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Vote(NamedTuple):
    """One checked vote request: the prompt id, the choice, the edited text (or None), the annotator's name, and the
    optional richer feedback: 1-7 ratings {"a", "b"}, tags {"a": [...], "b": [...]} and a free-text critique."""
    id: str
    choice: str
    edited_text: str | None
    annotator: str
    ratings: dict | None = None
    tags: dict | None = None
    critique: str | None = None


def pair_seeds(pid: str, base: int, attempt: int) -> tuple[int, int]:
    """The seeds of completions A and B of prompt `pid` (fixed by the id, so a restart shows the same pair)."""
    h = int(hashlib.sha256(f"{base}:{pid}".encode()).hexdigest()[:8], 16)
    return h + 2 * attempt, h + 2 * attempt + 1


def candidate_seed(pid: str, base: int, i: int) -> int:
    """The seed of candidate `i` of prompt `pid` (strategy active); candidates 0 and 1 are the pair_seeds pair."""
    return pair_seeds(pid, base, 0)[0] + i


def check_tags(tags) -> tuple[str, ...]:
    """The tag list of the page (--tags): non-empty, unique, short names without commas."""
    tags = tuple(str(t).strip() for t in tags)
    if not tags or any(not t or "," in t or len(t) > 40 for t in tags) or len(set(tags)) != len(tags):
        raise LMStackError(f"tags must be unique, non-empty names of at most 40 characters without commas, "
                           f"got {list(tags)} (e.g. --tags unsafe,wrong,off-topic)")
    return tags


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
                 seed: int = 0, max_resample: int = 3, strategy: str = "sequential", candidates: int = 4,
                 refit_every: int = 10, window: int = 8, tags=DEFAULT_TAGS, learner=None, featurize=None,
                 learner_options: dict | None = None, prefetch: bool = True):
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
        if int(candidates) < 2 or int(window) < 1:
            raise LMStackError(f"candidates (--candidates) must be >= 2 and window (--window) >= 1, got "
                               f"{candidates} and {window}")
        self.strategy, self.n_candidates, self.window = strategy, int(candidates), int(window)
        self.tags = check_tags(tags)
        self.by_id = {p["id"]: p for p in prompts}
        self.order = order_prompts([p["id"] for p in prompts], strategy, seed)
        self.votes = VoteLog(out_path)
        old = read_log(out_path)
        self.voted = {v.get("id") for v in old}
        self.skipped: set = set()
        self.session_votes = 0
        self.current: str | None = None      # the prompt on screen (shown again until it is voted or skipped)
        self.cache: dict[str, dict] = {}     # prompt id -> the pair shown (so a reload shows the same pair)
        self.cands: dict[str, dict] = {}     # prompt id -> its sampled candidates (strategy active)
        self.model_lock = threading.Lock()  # one generation at a time (the model and its KV cache aren't thread-safe)
        self.file_lock = threading.Lock()   # one append at a time, and the voted set changes with the file
        self.active: ActiveSession | None = None
        if strategy == "active":
            if learner is None:
                learner = ActiveLearner(self.locked(featurize or Featurizer(lm)), seed=seed, **(learner_options or {}))
            self.active = ActiveSession(learner, self, refit_every=refit_every, prefetch=prefetch)
            if sum([self.active.feed(v) for v in old]):  # a restart continues with the model of the old votes
                self.active.request_refit()
            self.active.start()

    # ------------------------------------------------------------------------------------------------ progress
    def progress(self) -> dict:
        done = sum(1 for i in self.order if i in self.voted)
        out = {"total": len(self.order), "done": done, "remaining": len(self.order) - done,
               "skipped": len(self.skipped - self.voted), "session_votes": self.session_votes,
               "strategy": self.strategy}
        if self.active is not None:
            out["active"] = self.active.status()
        return out

    def open_ids(self, limit: int | None = None) -> list[str]:
        """The prompts neither voted nor skipped, in the strategy's order (the first `limit` of them)."""
        out = []
        for i in self.order:
            if i not in self.voted and i not in self.skipped:
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def window_ids(self) -> list[str]:
        return self.open_ids(self.window)

    def next_id(self) -> str | None:
        """The prompt to show (None: all done): the one on screen while it is open, else the first open one of the
        order; with strategy active and a fitted reward model, the most informative prompt of the window."""
        cur = self.current
        if cur is not None and cur not in self.voted and cur not in self.skipped:
            return cur
        window = self.open_ids(self.window if self.active is not None else 1)
        if not window:
            return None
        pid = window[0]
        if self.active is not None and self.active.learner.ready:
            best = self.active.choose(window)
            pid = best[0] if best is not None else pid
        self.current = pid
        return pid

    def config(self) -> dict:
        return {"model": self.model_name, "annotator": self.annotator, "sampling": self.sampling,
                "out": str(self.out_path), "strategy": self.strategy, "tags": list(self.tags),
                "max_critique": MAX_CRITIQUE, "progress": self.progress()}

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

    def make_pair(self, pid: str, text: str, msgs: list | None, a: str, b: str, sa: int, sb: int) -> dict:
        pair = {"id": pid, "prompt": text, "chat": msgs is not None, "completion_a": a, "completion_b": b,
                "seed_a": sa, "seed_b": sb}
        if msgs is not None or "messages" in self.by_id[pid]:
            pair["messages"] = msgs or self.by_id[pid]["messages"]
        return pair

    def sample_pair(self, pid: str) -> dict:
        """The pair shown for prompt `pid` (sampled at its first showing, then the cached one). Blocking. With
        strategy active: the most informative pair of the prompt's candidates (`ActiveLearner.rank`)."""
        if self.active is not None:
            return self.active_pair(pid)
        with self.model_lock:
            if pid in self.cache:
                return self.cache[pid]
            text, msgs = self.render(self.by_id[pid])
            stop_ids = self.tokenizer.end_of_turn_ids if msgs is not None else None
            a, b, sa, sb = self.sample_two(pid, text, stop_ids)
            pair = self.make_pair(pid, text, msgs, a, b, sa, sb)
            self.cache[pid] = pair
            return pair

    # --------------------------------------------------------------------------------------- active learning
    def locked(self, featurize, chunk: int = 8):
        """`featurize` run under the model lock (the LM is not shared between two threads at once), `chunk` texts
        at a time, so a refit featurizing many votes lets the page sample in between."""
        def run(prompts: list[str], completions: list[str]):
            parts = []
            for i in range(0, len(prompts), chunk):
                with self.model_lock:
                    parts.append(featurize(prompts[i:i + chunk], completions[i:i + chunk]))
            return torch.cat(parts) if parts else featurize([], [])
        return run

    def sample_candidates(self, pid: str) -> dict:
        """{"prompt", "msgs", "cands": [(seed, text), ...]}: `candidates` completions of `pid` (seeds fixed by the
        id), repeated texts dropped; when fewer than two differ, up to max_resample more are sampled. Call with the
        model lock held."""
        text, msgs = self.render(self.by_id[pid])
        stop_ids = self.tokenizer.end_of_turn_ids if msgs is not None else None
        n = self.n_candidates
        extra = 0 if self.sampling.get("temperature") == 0 else self.max_resample
        cands: dict[str, int] = {}
        for i in range(n + extra):
            if i >= n and len(cands) >= 2:
                break
            seed = candidate_seed(pid, self.seed, i)
            cands.setdefault(self.complete(text, stop_ids, seed), seed)
        return {"prompt": text, "msgs": msgs, "cands": [(s, t) for t, s in cands.items()]}

    def candidates(self, pid: str) -> tuple[str, list[str]]:
        """(prompt text, candidate completions) of `pid`, sampled at the first call. Blocking."""
        with self.model_lock:
            c = self.cands.get(pid)
            if c is None:
                c = self.cands[pid] = self.sample_candidates(pid)
        return c["prompt"], [t for _, t in c["cands"]]

    def cached_candidates(self, pid: str) -> tuple[str, list[str]] | None:
        c = self.cands.get(pid)
        return None if c is None else (c["prompt"], [t for _, t in c["cands"]])

    def active_pair(self, pid: str) -> dict:
        with self.model_lock:
            if pid in self.cache:
                return self.cache[pid]
        text, texts = self.candidates(pid)
        info, i, j = self.active.learner.rank(text, texts) if len(texts) >= 2 else (0.0, 0, 0)
        c = self.cands[pid]
        (sa, a), (sb, b) = c["cands"][i], c["cands"][j]
        pair = self.make_pair(pid, text, c["msgs"], a, b, sa, sb)
        pair.update(information=float(info), candidates=len(texts))
        with self.model_lock:
            pair = self.cache.setdefault(pid, pair)
        self.active.prefetch()
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
        for key in ("ratings", "tags", "critique"):
            if getattr(vote, key):
                rec[key] = getattr(vote, key)
        rec.update(annotator=vote.annotator, timestamp=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   sampling={**self.sampling, "seed_a": pair["seed_a"], "seed_b": pair["seed_b"]},
                   model=self.model_name, strategy=self.strategy)
        if "information" in pair:
            rec.update(information=pair["information"], candidates=pair["candidates"])
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
        if self.active is not None:
            self.active.feed(rec)   # queued for the refit worker: the learner's lock is not taken here
            self.active.prefetch()
        return True

    def close(self) -> None:
        if self.active is not None:
            self.active.close()
        self.votes.close()
