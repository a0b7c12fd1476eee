"""Download helpers for online users: fetch the benchmarks' original files into the layout `lmstack.eval.tasks`
reads (default root: $LMSTACK_EVAL_DATA, else ~/.cache/lmstack/eval). Never called by the tests or at import.
Every file is written atomically (`lmstack.atomic`). The CLI is `lmstack eval-data`:

    lmstack eval-data mmlu truthfulqa wic hellaswag arc gsm8k bigbench:arithmetic
    lmstack eval-data arithmetic --out DIR        # build a BIG-bench-format arithmetic task offline
    lmstack eval-data mmlu_lmeval_dev --out DIR   # ~270 MMLU dev questions bundled with lm-eval

    from lmstack.eval.download import download
    download(["arithmetic"], "evaldata")          # [Path('evaldata/bigbench')]

Every loader also takes a local path (TASK=PATH), so data fetched any other way works the same.
"""
from __future__ import annotations

import io
import random
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from ..atomic import write_bytes, write_text
from ..errors import LMStackError
from .tasks import default_data_dir

MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
TRUTHFULQA_URLS = {"mc_task.json": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/mc_task.json",
                   "TruthfulQA.csv": "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/TruthfulQA.csv"}
WIC_URL = "https://pilehvar.github.io/wic/package/WiC_dataset.zip"
SUPERGLUE_WIC_URL = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/WiC.zip"
HELLASWAG_URLS = {f"hellaswag_{s}.jsonl": f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                                          f"hellaswag_{s}.jsonl" for s in ("train", "val")}
ARC_URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
GSM8K_URLS = {f"{s}.jsonl": f"https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/"
                            f"data/{s}.jsonl" for s in ("train", "test")}
BIGBENCH_URL = "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/{name}/task.json"


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.read()
    except OSError as e:
        raise LMStackError(f"could not download {url} ({e}); you seem to be offline: fetch the file elsewhere and "
                           "pass it with TASK=PATH or --data-dir") from e


def download_mmlu(root: Path) -> Path:
    dst = root / "mmlu"
    if (dst / "test").is_dir():
        return dst
    with tarfile.open(fileobj=io.BytesIO(_fetch(MMLU_URL))) as tar:  # data/{dev,val,test}/*.csv
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("data/") and m.name.endswith(".csv"):
                write_bytes(dst / m.name[len("data/"):], tar.extractfile(m).read())
    return dst


def download_truthfulqa(root: Path) -> Path:
    for name, url in TRUTHFULQA_URLS.items():
        if not (root / "truthfulqa" / name).exists():
            write_bytes(root / "truthfulqa" / name, _fetch(url))
    return root / "truthfulqa"


def _unzip(url: str, dst: Path, strip: str = "") -> None:
    with zipfile.ZipFile(io.BytesIO(_fetch(url))) as z:
        for name in z.namelist():
            if name.endswith("/") or "__MACOSX" in name:
                continue
            rel = name[len(strip):] if strip and name.startswith(strip) else name
            write_bytes(dst / rel, z.read(name))


def download_wic(root: Path, superglue: bool = False) -> Path:
    dst = root / ("wic_superglue" if superglue else "wic")
    if not dst.exists():
        _unzip(SUPERGLUE_WIC_URL if superglue else WIC_URL, dst, strip="WiC/" if superglue else "")
    return dst


def download_hellaswag(root: Path) -> Path:
    for name, url in HELLASWAG_URLS.items():
        if not (root / "hellaswag" / name).exists():
            write_bytes(root / "hellaswag" / name, _fetch(url))
    return root / "hellaswag"


def download_arc(root: Path) -> Path:
    dst = root / "arc"
    if not (dst / "ARC-Easy").exists():
        with zipfile.ZipFile(io.BytesIO(_fetch(ARC_URL))) as z:
            for name in z.namelist():
                parts = Path(name).parts  # ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl
                if name.endswith(".jsonl") and len(parts) >= 2 and parts[-2] in ("ARC-Easy", "ARC-Challenge"):
                    write_bytes(dst / parts[-2] / parts[-1], z.read(name))
    return dst


def download_gsm8k(root: Path) -> Path:
    for name, url in GSM8K_URLS.items():
        if not (root / "gsm8k" / name).exists():
            write_bytes(root / "gsm8k" / name, _fetch(url))
    return root / "gsm8k"


def download_bigbench(root: Path, name: str) -> Path:
    dst = root / "bigbench" / name / "task.json"
    if not dst.exists():
        write_bytes(dst, _fetch(BIGBENCH_URL.format(name=name)))
    return dst.parent


def build_arithmetic(root: Path, n: int = 200, seed: int = 0) -> Path:
    """An offline BIG-bench-format task (like BIG-bench's `arithmetic`): two-digit addition and subtraction,
    four choices each (`bigbench_arithmetic_mc`) and the same questions as generation (`bigbench_arithmetic_gen`)."""
    import json
    r = random.Random(seed)
    mc, gen = [], []
    for _ in range(n):
        a, b = r.randint(10, 99), r.randint(10, 99)
        op = r.choice(["plus", "minus"])
        ans = a + b if op == "plus" else a - b
        wrong = set()
        while len(wrong) < 3:
            w = ans + r.choice([-11, -10, -2, -1, 1, 2, 10, 11])
            if w != ans:
                wrong.add(w)
        choices = [str(ans)] + [str(w) for w in sorted(wrong)]
        r.shuffle(choices)
        q = f"What is {a} {op} {b}?"
        mc.append({"input": q, "target_scores": {c: int(c == str(ans)) for c in choices}})
        gen.append({"input": q, "target": str(ans)})
    for name, ex in (("arithmetic_mc", mc), ("arithmetic_gen", gen)):
        task = {"name": name, "description": "Two-digit addition and subtraction (built by lmstack).",
                "keywords": ["arithmetic"], "metrics": ["multiple_choice_grade" if name.endswith("mc") else
                                                        "exact_str_match"], "examples": ex}
        write_bytes(root / "bigbench" / name / "task.json", json.dumps(task, indent=1).encode())
    return root / "bigbench"


def build_mmlu_from_lm_eval(root: Path) -> Path:
    """Real MMLU questions offline: lm-evaluation-harness (a dev dependency) ships, for each of the 57 subjects,
    the 5 dev-split questions of Flan's chain-of-thought prompts with their answers. They are written as MMLU CSVs
    (`<root>/mmlu_lmeval_dev/test/<subject>_test.csv`, about 270 questions; questions whose choices span lines are
    skipped) for a 0-shot run: `--tasks mmlu=<root>/mmlu_lmeval_dev`. These are MMLU's dev questions, not its test
    set: the numbers are indicative, not comparable with published 5-shot test scores."""
    import csv
    import json
    import re
    try:
        import lm_eval
    except ImportError:
        raise LMStackError("building MMLU dev questions needs lm-eval installed (pip install lm-eval)") from None
    src = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    if not src.exists():
        raise LMStackError(f"{src} not found in this lm-eval version")
    block = re.compile(r"(?P<q>.*?)\n\(A\) (?P<a>.*?) \(B\) (?P<b>.*?) \(C\) (?P<c>.*?) \(D\) (?P<d>[^\n]*?)\n"
                       r"A: .*The answer is \((?P<ans>[ABCD])\)", re.S)
    dst = root / "mmlu_lmeval_dev" / "test"
    dst.mkdir(parents=True, exist_ok=True)
    for subject, prompt in json.loads(src.read_text()).items():
        rows = []
        for part in prompt.split("\n\nQ: ")[1:]:
            m = block.match(part.strip())
            if m and all("\n" not in m.group(k) for k in "abcd"):
                rows.append([m.group("q").strip(), *(m.group(k).strip() for k in "abcd"), m.group("ans")])
        if rows:
            buf = io.StringIO(newline="")
            csv.writer(buf).writerows(rows)
            write_text(dst / f"{subject}_test.csv", buf.getvalue())
    return dst.parent


DOWNLOADERS = {"mmlu": download_mmlu, "truthfulqa": download_truthfulqa, "wic": download_wic,
               "wic_superglue": lambda r: download_wic(r, superglue=True), "hellaswag": download_hellaswag,
               "arc": download_arc, "gsm8k": download_gsm8k, "arithmetic": build_arithmetic,
               "mmlu_lmeval_dev": build_mmlu_from_lm_eval}


def download(names: list[str], root: str | Path | None = None) -> list[Path]:
    """Fetch (or build) each named benchmark under `root` (default `default_data_dir()`); the folders written.
    Names: the keys of DOWNLOADERS, or bigbench:<task>. Data already there is not fetched again."""
    root = Path(root).expanduser() if root else default_data_dir()
    out = []
    for n in names:
        if n.startswith("bigbench:"):
            out.append(download_bigbench(root, n.split(":", 1)[1]))
        elif n in DOWNLOADERS:
            out.append(DOWNLOADERS[n](root))
        else:
            raise LMStackError(f"no downloader for {n!r}; choose from {', '.join(DOWNLOADERS)} or bigbench:<task>")
    return out

