"""Issue 11 (training side): reward / DPO / PPO load any model source (lmstack checkpoint, Hugging Face dir, GGUF),
one LoRA checkpoint layout for every objective (adapter tensors + adapter files naming the base model), resumable
everywhere: DPO with LoRA after SIGKILL, PPO with LoRA at a rollout boundary; merge-lora from a run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmstack
from conftest import REPO, read_jsonl, sigkill_when

PAIRS = [("The cat", " sat on the mat.", " jumps over dog."), ("Where is", " my good cat?", " the night?"),
         ("King and", " queen cat sang.", " lord sang."), ("A bird", " and a cat.", " and a dog."),
         ("Thou art", " my cat.", " my friend."), ("The sun", " cat star.", " moon star.")]
GGUF = Path(os.environ.get("LMSTACK_GGUF", REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prefs_src") / "prefs.jsonl"
    p.write_text("".join(json.dumps({"prompt": a, "chosen": b, "rejected": c}) + "\n" for a, b, c in PAIRS))
    return p


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts_src") / "prompts.txt"
    p.write_text("The\nA cat\nWhere\n")
    return p


@pytest.fixture(scope="module")
def reward_py(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rew_src") / "rew.py"
    p.write_text("def count_a(prompts, completions):\n    return [float(c.count('a')) for c in completions]\n")
    return p


@pytest.fixture(scope="module")
def hf_dir(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's model exported as a Hugging Face directory (GPT-2 layout)."""
    from lmstack.checkpoint import load_model
    from lmstack.convert.hf import export_hf
    model, tok = load_model(tiny_run[0] / "last")
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    export_hf(model, tok, out)
    assert json.loads((out / "config.json").read_text()).get("model_type")  # an HF dir, not an lmstack checkpoint
    return out


@pytest.fixture
def cli(capsys):
    from lmstack.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        threads = torch.get_num_threads()
        try:
            rc = main([str(a) for a in args])
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def _assert_lora_checkpoint(ckpt: Path, base: Path) -> None:
    """The one LoRA layout: adapter-only model.safetensors, adapter files naming the base, train_state.pt."""
    assert all(".lora_" in k for k in load_file(str(ckpt / "model.safetensors")))
    meta = json.loads((ckpt / "adapter_config.json").read_text())
    assert Path(meta["base_model_name_or_path"]).resolve() == base.resolve()
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "train_state.pt").is_file()


def _merged_matches_base_plus_adapter(run: Path, base: Path) -> None:
    from lmstack.models.lora import load_adapter
    merged = lmstack.load(run / "last").model
    policy = lmstack.load(base).model.float()
    load_adapter(policy, run / "last")
    x = torch.randint(0, min(merged.config.vocab_size, 60), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), policy(x), atol=1e-4, rtol=0)


# ---- model sources -------------------------------------------------------------------------------------------
def test_objectives_train_from_a_hugging_face_dir(tmp_path, hf_dir, prefs_file, prompts_file, reward_py, cli):
    rc, out, err = cli("reward", "train", "--model", hf_dir, "--data", prefs_file, "--out", tmp_path / "rm",
                       "--steps", "2", "--batch-size", "2", "--val-fraction", "0.34", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "rm" / "last" / "reward_head.safetensors").is_file()
    rc, out, err = cli("dpo", "--model", hf_dir, "--data", prefs_file, "--out", tmp_path / "dpo", "--steps", "2",
                       "--batch-size", "2", "--lora", "r=4,alpha=8,dropout=0,targets=q,v", "--no-progress")
    assert rc == 0, err
    _assert_lora_checkpoint(tmp_path / "dpo" / "last", hf_dir)
    _merged_matches_base_plus_adapter(tmp_path / "dpo", hf_dir)
    rc, out, err = cli("ppo", "--model", hf_dir, "--reward", f"python:{reward_py}:count_a", "--prompts", prompts_file,
                       "--out", tmp_path / "ppo", "--rollouts", "1", "--batch-size", "2", "--max-new-tokens", "4",
                       "--ppo-epochs", "1", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "ppo" / "last" / "value_head.safetensors").is_file()
    trained, base = lmstack.load(tmp_path / "ppo" / "last"), lmstack.load(hf_dir)
    changed = any(not torch.equal(a, b.float()) for a, b in zip(trained.model.parameters(), base.model.parameters()))
    grad_norm = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert changed == (grad_norm > 0)  # the saved policy is the one the logged update produced
    got = trained.generate("The", max_new_tokens=3, temperature=0, stop_at_eos=False)
    assert got == "".join(trained.stream("The", max_new_tokens=3, temperature=0, stop_at_eos=False, use_cache=False))


def test_objectives_train_from_gguf(tmp_path, prefs_file, prompts_file, reward_py, cli):
    """SmolLM2-135M (Q4_1 GGUF, dequantized to float32 for training): one step of each objective, 32 tokens."""
    if not GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {GGUF} (set LMSTACK_GGUF)")
    common = ("--data", prefs_file, "--steps", "1", "--batch-size", "2", "--max-length", "32", "--val-fraction",
              "0.34", "--no-progress", "--set", "eval_interval=1")
    rc, out, err = cli("dpo", "--model", GGUF, "--out", tmp_path / "dpo", "--lora", "r=4,alpha=8,targets=q,v",
                       *common)
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["steps"] == 1 and s["val_pairs"] == 2
    _assert_lora_checkpoint(tmp_path / "dpo" / "last", GGUF)
    rc, out, err = cli("reward", "train", "--model", GGUF, "--out", tmp_path / "rm", *common)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 1
    rc, out, err = cli("ppo", "--model", GGUF, "--reward", f"python:{reward_py}:count_a", "--prompts", prompts_file,
                       "--out", tmp_path / "ppo", "--rollouts", "1", "--batch-size", "2", "--max-new-tokens", "3",
                       "--ppo-epochs", "1", "--lora", "r=4,alpha=8,targets=q,v", "--no-progress")
    assert rc == 0, err
    rows = [x for x in read_jsonl(tmp_path / "ppo" / "metrics.jsonl") if "reward" in x]
    assert len(rows) == 1 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapters start at zero
    _assert_lora_checkpoint(tmp_path / "ppo" / "last", GGUF)


# ---- PPO with LoRA -------------------------------------------------------------------------------------------
def test_ppo_lora_resumes_exactly_and_merges_from_the_run_dir(tmp_path, tiny_run, cli):
    from lmstack.train.ppo import PPOConfig, train_ppo
    from lmstack.train.reward import finetune_config
    base = tiny_run[0] / "last"

    def count_e(prompts, completions):
        return [float(c.count("e")) for c in completions]
    ppo = PPOConfig(rollout_batch=4, max_new_tokens=6, ppo_epochs=2, minibatches=2, horizon=16,
                    lora="r=4,alpha=8,dropout=0.1,targets=q,k,v,o")
    common = {"lr": 3e-3, "min_lr": 3e-3, "lr_schedule": "constant", "warmup_steps": 0, "progress": False,
              "ckpt_interval": 4}
    prompts, q = ["The", "A cat", "Where"], dict(log=lambda *a: None)
    a = train_ppo(str(base), count_e, prompts, finetune_config(tmp_path / "a", common), ppo, 4, **q)
    train_ppo(str(base), count_e, prompts, finetune_config(tmp_path / "b", common), ppo, 2, **q)
    b = train_ppo(str(base), count_e, prompts, finetune_config(tmp_path / "b", {**common, "resume": True}), ppo, 4,
                  **q)
    for f in ("model.safetensors", "value_head.safetensors"):
        x, y = load_file(str(tmp_path / "a" / "last" / f)), load_file(str(tmp_path / "b" / "last" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
    assert a["final_kl_coef"] == b["final_kl_coef"] != 0.1
    rows = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "reward" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # reference = adapters disabled = the starting policy
    assert [r["train_loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "train_loss" in r] == \
        [r["train_loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "train_loss" in r]
    _assert_lora_checkpoint(tmp_path / "a" / "last", base)
    _merged_matches_base_plus_adapter(tmp_path / "a", base)
    rc, out, err = cli("merge-lora", tmp_path / "a", "--out", tmp_path / "merged")
    assert rc == 0, err
    assert json.loads(out)["max_logit_diff"] < 1e-5
    x = torch.randint(0, 60, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(lmstack.load(tmp_path / "merged").model(x),
                                   lmstack.load(tmp_path / "a" / "last").model(x), atol=1e-5, rtol=0)
    rc, out, err = cli("merge-lora", "--out", tmp_path / "m2")
    assert rc == 2 and "run directory" in err


# ---- DPO with LoRA: exact resume after SIGKILL ---------------------------------------------------------------
DPO_STEPS = 300


def _dpo_cmd(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmstack.cli", "dpo", "--model", str(base), "--data", str(data), "--out", str(out),
            "--lora", "r=4,alpha=8", "--steps", str(DPO_STEPS), "--batch-size", "2", "--eval-interval", "20",
            "--val-fraction", "0.34", "--lr", "1e-3", "--no-progress", "--set", "threads=1", *extra]


def test_dpo_lora_resumes_exactly_after_sigkill(tmp_path, tiny_run, prefs_file):
    base = tiny_run[0] / "last"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.Popen(_dpo_cmd(base, prefs_file, ref_out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_dpo_cmd(base, prefs_file, run_out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    state = run_out / "last" / "train_state.pt"
    try:
        sigkill_when(victim, state.exists)
        assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        killed = torch.load(state, weights_only=True)["step"]
        assert 0 < killed < DPO_STEPS
        resumed = subprocess.run(_dpo_cmd(base, prefs_file, run_out, "--resume"), cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    a, b = load_file(str(ref_out / "last" / "model.safetensors")), load_file(str(run_out / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and a and all(".lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained

    def rows(out, key):
        return [(r["step"], r[key]) for r in read_jsonl(out / "metrics.jsonl") if key in r]
    assert [s for s, _ in rows(ref_out, "train_loss")] == list(range(1, DPO_STEPS + 1))
    for key in ("train_loss", "val_loss", "val_accuracy", "rewards/margins", "final_val_loss"):
        got, want = rows(run_out, key), rows(ref_out, key)
        assert [s for s, _ in got] == [s for s, _ in want] and want, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), key
    _assert_lora_checkpoint(run_out / "last", base)
