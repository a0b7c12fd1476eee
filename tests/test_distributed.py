"""Training across processes (train/distributed.py): real torchrun launches of 2 gloo processes on loopback, compared
with one process on the same global batch.

- DDP and FSDP follow the 1-process loss trajectory to 1e-5 over 20 steps; so does DDP with gradient accumulation.
- A checkpoint written at world size 2 (FSDP, sharded through torch.distributed.checkpoint) resumes at world size 2
  and in one process with the same next losses, and loads in a plain process (lmstack.load) with the same weights.
- Only rank 0 writes metrics, the plot and checkpoint files (the dcp/ shards are each rank's, by design).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_jsonl, tiny_run_config

STEPS, TOL = 20, 1e-5
COMMON = {"decay_steps": STEPS, "warmup_steps": 3, "eval_interval": 10, "ckpt_interval": 10, "threads": 1,
          "device": "cpu", "seed": 7}


def _recipe(tmp: Path, corpus: Path) -> Path:
    import yaml
    cfg = tiny_run_config(tmp / "unused", corpus, max_steps=STEPS, **COMMON).to_dict()
    cfg.pop("out_dir")
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmstack", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_losses(out: Path) -> list[float]:
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"duplicate or unordered records in {out}/metrics.jsonl: {steps}"
    return [r["train_loss"] for r in recs]


def one_process(out: Path, corpus: Path, **over) -> list[float]:
    from lmstack.train import pretrain
    threads = torch.get_num_threads()
    try:
        pretrain(tiny_run_config(out, corpus, **{"max_steps": STEPS, **COMMON, **over}), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return train_losses(out)


def assert_close(a: list[float], b: list[float], tol: float = TOL) -> None:
    assert len(a) == len(b), (len(a), len(b))
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"trajectories differ by {worst:.3g} (> {tol:g}):\n{a}\n{b}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file):
    """The 1-process reference (global batch 8) and the 2-process runs (per-rank batch 4) of one recipe."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = _recipe(tmp, corpus_file)
    out = {"ref": tmp / "ref"}
    one_process(out["ref"], corpus_file, batch_size=8)
    for name, extra in {"ddp": [], "fsdp": ["--set", "distributed=fsdp"],
                        "accum": ["--set", "batch_size=2", "--set", "grad_accum=2"]}.items():
        out[name] = tmp / name
        r = torchrun("train", str(recipe), "--out-dir", str(out[name]), "--no-progress", "--set", "batch_size=4",
                     *extra)
        out[name + "_stdout"] = r.stdout
    out["recipe"], out["tmp"] = recipe, tmp
    return out


def test_ddp_and_fsdp_follow_the_single_process_trajectory(runs):
    ref = train_losses(runs["ref"])
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.5  # it learns: the comparison is not between constants
    assert_close(train_losses(runs["ddp"]), ref)
    assert_close(train_losses(runs["fsdp"]), ref)


def test_gradient_accumulation_under_ddp_equals_without(runs):
    assert_close(train_losses(runs["accum"]), train_losses(runs["ddp"]))


def test_fsdp_checkpoint_loads_in_one_process_with_the_same_weights(runs):
    import lmstack
    ref = load_file(str(runs["ref"] / "last" / "model.safetensors"))
    got = load_file(str(runs["fsdp"] / "last" / "model.safetensors"))
    assert ref.keys() == got.keys()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-4
    shards = sorted(p.name for p in (runs["fsdp"] / "last" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    lm = lmstack.load(runs["fsdp"] / "last")
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(lm.model(x), lmstack.load(runs["ref"] / "last").model(x), atol=1e-4)


def test_only_rank_zero_writes(runs):
    ref_files = {p.relative_to(runs["ref"]).as_posix() for p in runs["ref"].rglob("*")}
    for name in ("ddp", "fsdp"):
        files = {p.relative_to(runs[name]).as_posix() for p in runs[name].rglob("*")}
        extra = {f for f in files - ref_files if "/dcp" not in f and not f.endswith("/dcp")}
        assert not extra, f"{name} wrote files a single process does not: {sorted(extra)}"
        assert not any(".dcp-tmp" in f for f in files)
        # rank 0 alone prints (one "model: N parameters (...)" line); train_losses checks steps are logged once
        assert runs[name + "_stdout"].count(" parameters (") == 1, runs[name + "_stdout"]


def test_checkpoint_at_world_two_resumes_at_one_and_two(runs, corpus_file):
    ref = train_losses(runs["ref"])
    tmp, recipe = runs["tmp"], runs["recipe"]
    half = tmp / "half"
    torchrun("train", str(recipe), "--out-dir", str(half), "--no-progress", "--set", "batch_size=4",
             "--set", "distributed=fsdp", "--set", "max_steps=10")
    assert json.loads((half / "last" / "config.json").read_text())  # a complete checkpoint at step 10
    at_one = tmp / "half-one"
    shutil.copytree(half, at_one)
    torchrun("train", str(recipe), "--out-dir", str(half), "--no-progress", "--set", "batch_size=4",
             "--set", "distributed=fsdp", "--resume")
    assert_close(train_losses(half), ref)
    assert_close(one_process(at_one, corpus_file, batch_size=8, resume=True), ref)


def test_reward_training_under_fsdp_matches_one_process(runs, tiny_run, tmp_path):
    from lmstack.train.reward import is_reward_model, load_reward_model
    prefs = tmp_path / "prefs.jsonl"
    pairs = [("The cat", " sat on the mat.", " jumps over dog."), ("Where is", " my good cat?", " the night?"),
             ("King and", " queen cat sang.", " lord sang."), ("A bird", " and a cat.", " and a dog."),
             ("Thou art", " my cat.", " my friend."), ("The sun", " cat star.", " moon star.")] * 2
    prefs.write_text("".join(json.dumps({"prompt": a, "chosen": b, "rejected": c}) + "\n" for a, b, c in pairs))
    args = ["reward", "train", "--model", str(tiny_run[0] / "last"), "--data", str(prefs), "--steps", "6",
            "--eval-interval", "3", "--val-fraction", "0.2", "--no-progress", "--set", "threads=1",
            "--set", "device=cpu"]
    from conftest import run_cli
    r = run_cli(*args, "--batch-size", "4", "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    torchrun(*args, "--batch-size", "2", "--out", str(tmp_path / "two"), "--set", "distributed=fsdp")
    assert_close(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"))
    assert is_reward_model(tmp_path / "two" / "last")
    rm_one, tok = load_reward_model(tmp_path / "one" / "last")
    rm_two, _ = load_reward_model(tmp_path / "two" / "last")
    texts = ["The cat sat on the mat.", "The sun moon star."]
    assert rm_two.score(tok, texts) == pytest.approx(rm_one.score(tok, texts), abs=1e-4)
