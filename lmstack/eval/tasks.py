"""Task registry: a task name (and optional path) -> `Task` (docs, few-shot pool, prompt settings, kind).

`--tasks` takes a comma-separated list of NAME or NAME=PATH. Without a PATH the data is looked up under
`--data-dir` (default $LMSTACK_EVAL_DATA, else ~/.cache/lmstack/eval, where `lmstack eval-data` puts it):

  mmlu, mmlu_<subject>   <dir>/mmlu/{dev,test}/<subject>_{dev,test}.csv (also <dir>/mmlu/data/...)
  truthfulqa_mc1/_mc2    <dir>/truthfulqa/mc_task.json (or TruthfulQA.csv, or a HF-layout .jsonl)
  wic                    <dir>/wic/dev/dev.{data,gold}.txt (+ train/ for shots), or SuperGLUE <dir>/wic/val.jsonl
  hellaswag              <dir>/hellaswag/hellaswag_val.jsonl (+ hellaswag_train.jsonl)
  arc_easy/arc_challenge <dir>/arc/ARC-Easy/ARC-Easy-Test.jsonl (+ -Train.jsonl)
  gsm8k                  <dir>/gsm8k/test.jsonl (+ train.jsonl)
  bigbench_<name>        <dir>/bigbench/<name>/task.json
  perplexity=<corpus>    a text/jsonl file, a directory, a glob, or a built-in corpus (shakespeare, pydocs)

With NAME=PATH the path points at the file (or directory) itself; e.g. `mmlu=~/data/mmlu/data`,
`truthfulqa_mc2=TruthfulQA.csv`, `bigbench_mytask=task.json`, `arc_easy=ARC-Easy-Dev.jsonl`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LMStackError
from . import formats as F
from .formats import Doc

VERSION = {"mmlu": "1.0", "truthfulqa_mc1": "2.0", "truthfulqa_mc2": "2.0", "wic": "1.0", "hellaswag": "1.0",
           "arc": "1.0", "gsm8k": "3.0", "bigbench": "1.0", "perplexity": "1.0"}


@dataclass
class Task:
    name: str
    kind: str  # 'mc' (acc/acc_norm), 'mc2' (TruthfulQA MC2), 'gen' (generation), 'ppl' (perplexity)
    docs: list[Doc] = field(default_factory=list)
    fewshot_docs: list[Doc] = field(default_factory=list)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    extract: str | None = None  # 'gsm8k': strict '#### N' and flexible last-number matches
    source: str = ""
    group: str | None = None
    version: str = "1.0"
    corpus: str | None = None  # 'ppl' tasks: the corpus spec

    def shots(self, doc: Doc, k: int) -> list[Doc]:
        """The first k examples of the few-shot pool (lm-eval's `first_n` sampler), never the doc itself."""
        return [d for d in self.fewshot_docs if d is not doc][:k]

    def context(self, doc: Doc, k: int = 0) -> str:
        """description + k solved examples + the doc's query, as lm-eval assembles them."""
        ex = "".join(s.context + self.target_delimiter + s.target_text() + self.fewshot_delimiter
                     for s in self.shots(doc, k))
        return self.description + ex + doc.context


def _has_examples(task_json: Path) -> bool:
    if not task_json.exists():
        return False
    data = F.read_json(task_json)
    return isinstance(data, dict) and "examples" in data


def _bigbench_task(name: str, p: Path, group: str | None = None) -> list[Task]:
    docs, kind, desc = F.load_bigbench(p)
    # BIG-bench's own format: examples joined by newlines, prompts "Q: ...\nA:" answered " <target>"
    return [Task(name, kind, docs, docs, description=desc.strip() + "\n" if desc.strip() else "",
                 fewshot_delimiter="\n", until=["\n"], max_new_tokens=64, source=str(p), group=group,
                 version=VERSION["bigbench"])]


def default_data_dir() -> Path:
    if os.environ.get("LMSTACK_EVAL_DATA"):
        return Path(os.environ["LMSTACK_EVAL_DATA"])
    from ..data.corpora import cache_dir
    return cache_dir() / "eval"


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _missing(name: str, where) -> LMStackError:
    return LMStackError(f"no data for task {name!r} at {where}; put the benchmark's files there "
                        f"(`lmstack eval-data NAME` fetches them), pass --data-dir, or give the path as {name}=PATH")


def _mmlu_root(p: Path) -> Path:
    for cand in (p, p / "data", p / "mmlu", p / "mmlu" / "data"):
        if (cand / "test").is_dir():
            return cand
    raise _missing("mmlu", p)


def mmlu_subjects(root: Path) -> list[str]:
    return sorted(f.name[:-len("_test.csv")] for f in (root / "test").glob("*_test.csv"))


def mmlu_task(root: Path, subject: str) -> Task:
    test = root / "test" / f"{subject}_test.csv"
    if not test.exists():
        raise LMStackError(f"no MMLU subject {subject!r} at {test}; subjects there: "
                           f"{', '.join(mmlu_subjects(root)) or 'none'}")
    dev = root / "dev" / f"{subject}_dev.csv"
    return Task(f"mmlu_{subject}", "mc", F.load_mmlu_csv(test, subject),
                F.load_mmlu_csv(dev, subject) if dev.exists() else [],
                description=f"The following are multiple choice questions (with answers) about "
                            f"{subject.replace('_', ' ')}.\n\n",
                source=str(test), group="mmlu", version=VERSION["mmlu"])


def _split_pair(p: Path, eval_names: tuple[str, ...], train_names: tuple[str, ...]) -> tuple[Path, Path | None]:
    if p.is_file():
        return p, None
    ev = _first(*(p / n for n in eval_names))
    if ev is None:
        raise _missing(p.name, p)
    return ev, _first(*(p / n for n in train_names))


def _mmlu_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    root = _mmlu_root(given or base / "mmlu")
    subjects = mmlu_subjects(root) if name == "mmlu" else [name[len("mmlu_"):]]
    if not subjects:
        raise _missing("mmlu", root / "test")
    return [mmlu_task(root, s) for s in subjects]


def _truthfulqa_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    p = given or base / "truthfulqa"
    if p.is_dir():
        p = _first(p / "mc_task.json", p / "TruthfulQA.csv", p / "validation.jsonl") or p / "mc_task.json"
    if not p.exists():
        raise _missing(name, p)
    which = name[-3:]
    return [Task(name, "mc" if which == "mc1" else "mc2", F.load_truthfulqa(p, which), source=str(p),
                 version=VERSION[name])]


def _wic_docs(name: str, p: Path) -> tuple[list[Doc], list[Doc]]:
    """(eval docs, few-shot docs) of WiC at `p`: a .jsonl or .data.txt file, or a SuperGLUE / original folder."""
    if p.is_file() and p.suffix == ".jsonl":
        return F.load_wic_jsonl(p), []
    if p.is_file():
        return F.load_wic_txt(p, p.with_name(p.name.replace(".data.txt", ".gold.txt"))), []
    if (p / "val.jsonl").exists():
        docs = F.load_wic_jsonl(p / "val.jsonl")
        return docs, F.load_wic_jsonl(p / "train.jsonl") if (p / "train.jsonl").exists() else []
    if (p / "dev" / "dev.data.txt").exists():
        docs = F.load_wic_txt(p / "dev" / "dev.data.txt", p / "dev" / "dev.gold.txt")
        tr = p / "train" / "train.data.txt"
        return docs, F.load_wic_txt(tr, p / "train" / "train.gold.txt") if tr.exists() else []
    raise _missing(name, p)


def _wic_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    p = given or base / "wic"
    docs, shots = _wic_docs(name, p)
    if any(d.gold is None for d in docs):
        raise LMStackError(f"task 'wic' at {p} has no gold labels; evaluate the dev/val split")
    return [Task(name, "mc", docs, shots, source=str(p), version=VERSION["wic"])]


def _hellaswag_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    ev, tr = _split_pair(given or base / "hellaswag", ("hellaswag_val.jsonl", "validation.jsonl"),
                         ("hellaswag_train.jsonl", "train.jsonl"))
    return [Task(name, "mc", F.load_hellaswag(ev), F.load_hellaswag(tr) if tr else [], source=str(ev),
                 version=VERSION["hellaswag"])]


def _arc_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    sub = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
    p = given or base / "arc" / sub
    ev, tr = _split_pair(p, (f"{sub}-Test.jsonl", "test.jsonl"), (f"{sub}-Train.jsonl", "train.jsonl"))
    return [Task(name, "mc", F.load_arc(ev), F.load_arc(tr) if tr else [], source=str(ev),
                 version=VERSION["arc"])]


def _gsm8k_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    ev, tr = _split_pair(given or base / "gsm8k", ("test.jsonl",), ("train.jsonl",))
    return [Task(name, "gen", F.load_gsm8k(ev), F.load_gsm8k(tr) if tr else [], source=str(ev),
                 until=["Question:", "</s>", "<|im_end|>"], max_new_tokens=256, extract="gsm8k",
                 version=VERSION["gsm8k"])]


def _bigbench_tasks(name: str, given: Path | None, base: Path) -> list[Task]:
    sub = name[len("bigbench_"):] if name.startswith("bigbench_") else ""
    p = given or base / "bigbench" / sub
    subtasks = sorted(d for d in p.iterdir() if (d / "task.json").exists()) if p.is_dir() else []
    if subtasks and not _has_examples(p / "task.json"):
        # a task made of subtasks (e.g. logical_deduction/{three,five,seven}_objects): one task each, grouped
        return [t for d in subtasks for t in _bigbench_task(f"{name}:{d.name}", d, group=name)]
    if not (p / "task.json" if p.is_dir() else p).exists():
        raise _missing(name, p)
    return _bigbench_task(name, p)


def _perplexity_tasks(path: str) -> list[Task]:
    if not path:
        raise LMStackError("give the corpus as perplexity=FILE (a text/jsonl file, directory, glob, or "
                           "'shakespeare' / 'pydocs')")
    return [Task(f"perplexity:{Path(path).name or path}", "ppl", corpus=path, version=VERSION["perplexity"])]


# task name -> its loader, a function of (name, the PATH of NAME=PATH or None, the data dir)
_LOADERS = {"truthfulqa_mc1": _truthfulqa_tasks, "truthfulqa_mc2": _truthfulqa_tasks, "wic": _wic_tasks,
            "hellaswag": _hellaswag_tasks, "arc_easy": _arc_tasks, "arc_challenge": _arc_tasks,
            "gsm8k": _gsm8k_tasks}


def _loader(name: str):
    if name == "mmlu" or name.startswith("mmlu_"):
        return _mmlu_tasks
    if name.startswith("bigbench"):
        return _bigbench_tasks
    return _LOADERS.get(name)


def load_tasks(spec: str, data_dir: str | Path | None = None) -> list[Task]:
    """One task spec (NAME or NAME=PATH) -> its tasks (`mmlu` expands to one task per subject)."""
    name, _, path = spec.strip().partition("=")
    name = name.strip().lower()
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    given = Path(path).expanduser() if path else None
    loader = _loader(name)
    if loader is not None:
        return loader(name, given, base)
    if name in ("perplexity", "ppl"):
        return _perplexity_tasks(path)
    raise LMStackError(f"unknown task {name!r}; choose from mmlu, mmlu_<subject>, truthfulqa_mc1, truthfulqa_mc2, "
                       "wic, hellaswag, arc_easy, arc_challenge, gsm8k, bigbench_<name>, perplexity=FILE")


def resolve_tasks(specs: str | list[str], data_dir: str | Path | None = None) -> list[Task]:
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise LMStackError("no tasks given; pass --tasks NAME[,NAME...]")
    out = []
    for s in specs:
        out += load_tasks(s, data_dir)
    return out
