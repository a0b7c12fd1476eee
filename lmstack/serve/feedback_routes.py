"""The feedback page's routes: plain async functions of (state, request) over a `FeedbackState`, registered on the
app by `register`, plus the request checks they use and the error handlers (every error is JSON:
{"error": {"message", "code"}})."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LMStackError
from .feedback_state import (CHOICES, DEFAULT_TAGS, MAX_CRITIQUE, MAX_NAME, MAX_TEXT, SIDES, FeedbackError,
                             FeedbackState, Vote)

STATIC_DIR = Path(__file__).parent / "static"  # feedback.html is served at /
VOTE_FIELDS = {"id", "choice", "edited_text", "annotator", "ratings", "tags", "critique"}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


# ------------------------------------------------------------------------------------------------------- checks
async def read_object(request: Request) -> dict:
    """The request's JSON object body (400 when it is not JSON, 422 when it is not an object)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FeedbackError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise FeedbackError(422, "the request body must be a JSON object")
    return body


def vote_annotator(who, default: str | None) -> str:
    """The annotator of a vote: the request's name, else the server's default (422 when neither, or too long)."""
    if who is not None and not isinstance(who, str):
        raise FeedbackError(422, "annotator must be a string")
    who = (who or "").strip() or (default or "").strip()
    if not who:
        raise FeedbackError(422, "annotator: enter your name (or start the server with --annotator NAME)")
    if len(who) > MAX_NAME:
        raise FeedbackError(422, f"annotator: at most {MAX_NAME} characters")
    return who


def per_side(value, field: str, shape: str) -> dict:
    """The {"a": ..., "b": ...} object of a ratings/tags field (422 naming the field when it is not one)."""
    if not isinstance(value, dict):
        raise FeedbackError(422, f"{field} must be an object {shape}, got {type(value).__name__}")
    for side in value:
        if side not in SIDES:
            raise FeedbackError(422, f"{field}: unknown side {side!r}; use \"a\" or \"b\"")
    return value


def check_ratings(value) -> dict | None:
    """The 1-7 ratings of completions A and B (either may be left out); 400 naming the field when bad."""
    if value is None:
        return None
    value = per_side(value, "ratings", '{"a": 1-7, "b": 1-7}')
    for side, r in value.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 7:
            raise FeedbackError(422, f"ratings.{side} must be a whole number from 1 to 7, got {r!r}")
    return {s: value[s] for s in SIDES if s in value} or None


def check_vote_tags(value, allowed=DEFAULT_TAGS) -> dict | None:
    """The tags of completions A and B, each a list of distinct names from the page's tag list (--tags)."""
    if value is None:
        return None
    value = per_side(value, "tags", '{"a": [tag, ...], "b": [tag, ...]}')
    out = {}
    for side in SIDES:
        tags = value.get(side) or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise FeedbackError(422, f"tags.{side} must be a list of tag names")
        for t in tags:
            if t not in allowed:
                raise FeedbackError(422, f"tags.{side}: unknown tag {t!r}; the tags are {', '.join(allowed)}")
        if len(set(tags)) != len(tags):
            raise FeedbackError(422, f"tags.{side}: a tag is given twice")
        if tags:
            out[side] = tags
    return out or None


def check_critique(value) -> str | None:
    """The free-text critique (at most MAX_CRITIQUE characters; blank = none)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FeedbackError(422, f"critique must be a string, got {type(value).__name__}")
    if len(value) > MAX_CRITIQUE:
        raise FeedbackError(422, f"critique: at most {MAX_CRITIQUE} characters, got {len(value)}; shorten it")
    return value.strip() or None


def parse_vote(body: dict, default_annotator: str | None, tags=DEFAULT_TAGS) -> Vote:
    """The fields of a POST /api/vote body, checked (422 with what is wrong in id/choice/edited_text/annotator, 400
    naming the field for bad ratings, tags or critique); the prompt id is not looked up."""
    unknown = set(body) - VOTE_FIELDS
    if unknown:
        raise FeedbackError(422, f"unknown field(s): {', '.join(sorted(unknown))}")
    pid, choice, edited = body.get("id"), body.get("choice"), body.get("edited_text")
    if not isinstance(pid, str) or not pid:
        raise FeedbackError(422, "id: a prompt id (string) is required")
    if choice not in CHOICES:
        raise FeedbackError(422, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if edited is not None and (not isinstance(edited, str) or len(edited) > MAX_TEXT):
        raise FeedbackError(422, f"edited_text must be a string of at most {MAX_TEXT} characters")
    return Vote(pid, choice, edited, vote_annotator(body.get("annotator"), default_annotator),
                check_ratings(body.get("ratings")), check_vote_tags(body.get("tags"), tags),
                check_critique(body.get("critique")))


def check_edit(vote: Vote) -> None:
    if vote.edited_text is not None and vote.choice not in ("a", "b"):
        raise FeedbackError(422, "edited_text goes with choice 'a' or 'b' (the edited text replaces the chosen one)")


# ------------------------------------------------------------------------------------------------------- routes
async def page(state: FeedbackState, request: Request):
    return FileResponse(STATIC_DIR / "feedback.html", media_type="text/html")


async def config(state: FeedbackState, request: Request):
    return state.config()


async def progress(state: FeedbackState, request: Request):
    return state.progress()


async def next_pair(state: FeedbackState, request: Request):
    """The next unjudged prompt with completions A and B (chosen and sampled on a worker thread), or
    {"done": true}."""
    pid = await run_in_threadpool(state.next_id)
    if pid is None:
        return {"done": True, "progress": state.progress()}
    try:
        pair = await run_in_threadpool(state.sample_pair, pid)
    except LMStackError as e:
        raise FeedbackError(422, f"prompt {pid}: {e}") from None
    return {"done": False, **pair, "sampling": state.sampling, "model": state.model_name,
            "progress": state.progress()}


async def skip(state: FeedbackState, request: Request):
    body = await read_object(request)
    state.skip(body.get("id"))
    return {"ok": True, "progress": state.progress()}


async def unskip(state: FeedbackState, request: Request):
    state.unskip()
    return {"ok": True, "progress": state.progress()}


async def vote(state: FeedbackState, request: Request):
    """Check the vote, build its record and append it (fsync'ed) before answering "saved"."""
    v = parse_vote(await read_object(request), state.annotator, state.tags)
    pair = state.shown_pair(v.id)
    check_edit(v)
    rec = state.vote_record(pair, v)
    try:
        ok = await run_in_threadpool(state.save_vote, rec)
    except OSError as e:
        raise FeedbackError(507, f"could not write the vote to {state.out_path}: {e.strerror or e}") from None
    if not ok:
        raise FeedbackError(409, f"prompt {v.id} already has a vote in {state.out_path}")
    return {"ok": True, "saved": rec, "progress": state.progress()}


ROUTES: list[tuple[str, str, Callable[[FeedbackState, Request], Awaitable]]] = [
    ("GET", "/", page),
    ("GET", "/api/config", config),
    ("GET", "/api/progress", progress),
    ("GET", "/api/next", next_pair),
    ("POST", "/api/skip", skip),
    ("POST", "/api/unskip", unskip),
    ("POST", "/api/vote", vote),
]


# ----------------------------------------------------------------------------------------------- registration
async def on_feedback_error(request: Request, exc: FeedbackError):
    return error(exc.status, exc.message)


async def on_invalid(request: Request, exc: RequestValidationError):
    msgs = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return error(422, "; ".join(msgs) or "invalid request")


async def on_http(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail))


async def on_crash(request: Request, exc: Exception):  # a bug must still answer JSON, and say what happened
    return error(500, f"internal error: {type(exc).__name__}: {exc}")


def _bind(state: FeedbackState, route: Callable[[FeedbackState, Request], Awaitable]):
    async def endpoint(request: Request):
        return await route(state, request)
    endpoint.__name__ = route.__name__
    return endpoint


def register(app: FastAPI, state: FeedbackState) -> None:
    """Add the error handlers, every route and the /static files to `app`, over `state`."""
    app.add_exception_handler(FeedbackError, on_feedback_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
    for method, path, route in ROUTES:
        app.add_api_route(path, _bind(state, route), methods=[method], include_in_schema=path != "/")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
