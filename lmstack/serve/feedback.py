"""Human feedback (`lmstack feedback`): a local web page that shows a prompt with two sampled completions; the
person picks the better one (or tie / both bad), may edit the better one, and every vote is appended to a JSONL
file and fsync'ed before the page hears "saved", so a crash loses nothing. `export_preferences` turns the votes
into the standard prompt/chosen/rejected JSONL that preference training (reward model, DPO) reads.

    app = create_feedback_app(lmstack.load("ckpt"), load_prompts("prompts.jsonl"), "votes.jsonl")
    feedback_server(FeedbackConfig(model="ckpt", prompts="prompts.txt", out="votes.jsonl")).serve()  # the CLI's run

Routes: GET / (the page, static/feedback.html), GET /api/next (the next unjudged prompt with completions A and B),
POST /api/vote, POST /api/skip, GET /api/progress.

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
settings plus seed_a / seed_b), model.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LMStackError
from ..generate.sampling import SamplingParams
from .feedback_store import VoteLog, export_preferences, load_prompts

__all__ = ["create_feedback_app", "FeedbackConfig", "FeedbackServer", "feedback_server", "load_prompts",
           "export_preferences"]

STATIC_DIR = Path(__file__).parent / "static"
CHOICES = ("a", "b", "tie", "both_bad")
DEFAULT_SAMPLING = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95}
MAX_TEXT = 200_000  # characters of an edited completion
MAX_NAME = 200      # characters of an annotator name


# ---------------------------------------------------------------------------------------------------------- app
def _seeds(pid: str, base: int, attempt: int) -> tuple[int, int]:
    h = int(hashlib.sha256(f"{base}:{pid}".encode()).hexdigest()[:8], 16)
    return h + 2 * attempt, h + 2 * attempt + 1


def create_feedback_app(lm, prompts: list[dict] | str | Path, out_path: str | Path, annotator: str | None = None,
                        sampling: dict | None = None, model_name: str | None = None, chat: bool | None = None,
                        seed: int = 0, max_resample: int = 3):
    """The FastAPI app of the feedback page. prompts: `load_prompts` output or a prompts file. out_path: the votes
    JSONL (appended to; prompts it already has votes for are skipped). annotator: default name when the page sends
    none. sampling: SamplingParams fields for both completions (default max_new_tokens=128, temperature=1,
    top_p=0.95); completion A and B differ by seed (derived from `seed` and the prompt id), and a pair that came
    out identical is resampled up to `max_resample` times. chat: None = chat template for "messages" prompts only,
    True = also wrap plain prompts as one user turn, False = never."""

    if not isinstance(prompts, list):
        prompts = load_prompts(prompts)
    out_path = Path(out_path)
    if out_path.parent and not out_path.parent.exists():
        raise LMStackError(f"the folder of the votes file does not exist: {out_path.parent}")
    sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
    sampling.pop("seed", None)
    SamplingParams(**sampling)  # bad settings fail here, with the fix, not on the first request
    model_name = model_name or str(getattr(lm, "path", None) or "model")
    tok = lm.tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise LMStackError("chat=True (--chat) needs a model with a chat template; this one has none")

    by_id = {p["id"]: p for p in prompts}
    order = [p["id"] for p in prompts]
    votes = VoteLog(out_path)
    voted = votes.ids()
    state = {"skipped": set(), "session_votes": 0}
    cache: dict[str, dict] = {}   # prompt id -> the pair shown (so a reload shows the same pair)
    model_lock = threading.Lock()  # one generation at a time (the model and its KV cache are not thread-safe)
    file_lock = threading.Lock()   # one append at a time, and the voted set changes with the file

    def render(p: dict) -> tuple[str, list | None]:
        """(the text the model continues, the chat messages when it is a chat turn else None)."""
        if "messages" in p:
            if has_template and chat is not False:
                return lm.chat_prompt(p["messages"]), p["messages"]
            return "\n".join(m["content"] for m in p["messages"]) + "\n", None
        if chat and has_template:
            msgs = [{"role": "user", "content": p["prompt"]}]
            return lm.chat_prompt(msgs), msgs
        return p["prompt"], None

    def sample_pair(pid: str) -> dict:
        with model_lock:
            if pid in cache:
                return cache[pid]
            p = by_id[pid]
            text, msgs = render(p)
            stop_ids = tok.end_of_turn_ids if msgs is not None else None
            tries = 1 if sampling.get("temperature") == 0 else max_resample + 1  # greedy: seeds change nothing
            for attempt in range(tries):
                sa, sb = _seeds(pid, seed, attempt)
                a = "".join(lm.stream(text, truncate="left", stop_ids=stop_ids, seed=sa, **sampling))
                b = "".join(lm.stream(text, truncate="left", stop_ids=stop_ids, seed=sb, **sampling))
                if a != b:
                    break
            pair = {"id": pid, "prompt": text, "chat": msgs is not None, "completion_a": a, "completion_b": b,
                    "seed_a": sa, "seed_b": sb}
            if msgs is not None or "messages" in p:
                pair["messages"] = msgs or p["messages"]
            cache[pid] = pair
            return pair

    def progress() -> dict:
        done = sum(1 for i in order if i in voted)
        return {"total": len(order), "done": done, "remaining": len(order) - done,
                "skipped": len(state["skipped"] - voted), "session_votes": state["session_votes"]}

    def next_id() -> str | None:
        for i in order:
            if i not in voted and i not in state["skipped"]:
                return i
        return None

    def error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)

    app = FastAPI(title="lmstack feedback", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error(422, "; ".join(msgs) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug must still answer JSON, and say what happened
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "feedback.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/config")
    async def config():
        return {"model": model_name, "annotator": annotator, "sampling": sampling, "out": str(out_path),
                "progress": progress()}

    @app.get("/api/progress")
    async def get_progress():
        return progress()

    @app.get("/api/next")
    async def get_next():
        pid = next_id()
        if pid is None:
            return {"done": True, "progress": progress()}
        try:
            pair = await run_in_threadpool(sample_pair, pid)
        except LMStackError as e:
            return error(422, f"prompt {pid}: {e}")
        return {"done": False, **pair, "sampling": sampling, "model": model_name, "progress": progress()}

    @app.post("/api/skip")
    async def skip(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        pid = body.get("id")
        if not isinstance(pid, str) or pid not in by_id:
            return error(404, f"unknown prompt id {pid!r}")
        state["skipped"].add(pid)
        return {"ok": True, "progress": progress()}

    @app.post("/api/unskip")
    async def unskip():
        state["skipped"].clear()
        return {"ok": True, "progress": progress()}

    async def _json_body(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body must be JSON")
        if not isinstance(body, dict):
            return error(422, "the request body must be a JSON object")
        return body

    @app.post("/api/vote")
    async def vote(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        unknown = set(body) - {"id", "choice", "edited_text", "annotator"}
        if unknown:
            return error(422, f"unknown field(s): {', '.join(sorted(unknown))}")
        pid, choice, edited, who = body.get("id"), body.get("choice"), body.get("edited_text"), body.get("annotator")
        if not isinstance(pid, str) or not pid:
            return error(422, "id: a prompt id (string) is required")
        if choice not in CHOICES:
            return error(422, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if edited is not None and (not isinstance(edited, str) or len(edited) > MAX_TEXT):
            return error(422, f"edited_text must be a string of at most {MAX_TEXT} characters")
        if who is not None and not isinstance(who, str):
            return error(422, "annotator must be a string")
        who = (who or "").strip() or (annotator or "").strip()
        if not who:
            return error(422, "annotator: enter your name (or start the server with --annotator NAME)")
        if len(who) > MAX_NAME:
            return error(422, f"annotator: at most {MAX_NAME} characters")
        if pid not in by_id:
            return error(404, f"unknown prompt id {pid!r}")
        pair = cache.get(pid)
        if pair is None:
            return error(409, f"prompt {pid} has not been shown yet; GET /api/next first")
        if edited is not None and choice not in ("a", "b"):
            return error(422, "edited_text goes with choice 'a' or 'b' (the edited text replaces the chosen one)")

        rec = {"id": pid, "prompt": pair["prompt"], "chat": pair["chat"]}
        if "messages" in pair:
            rec["messages"] = pair["messages"]
        rec.update(completion_a=pair["completion_a"], completion_b=pair["completion_b"], choice=choice,
                   chosen=None, rejected=None, edited=False)
        if choice in ("a", "b"):
            win, lose = ("completion_a", "completion_b") if choice == "a" else ("completion_b", "completion_a")
            rec["chosen"], rec["rejected"] = pair[win], pair[lose]
            if edited is not None and edited != pair[win]:
                rec.update(chosen=edited, edited=True, original_chosen=pair[win])
        rec.update(annotator=who, timestamp=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   sampling={**sampling, "seed_a": pair["seed_a"], "seed_b": pair["seed_b"]}, model=model_name)

        def write() -> bool:
            with file_lock:
                if pid in voted:
                    return False
                votes.append(rec)  # fsync'ed before the page hears "saved"
                voted.add(pid)
                state["session_votes"] += 1
                return True

        try:
            ok = await run_in_threadpool(write)
        except OSError as e:
            return error(507, f"could not write the vote to {out_path}: {e.strerror or e}")
        if not ok:
            return error(409, f"prompt {pid} already has a vote in {out_path}")
        return {"ok": True, "saved": rec, "progress": progress()}

    app.state.feedback = {"out_path": out_path, "progress": progress, "cache": cache, "votes": votes}
    return app


# ------------------------------------------------------------------------------------------------------ serving
@dataclass
class FeedbackConfig:
    """One feedback session (the `lmstack feedback` flags): the model and prompts files, the votes JSONL, where to
    listen, the default annotator (None: the user name), the sampling settings of both completions, the base seed,
    chat=True to send plain prompts as a user turn, and whether to open the page in a browser."""
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


@dataclass
class FeedbackServer:
    """A ready feedback page: `notes()` says where it is (and warns), `serve()` runs it until Ctrl+C."""
    app: Any
    url: str
    config: FeedbackConfig

    def notes(self) -> list[str]:
        cfg, p = self.config, self.app.state.feedback["progress"]()
        out = [f"feedback: {p['done']}/{p['total']} prompts already voted in {cfg.out}; open {self.url}  "
               "(Ctrl+C to stop)"]
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
            self.app.state.feedback["votes"].close()


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
                              chat=True if cfg.chat else None, seed=cfg.seed)
    host = "localhost" if cfg.host in ("127.0.0.1", "0.0.0.0", "::") else cfg.host
    return FeedbackServer(app, f"http://{host}:{cfg.port}/", cfg)
