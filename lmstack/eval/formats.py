"""Readers for the benchmarks' original file formats, each turning a file into a list of `Doc`s.

Prompts follow lm-evaluation-harness's default task configs (the text each doc becomes is in `Doc.context`, the
scored continuations in `Doc.choices`, without the " " target delimiter). Malformed input raises LMStackError
naming the file and line.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..data.jsonl import read_jsonl as _read_jsonl
from ..errors import LMStackError


@dataclass
class Doc:
    """One evaluation item. Multiple choice: `choices` + `gold` (index; mc2 uses `labels` 1/0 per choice).
    Generation: `target` (the few-shot answer text) + `answers` (accepted final answers). `context` is the query
    text without description or few-shot examples."""
    context: str
    choices: list[str] | None = None
    gold: int | None = None
    labels: list[int] | None = None
    target: str | None = None
    answers: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def target_text(self) -> str:
        """The answer a few-shot example shows after the context."""
        if self.target is not None:
            return self.target
        if self.choices is not None and self.gold is not None:
            return self.choices[self.gold]
        raise LMStackError("this doc has no answer to show as a few-shot example")


def _err(path, line: int | None, msg: str) -> LMStackError:
    return LMStackError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LMStackError(f"{path} does not exist; pass the benchmark's data with --data-dir or TASK=PATH")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    yield from _read_jsonl(_check_file(path))


def read_json(path: Path) -> Any:
    path = _check_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _err(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None


def read_csv(path: Path, header: bool = False) -> Iterator[tuple[int, list[str] | dict]]:
    """(line number of the row's start, row) for every row; header=True yields dicts keyed by the header."""
    path = _check_file(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        cols = None
        line = 1
        try:
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue
                if header and cols is None:
                    cols = row
                    continue
                if header:
                    if len(row) != len(cols):
                        raise _err(path, start, f"expected {len(cols)} columns like the header, got {len(row)}")
                    yield start, dict(zip(cols, row))
                else:
                    yield start, row
        except csv.Error as e:
            raise _err(path, reader.line_num, f"malformed CSV ({e})") from None


def _need(rec: dict, key: str, kind, path, n) -> Any:
    v = rec.get(key)
    if not isinstance(v, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _err(path, n, f"expected field {key!r} of type {want}, got {type(v).__name__}")
    return v


# ---- MMLU: data/{dev,val,test}/{subject}_{split}.csv, rows question,A,B,C,D,answer (no header) -----------------
def mmlu_prompt(question: str, options: list[str]) -> str:
    return (question.strip() + "".join(f"\n{k}. {o}" for k, o in zip("ABCD", options)) + "\nAnswer:")


def load_mmlu_csv(path: Path, subject: str | None = None) -> list[Doc]:
    docs = []
    for n, row in read_csv(path):
        if len(row) != 6:
            raise _err(path, n, f"expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
        q, *opts, ans = row
        ans = ans.strip().upper()
        if ans not in ("A", "B", "C", "D"):
            raise _err(path, n, f"answer must be one of A/B/C/D, got {ans!r}")
        docs.append(Doc(mmlu_prompt(q, opts), ["A", "B", "C", "D"], "ABCD".index(ans), meta={"subject": subject}))
    return docs


# ---- TruthfulQA: mc_task.json (original), HF-style jsonl, or TruthfulQA.csv -------------------------------------
TQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def tqa_prompt(question: str) -> str:
    return TQA_PROMPT + "\n\nQ: " + question + "\nA:"


def _tqa_targets(v, path, n, key) -> tuple[list[str], list[int]]:
    if isinstance(v, dict) and "choices" in v and "labels" in v:  # HF datasets layout
        choices, labels = list(v["choices"]), [int(x) for x in v["labels"]]
    elif isinstance(v, dict):  # original mc_task.json: {answer: 0/1}, in file order
        choices, labels = list(v.keys()), [int(x) for x in v.values()]
    else:
        raise _err(path, n, f"{key!r} must be an object of answer -> 0/1 (or choices/labels lists)")
    if not choices or len(choices) != len(labels) or 1 not in labels:
        raise _err(path, n, f"{key!r} needs at least one answer labelled 1")
    return choices, labels


def load_truthfulqa(path: Path, which: str) -> list[Doc]:
    """which: 'mc1' or 'mc2'."""
    path = Path(path)
    key = f"{which}_targets"
    docs = []
    if path.suffix == ".csv":  # Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source
        for n, row in read_csv(path, header=True):
            try:
                q, best = row["Question"], row["Best Answer"].strip()
                correct = [a.strip() for a in row["Correct Answers"].split(";") if a.strip()]
                wrong = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
            except KeyError as e:
                raise _err(path, n, f"missing column {e.args[0]!r} (TruthfulQA.csv has Question, Best Answer, "
                                    "Correct Answers, Incorrect Answers)") from None
            if not wrong or not best:
                raise _err(path, n, "a question needs a best answer and at least one incorrect answer")
            if which == "mc1":
                choices, labels = [best] + wrong, [1] + [0] * len(wrong)
            else:
                true = [best] + [c for c in correct if c != best]
                choices, labels = true + wrong, [1] * len(true) + [0] * len(wrong)
            docs.append(Doc(tqa_prompt(q), choices, 0, labels))
        return docs
    if path.suffix == ".jsonl":
        items = list(read_jsonl(path))
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise _err(path, 1, "expected a JSON list of questions (TruthfulQA's mc_task.json)")
        items = [(None, d) for d in data]
    for i, (n, rec) in enumerate(items):
        where = n if n is not None else None
        if not isinstance(rec, dict):
            raise _err(path, where, f"item {i}: expected an object")
        q = rec.get("question")
        if not isinstance(q, str):
            raise _err(path, where, f"item {i}: missing string field 'question'")
        if key not in rec:
            raise _err(path, where, f"item {i}: missing {key!r}")
        choices, labels = _tqa_targets(rec[key], path, where, key)
        docs.append(Doc(tqa_prompt(q), choices, labels.index(1), labels))
    return docs


# ---- WiC: original {split}.data.txt + {split}.gold.txt, or SuperGLUE {split}.jsonl ---------------------------
def wic_prompt(s1: str, s2: str, word: str) -> str:
    return (f"Sentence 1: {s1}\nSentence 2: {s2}\nQuestion: Is the word '{word}' used in the same way in the two "
            "sentences above?\nAnswer:")


def load_wic_txt(data: Path, gold: Path | None) -> list[Doc]:
    data = _check_file(data)
    labels = None
    if gold is not None:
        labels = []
        for n, line in enumerate(_check_file(gold).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                if line.strip() not in ("T", "F"):
                    raise _err(gold, n, f"expected T or F, got {line.strip()!r}")
                labels.append(int(line.strip() == "T"))
    docs = []
    for n, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise _err(data, n, f"expected 5 tab-separated fields (word, POS, i-j, sentence1, sentence2), "
                                f"got {len(parts)}")
        word, _, idx, s1, s2 = parts
        try:
            i1 = int(idx.split("-")[0])
            surface = s1.split(" ")[i1]
        except (ValueError, IndexError):
            raise _err(data, n, f"bad word index {idx!r}") from None
        docs.append(Doc(wic_prompt(s1, s2, surface), ["no", "yes"], None, meta={"word": word}))
    if labels is not None:
        if len(labels) != len(docs):
            raise _err(gold, None, f"{len(labels)} gold labels for {len(docs)} examples in {data}")
        for d, g in zip(docs, labels):
            d.gold = g
    return docs


def load_wic_jsonl(path: Path) -> list[Doc]:
    docs = []
    for n, rec in read_jsonl(path):
        s1, s2 = _need(rec, "sentence1", str, path, n), _need(rec, "sentence2", str, path, n)
        if "start1" in rec and "end1" in rec:
            word = s1[int(rec["start1"]):int(rec["end1"])]
        else:
            word = _need(rec, "word", str, path, n)
        label = rec.get("label")
        if label is not None and not isinstance(label, (bool, int)):
            raise _err(path, n, f"label must be true/false or 0/1, got {label!r}")
        docs.append(Doc(wic_prompt(s1, s2, word), ["no", "yes"], None if label is None else int(label)))
    return docs


# ---- HellaSwag jsonl (Rowan Zellers' release) -----------------------------------------------------------------
def _hs_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Doc]:
    docs = []
    for n, rec in read_jsonl(path):
        endings = _need(rec, "endings", list, path, n)
        ctx = _need(rec, "ctx_a", str, path, n) + " " + _need(rec, "ctx_b", str, path, n).capitalize()
        if "label" not in rec:
            raise _err(path, n, "missing 'label' (the test split has no labels; use the validation file)")
        docs.append(Doc(_hs_pre(rec.get("activity_label", "") + ": " + ctx), [_hs_pre(e) for e in endings],
                        int(rec["label"])))
    return docs


# ---- ARC jsonl (AI2 release: question.stem/choices, or the HF layout) ------------------------------------------
def load_arc(path: Path) -> list[Doc]:
    docs = []
    for n, rec in read_jsonl(path):
        q = rec.get("question")
        if isinstance(q, dict):  # AI2 release
            stem, ch = q.get("stem"), q.get("choices")
            if not isinstance(stem, str) or not isinstance(ch, list):
                raise _err(path, n, "expected question.stem and question.choices")
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        elif isinstance(q, str):
            stem, ch = q, rec.get("choices")
            if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
                raise _err(path, n, "expected choices: {text: [...], label: [...]}")
            texts, labels = list(ch["text"]), list(ch["label"])
        else:
            raise _err(path, n, "missing 'question'")
        key = rec.get("answerKey")
        if key not in labels:
            raise _err(path, n, f"answerKey {key!r} is not one of the choice labels {labels}")
        docs.append(Doc(f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return docs


# ---- GSM8K jsonl: question, answer ending in '#### N' ------------------------------------------------------------
def load_gsm8k(path: Path) -> list[Doc]:
    docs = []
    for n, rec in read_jsonl(path):
        q, a = _need(rec, "question", str, path, n), _need(rec, "answer", str, path, n)
        if "####" not in a:
            raise _err(path, n, "the answer must end with '#### <number>'")
        docs.append(Doc(f"Question: {q}\nAnswer:", target=a, answers=[a.split("####")[-1].strip()]))
    return docs


# ---- BIG-bench JSON tasks: task.json with examples[{input, target_scores | target}] -------------------------------
def load_bigbench(path: Path) -> tuple[list[Doc], str, str]:
    """(docs, kind 'mc' or 'gen', description). Multiple choice when every example has target_scores (or
    multiple_choice_targets + multiple_choice_scores); otherwise generation against `target`."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.json"
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise _err(path, None, "a BIG-bench task.json needs an 'examples' list")
    in_pre = data.get("example_input_prefix", "\nQ: ")
    out_pre = data.get("example_output_prefix", "\nA: ")
    desc = data.get("task_prefix", "")
    docs, kinds = [], set()
    for i, ex in enumerate(data["examples"]):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise _err(path, None, f"examples[{i}] needs a string 'input'")
        ctx = (in_pre + ex["input"] + out_pre).lstrip("\n").rstrip()
        if "target_scores" in ex or "multiple_choice_targets" in ex:
            if "target_scores" in ex:
                ts = ex["target_scores"]
                if not isinstance(ts, dict) or not ts:
                    raise _err(path, None, f"examples[{i}].target_scores must be a non-empty object")
                choices, scores = list(ts.keys()), [float(v) for v in ts.values()]
            else:
                choices, scores = ex["multiple_choice_targets"], [float(v) for v in ex["multiple_choice_scores"]]
            gold = max(range(len(scores)), key=lambda j: scores[j])
            t = ex.get("target")
            answers = [t] if isinstance(t, str) else list(t or []) or [choices[gold]]
            docs.append(Doc(ctx, choices, gold, [int(s == max(scores)) for s in scores], answers=answers))
            kinds.add("mc")
        elif "target" in ex:
            t = ex["target"]
            answers = [t] if isinstance(t, str) else list(t)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise _err(path, None, f"examples[{i}].target must be a string or a list of strings")
            docs.append(Doc(ctx, target=answers[0], answers=answers))
            kinds.add("gen")
        else:
            raise _err(path, None, f"examples[{i}] has neither target_scores nor target")
    if not docs:
        raise _err(path, None, "no examples")
    return docs, ("mc" if kinds == {"mc"} else "gen"), desc
