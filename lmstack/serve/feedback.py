"""Human feedback (`lmstack feedback`): a local web page that shows a prompt with two sampled completions; the
person picks the better one (or tie / both bad), may edit the better one, rate each completion 1-7, tag it
(unsafe, wrong, ...) and write a critique, and every vote is appended to a JSONL file and fsync'ed before the page
hears "saved", so a crash loses nothing. `export_votes` turns the votes into the standard prompt/chosen/rejected
JSONL that preference training (reward model, DPO) reads, into ratings (a regression reward model) or into SFT
data from the edited answers.

Which prompt comes next (feedback_active.py): sequential (file order), random (a seeded permutation) or active
(the prompt and the pair of its sampled candidates a reward-model ensemble over frozen LM features is least sure
about; refit in the background every `refit_every` decisive votes; random order until its first fit).

    app = create_feedback_app(lmstack.load("ckpt"), load_prompts("prompts.jsonl"), "votes.jsonl")
    feedback_server(FeedbackConfig(model="ckpt", prompts="prompts.txt", out="votes.jsonl")).serve()  # the CLI's run

Routes: GET / (the page, static/feedback.html), GET /api/next (the next unjudged prompt with completions A and B),
POST /api/vote, POST /api/skip, POST /api/unskip, GET /api/progress, GET /api/config.

The pieces: feedback_state.py (FeedbackState: the LM, prompts, sampling settings, votes log, shown pairs, locks;
sampling a pair, building and saving a vote record), feedback_active.py (strategies, the learner's refit worker),
feedback_routes.py (request checks, the routes, registration), feedback_store.py (prompts file, votes log,
exports). This module builds the app and the `lmstack feedback` server.

Prompts file (`feedback_store.load_prompts`): `.txt` (one prompt per line, blank lines skipped, a literal `\n`
becomes a newline) or `.jsonl` (one object per line with "prompt": str or "messages": [{"role", "content"}, ...], and
an optional "id"). A "messages" prompt is rendered with the model's chat template when it has one; a plain prompt is
sent as it is (or as one user turn with chat=True). Completions come from `LM.stream` (the one ids -> text path).

A prompt's id is its "id" field, else a hash of its content, so a restarted session (same votes file) skips the
prompts already voted and carries on; the two seeds of a prompt are fixed by its id, so it gets the same pair again.

Vote record (one JSON line): id, prompt (the text the model continued), chat (true when that text is the chat
template's rendering of `messages`), messages (chat-style prompts), completion_a, completion_b, choice ("a" | "b" |
"tie" | "both_bad"), chosen, rejected (null unless a/b), edited (true when the annotator's edited text replaced
chosen; the sampled text is then in original_chosen), annotator, timestamp (ISO 8601 UTC), sampling (the decoding
settings plus seed_a / seed_b), model, strategy; when given: ratings ({"a": 1-7, "b": 1-7}), tags ({"a": [...],
"b": [...]}, names from the page's tag list), critique (str); with strategy active: information (of the pair
shown) and candidates (how many distinct completions it was picked from). Old files without these still load.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .feedback_routes import STATIC_DIR, register
from .feedback_active import STRATEGIES
from .feedback_state import (CHOICES, DEFAULT_SAMPLING, DEFAULT_TAGS, MAX_CRITIQUE, MAX_NAME, MAX_TEXT,
                             FeedbackError, FeedbackState)
from .feedback_store import (EXPORT_FORMATS, export_preferences, export_ratings, export_sft, export_votes,
                             load_prompts)

__all__ = ["create_feedback_app", "FeedbackConfig", "FeedbackServer", "feedback_server", "load_prompts",
           "export_preferences", "export_ratings", "export_sft", "export_votes", "EXPORT_FORMATS", "STRATEGIES",
           "FeedbackState", "FeedbackError", "CHOICES", "DEFAULT_SAMPLING", "DEFAULT_TAGS", "MAX_TEXT", "MAX_NAME",
           "MAX_CRITIQUE", "STATIC_DIR"]


# ---------------------------------------------------------------------------------------------------------- app
def create_feedback_app(lm, prompts: list[dict] | str | Path, out_path: str | Path, annotator: str | None = None,
                        sampling: dict | None = None, model_name: str | None = None, chat: bool | None = None,
                        seed: int = 0, max_resample: int = 3, strategy: str = "sequential", candidates: int = 4,
                        refit_every: int = 10, window: int = 8, tags=DEFAULT_TAGS, learner=None, featurize=None,
                        learner_options: dict | None = None, prefetch: bool = True) -> FastAPI:
    """The FastAPI app of the feedback page. prompts: `load_prompts` output or a prompts file. out_path: the votes
    JSONL (appended to; prompts it already has votes for are skipped). annotator: default name when the page sends
    none. sampling: SamplingParams fields for both completions (default max_new_tokens=128, temperature=1,
    top_p=0.95); completion A and B differ by seed (derived from `seed` and the prompt id), and a pair that came
    out identical is resampled up to `max_resample` times. chat: None = chat template for "messages" prompts only,
    True = also wrap plain prompts as one user turn, False = never.

    strategy: "sequential" (the default here; `lmstack feedback` defaults to "active"), "random" or "active".
    Active: `candidates` completions per prompt, the next prompt picked among the next `window` open ones, the
    reward model refit every `refit_every` decisive votes on a worker thread. learner: an ActiveLearner-like
    object (default: `ActiveLearner(featurize, seed=seed, **learner_options)` with featurize defaulting to
    `Featurizer(lm)`, run under the page's model lock); prefetch=False turns off sampling the window ahead (the
    tests use it to make the choice deterministic). tags: the tag names the page offers.

    The app's state is one `FeedbackState` (feedback_state.py), at `app.state.feedback_state`; the routes over it
    are in feedback_routes.py. `app.state.feedback` keeps the older view: out_path, progress(), cache, votes."""
    state = FeedbackState(lm, prompts, out_path, annotator=annotator, sampling=sampling, model_name=model_name,
                          chat=chat, seed=seed, max_resample=max_resample, strategy=strategy, candidates=candidates,
                          refit_every=refit_every, window=window, tags=tags, learner=learner, featurize=featurize,
                          learner_options=learner_options, prefetch=prefetch)
    app = FastAPI(title="lmstack feedback", docs_url=None, redoc_url=None, openapi_url=None)
    register(app, state)
    app.state.feedback_state = state
    app.state.feedback = {"out_path": state.out_path, "progress": state.progress, "cache": state.cache,
                          "votes": state.votes}
    return app


# ------------------------------------------------------------------------------------------------------ serving
@dataclass
class FeedbackConfig:
    """One feedback session (the `lmstack feedback` flags): the model and prompts files, the votes JSONL, where to
    listen, the default annotator (None: the user name), the sampling settings of both completions, the base seed,
    chat=True to send plain prompts as a user turn, whether to open the page in a browser, the strategy (active by
    default here), candidates per prompt, refit period, window of prompts scored per request, and the tags."""
    model: str
    prompts: str | Path
    out: str | Path
    host: str = "127.0.0.1"
    port: int = 8008
    annotator: str | None = None
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    chat: bool = False
    open_browser: bool = True
    strategy: str = "active"
    candidates: int = 4
    refit_every: int = 10
    window: int = 8
    tags: tuple = DEFAULT_TAGS
    active_method: str = "bt"  # ActiveLearner's information measure: bt (measured better) | disagreement


@dataclass
class FeedbackServer:
    """A ready feedback page: `notes()` says where it is (and warns), `serve()` runs it until Ctrl+C."""
    app: Any
    url: str
    config: FeedbackConfig

    def notes(self) -> list[str]:
        cfg, p = self.config, self.app.state.feedback_state.progress()
        out = [f"feedback: {p['done']}/{p['total']} prompts already voted in {cfg.out}; open {self.url}  "
               "(Ctrl+C to stop)"]
        if cfg.strategy == "active":
            out.append(f"feedback: strategy active: {cfg.candidates} candidates per prompt, the reward model is refit "
                       f"every {cfg.refit_every} votes ({p['active']['votes']} so far); random order until its "
                       "first fit")
        if cfg.host not in ("127.0.0.1", "localhost", "::1"):
            out.append("feedback: warning: the page has no login; anyone who can reach this address can vote")
        if cfg.temperature == 0:
            out.append("feedback: warning: --temperature 0 is greedy decoding, so completions A and B will be the "
                       "same")
        return out

    def serve(self) -> None:
        import webbrowser

        import uvicorn
        if self.config.open_browser:
            threading.Timer(1.0, lambda: webbrowser.open(self.url)).start()
        try:
            uvicorn.run(self.app, host=self.config.host, port=self.config.port, log_level="warning")
        finally:
            self.app.state.feedback_state.close()


def feedback_server(cfg: FeedbackConfig) -> FeedbackServer:
    """Load the prompts and the model of `cfg` and build the page (nothing is served until `.serve()`)."""
    import getpass

    import lmstack
    prompts = load_prompts(cfg.prompts)
    lm = lmstack.load(cfg.model)
    try:
        default_name = cfg.annotator or getpass.getuser()
    except Exception:  # no user name in this environment
        default_name = cfg.annotator
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    app = create_feedback_app(lm, prompts, cfg.out, annotator=default_name, sampling=sampling, model_name=cfg.model,
                              chat=True if cfg.chat else None, seed=cfg.seed, strategy=cfg.strategy,
                              candidates=cfg.candidates, refit_every=cfg.refit_every, window=cfg.window, tags=cfg.tags,
                              learner_options={"method": cfg.active_method})
    host = "localhost" if cfg.host in ("127.0.0.1", "0.0.0.0", "::") else cfg.host
    return FeedbackServer(app, f"http://{host}:{cfg.port}/", cfg)
