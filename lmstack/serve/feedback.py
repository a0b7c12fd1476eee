"""Human feedback (`lmstack feedback`): a local web page that shows a prompt with two sampled completions; the
person picks the better one (or tie / both bad), may edit the better one, and every vote is appended to a JSONL
file and fsync'ed before the page hears "saved", so a crash loses nothing. `export_preferences` turns the votes
into the standard prompt/chosen/rejected JSONL that preference training (reward model, DPO) reads.

    app = create_feedback_app(lmstack.load("ckpt"), load_prompts("prompts.jsonl"), "votes.jsonl")

Routes: GET / (the page, static/feedback.html), GET /api/next (the next unjudged prompt with completions A and B),
POST /api/vote, POST /api/skip, GET /api/progress.

Prompts file: `.txt` (one prompt per line, blank lines skipped) or `.jsonl` (one object per line with "prompt": str
or "messages": [{"role", "content"}, ...], and an optional "id"). A "messages" prompt is rendered with the model's
chat template when it has one; a plain prompt is sent as it is (or as one user turn with chat=True).

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
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.jsonl import read_jsonl
from ..errors import LMStackError
from ..generate.sampling import SamplingParams

STATIC_DIR = Path(__file__).parent / "static"
CHOICES = ("a", "b", "tie", "both_bad")
DEFAULT_SAMPLING = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95}
MAX_TEXT = 200_000  # characters of an edited completion
MAX_NAME = 200      # characters of an annotator name


# ------------------------------------------------------------------------------------------------------ prompts
def _prompt_id(item: dict) -> str:
    body = item["messages"] if "messages" in item else item["prompt"]
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def load_prompts(path: str | Path) -> list[dict]:
    """Prompts from a .txt (one per line) or .jsonl ("prompt" or "messages", optional "id") file:
    [{"id", "prompt"} | {"id", "messages"}]. Repeated prompts (same id) are kept once."""
    path = Path(path)
    if not path.is_file():
        raise LMStackError(f"prompts file not found: {path} (give a .txt with one prompt per line or a .jsonl)")
    items: list[dict] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json"):
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
            item["id"] = str(obj["id"]) if obj.get("id") is not None else _prompt_id(item)
            items.append(item)
    else:
        for line in text.splitlines():
            if line.strip():
                item = {"prompt": line}
                item["id"] = _prompt_id(item)
                items.append(item)
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
def read_votes(path: str | Path) -> list[dict]:
    """The vote records in a votes file. A torn last line (a crash in the middle of a write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and fsync it (and, for a new file, its directory) before returning. A file whose last
    line was torn by a crash gets a newline first, so the new record always starts on its own line."""
    path = Path(path)
    new = not path.exists()
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    if new and hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_preferences(votes_path: str | Path, out_path: str | Path, include_edited: bool = True) -> dict:
    """Write the standard preference JSONL ({"prompt", "chosen", "rejected"} per line) from a votes file; a chat
    prompt is written as its messages (lmstack.data.prefs renders them with the chat template and ends the
    completions with the end-of-turn token), a plain prompt as its text. Ties and
    both-bad votes carry no preference and are skipped; when a prompt was voted more than once the last vote wins
    per annotator. include_edited=False drops pairs whose chosen text the annotator edited. Written atomically.
    Returns counts: {"votes", "written", "tie", "both_bad", "edited", "skipped_edited", "duplicates"}."""
    votes_path, out_path = Path(votes_path), Path(out_path)
    if not votes_path.is_file():
        raise LMStackError(f"votes file not found: {votes_path}")
    if out_path.resolve() == votes_path.resolve():
        raise LMStackError(f"the export would overwrite the votes file {votes_path}; pick another output name")
    votes = read_votes(votes_path)
    last: dict[tuple, dict] = {}
    for v in votes:
        last[(v.get("id"), v.get("annotator"))] = v
    counts = {"votes": len(votes), "written": 0, "tie": 0, "both_bad": 0, "edited": 0, "skipped_edited": 0,
              "duplicates": len(votes) - len(last)}
    rows = []
    for v in last.values():
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
        prompt = v["messages"] if v.get("chat") and isinstance(v.get("messages"), list) else v["prompt"]
        rows.append({"prompt": prompt, "chosen": v["chosen"], "rejected": v["rejected"]})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    counts["written"] = len(rows)
    return counts


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
    voted = {v.get("id") for v in read_votes(out_path)}
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
                append_jsonl(out_path, rec)
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

    app.state.feedback = {"out_path": out_path, "progress": progress, "cache": cache}
    return app


# ------------------------------------------------------------------------------------------------------ the CLI
def cmd_feedback(a) -> None:
    """`lmstack feedback`: serve the page (and open it in a browser), or `--export OUT` the votes in --out."""
    if a.export:
        counts = export_preferences(a.out, a.export, include_edited=not a.no_edited)
        print(f"wrote {counts['written']} prompt/chosen/rejected pairs -> {a.export} "
              f"(from {counts['votes']} votes: skipped {counts['tie']} tie, {counts['both_bad']} both bad, "
              f"{counts['duplicates']} superseded, {counts['skipped_edited']} edited; {counts['edited']} edited kept)")
        return
    if not a.model or not a.prompts:
        raise LMStackError("lmstack feedback needs --model and --prompts (or --export OUT to export the votes)")
    import getpass
    import webbrowser

    import uvicorn

    import lmstack
    prompts = load_prompts(a.prompts)
    lm = lmstack.load(a.model)
    try:
        default_name = a.annotator or getpass.getuser()
    except Exception:  # no user name in this environment
        default_name = a.annotator
    sampling = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p}
    app = create_feedback_app(lm, prompts, a.out, annotator=default_name, sampling=sampling, model_name=a.model,
                              chat=True if a.chat else None, seed=a.seed)
    p = app.state.feedback["progress"]()
    host = "localhost" if a.host in ("127.0.0.1", "0.0.0.0", "::") else a.host
    url = f"http://{host}:{a.port}/"
    print(f"feedback: {p['done']}/{p['total']} prompts already voted in {a.out}; open {url}  (Ctrl+C to stop)")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print("feedback: warning: the page has no login; anyone who can reach this address can vote")
    if a.temperature == 0:
        print("feedback: warning: --temperature 0 is greedy decoding, so completions A and B will be the same")
    if not a.no_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
