"""Reward model, DPO and PPO (issue 7): losses against hand-computed formulas, GAE, the adaptive KL controller,
reward-model save/load, preference-data errors, and a few-step CLI run of each verb on the tiny checkpoint."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_chat_checkpoint, read_jsonl, run_cli
from lmstack.errors import LMStackError


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# ---- losses against the formulas ------------------------------------------------------------------------------
def test_dpo_loss_matches_hand_computed_formula():
    from lmstack.train.dpo import dpo_loss
    pc, pr = torch.tensor([-5.0, -3.0]), torch.tensor([-7.0, -2.0])
    rc, rr = torch.tensor([-6.0, -3.5]), torch.tensor([-6.5, -2.5])
    beta = 0.1
    # row 0: h = (-5 + 7) - (-6 + 6.5) = 1.5;  row 1: h = (-3 + 2) - (-3.5 + 2.5) = 0.0
    expected = (_softplus(-0.15) + _softplus(0.0)) / 2        # -log sigmoid(beta h)
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert r_c.tolist() == pytest.approx([0.1, 0.05])            # beta (pi_c - ref_c)
    assert r_r.tolist() == pytest.approx([-0.05, 0.05])          # beta (pi_r - ref_r)
    # label smoothing (cDPO): (1 - e) softplus(-beta h) + e softplus(beta h)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    expected = (0.8 * _softplus(-0.15) + 0.2 * _softplus(0.15) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # IPO: (h - 1 / (2 beta))^2
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(((1.5 - 5) ** 2 + (0 - 5) ** 2) / 2, abs=1e-5)
    with pytest.raises(LMStackError):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge-ish")


def test_bradley_terry_loss_matches_formula():
    from lmstack.train.reward import bt_loss
    rc, rr = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])
    expected = (_softplus(-1.0) + _softplus(2.0) + math.log(2)) / 3   # -log sigmoid(rc - rr)
    assert bt_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)


def test_sequence_logprobs_sums_completion_tokens_only(tiny_cfg):
    from lmstack.data.prefs import collate
    from lmstack.models.transformer import Transformer
    from lmstack.train.dpo import sequence_logprobs
    torch.manual_seed(0)
    m = Transformer(tiny_cfg).eval()
    seqs = [([1, 2, 3, 4, 5], 2), ([7, 8, 9], 1)]             # (ids, prompt_len)
    ids, attn, comp = collate(seqs)
    got = sequence_logprobs(m, ids, attn, comp)
    for b, (s, plen) in enumerate(seqs):
        lp = torch.log_softmax(m(torch.tensor([s])), -1)[0]
        want = sum(lp[t - 1, s[t]].item() for t in range(plen, len(s)))
        assert got[b].item() == pytest.approx(want, abs=1e-5)


# ---- PPO pieces -----------------------------------------------------------------------------------------------
def test_gae_matches_hand_computed_example():
    from lmstack.train.ppo import gae
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.5)
    # t=2: 1 - 0.3 = 0.7;  t=1: (0 + 0.3 - 0.4) + 0.5 * 0.7 = 0.25;  t=0: (0 + 0.4 - 0.5) + 0.5 * 0.25 = 0.025
    assert adv[0].tolist() == pytest.approx([0.025, 0.25, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.525, 0.65, 1.0], abs=1e-6)
    # discounting: gamma=0.9, lam=1 -> advantages are discounted returns minus values
    adv, _ = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.81 - 0.5, 0.9 - 0.4, 1.0 - 0.3], abs=1e-6)
    # masked slots (a prompt slot before, padding after) are ignored and get zero advantage
    r = torch.tensor([[9.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[7.0, 0.4, 0.3, 8.0]])
    adv, ret = gae(r, v, torch.tensor([[False, True, True, False]]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0, 0.25, 0.7, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, 0.65, 1.0, 0.0], abs=1e-6)


def test_adaptive_kl_controller_update():
    from lmstack.train.ppo import AdaptiveKLController, FixedKLController
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, 100)              # error clipped to +0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert c.value == pytest.approx(0.1 * 1.002)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, 100)               # error 0.1
    assert c.value == pytest.approx(0.1 * 1.001)
    c.update(0.0, 1000)              # error clipped to -0.2
    assert c.value == pytest.approx(0.1 * 1.001 * 0.98)
    f = FixedKLController(0.3)
    f.update(100.0, 100)
    assert f.value == 0.3


def test_ppo_clipped_losses_by_hand():
    from lmstack.train.ppo import ppo_losses
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))          # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    values, old_v, ret = torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[2.0, 0.0, 0.1]])
    pg, vf, st = ppo_losses(logp, old, values, old_v, adv, ret, mask, cliprange=0.2, cliprange_value=0.2)
    # max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2) = -1.2;  0.5 -> max(0.5, 0.8) = 0.8;  1.1 -> -2.2 (not clipped)
    assert pg.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert st["clipfrac"] == pytest.approx(2 / 3)
    # values: v=1 clipped to 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24; others: 0, max(0.01, 0.01)
    assert vf.item() == pytest.approx(0.5 * (3.24 + 0 + 0.01) / 3, abs=1e-6)


def test_reward_fn_specs(tmp_path):
    from lmstack.train.ppo import load_reward_fn
    f = tmp_path / "myreward.py"
    f.write_text("def fn(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    fn = load_reward_fn(f"python:{f}:fn")
    assert fn(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    sys.path.insert(0, str(tmp_path))
    try:
        assert load_reward_fn("python:myreward:fn")(["a"], ["abc"]) == [3.0]
    finally:
        sys.path.remove(str(tmp_path))
    for bad in ("python:myreward", f"python:{f}:nope", "python:no_such_module_xyz:f", str(tmp_path)):
        with pytest.raises(LMStackError):
            load_reward_fn(bad)


# ---- data -----------------------------------------------------------------------------------------------------
def test_load_prefs_formats_and_errors(tmp_path, tiny_run):
    from lmstack.checkpoint import load_model
    from lmstack.data.prefs import load_prefs
    run_dir, _ = tiny_run
    tok = make_chat_checkpoint(run_dir, tmp_path / "chat") and load_model(tmp_path / "chat")[1]
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "chosen": "good", "rejected": "bad"}) + "\n\n"
                 + json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                               "chosen": {"role": "assistant", "content": "yes"},
                               "rejected": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "no"}]}) + "\n")
    ex = load_prefs(p, tok)
    assert [(e.chosen, e.rejected, e.chat) for e in ex] == [("good", "bad", False), ("yes", "no", True)]
    assert ex[1].prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for line, needle in (('{"prompt": "x", "chosen": "y"', "invalid JSON"),
                         ('{"prompt": "x", "chosen": "y"}', "'rejected'"),
                         ('["x"]', "JSON object"),
                         ('{"prompt": 3, "chosen": "y", "rejected": "z"}', "'prompt'")):
        p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + line + "\n")
        with pytest.raises(LMStackError, match=f"p.jsonl:2: .*{needle}"):
            load_prefs(p, tok)
    with pytest.raises(LMStackError, match="no data file"):
        load_prefs(tmp_path / "missing.jsonl")
    from lmstack.data.prefs import load_prompts
    q = tmp_path / "q.jsonl"
    q.write_text('{"prompt": "Once"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert load_prompts(q, tok) == ["Once", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    q.write_text('{"prompt": "Once"}\n{"text": "x"}\n')
    with pytest.raises(LMStackError, match="q.jsonl:2: "):
        load_prompts(q, tok)
    t = tmp_path / "q.txt"
    t.write_text("a\n\nb\\nc\n")
    assert load_prompts(t) == ["a", "b\nc"]


# ---- reward model ---------------------------------------------------------------------------------------------
def test_reward_model_save_load_roundtrip_and_padding(tmp_path, tiny_run):
    import lmstack
    from lmstack.checkpoint import load_model
    from lmstack.data.prefs import collate, encode_pair
    from lmstack.train.reward import RewardModel, is_reward_model, load_reward_model, save_reward_model
    run_dir, _ = tiny_run
    backbone, tok = load_model(run_dir / "last")
    torch.manual_seed(0)
    rm = RewardModel(backbone).eval()
    texts = ["The cat sat.", "Dog!", "Where is the moon and the sun"]
    before = rm.score(tok, texts)
    # the head reads the last real token: a row alone == the same row padded in a batch
    alone = [rm.score(tok, [t])[0] for t in texts]
    assert before == pytest.approx(alone, abs=1e-5)
    save_reward_model(tmp_path / "rm", rm, tok)
    assert is_reward_model(tmp_path / "rm") and (tmp_path / "rm" / "reward_head.safetensors").exists()
    rm2, tok2 = load_reward_model(tmp_path / "rm")
    assert rm2.score(tok2, texts) == pytest.approx(before, abs=1e-6)
    assert lmstack.load(tmp_path / "rm").generate("The", max_new_tokens=3, temperature=0) is not None  # still an LM
    with pytest.raises(LMStackError, match="not a reward model"):
        load_reward_model(run_dir / "last")
    ids, attn, comp = collate([encode_pair(tok, "ab", "cd", 32)])
    assert attn.sum() == 5 and comp.tolist()[0] == [False, False, True, True, True]  # c, d + EOS


def test_reward_training_resumes_exactly(tmp_path, tiny_run, prefs_file):
    """HeadTrainer's checkpoints (backbone + head + optimizer) resume to the same floats as an unbroken run."""
    from safetensors.torch import load_file
    from lmstack.train.reward import finetune_config, train_reward
    run_dir, _ = tiny_run
    quiet = dict(log=lambda *a: None, val_fraction=0.34)
    common = {"lr_schedule": "constant", "warmup_steps": 0, "batch_size": 2, "eval_interval": 3, "progress": False}
    train_reward(str(run_dir / "last"), str(prefs_file), finetune_config(tmp_path / "a", {**common, "max_steps": 6}),
                 **quiet)
    train_reward(str(run_dir / "last"), str(prefs_file), finetune_config(tmp_path / "b", {**common, "max_steps": 3}),
                 **quiet)
    train_reward(str(run_dir / "last"), str(prefs_file),
                 finetune_config(tmp_path / "b", {**common, "max_steps": 6, "resume": True}), **quiet)
    for f in ("reward_head.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "last" / f)), load_file(str(tmp_path / "b" / "last" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert [r["train_loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == \
        [r["train_loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]


def test_ppo_resumes_exactly_at_a_rollout_boundary(tmp_path, tiny_run):
    """Policy, value head, optimizer and the adaptive KL coefficient come back from a checkpoint."""
    from safetensors.torch import load_file
    from lmstack.train.ppo import PPOConfig, train_ppo
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run

    def count_e(prompts, completions):
        return [float(c.count("e")) for c in completions]
    ppo = PPOConfig(rollout_batch=4, max_new_tokens=6, ppo_epochs=2, minibatches=2, horizon=16)
    common = {"lr": 1e-3, "min_lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "progress": False,
              "ckpt_interval": 4}
    prompts = ["The", "A cat", "Where"]
    q = dict(log=lambda *a: None)
    a = train_ppo(str(run_dir / "last"), count_e, prompts, finetune_config(tmp_path / "a", common), ppo, 4, **q)
    train_ppo(str(run_dir / "last"), count_e, prompts, finetune_config(tmp_path / "b", common), ppo, 2, **q)
    b = train_ppo(str(run_dir / "last"), count_e, prompts, finetune_config(tmp_path / "b", {**common, "resume": True}),
                  ppo, 4, **q)
    for f in ("model.safetensors", "value_head.safetensors"):
        x, y = load_file(str(tmp_path / "a" / "last" / f)), load_file(str(tmp_path / "b" / "last" / f))
        assert all(torch.equal(x[k], y[k]) for k in x), f
    assert a["final_kl_coef"] == b["final_kl_coef"] != 0.1


def test_ppo_resumes_exactly_inside_a_rollout(tmp_path, tiny_run):
    """A checkpoint in the middle of a rollout's minibatch updates saves that rollout; after a crash the resumed run
    finishes the rollout from the file (it can't be re-sampled: the policy has moved) and ends with the same floats,
    metrics and KL coefficient as a run that never stopped."""
    from safetensors.torch import load_file
    from lmstack.train.ppo import ROLLOUT_FILE, PPOConfig, train_ppo
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run
    calls = {"n": 0}

    def count_e(prompts, completions):
        return [float(c.count("e")) for c in completions]

    def crash_on_third_rollout(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return count_e(prompts, completions)
    ppo = PPOConfig(rollout_batch=4, max_new_tokens=6, ppo_epochs=2, minibatches=2, horizon=16)  # 4 updates/rollout
    common = {"lr": 1e-3, "min_lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "progress": False,
              "ckpt_interval": 6}
    prompts, q = ["The", "A cat", "Where"], dict(log=lambda *a: None)
    a = train_ppo(str(run_dir / "last"), count_e, prompts, finetune_config(tmp_path / "a", common), ppo, 4, **q)
    with pytest.raises(RuntimeError, match="killed"):  # dies at step 8; the last checkpoint is step 6 (mid-rollout 2)
        train_ppo(str(run_dir / "last"), crash_on_third_rollout, prompts, finetune_config(tmp_path / "b", common),
                  ppo, 4, **q)
    assert (tmp_path / "b" / "last" / ROLLOUT_FILE).exists()
    b = train_ppo(str(run_dir / "last"), count_e, prompts, finetune_config(tmp_path / "b", {**common, "resume": True}),
                  ppo, 4, **q)
    assert not (tmp_path / "b" / "last" / ROLLOUT_FILE).exists()  # the final checkpoint is on a boundary
    for f in ("model.safetensors", "value_head.safetensors"):
        x, y = load_file(str(tmp_path / "a" / "last" / f)), load_file(str(tmp_path / "b" / "last" / f))
        assert all(torch.equal(x[k], y[k]) for k in x), f
    ra, rb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if "elapsed" not in k and k not in ("tokens_per_sec", "train_s")}  # noqa: E731
                          for r in rows]
    assert strip(ra) == strip(rb) and len(ra) == 16
    assert a["final_kl_coef"] == b["final_kl_coef"] and a["end_reward"] == b["end_reward"] and b["rollouts"] == 4


# ---- CLI, a few steps each ------------------------------------------------------------------------------------
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`lmstack ARGS` in-process (no interpreter start-up per call); one test also runs it as a subprocess."""
    from lmstack.cli import main

    def run(*args: str) -> _Result:
        capsys.readouterr()
        threads = torch.get_num_threads()
        try:
            rc = main(list(args))
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)
    return run


PAIRS = [("The cat", " sat on the mat.", " jumps over dog."), ("Where is", " my good cat?", " the night?"),
         ("King and", " queen cat sang.", " lord sang."), ("A bird", " and a cat.", " and a dog."),
         ("Thou art", " my cat.", " my friend."), ("The sun", " cat star.", " moon star.")]


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    p.write_text("".join(json.dumps({"prompt": a, "chosen": b, "rejected": c}) + "\n" for a, b, c in PAIRS))
    return p


def test_cli_reward_train_and_score(tmp_path, tiny_run, prefs_file, cli):
    run_dir, _ = tiny_run
    out = tmp_path / "rm"
    r = run_cli("reward", "train", "--model", str(run_dir / "last"), "--data", str(prefs_file), "--out", str(out),
                "--steps", "4", "--batch-size", "2", "--eval-interval", "2", "--val-fraction", "0.34",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "held-out pairwise accuracy" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["val_pairs"] == 2 and 0.0 <= summary["val_accuracy"] <= 1.0
    # the reported accuracy is the held-out fraction recomputed here from the saved model
    from lmstack.data.prefs import load_prefs, split_prefs
    from lmstack.train.reward import load_reward_model
    rm, rtok = load_reward_model(out / "last")
    _, val = split_prefs(load_prefs(prefs_file, rtok), 0.34, seed=1337)   # the run's split (default seed)
    rc = rm.score_pairs(rtok, [e.prompt for e in val], [e.chosen for e in val])
    rr = rm.score_pairs(rtok, [e.prompt for e in val], [e.rejected for e in val])
    assert len(val) == 2 and min(abs(a - b) for a, b in zip(rc, rr)) > 1e-6  # no near-ties: the fraction is sharp
    assert summary["val_accuracy"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / len(val))
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["step"] == 4 and "val_accuracy" in rows[-1]
    r = cli("reward", "score", "--model", str(out / "last"), "the cat sat", "the dog")
    assert r.returncode == 0, r.stderr
    scores = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [s["text"] for s in scores] == ["the cat sat", "the dog"] and all(math.isfinite(s["score"]) for s in scores)
    r = cli("reward", "score", "--model", str(run_dir / "last"), "x")
    assert r.returncode == 2 and "not a reward model" in r.stderr


def test_cli_dpo_full_and_lora(tmp_path, tiny_run, prefs_file, cli):
    import lmstack
    run_dir, _ = tiny_run
    out = tmp_path / "dpo"
    r = cli("dpo", "--model", str(run_dir / "last"), "--data", str(prefs_file), "--out", str(out), "--steps", "3",
                "--batch-size", "2", "--eval-interval", "3", "--val-fraction", "0.34", "--beta", "0.2",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "held-out preference accuracy" in r.stdout
    rec = [x for x in read_jsonl(out / "metrics.jsonl") if "val_accuracy" in x][-1]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "val_margin"):
        assert k in rec
    lmstack.load(out / "last")
    out2 = tmp_path / "dpo_lora"
    r = cli("dpo", "--model", str(run_dir / "last"), "--data", str(prefs_file), "--out", str(out2), "--steps", "2",
                "--batch-size", "2", "--lora", "r=4,alpha=8,dropout=0,targets=q,v", "--ref", "live", "--no-progress")
    assert r.returncode == 0, r.stderr
    # the one LoRA layout (as SFT's): adapter tensors + adapter files naming the base, in last/ itself
    from safetensors.torch import load_file
    from lmstack.models.lora import load_adapter
    assert (out2 / "last" / "adapter_config.json").is_file() and (out2 / "last" / "adapter_model.safetensors").is_file()
    assert all(".lora_" in k for k in load_file(str(out2 / "last" / "model.safetensors")))
    merged = lmstack.load(out2 / "last")  # the merged policy, built from the recorded base + the adapter
    policy = lmstack.load(run_dir / "last").model
    load_adapter(policy, out2 / "last")   # base + adapter, unmerged: the model DPO trained
    x = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        want, got = policy(x), merged.model(x)
        base_logits = lmstack.load(run_dir / "last").model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base_logits, atol=1e-6)  # the adapter did train (B moved away from zero)
    # merge-lora from the run directory alone (the run records its base model)
    r = cli("merge-lora", str(out2), "--out", str(tmp_path / "dpo_merged"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_logit_diff"] < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(lmstack.load(tmp_path / "dpo_merged").model(x), want, atol=1e-5, rtol=0)
    r = cli("dpo", "--model", str(run_dir / "last"), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out2))
    assert r.returncode == 2 and "no data file" in r.stderr


def test_cli_ppo_with_python_reward_and_reward_model(tmp_path, tiny_run, prefs_file, cli):
    import lmstack
    from lmstack.checkpoint import load_model
    from lmstack.train.reward import RewardModel, save_reward_model
    run_dir, _ = tiny_run
    fn = tmp_path / "rew.py"
    fn.write_text("def count_a(prompts, completions):\n    return [float(c.count('a')) for c in completions]\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The\nA cat\nWhere\n")
    out = tmp_path / "ppo"
    r = cli("ppo", "--model", str(run_dir / "last"), "--reward", f"python:{fn}:count_a", "--prompts", str(prompts),
                "--out", str(out), "--rollouts", "3", "--batch-size", "4", "--max-new-tokens", "6", "--ppo-epochs", "2",
                "--minibatches", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [x for x in read_jsonl(out / "metrics.jsonl") if "reward" in x]
    assert [x["rollout"] for x in rows] == [1, 2, 3]
    for k in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "pg_loss", "vf_loss", "approx_kl"):
        assert all(math.isfinite(x[k]) for x in rows), k
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)      # first rollout: policy == reference
    assert (out / "last" / "value_head.safetensors").exists() and (out / "ppo.png").exists()
    lmstack.load(out / "last")
    # a reward-model directory as the reward
    backbone, tok = load_model(run_dir / "last")
    save_reward_model(tmp_path / "rm", RewardModel(backbone), tok)
    r = cli("ppo", "--model", str(run_dir / "last"), "--reward", str(tmp_path / "rm"), "--prompts", str(prompts),
                "--out", str(tmp_path / "ppo2"), "--rollouts", "1", "--batch-size", "2", "--max-new-tokens", "4",
                "--ppo-epochs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("ppo", "--model", str(run_dir / "last"), "--reward", "python:nosuchmod_q:f", "--prompts", str(prompts),
                "--out", str(tmp_path / "ppo3"))
    assert r.returncode == 2 and "cannot import" in r.stderr


# ---- the demonstrations (short versions; benchmarks/rlhf_demo.py has the full ones) ---------------------------
@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import rlhf_demo
    return rlhf_demo


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory, demo):
    """The demo's base model (300 pretraining steps, ~25 s), shared by the demo tests."""
    return demo.pretrain_base(tmp_path_factory.mktemp("rlhf_demo"), 300, log=lambda *a: None)


@pytest.mark.slow
def test_demo_dpo_reaches_held_out_accuracy(tmp_path, demo, demo_base):
    base = demo_base
    s = demo.run_dpo(base, tmp_path, 60, 300, log=lambda *a: None)
    assert s["val_accuracy"] >= 0.9
    s = demo.run_reward(base, tmp_path, 60, log=lambda *a: None)
    assert s["val_accuracy"] >= 0.9


@pytest.mark.slow
def test_demo_ppo_raises_reward_with_bounded_kl(tmp_path, demo, demo_base):
    base = demo_base
    s = demo.run_ppo(base, tmp_path, 30, 16, log=lambda *a: None)
    assert s["end_reward"] > s["start_reward"] + 0.5
    assert s["max_kl"] < 40


# ---- reward regression on ratings (issue 17) ------------------------------------------------------------------
RATINGS = [("The cat", " sat on the mat.", 7), ("The cat", " the night?", 1), ("Where is", " my good cat?", 6),
           ("Where is", " lord sang.", 2), ("A bird", " and a cat.", 6.5), ("A bird", " and a dog.", 2.5),
           ("Thou art", " my cat.", 7), ("Thou art", " my friend.", 3)]


def test_cli_reward_train_regression_lowers_rating_mse(tmp_path, tiny_run, cli):
    """`reward train --objective regression`: the reward head learns the ratings (training-set MSE against
    (rating - 4) / 1.5, recomputed here from the saved model, falls); malformed ratings fail with file:line."""
    from lmstack.data.prefs import load_ratings, rating_target
    from lmstack.train.reward import RewardModel, load_reward_model
    run_dir, _ = tiny_run
    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c, "rating": r, "tags": ["t"]}) + "\n"
                            for p, c, r in RATINGS))
    ex = load_ratings(data)
    y = torch.tensor([rating_target(e.rating) for e in ex])

    def mse(rm, tok):
        return float(((torch.tensor(rm.score_pairs(tok, [e.prompt for e in ex], [e.completion for e in ex])) - y) ** 2)
                     .mean())
    from lmstack.checkpoint import load_model
    backbone, tok = load_model(run_dir / "last")
    torch.manual_seed(1337)                         # the run's seed: the same initial head as the run starts from
    before = mse(RewardModel(backbone).eval(), tok)
    out = tmp_path / "rm"
    r = cli("reward", "train", "--objective", "regression", "--model", str(run_dir / "last"), "--data", str(data),
            "--out", str(out), "--steps", "30", "--batch-size", "4", "--val-fraction", "0", "--lr", "3e-3",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["objective"] == "regression" and summary["train_ratings"] == len(RATINGS)
    rm, rtok = load_reward_model(out / "last")
    after = mse(rm, rtok)
    assert after < 0.5 * before, (before, after)
    assert json.loads((out / "last" / "reward_config.json").read_text())["objective"] == "regression"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b", "rating": 4}) + "\n"
                   + json.dumps({"prompt": "a", "completion": "b", "rating": 9}) + "\n")
    r = cli("reward", "train", "--objective", "regression", "--model", str(run_dir / "last"), "--data", str(bad),
            "--out", str(tmp_path / "rm2"), "--steps", "1", "--no-progress")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "1 to 7" in r.stderr
