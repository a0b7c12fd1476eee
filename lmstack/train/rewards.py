"""Verifiable rewards for GRPO: functions of (prompt, completion, record) -> float that a program checks.

A record is one line of the prompts file ({"prompt": ..., "answer": ..., more fields}). Specs (`--reward`):

    exact-match            1.0 when the completion's final answer equals record["answer"], else 0.0.
                           The final answer: the number after the last GSM8K-style `#### ` marker; without a
                           marker, the LAST number in the completion (so "... = 42." counts). Numbers are
                           compared as numbers after dropping thousands commas, a leading "$", and a
                           trailing "." ("1,000" == "1000" == "1000.0"); a non-numeric answer is compared as
                           stripped text. `strict-match`: the same, but only a `####` answer counts.
    numeric[:TOL]          1.0 when |final answer - answer| <= TOL (default 1e-6); TOL ending in "%" is relative
                           (numeric:1% -> within 1% of the answer).
    regex[:PATTERN]        1.0 when re.search(PATTERN, completion) matches; "{answer}" in PATTERN stands for the
                           record's escaped answer; without PATTERN the record's "regex" field is the pattern.
    python-tests[:SECONDS] the completion's code (the first ```python fenced block, else the whole completion)
                           followed by the record's "tests" (Python source, e.g. asserts) run in a fresh
                           `python -I` subprocess; 1.0 if it exits 0 within SECONDS (default 10), else 0.0.
                           A timeout kills the subprocess's whole process group: a hang scores 0 and never
                           hangs the run.
    python:module:fn       a user function fn(prompt, completion, answer) -> float (the third parameter gets the
    python:file.py:fn      whole record instead when it is named `record`).

Several specs combine as a weighted sum: `exact-match+0.1*regex:####` (split on "+" before a spec name;
WEIGHT*SPEC). `load_rewards(spec)` returns a RewardFn: (prompts, completions, records) -> list[float].
"""
from __future__ import annotations

import inspect
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any, Callable

from ..errors import LMStackError
from .reward import load_reward_fn

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_HASH = re.compile(r"####\s*(" + _NUM + ")")
_ANY = re.compile(_NUM)
BUILTIN = ("exact-match", "strict-match", "numeric", "regex", "python-tests")


# ---- answer extraction ---------------------------------------------------------------------------------------
def normalize_number(s: str) -> str:
    """'$1,000.' -> '1000'; '-3.50' -> '-3.5'; text that is not a number comes back stripped."""
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return s.strip()
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer of a completion: the number after the last `####`; without one (and not `strict`) the last
    number anywhere; None when there is none. Normalised (normalize_number)."""
    hits = _HASH.findall(text)
    if hits:
        return normalize_number(hits[-1])
    if strict:
        return None
    nums = _ANY.findall(text)
    return normalize_number(nums[-1]) if nums else None


def answers_match(pred: str | None, answer: Any) -> bool:
    if pred is None or answer is None:
        return False
    return pred == normalize_number(str(answer))


# ---- the built-in rewards ------------------------------------------------------------------------------------
def exact_match(prompt: str, completion: str, record: dict, strict: bool = False) -> float:
    return float(answers_match(extract_answer(completion, strict), _answer(record)))


def numeric_match(prompt: str, completion: str, record: dict, tol: float = 1e-6, relative: bool = False) -> float:
    pred = extract_answer(completion)
    try:
        x, y = float(pred), float(normalize_number(str(_answer(record))))
    except (TypeError, ValueError):
        return 0.0
    return float(abs(x - y) <= (tol * abs(y) if relative else tol))


def regex_match(prompt: str, completion: str, record: dict, pattern: str | None = None) -> float:
    pat = pattern if pattern is not None else record.get("regex")
    if pat is None:
        raise LMStackError("reward regex: give a pattern (regex:PATTERN) or a 'regex' field in every prompt record")
    if "{answer}" in pat:
        pat = pat.replace("{answer}", re.escape(str(_answer(record))))
    return float(re.search(pat, completion) is not None)


def code_of(completion: str) -> str:
    """The first ```python (or bare ```) fenced block of a completion, else the completion itself."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", completion, re.S)
    return m.group(1) if m else completion


def run_python_tests(code: str, tests: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Run `code` then `tests` in a fresh isolated interpreter (a temp dir as cwd): (passed, why). A timeout kills
    the subprocess's process group, so neither a hang nor a fork bomb outlives it."""
    with tempfile.TemporaryDirectory(prefix="lmstack-tests-") as d:
        path = os.path.join(d, "solution_test.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code + "\n\n" + tests + "\n")
        p = subprocess.Popen([sys.executable, "-I", path], cwd=d, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            return False, f"timeout after {timeout}s"
        finally:
            _kill_group(p)  # whatever it left running in its session
        if p.returncode == 0:
            return True, "passed"
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return False, lines[-1] if lines else f"exit code {p.returncode}"


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def python_tests(prompt: str, completion: str, record: dict, timeout: float = 10.0) -> float:
    tests = record.get("tests")
    if not isinstance(tests, str):
        raise LMStackError("reward python-tests: every prompt record needs a 'tests' field (Python source)")
    return float(run_python_tests(code_of(completion), tests, timeout)[0])


def _answer(record: dict):
    if "answer" not in record:
        raise LMStackError("this reward checks record['answer']: give every prompt record an 'answer' field")
    return record["answer"]


# ---- specs ---------------------------------------------------------------------------------------------------
RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]
PerSample = Callable[[str, str, dict], float]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LMStackError(f"--reward {what}: {text!r} is not a number") from None


def parse_one(spec: str) -> PerSample:
    """One reward spec (no '+' sum) -> a per-sample function (prompt, completion, record) -> float."""
    name, _, arg = spec.partition(":")
    if name == "exact-match" and not arg:
        return exact_match
    if name == "strict-match" and not arg:
        return lambda p, c, r: exact_match(p, c, r, strict=True)
    if name == "numeric":
        rel = arg.endswith("%")
        tol = _number(arg.rstrip("%"), spec) / (100 if rel else 1) if arg else 1e-6
        return lambda p, c, r: numeric_match(p, c, r, tol, rel)
    if name == "regex":
        if arg:
            try:
                re.compile(arg.replace("{answer}", "0"))
            except re.error as e:
                raise LMStackError(f"--reward {spec!r}: bad regular expression ({e})") from None
        return lambda p, c, r: regex_match(p, c, r, arg or None)
    if name == "python-tests":
        t = _number(arg, spec) if arg else 10.0
        if t <= 0:
            raise LMStackError(f"--reward {spec!r}: the timeout must be > 0 seconds")
        return lambda p, c, r: python_tests(p, c, r, t)
    if name == "python":
        return _user_fn(spec)
    raise LMStackError(f"unknown --reward {spec!r}; use one of {', '.join(BUILTIN)} (e.g. numeric:0.01, "
                       "regex:PATTERN, python-tests:10) or python:module:fn / python:file.py:fn")


def _user_fn(spec: str) -> PerSample:
    fn = load_reward_fn(spec)  # the one python:module:function importer (clear errors for a bad module / name)
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    whole = len(params) >= 3 and params[2] == "record"
    if len(params) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()):
        raise LMStackError(f"--reward {spec!r}: the function must take (prompt, completion, answer) or "
                           "(prompt, completion, record)")
    return lambda p, c, r: fn(p, c, r if whole else r.get("answer"))


def split_spec(spec: str) -> list[tuple[float, str]]:
    """'exact-match+0.1*regex:####' -> [(1.0, 'exact-match'), (0.1, 'regex:####')]: split on '+' only where a
    (weighted) spec name follows, so a regex may contain '+'."""
    names = "|".join(re.escape(n) for n in (*BUILTIN, "python:"))
    parts = re.split(rf"\+(?=(?:[0-9.eE-]+\*)?(?:{names}))", spec)
    out = []
    for part in parts:
        m = re.match(r"([0-9.eE-]+)\*(.+)$", part, re.S)
        out.append((_number(m.group(1), spec), m.group(2)) if m else (1.0, part))
    return out


def load_rewards(spec: str | Callable | list) -> RewardFn:
    """A RewardFn (prompts, completions, records) -> list[float] from a spec string (see the module doc), a
    per-sample callable (prompt, completion, record) -> float, or a list of either (summed)."""
    if isinstance(spec, (list, tuple)):
        parts = [(1.0, s) for s in spec]
    elif isinstance(spec, str):
        if not spec.strip():
            raise LMStackError("--reward is empty; use e.g. exact-match")
        parts = split_spec(spec)
    else:
        parts = [(1.0, spec)]
    fns = [(w, s if callable(s) else parse_one(s)) for w, s in parts]

    def reward(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        out = []
        for p, c, r in zip(prompts, completions, records):
            total = 0.0
            for w, f in fns:
                v = float(f(p, c, r))
                if not math.isfinite(v):
                    raise LMStackError(f"the reward returned {v} for completion {c[:60]!r}")
                total += w * v
            out.append(total)
        return out
    return reward
