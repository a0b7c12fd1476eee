"""`lmstack eval` vs lm-evaluation-harness's own `hf` backend: the same MMLU questions, the same weights, one run.

    .venv/bin/python benchmarks/eval_vs_lmeval.py                         # 0- and 5-shot, all subjects, 1 round
    .venv/bin/python benchmarks/eval_vs_lmeval.py --subjects 20 --rounds 2 --json benchmarks/results/eval_vs_lmeval.json

Model: the shared SmolLM2-135M-Instruct GGUF, converted once to a Hugging Face directory (`lmstack export --format hf`,
cached at --hf-dir); both engines load that directory in float32. Data: the MMLU dev questions lm-eval ships
(`lmstack eval-data mmlu_lmeval_dev`, ~270 questions over 56 subjects), written both as MMLU CSVs (lmstack) and as
JSON files with lm-eval task YAMLs using lm-eval's own MMLU template. Offline there is no MMLU dev split to draw
shots from, so the few-shot examples of a subject are the first 5 questions of the next subjects in alphabetical
order (a
speed benchmark: the prompts have the real 5-shot shape and length; the accuracies compare the engines, not the
model).

Each engine runs in its own process with --threads threads, one after the other, alternating per round: lm-eval
`hf` at its default batch size 1 and at --lmeval-batch, lmstack at --batch-size with the prefix cache and (few-shot)
without it. Timed: lmstack's whole `evaluate` call (tasks read, prompts built, scored); lm-eval's
`loglikelihood` call (the scoring only: its task building and prompt rendering are left out, which favours it).
Model loading is not timed for either. Accuracy is compared question by question (argmax of the four
log-likelihoods) and the largest log-likelihood difference is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {title}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


def ensure_hf_dir(hf: Path, gguf: Path) -> None:
    if not (hf / "config.json").exists():
        subprocess.run([sys.executable, "-m", "lmstack", "export", str(gguf), "--format", "hf", "--out", str(hf)],
                       check=True)


def build_data(root: Path, n_subjects: int) -> list[str]:
    """MMLU CSVs (root/mmlu/{test,dev}) and lm-eval task YAMLs + JSON (root/lmeval) for the first n subjects."""
    from lmstack.eval.download import build_mmlu_from_lm_eval
    src = build_mmlu_from_lm_eval(root / "src") / "test"
    subjects = sorted(f.name[:-len("_test.csv")] for f in src.glob("*_test.csv"))
    rows = {s: list(csv.reader((src / f"{s}_test.csv").open(newline=""))) for s in subjects}
    chosen = subjects[:n_subjects]
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    (root / "lmeval").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(chosen):
        shots = [r for j in range(1, len(subjects)) for r in rows[subjects[(i + j) % len(subjects)]]][:5]
        for split, data in (("test", rows[s]), ("dev", shots)):
            with (root / "mmlu" / split / f"{s}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(data)
            (root / "lmeval" / f"{s}_{split}.jsonl").write_text("".join(
                json.dumps({"question": q, "choices": opts, "answer": "ABCD".index(a)}) + "\n"
                for q, *opts, a in data))
        (root / "lmeval" / f"{s}.yaml").write_text(YAML.format(
            name=f"bench_mmlu_{s}", test=root / "lmeval" / f"{s}_test.jsonl", dev=root / "lmeval" / f"{s}_dev.jsonl",
            title=s.replace("_", " ")))
    return chosen


def worker_lmeval(a) -> dict:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    import torch
    torch.set_num_threads(a.threads)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=str(a.hf_dir), dtype="float32", batch_size=a.batch_size, device="cpu")
    timed = {"s": 0.0, "cpu": 0.0}
    inner = lm.loglikelihood

    def loglikelihood(requests, *args, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        out = inner(requests, *args, **kw)
        timed["s"] += time.perf_counter() - t0
        timed["cpu"] += time.process_time() - c0
        return out
    lm.loglikelihood = loglikelihood
    subjects = a.subject_list.split(",")
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=[f"bench_mmlu_{s}" for s in subjects], num_fewshot=a.shots,
                          task_manager=TaskManager(include_path=str(a.data / "lmeval")), log_samples=True)
    wall = time.perf_counter() - t0
    lls = {}
    for s in subjects:
        for smp in sorted(res["samples"][f"bench_mmlu_{s}"], key=lambda x: x["doc_id"]):
            lls[f"{s}/{smp['doc_id']}"] = [float(x[0][0]) for x in smp["resps"]]
    return {"seconds": timed["s"], "cpu_seconds": timed["cpu"], "wall_seconds": wall, "lls": lls}


def worker_lmstack(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import lmstack
    from lmstack.eval import evaluate
    lm = lmstack.load(a.hf_dir, dtype=torch.float32)
    subjects = a.subject_list.split(",")
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(lm, ",".join(f"mmlu_{s}={a.data / 'mmlu'}" for s in subjects), shots=a.shots,
                   batch_size=a.batch_size, log_samples=True, prefix_cache=not a.no_prefix_cache)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    lls = {f"{s}/{smp['doc']}": smp["loglikelihoods"] for s in subjects for smp in res["samples"][f"mmlu_{s}"]}
    return {"seconds": secs, "cpu_seconds": cpu, "wall_seconds": secs, "lls": lls, "scoring": res.get("scoring")}


def run_worker(a, engine: str, shots: int, batch: int, no_cache: bool, subjects: list[str]) -> dict:
    out = a.data / f"worker-{engine}-{shots}-{batch}-{int(no_cache)}.json"
    cmd = [sys.executable, __file__, "--worker", engine, "--shots", str(shots), "--batch-size", str(batch),
           "--threads", str(a.threads), "--hf-dir", str(a.hf_dir), "--data", str(a.data), "--worker-out", str(out),
           "--subject-list", ",".join(subjects)] + (["--no-prefix-cache"] if no_cache else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if engine == "lmeval" else None,
                   stderr=subprocess.DEVNULL if engine == "lmeval" else None)
    return json.loads(out.read_text())


def compare(ref: dict, got: dict) -> dict:
    """Question-by-question agreement of predictions (argmax of the log-likelihoods) and the largest |diff|."""
    keys = sorted(ref)
    assert sorted(got) == keys, "the engines scored different questions"
    pred = {k: max(range(4), key=lambda i, v=v: v[i]) for d in (ref,) for k, v in d.items()}
    pred2 = {k: max(range(4), key=lambda i, v=v: v[i]) for k, v in got.items()}
    differ = [k for k in keys if pred[k] != pred2[k]]
    diff = max(abs(x - y) for k in keys for x, y in zip(ref[k], got[k]))
    return {"questions": len(keys), "predictions_differ": differ, "max_abs_loglik_diff": diff}


def accuracy(lls: dict, data: Path) -> float:
    gold = {}
    for f in (data / "mmlu" / "test").glob("*_test.csv"):
        for i, row in enumerate(csv.reader(f.open(newline=""))):
            gold[f"{f.name[:-len('_test.csv')]}/{i}"] = "ABCD".index(row[-1])
    return sum(max(range(4), key=lambda i, v=v: v[i]) == gold[k] for k, v in lls.items()) / len(lls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--hf-dir", type=Path, default=ROOT / "runs" / "smollm2-135m-hf")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "eval_vs_lmeval")
    ap.add_argument("--subjects", type=int, default=56, help="the first N MMLU subjects (of 56)")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="lmstack questions per pass")
    ap.add_argument("--lmeval-batch", type=int, default=8, help="lm-eval's larger batch size (besides 1)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=["lmeval", "lmstack"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--subject-list", help=argparse.SUPPRESS)
    ap.add_argument("--no-prefix-cache", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.shots = int(a.shots)
        res = (worker_lmeval if a.worker == "lmeval" else worker_lmstack)(a)
        a.worker_out.write_text(json.dumps(res))
        return
    ensure_hf_dir(a.hf_dir, a.gguf)
    subjects = build_data(a.data, a.subjects)
    runs = []  # (shots, label, engine, batch, no_cache)
    for k in (int(x) for x in a.shots.split(",")):
        runs += [(k, "lm-eval hf, batch 1", "lmeval", 1, False),
                 (k, f"lmstack, batch {a.batch_size}, prefix cache", "lmstack", a.batch_size, False),
                 (k, f"lm-eval hf, batch {a.lmeval_batch}", "lmeval", a.lmeval_batch, False)]
        if k:
            runs.append((k, f"lmstack, batch {a.batch_size}, no prefix cache", "lmstack", a.batch_size, True))
    got: dict[tuple, list[dict]] = {}
    for r in range(a.rounds):
        for k, label, engine, batch, no_cache in runs:
            res = run_worker(a, engine, k, batch, no_cache, subjects)
            got.setdefault((k, label), []).append(res)
            print(f"round {r + 1} {k}-shot {label}: {len(res['lls']) / res['seconds']:.2f} examples/s, "
                  f"{len(res['lls']) / res['cpu_seconds']:.2f} examples per CPU-second", flush=True)
    summary = {"subjects": len(subjects), "threads": a.threads, "rounds": a.rounds, "rows": []}
    for k in sorted({k for k, *_ in runs}):
        base = None
        for kk, label, *_ in [x for x in runs if x[0] == k]:
            rs = got[(k, label)]
            n = len(rs[0]["lls"])
            eps = statistics.median(n / x["seconds"] for x in rs)
            epc = statistics.median(n / x["cpu_seconds"] for x in rs)
            base = base or (eps, rs[0]["lls"], epc)
            cmp = compare(base[1], rs[0]["lls"])
            summary["rows"].append({"shots": k, "engine": label, "questions": n, "examples_per_s": round(eps, 2),
                                    "vs_lmeval_batch1": round(eps / base[0], 2),
                                    "examples_per_cpu_s": round(epc, 3),
                                    "cpu_vs_lmeval_batch1": round(epc / base[2], 2),
                                    "acc": accuracy(rs[0]["lls"], a.data),
                                    "predictions_differ_from_lmeval": cmp["predictions_differ"],
                                    "max_abs_loglik_diff": cmp["max_abs_loglik_diff"],
                                    **({"scoring": rs[0]["scoring"]} if rs[0].get("scoring") else {})})
    print("| shots | engine | examples/s | vs lm-eval batch 1 | examples/CPU-s | vs lm-eval batch 1 | acc | "
          "predictions differing | max abs loglik diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in summary["rows"]:
        print(f"| {row['shots']} | {row['engine']} | {row['examples_per_s']} | {row['vs_lmeval_batch1']}x | "
              f"{row['examples_per_cpu_s']} | {row['cpu_vs_lmeval_batch1']}x | "
              f"{row['acc']:.4f} | {len(row['predictions_differ_from_lmeval'])} | {row['max_abs_loglik_diff']:.1e} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
