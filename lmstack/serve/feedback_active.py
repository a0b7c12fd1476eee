"""Which prompt the feedback page shows next (`--strategy active|random|sequential`), and the active-learning
session behind "active": an `lmstack.train.active.ActiveLearner` (a reward-model ensemble over frozen LM features),
the worker thread that refits it every `refit_every` decisive votes, and the thread that samples the candidates of
the next prompts ahead of time.

* sequential: the prompts in file order.
* random: a seeded permutation of the file order (`random.Random(seed).shuffle`), the same after a restart.
* active: the random order until the reward model is ready (enough votes for a first fit); then, among the next
  `window` open prompts of that order whose candidates are sampled and featurized (by the prefetch thread), the
  one whose most informative pair (`ActiveLearner.rank` over its `candidates` completions) has the highest
  expected information; when none is yet, the next prompt of the order.

Nothing here blocks a request for long: /api/vote only queues the vote (`ActiveSession.feed`); the worker feeds
the queued votes to the learner and fits it. /api/next calls `rank` only over candidates whose features are
cached (the learner's lock is held briefly), plus at most one prompt's candidates when none is ready. A failed
refit is logged and shown in the progress (`refit_error`); the page keeps working with the previous model.
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Protocol

from ..errors import LMStackError

STRATEGIES = ("active", "random", "sequential")
log = logging.getLogger("lmstack.feedback")


def order_prompts(ids: list[str], strategy: str, seed: int = 0) -> list[str]:
    """The order the page goes through the prompt ids: file order (sequential) or a seeded permutation."""
    if strategy not in STRATEGIES:
        raise LMStackError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    ids = list(ids)
    if strategy != "sequential":
        random.Random(seed).shuffle(ids)
    return ids


class CandidateSource(Protocol):
    """What the session needs from the page's state (FeedbackState implements it)."""

    def window_ids(self) -> list[str]: ...  # the next open prompts of the order (at most `window`)

    def candidates(self, pid: str) -> tuple[str, list[str]]: ...  # (prompt text, unique completions), sampled once

    def cached_candidates(self, pid: str) -> tuple[str, list[str]] | None: ...  # the same, None if not sampled yet


class ActiveSession:
    """The learner of one feedback page, its refit worker and its candidate prefetcher (daemon threads, started by
    `start`, stopped by `close`). Thread-safe: one lock guards the queue and the counters."""

    def __init__(self, learner, source: CandidateSource, refit_every: int = 10, prefetch: bool = True):
        if int(refit_every) < 1:
            raise LMStackError(f"refit_every (--refit-every) must be >= 1, got {refit_every}")
        self.learner, self.source, self.refit_every, self.use_prefetch = learner, source, int(refit_every), prefetch
        self.lock = threading.Condition()
        self.pending: list[tuple] = []   # ("vote", prompt, chosen, rejected) | ("rating", prompt, completion, r)
        self.decisive = 0                # decisive (a/b) votes seen, old ones included
        self.fed = 0                     # decisive votes handed to the learner
        self.refit_votes = 0             # decisive votes at the last finished refit
        self.refits = 0
        self.fitting = self.wanted = False
        self.error: str | None = None
        self.stopping = threading.Event()
        self.refit_wake, self.prefetch_wake = threading.Event(), threading.Event()
        self.threads: list[threading.Thread] = []
        self.warm: set[str] = set()      # prompts whose candidates are sampled and featurized (`warm_window`)

    # ------------------------------------------------------------------------------------------------- votes in
    def feed(self, rec: dict) -> bool:
        """Queue the signal of a saved vote record (its a/b preference, its 1-7 ratings) and wake the worker when
        `refit_every` decisive votes came since the last refit. Cheap: never touches the learner. True when the
        vote was decisive."""
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            return False
        items = []
        decisive = (rec.get("choice") in ("a", "b") and isinstance(rec.get("chosen"), str)
                    and isinstance(rec.get("rejected"), str))
        if decisive:
            items.append(("vote", prompt, rec["chosen"], rec["rejected"]))
        ratings = rec.get("ratings") if isinstance(rec.get("ratings"), dict) else {}
        for side in ("a", "b"):
            r, text = ratings.get(side), rec.get(f"completion_{side}")
            if isinstance(r, (int, float)) and not isinstance(r, bool) and 1 <= r <= 7 and isinstance(text, str):
                items.append(("rating", prompt, text, float(r)))
        with self.lock:
            self.pending += items
            self.decisive += decisive
            if self.decisive - self.refit_votes >= self.refit_every:
                self._want()
        return decisive

    def request_refit(self) -> None:
        """Refit now (at startup, after the old votes were fed), whatever the count."""
        with self.lock:
            self._want()

    def _want(self) -> None:  # holds self.lock
        self.wanted = True
        self.refit_wake.set()

    # ----------------------------------------------------------------------------------------------- the worker
    def _refit_once(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
            self.wanted, self.fitting = False, True
        fed = 0
        try:
            for kind, prompt, text, other in batch:
                if kind == "vote":
                    self.learner.add_vote(prompt, text, other)
                    fed += 1
                else:
                    self.learner.add_rating(prompt, text, other)
            self.learner.fit()
            error = None
        except Exception as e:  # a refit must never take the page down: log it, show it, keep the old model
            log.exception("feedback: the reward-model refit failed")
            error = f"{type(e).__name__}: {e}"
        with self.lock:
            self.fed += fed
            self.refit_votes = self.fed
            self.refits += 1
            self.error, self.fitting = error, False
            if self.decisive - self.refit_votes >= self.refit_every:
                self._want()
            self.lock.notify_all()
        self.prefetch()  # the new model ranks the window again (and warms its features)

    def _refit_loop(self) -> None:
        while True:
            self.refit_wake.wait()
            self.refit_wake.clear()
            if self.stopping.is_set():
                return
            if self.wanted:
                self._refit_once()

    def warm_window(self) -> None:
        """Sample the candidates of the window's prompts and, once the model is ready, rank them (which computes
        and caches their features): the prompts `choose` compares. What the prefetch thread runs."""
        for pid in self.source.window_ids():
            if self.stopping.is_set():
                return
            try:
                text, cands = self.source.candidates(pid)
                if self.learner.ready:
                    self.learner.rank(text, cands)
                    with self.lock:
                        self.warm.add(pid)
            except Exception:  # the request path samples again and reports the error itself
                log.exception("feedback: sampling candidates ahead failed for prompt %s", pid)

    def _prefetch_loop(self) -> None:
        while not self.stopping.is_set():
            self.prefetch_wake.wait()
            self.prefetch_wake.clear()
            if not self.stopping.is_set():
                self.warm_window()

    def prefetch(self) -> None:
        """Wake the prefetcher: sample (and featurize) the candidates of the next prompts of the window."""
        if self.use_prefetch:
            self.prefetch_wake.set()

    def start(self) -> None:
        loops = [self._refit_loop] + ([self._prefetch_loop] if self.use_prefetch else [])
        for fn in loops:
            th = threading.Thread(target=fn, name=f"feedback-{fn.__name__.strip('_')}", daemon=True)
            th.start()
            self.threads.append(th)
        self.prefetch()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no refit is due or running (True), or `timeout` seconds passed (False)."""
        with self.lock:
            return self.lock.wait_for(lambda: not self.wanted and not self.fitting, timeout=timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.refit_wake.set()
        self.prefetch_wake.set()
        for th in self.threads:
            th.join(timeout=timeout)

    # ------------------------------------------------------------------------------------------------ choosing
    def choose(self, window: list[str]) -> tuple[str, float, int, int] | None:
        """(prompt id, information, i, j) of the prompt in `window` whose best candidate pair is the most
        informative (the first one on ties), among the warm ones (candidates sampled and featurized ahead, so this
        only does arithmetic); None when none of them is warm yet."""
        best = None
        for pid in window:
            got = self.source.cached_candidates(pid) if pid in self.warm else None
            if got is None:
                continue
            info, i, j = self.learner.rank(*got)
            if best is None or info > best[1]:
                best = (pid, info, i, j)
        return best

    def status(self) -> dict:
        """The active-learning part of /api/progress."""
        st = self.learner.status()
        with self.lock:
            return {"votes": self.decisive, "since_refit": self.decisive - self.refit_votes,
                    "refit_every": self.refit_every, "refits": self.refits, "fitting": self.fitting or self.wanted,
                    "ready": bool(st.get("ready")), "agreement": st.get("agreement"),
                    "heldout": st.get("heldout", 0), "fitted_on": st.get("fitted_on", 0), "refit_error": self.error}
