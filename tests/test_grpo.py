"""GRPO: group advantages, the clipped loss and k3 KL by hand, the verifiable rewards, the arithmetic generator, a
CLI run (metrics + PNG), exact resume, and a tiny learning test."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import read_jsonl


# ---- the pieces, by hand --------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    from lmstack.train.grpo import group_advantages
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second has zero std
    adv = group_advantages(r, 4, scale=True, eps=0.0)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert adv[4:].tolist() == [0.0] * 4                     # equal rewards: no signal
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_grpo_loss_and_clip_by_hand():
    from lmstack.train.grpo import grpo_loss
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.9), 0.0], [math.log(0.5), 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, st = grpo_loss(logp, old, adv, mask, cliprange=0.2)
    # row 0 (A=1): ratios 1.5 -> clipped to 1.2 (min of 1.5, 1.2), 0.9 -> 0.9; row 1 (A=-2): ratio 0.5 -> clip 0.8,
    # -A*ratio = 1.0 vs -A*0.8 = 1.6 -> max 1.6 (clipped)
    per_tok = [-1.2, -0.9, 1.6]
    assert float(loss) == pytest.approx(sum(per_tok) / 3)
    assert st["clipfrac"] == pytest.approx(2 / 3)
    seq, _ = grpo_loss(logp, old, adv, mask, cliprange=0.2, agg="sequence")
    assert float(seq) == pytest.approx(((-1.2 - 0.9) / 2 + 1.6) / 2)
    hi, _ = grpo_loss(logp, old, adv, mask, cliprange=0.2, cliprange_high=0.6)  # clip-higher: 1.5 stays
    assert float(hi) == pytest.approx((-1.5 - 0.9 + 1.6) / 3)
    # the gradient flows through the unclipped token only (row 0, token 1: d(-A ratio)/d logp = -ratio)
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, adv, mask, cliprange=0.2)[0].backward()
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, -0.9 / 3, 0.0, 0.0, 0.0, 0.0])


def test_k3_kl_zero_at_the_reference_and_positive_elsewhere():
    from lmstack.train.grpo import grpo_loss, k3_kl
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    assert k3_kl(lp, lp).abs().max() == 0
    ref = torch.log(torch.tensor([[0.4, 0.5, 0.3]]))
    d = ref - lp
    assert k3_kl(lp, ref)[0].tolist() == pytest.approx((torch.exp(d) - d - 1)[0].tolist())
    assert (k3_kl(lp, ref) >= 0).all() and k3_kl(lp, ref)[0, 0] > 0
    mask = torch.ones(1, 3, dtype=torch.bool)
    base, _ = grpo_loss(lp, lp.detach(), torch.zeros(1), mask, ref_logp=ref, kl_coef=0.0)
    pen, st = grpo_loss(lp, lp.detach(), torch.zeros(1), mask, ref_logp=ref, kl_coef=0.5)
    assert float(base) == 0 and float(pen) == pytest.approx(0.5 * float(k3_kl(lp, ref).mean()))
    assert st["kl"] == pytest.approx(float(k3_kl(lp, ref).mean()))


def test_completion_logprobs_match_full_softmax():
    from conftest import lively_model
    from lmstack.train.grpo import completion_logprobs
    from lmstack.train.ppo import policy_logprobs
    m = lively_model()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 2:6] = True
    mask[2, 8] = True
    with torch.no_grad():
        lp, ent = completion_logprobs(m, ids, mask, temperature=0.7)
        ref_lp, ref_ent = policy_logprobs(m(ids), ids, 0.7)
    assert torch.allclose(lp[mask], ref_lp[mask], atol=1e-5) and torch.allclose(ent[mask], ref_ent[mask], atol=1e-4)
    assert (lp[~mask] == 0).all()


# ---- rewards --------------------------------------------------------------------------------------------------
def test_extract_answer_formats():
    from lmstack.train.rewards import extract_answer
    assert extract_answer("so 40 + 2 = 42\n#### 42") == "42"
    assert extract_answer("#### 1,234.") == "1234"
    assert extract_answer("#### 7 then #### -3") == "-3"
    assert extract_answer("It is 17, not 18.") == "18"            # no marker: the last number
    assert extract_answer("It is 17, not 18.", strict=True) is None
    assert extract_answer("$3.50") == "3.5" and extract_answer("no digits") is None


@pytest.mark.parametrize("spec, completion, record, want", [
    ("exact-match", "47 + 5 = 52\n#### 52", {"answer": "52"}, 1.0),
    ("exact-match", "the answer is 52.", {"answer": 52}, 1.0),
    ("exact-match", "#### 51", {"answer": "52"}, 0.0),
    ("exact-match", "I don't know", {"answer": "52"}, 0.0),
    ("strict-match", "the answer is 52.", {"answer": "52"}, 0.0),
    ("strict-match", "#### 52", {"answer": "52"}, 1.0),
    ("numeric:0.01", "#### 3.141", {"answer": "3.14159"}, 1.0),
    ("numeric:0.0001", "#### 3.141", {"answer": "3.14159"}, 0.0),
    ("numeric:1%", "about 99", {"answer": "100"}, 1.0),
    ("numeric", "nothing", {"answer": "1"}, 0.0),
    ("regex:^yes\\b", "yes, it is", {}, 1.0),
    ("regex:^yes\\b", "no", {}, 0.0),
    ("regex:answer: {answer}$", "answer: 1+1", {"answer": "1+1"}, 1.0),   # the answer is escaped
    ("regex", "abc123", {"regex": "[0-9]{3}"}, 1.0),
    ("exact-match+0.5*regex:####", "#### 52", {"answer": "52"}, 1.5),
    ("exact-match+0.5*regex:####", "52", {"answer": "52"}, 1.0),
])
def test_builtin_rewards(spec, completion, record, want):
    from lmstack.train.rewards import load_rewards
    assert load_rewards(spec)(["p"], [completion], [record]) == [pytest.approx(want)]


def test_python_tests_reward_pass_fail_crash_timeout():
    from lmstack.train.rewards import load_rewards, run_python_tests
    rec = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    f = load_rewards("python-tests:20")
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert f(["p"] * 4, [good, "def add(a, b):\n    return a - b", "def add(a, b) return", "no code"],
             [rec] * 4) == [1.0, 0.0, 0.0, 0.0]
    ok, why = run_python_tests("import time\ntime.sleep(60)", "", timeout=0.5)
    assert not ok and "timeout" in why
    assert load_rewards("python-tests:0.5")(["p"], ["while True:\n    pass"], [rec]) == [0.0]


def test_user_reward_functions(tmp_path):
    from lmstack.train.rewards import load_rewards
    f = tmp_path / "myrew.py"
    f.write_text("def by_answer(prompt, completion, answer):\n    return float(completion.strip() == answer)\n"
                 "def by_record(prompt, completion, record):\n    return float(len(completion) == record['n'])\n"
                 "def too_few(completion):\n    return 1.0\n")
    assert load_rewards(f"python:{f}:by_answer")(["p", "p"], ["7", "8"], [{"answer": "7"}] * 2) == [1.0, 0.0]
    assert load_rewards(f"python:{f}:by_record")(["p"], ["abc"], [{"n": 3}]) == [1.0]
    assert load_rewards(lambda p, c, r: len(c))(["p"], ["abcd"], [{}]) == [4.0]


@pytest.mark.parametrize("spec, msg", [
    ("exact", "unknown --reward"), ("numeric:abc", "not a number"), ("regex:([", "bad regular expression"),
    ("python-tests:0", "must be > 0"), ("python:nosuchmod_zz:f", "cannot import"), ("", "empty"),
])
def test_bad_reward_specs(spec, msg, tmp_path):
    from lmstack.errors import LMStackError
    from lmstack.train.rewards import load_rewards
    with pytest.raises(LMStackError, match=msg):
        load_rewards(spec)


def test_reward_needs_its_record_field():
    from lmstack.errors import LMStackError
    from lmstack.train.rewards import load_rewards
    with pytest.raises(LMStackError, match="'answer'"):
        load_rewards("exact-match")(["p"], ["1"], [{}])
    with pytest.raises(LMStackError, match="'tests'"):
        load_rewards("python-tests")(["p"], ["1"], [{}])


def test_arithmetic_split_is_disjoint_and_correct():
    from lmstack.data import arithmetic
    train, test = arithmetic.split(300, 100, seed=3, digits=(2, 3))
    assert len(train) == 300 and len(test) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in train + test:
        a, op, b = r["question"].removeprefix("What is ").rstrip("?").split()
        assert 2 <= len(a) <= 3 and 2 <= len(b) <= 3
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and int(r["answer"]) >= 0
    assert arithmetic.split(300, 100, seed=3, digits=(2, 3)) == (train, test)
    recs = arithmetic.as_prompts(test[:2])
    assert recs[0]["answer"] == test[0]["answer"] and "####" in recs[0]["prompt"]


# ---- runs on a tiny model -------------------------------------------------------------------------------------
def _prompts_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n"
                         for q, a in [("The", "1"), ("A cat", "2"), ("Where", "3"), ("King", "4")]))
    return p


def test_cli_grpo_writes_metrics_and_png(tmp_path, tiny_run):
    from lmstack.cli import main
    run_dir, _ = tiny_run
    rew = tmp_path / "rew.py"
    rew.write_text("def count_e(prompt, completion, answer):\n    return float(completion.count('e'))\n")
    out = tmp_path / "grpo"
    threads = torch.get_num_threads()
    try:
        rc = main(["grpo", "--model", str(run_dir / "last"), "--prompts", str(_prompts_file(tmp_path)),
                   "--reward", f"python:{rew}:count_e", "--out", str(out), "--steps", "3", "--group-size", "4",
                   "--prompts-per-step", "2", "--max-new-tokens", "6", "--kl-coef", "0.05", "--lora",
                   "r=4,alpha=8,targets=q,v", "--no-progress", "--oversample", "2", "--filter-groups"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "rollout" in r]
    assert [r["rollout"] for r in rows] == [1, 2, 3]
    assert all(1 <= r["kept_groups"] <= 2 for r in rows)  # 4 groups sampled, at most 2 kept
    for k in ("reward", "reward_std", "kl", "entropy", "completion_len", "clipfrac", "accuracy"):
        assert all(math.isfinite(r[k]) for r in rows), k
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)          # the first rollout: policy == reference
    assert (out / "grpo.png").stat().st_size > 0 and (out / "last" / "adapter_config.json").exists()
    assert main(["grpo", "--model", str(run_dir / "last"), "--prompts", str(_prompts_file(tmp_path)),
                 "--reward", "exactly", "--out", str(tmp_path / "x")]) == 2
    assert main(["grpo", "--model", str(run_dir / "last"), "--prompts", str(_prompts_file(tmp_path)),
                 "--reward", "exact-match", "--group-size", "1", "--out", str(tmp_path / "y")]) == 2


def test_grpo_resumes_exactly(tmp_path, tiny_run):
    from safetensors.torch import load_file
    from lmstack.train.grpo import GRPOConfig, train_grpo
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run
    g = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, ppo_epochs=2, minibatches=2, kl_coef=0.1)
    common = {"lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "progress": False, "ckpt_interval": 4}
    prompts = str(_prompts_file(tmp_path))
    rew = lambda p, c, r: float(c.count("e"))  # noqa: E731
    q = dict(log=lambda *a: None)
    train_grpo(str(run_dir / "last"), rew, prompts, finetune_config(tmp_path / "a", common), g, 4, **q)
    train_grpo(str(run_dir / "last"), rew, prompts, finetune_config(tmp_path / "b", common), g, 2, **q)
    train_grpo(str(run_dir / "last"), rew, prompts, finetune_config(tmp_path / "b", {**common, "resume": True}), g, 4,
               **q)
    x, y = load_file(str(tmp_path / "a" / "last" / "model.safetensors")), \
        load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    ra, rb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb] and len(ra) == 16
    assert [r.get("reward") for r in ra] == [r.get("reward") for r in rb]


def test_grpo_raises_the_probability_of_a_rewarded_token(tmp_path, tiny_run):
    """Reward = the share of 'e' characters in the completion: GRPO must raise p('e') after the prompt."""
    from lmstack.checkpoint import load_model
    from lmstack.convert.load import load_any
    from lmstack.train.grpo import GRPOConfig, train_grpo
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run
    model, tok = load_model(run_dir / "last")
    e = tok.encode("e")[0]

    def p_e(m) -> float:
        ids = torch.tensor([tok.encode_prompt("The")])
        with torch.no_grad():
            return float(torch.softmax(m(ids)[0, -1].float(), -1)[e])
    before = p_e(model.eval())
    g = GRPOConfig(group_size=8, prompts_per_step=2, max_new_tokens=4)
    cfg = finetune_config(tmp_path / "learn", {"lr": 3e-3, "lr_schedule": "constant", "warmup_steps": 0,
                                               "progress": False})
    rew = lambda p, c, r: c.count("e") / max(1, len(c))  # noqa: E731
    train_grpo(str(run_dir / "last"), rew, ["The"], cfg, g, 15, log=lambda *a: None)
    after = p_e(load_any(tmp_path / "learn" / "last")[0])
    assert after > before + 0.15, (before, after)  # 0.04 -> 0.26 here; the negated reward drives it to 0.003


def test_kept_groups_by_hand():
    """Plain GRPO keeps every group; oversampling keeps prompts_per_step groups, those with a reward spread first;
    filter_groups keeps only groups with a spread (one group when none has)."""
    from lmstack.train.grpo import GRPOConfig, GRPOObjective
    spread = torch.tensor([False, True, False, True, True, False])
    obj = GRPOObjective.__new__(GRPOObjective)
    for kw, want in ((dict(prompts_per_step=6), [0, 1, 2, 3, 4, 5]),
                     (dict(prompts_per_step=3, oversample=2), [1, 3, 4]),
                     (dict(prompts_per_step=2, oversample=3), [1, 3]),
                     (dict(prompts_per_step=6, filter_groups=True), [1, 3, 4]),
                     (dict(prompts_per_step=2, oversample=3, filter_groups=True), [1, 3])):
        obj.g = GRPOConfig(**kw)
        assert obj.kept_groups(spread).tolist() == want, kw
    obj.g = GRPOConfig(prompts_per_step=6, filter_groups=True)
    assert obj.kept_groups(torch.zeros(6, dtype=torch.bool)).tolist() == [0]


def test_grpo_filter_groups_oversample_and_best_checkpoint(tmp_path, tiny_run):
    """A reward that is the same for every completion of two of the prompts: those groups never reach the update
    (kept_groups counts the rest); with eval prompts, <out>/best is the step of the highest eval accuracy."""
    from lmstack.train.grpo import GRPOConfig, train_grpo
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run
    recs = [{"prompt": q, "answer": a} for q, a in [("The", "1"), ("A cat", "2"), ("Where", "3"), ("King", "4")]]
    rew = lambda p, c, r: 0.5 if p in ("The", "King") else float(c.count("e"))  # noqa: E731
    g = GRPOConfig(group_size=4, prompts_per_step=2, oversample=2, filter_groups=True, max_new_tokens=6,
                   eval_every=1)
    cfg = finetune_config(tmp_path / "f", {"lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0,
                                           "progress": False, "keep_best": True})
    s = train_grpo(str(run_dir / "last"), rew, recs, cfg, g, 4, eval_prompts=recs[:2], log=lambda *a: None)
    rows = [r for r in read_jsonl(tmp_path / "f" / "metrics.jsonl") if "rollout" in r]
    assert len(rows) == 4
    for r in rows:
        assert 1 <= r["kept_groups"] <= 2 and r["zero_std_groups"] >= 0.5 - 1e-9  # 'The'/'King' groups: no spread
    accs = [r["eval_accuracy"] for r in rows]
    assert s["best_step"] == 1 + accs.index(max(accs)) and s["best_eval_accuracy"] == max(accs)
    assert s["best_model"] == str(tmp_path / "f" / "best") and (tmp_path / "f" / "best").is_dir()


def test_grpo_resumes_exactly_inside_a_rollout(tmp_path, tiny_run):
    """A checkpoint between a rollout's minibatch updates saves that rollout (it can't be re-sampled: the policy has
    moved); after a crash the resumed run finishes it from the file and ends with the floats and metrics of a run
    that never stopped."""
    from safetensors.torch import load_file
    from lmstack.train.grpo import GRPOConfig, train_grpo
    from lmstack.train.ppo import ROLLOUT_FILE
    from lmstack.train.reward import finetune_config
    run_dir, _ = tiny_run
    g = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, ppo_epochs=2, minibatches=2, kl_coef=0.1)
    common = {"lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "progress": False, "ckpt_interval": 6}
    prompts, q = str(_prompts_file(tmp_path)), dict(log=lambda *a: None)
    calls = {"n": 0}

    def rew(p, c, r):
        return float(c.count("e"))

    def crash_in_third_rollout(p, c, r):
        calls["n"] += 1
        if calls["n"] > 16:  # 8 completions per rollout
            raise RuntimeError("killed")
        return rew(p, c, r)
    a = train_grpo(str(run_dir / "last"), rew, prompts, finetune_config(tmp_path / "a", common), g, 4, **q)
    with pytest.raises(RuntimeError, match="killed"):  # dies at step 8; the last checkpoint is step 6 (mid-rollout 2)
        train_grpo(str(run_dir / "last"), crash_in_third_rollout, prompts, finetune_config(tmp_path / "b", common),
                   g, 4, **q)
    assert (tmp_path / "b" / "last" / ROLLOUT_FILE).exists()
    b = train_grpo(str(run_dir / "last"), rew, prompts, finetune_config(tmp_path / "b", {**common, "resume": True}),
                   g, 4, **q)
    assert not (tmp_path / "b" / "last" / ROLLOUT_FILE).exists()  # the final checkpoint is on a boundary
    x, y = load_file(str(tmp_path / "a" / "last" / "model.safetensors")), \
        load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    ra, rb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if "elapsed" not in k and not k.endswith("_s")  # noqa: E731
                           and k != "tokens_per_sec"} for r in rows]
    assert strip(ra) == strip(rb) and len(ra) == 16
    assert a["end_reward"] == b["end_reward"] and b["rollouts"] == 4
