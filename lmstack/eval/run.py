"""The evaluation runner: tasks -> requests -> metrics -> a results dict, a markdown table and a JSON file.

    from lmstack.eval import evaluate
    res = evaluate("model.gguf", ["mmlu", "truthfulqa_mc2"], data_dir="~/evaldata", shots=5, limit=100)
    print(res["table"])

    from lmstack.eval import EvalConfig, run_eval       # the same run from one config (what `lmstack eval` builds)
    res = run_eval(EvalConfig(model="model.gguf", tasks="mmlu", data_dir="~/evaldata", shots=5, out="res.json"))

Aggregation: per task, the mean of the per-example metric with its sample standard error (stdev / sqrt(n), as
lm-eval). Groups (MMLU): the macro-average over subjects, with stderr sqrt(sum of subject stderr^2) / k (subjects
are independent samples); the micro-average over all questions is reported as `acc_micro`.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..data.jsonl import JsonlLog
from ..errors import LMStackError
from . import metrics as M
from .tasks import Task, resolve_tasks


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from rich.progress import Progress
    except ImportError:  # pragma: no cover
        return None
    p = Progress(transient=True)
    p.start()
    tid = p.add_task(desc, total=total)
    return p, tid


def task_docs(task: Task, shots: int, limit: int | None) -> list:
    """The task's first `limit` examples; a clear error when there are none or too few few-shot examples."""
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise LMStackError(f"task {task.name} has no examples")
    if shots and len(task.shots(docs[0], shots)) < shots:
        raise LMStackError(f"task {task.name} has {len(task.fewshot_docs)} few-shot examples (from {task.source}'s "
                           f"training/dev split), fewer than --shots {shots}")
    return docs


def score_mc_tasks(backend, tasks: list[Task], shots: int, limit: int | None, batch_size: int, bar=None
                   ) -> dict[str, list]:
    """{task name: per example, [(log-likelihood, is_greedy)] per choice} for multiple-choice tasks scored together:
    `batch_size` questions per pass, longest prompt first across all tasks (similar lengths share a batch: little
    padding; a memory problem shows on the first batch). Few-shot with the backend's prefix cache: task by task
    (longest first within a task), so a task's questions follow each other and reuse its cached prefix."""
    reqs, where = [], []
    for ti, task in enumerate(tasks):
        for di, doc in enumerate(task_docs(task, shots, limit)):
            reqs.append((task.context(doc, shots), [task.target_delimiter + c for c in doc.choices]))
            where.append((ti, di))
    by_task = shots > 0 and getattr(backend, "prefix_cache", None) is not None
    order = sorted(range(len(reqs)), key=lambda i: (where[i][0] if by_task else 0, -len(reqs[i][0])))
    out: dict[str, list] = {t.name: [None] * len(task_docs(t, shots, limit)) for t in tasks}
    for s in range(0, len(order), max(1, batch_size)):
        idx = order[s:s + max(1, batch_size)]
        batch = [reqs[i] for i in idx]
        if hasattr(backend, "loglikelihood_batch"):
            res = backend.loglikelihood_batch(batch)
        else:
            res = [backend.loglikelihood_choices(c, x) for c, x in batch]
        for i, r in zip(idx, res):
            ti, di = where[i]
            out[tasks[ti].name][di] = r
        if bar:
            bar[0].advance(bar[1], len(idx))
    return out


def evaluate_task(backend, task: Task, shots: int = 0, limit: int | None = None, batch_size: int = 8,
                  stride: int | None = None, max_length: int | None = None, max_new_tokens: int | None = None,
                  log_samples: bool = False, progress: bool = False, answers: list | None = None) -> dict[str, Any]:
    """Run one task: {'metrics': {name: {'value', 'stderr', 'n'}}, 'samples': [...] (with log_samples)}.
    answers: a multiple-choice task's scored choices, when `score_mc_tasks` scored them already."""
    samples: list[dict] = []
    if task.kind == "ppl":
        from .perplexity import aggregate, corpus_documents, document_stats
        docs = corpus_documents(task.corpus, limit)
        stats = [document_stats(backend, d, stride, max_length) for d in docs]
        agg = aggregate(stats)
        n = agg["documents"]
        mets = {k: {"value": agg[k], "stderr": None, "n": n}
                for k in ("token_perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")}
        return {"metrics": mets, "samples": stats if log_samples else [],
                "totals": {k: agg[k] for k in ("nats", "tokens", "bytes", "words", "documents")}}

    docs = task_docs(task, shots, limit)
    per: dict[str, list[float]] = {}
    bar = _progress(len(docs), task.name, progress and not (answers is not None and task.kind in ("mc", "mc2")))
    try:
        if task.kind in ("mc", "mc2"):
            ctxs = [task.context(doc, shots) for doc in docs]
            if answers is None:
                answers = score_mc_tasks(backend, [task], shots, limit, batch_size, bar=bar)[task.name]
            for i, (doc, ctx, res) in enumerate(zip(docs, ctxs, answers)):
                lls = [r[0] for r in res]
                if task.kind == "mc2":
                    m = {"acc": M.mc2_metric(lls, doc.labels)}
                else:
                    m = M.mc_metrics(lls, doc.choices, doc.gold)
                for k, v in m.items():
                    per.setdefault(k, []).append(v)
                if log_samples:
                    samples.append({"doc": i, "context": ctx, "choices": doc.choices, "gold": doc.gold,
                                    "loglikelihoods": lls, "is_greedy": [r[1] for r in res], **m})
        elif task.kind == "gen":
            prompts = [task.context(doc, shots) for doc in docs]
            outs = []
            for s in range(0, len(prompts), batch_size):
                outs += backend.generate(prompts[s:s + batch_size], task.until,
                                         max_new_tokens or task.max_new_tokens, batch_size=batch_size)
                if bar:
                    bar[0].advance(bar[1], len(prompts[s:s + batch_size]))
            for i, (doc, out) in enumerate(zip(docs, outs)):
                if task.extract == "gsm8k":
                    m = {"exact_match_strict": M.exact_match(M.extract_strict(out), doc.answers),
                         "exact_match_flexible": M.exact_match(M.extract_flexible(out), doc.answers)}
                else:
                    m = {"exact_match": float(any(out.strip() == a.strip() for a in doc.answers))}
                for k, v in m.items():
                    per.setdefault(k, []).append(v)
                if log_samples:
                    samples.append({"doc": i, "prompt": prompts[i], "output": out, "answers": doc.answers, **m})
        else:
            raise LMStackError(f"unknown task kind {task.kind!r}")
    finally:
        if bar:
            bar[0].stop()
    mets = {k: {"value": M.mean(v), "stderr": M.stderr(v), "n": len(v)} for k, v in per.items()}
    return {"metrics": mets, "samples": samples}


class ResumeCache:
    """Wraps a backend and appends every answered request to a `JsonlLog` (one flushed line per request), so an
    interrupted run resumes where it stopped: `evaluate(..., out=F)` keeps `F.partial.jsonl` until the run
    finishes. Keys hash the model name with the full request."""

    def __init__(self, backend, path: Path):
        self.backend, self.path = backend, Path(path)
        self.hits = 0
        self._log = JsonlLog(self.path)  # a line cut by the interruption is dropped on reopening
        self.store: dict[str, Any] = {rec["k"]: rec["v"] for rec in self._log.records() if "k" in rec and "v" in rec}

    def __getattr__(self, name):  # everything else (name, tok, add_special_tokens, ...) from the wrapped backend
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)

    def _key(self, *req) -> str:
        import hashlib
        return hashlib.sha1(json.dumps([str(getattr(self.backend, "name", "")), *req]).encode()).hexdigest()

    def _get(self, key: str, compute):
        if key in self.store:
            self.hits += 1
            return self.store[key]
        v = compute()
        self.store[key] = v
        self._log.append({"k": key, "v": v})
        return v

    def loglikelihood_choices(self, context: str, continuations: list[str]):
        v = self._get(self._key("ll", context, continuations),
                      lambda: [list(r) for r in self.backend.loglikelihood_choices(context, continuations)])
        return [tuple(r) for r in v]

    def loglikelihood_batch(self, requests: list[tuple[str, list[str]]]):
        keys = [self._key("ll", c, x) for c, x in requests]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            reqs = [requests[i] for i in todo]
            res = (self.backend.loglikelihood_batch(reqs) if hasattr(self.backend, "loglikelihood_batch")
                   else [self.backend.loglikelihood_choices(c, x) for c, x in reqs])
            for i, r in zip(todo, res):
                self._get(keys[i], lambda r=r: [list(t) for t in r])
        self.hits += len(requests) - len(todo)
        return [[tuple(t) for t in self.store[k]] for k in keys]

    def generate(self, prompts: list[str], until: list[str], max_new_tokens: int, batch_size: int = 1):
        keys = [self._key("gen", p, until, max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            outs = self.backend.generate([prompts[i] for i in todo], until, max_new_tokens, batch_size)
            for i, o in zip(todo, outs):
                self._get(keys[i], lambda o=o: o)
        self.hits += len(prompts) - len(todo)
        return [self.store[k] for k in keys]

    def token_logprobs_rolling(self, text: str, stride: int | None = None, max_length: int | None = None):
        import torch
        v = self._get(self._key("roll", text, stride, max_length),
                      lambda: self.backend.token_logprobs_rolling(text, stride, max_length).tolist())
        return torch.tensor(v, dtype=torch.float64)

    def close(self, remove: bool = False) -> None:
        self._log.close()
        if remove:
            self.path.unlink(missing_ok=True)


def _group_metrics(results: dict[str, dict], members: list[str]) -> dict[str, dict]:
    out = {}
    names = set.intersection(*(set(results[t]["metrics"]) for t in members))
    for k in sorted(names):
        ms = [results[t]["metrics"][k] for t in members]
        vals = [m["value"] for m in ms]
        ses = [m["stderr"] for m in ms]
        n = sum(m["n"] for m in ms)
        se = (math.sqrt(sum(s * s for s in ses)) / len(ses)
              if all(s is not None and not math.isnan(s) for s in ses) else float("nan"))
        out[k] = {"value": M.mean(vals), "stderr": se, "n": n, "aggregation": f"macro-average of {len(ms)} tasks"}
        micro = sum(m["value"] * m["n"] for m in ms) / n
        out[k + "_micro"] = {"value": micro, "stderr": None, "n": n, "aggregation": "micro-average (per example)"}
    return out


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}"


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value | stderr | n |", "| --- | --- | --- | --- | --- |"]
    rows = [(t, r["metrics"]) for t, r in results["results"].items()]
    rows += [(g, m) for g, m in results.get("groups", {}).items()]
    for task, mets in rows:
        for k, m in mets.items():
            lines.append(f"| {task} | {k} | {_fmt(m['value'])} | {_fmt(m['stderr'])} | {m['n']} |")
    return "\n".join(lines)


def _versions() -> dict:
    import torch
    from importlib.metadata import PackageNotFoundError, version
    try:
        lv = version("lmstack")
    except PackageNotFoundError:  # pragma: no cover
        lv = "unknown"
    return {"lmstack": lv, "torch": torch.__version__, "python": platform.python_version()}


def make_backend(model, base_url: str | None = None, api_key: str | None = None, tokenizer: str | None = None,
                 device: str = "cpu", dtype=None, add_special_tokens: bool = True, max_length: int | None = None,
                 prefix_cache: bool = True):
    """A backend for a local model (path or an `lmstack.LM`) or a remote OpenAI-compatible endpoint; prefix_cache:
    reuse the keys/values of the prompt prefix questions share (local models; see eval/backend.py)."""
    if base_url:
        from .remote import RemoteBackend
        return RemoteBackend(base_url, str(model), api_key=api_key, tokenizer=tokenizer,
                             add_special_tokens=add_special_tokens, max_length=max_length)
    from .backend import LocalBackend
    if isinstance(model, (str, Path)):
        import lmstack
        # float weights (a GGUF dequantized): scores match a float reference and the shared-prefix reuse is exact
        # (the packed decode kernels are not batch-invariant; see lmstack/models/kernels.py)
        lm = lmstack.load(model, device=device, dtype=dtype, packed=False)
    elif hasattr(model, "loglikelihood_choices"):
        return model
    else:
        lm = model
    return LocalBackend(lm, add_special_tokens=add_special_tokens, max_length=max_length, prefix_cache=prefix_cache)


@dataclass
class EvalConfig:
    """One evaluation run: what `lmstack eval` takes, flag for flag. model: a path (checkpoint dir, HF dir, GGUF
    file), an `lmstack.LM`, a backend, or the model name on `base_url`; dtype: a torch dtype for loading a path;
    prefix_cache: compute the keys/values of the prompt prefix the questions share (few-shot examples) once."""
    model: Any
    tasks: str | list[str]
    data_dir: str | None = None
    shots: int = 0
    limit: int | None = None
    batch_size: int = 8
    stride: int | None = None
    max_length: int | None = None
    max_new_tokens: int | None = None
    seed: int = 1234
    base_url: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    dtype: Any = None
    log_samples: bool = False
    progress: bool = False
    out: str | Path | None = None
    prefix_cache: bool = True


def evaluate(model, tasks: str | list[str], data_dir: str | None = None, shots: int = 0, limit: int | None = None,
             batch_size: int = 8, stride: int | None = None, max_length: int | None = None,
             max_new_tokens: int | None = None, seed: int = 1234, base_url: str | None = None,
             api_key: str | None = None, tokenizer: str | None = None, log_samples: bool = False,
             progress: bool = False, out: str | Path | None = None, dtype=None, prefix_cache: bool = True) -> dict:
    """Evaluate `model` (a path, an `lmstack.LM`, or a model name on `base_url`) on `tasks`; returns the results
    dict (also written as JSON to `out`), with a markdown `table`. With `out`, answered requests are appended to
    `<out>.partial.jsonl` as they come, so an interrupted run started again with the same arguments resumes.
    The keyword form of `run_eval(EvalConfig(...))`."""
    return run_eval(EvalConfig(model, tasks, data_dir=data_dir, shots=shots, limit=limit, batch_size=batch_size,
                               stride=stride, max_length=max_length, max_new_tokens=max_new_tokens, seed=seed,
                               base_url=base_url, api_key=api_key, tokenizer=tokenizer, dtype=dtype,
                               log_samples=log_samples, progress=progress, out=out, prefix_cache=prefix_cache))


def run_eval(cfg: EvalConfig) -> dict:
    """Run the evaluation `cfg` describes (see `evaluate`); the results JSON is written atomically to `cfg.out`."""
    import random

    import torch
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task_objs = resolve_tasks(cfg.tasks, cfg.data_dir)
    backend = make_backend(cfg.model, base_url=cfg.base_url, api_key=cfg.api_key, tokenizer=cfg.tokenizer,
                           dtype=cfg.dtype, max_length=cfg.max_length, prefix_cache=cfg.prefix_cache)
    cache = None
    if cfg.out:  # resumable: answered requests are kept next to the output until the run completes
        cache = backend = ResumeCache(backend, Path(str(cfg.out) + ".partial.jsonl"))
    try:
        res = _run(backend, cfg, task_objs)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    if cache is not None:
        res["resumed_requests"] = cache.hits
        cache.close(remove=True)
    if cfg.out:
        write_text(cfg.out, json.dumps(res, indent=2, default=str) + "\n")
    return res


def _run(backend, cfg: EvalConfig, task_objs: list[Task]) -> dict:
    t0 = time.time()
    results: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    samples: dict[str, list] = {}
    shots, limit, stride, max_length, max_new_tokens = cfg.shots, cfg.limit, cfg.stride, cfg.max_length, \
        cfg.max_new_tokens
    mc = [t for t in task_objs if t.kind in ("mc", "mc2")]
    t1 = time.time()
    bar = _progress(sum(len(task_docs(t, shots, limit)) for t in mc), "multiple choice", cfg.progress) if mc else None
    try:  # all multiple-choice tasks together (batches across tasks); each task's share of the time by examples
        answers = score_mc_tasks(backend, mc, shots, limit, cfg.batch_size, bar) if mc else {}
    finally:
        if bar:
            bar[0].stop()
    mc_secs = (time.time() - t1) / max(1, sum(len(a) for a in answers.values()))
    for task in task_objs:
        t1 = time.time()
        r = evaluate_task(backend, task, shots=shots, limit=limit, batch_size=cfg.batch_size, stride=stride,
                          max_length=max_length, max_new_tokens=max_new_tokens, log_samples=cfg.log_samples,
                          progress=cfg.progress, answers=answers.get(task.name))
        secs = time.time() - t1 + mc_secs * len(answers.get(task.name, ()))
        results[task.name] = {"metrics": r["metrics"], "seconds": round(secs, 3),
                              **({"totals": r["totals"]} if "totals" in r else {})}
        configs[task.name] = {"kind": task.kind, "source": task.source or task.corpus, "version": task.version,
                              "num_fewshot": shots if task.kind != "ppl" else 0, "limit": limit,
                              "target_delimiter": task.target_delimiter, "fewshot_delimiter": task.fewshot_delimiter,
                              "fewshot_sampler": "first_n", **({"until": task.until, "max_new_tokens":
                                                                 max_new_tokens or task.max_new_tokens}
                                                                if task.kind == "gen" else {}),
                              **({"stride": stride, "max_length": max_length} if task.kind == "ppl" else {})}
        if cfg.log_samples:
            samples[task.name] = r["samples"]
    groups: dict[str, list[str]] = {}
    for task in task_objs:
        if task.group:
            groups.setdefault(task.group, []).append(task.name)
    tasks = cfg.tasks
    res = {
        "model": str(getattr(backend, "name", cfg.model)),
        "backend": type(getattr(backend, "backend", backend)).__name__,
        "base_url": cfg.base_url,
        "tasks": [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)],
        "config": {"data_dir": str(cfg.data_dir) if cfg.data_dir else None, "shots": shots, "limit": limit,
                   "batch_size": cfg.batch_size, "seed": cfg.seed, "stride": stride, "max_length": max_length,
                   "add_special_tokens": getattr(backend, "add_special_tokens", None),
                   "prefix_cache": cfg.prefix_cache},
        "task_configs": configs,
        "versions": _versions(),
        "seed": cfg.seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 3),
        "results": results,
        "groups": {g: _group_metrics(results, m) for g, m in groups.items() if len(m) > 1},
    }
    inner = getattr(backend, "backend", backend)
    if hasattr(inner, "prefix_stats"):
        res["scoring"] = inner.prefix_stats()
    if cfg.log_samples:
        res["samples"] = samples
    res["table"] = markdown_table(res)
    return res
