"""IsoFLOP sweeps: the shape rule, the FLOPs convention, the size grid, and micro sweeps end to end (runs.jsonl that
`fit` reads, skipping finished runs, exact resume of an interrupted one, the prediction check)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, make_text
from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.models import Transformer
from lmstack.scaling import load_runs
from lmstack.scaling import prediction as ck
from lmstack.scaling import sweep as sw
from lmstack.scaling.fit import approach2_predict, approach3_predict, budget_key
from lmstack.scaling.laws import Parametric
from lmstack.train.config import yaml_load

BASE_MODEL = ModelConfig(vocab_size=2048, block_size=128, n_layer=1, n_embd=64, n_head=1, pos_emb="rope",
                         norm="rmsnorm", mlp="gelu", bias=False, tie_embeddings=True)
# micro sweeps: char tokenizer on a small synthetic file, context 32, 4 x 32 tokens a step, small final eval
MICRO = ["tokenizer=char", "model.block_size=32", "batch_size=4", "final_eval_windows=16", "eval_iters=1",
         "log_interval=1000"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text(make_text(800))
    return str(p)


def micro_sweep(out, corpus, budgets=(1e9, 3e9), sizes=3, **kw):
    kw.setdefault("plot", None)
    return sw.run_sweep(out, list(budgets), sizes, corpus=corpus, overrides=MICRO, progress=False,
                        log=lambda *a: None, **kw)


# ---- shape rule, FLOPs, grid ----------------------------------------------------------------------
def test_shape_rule_is_monotone_and_hits_targets():
    ladder = sw.shape_ladder(BASE_MODEL, max_width=1024)
    ns = [m.num_params() for m in ladder]
    assert all(a < b for a, b in zip(ns, ns[1:]))
    assert [(m.n_layer, m.n_embd, m.n_head) for m in ladder[:4]] == [(1, 16, 1), (1, 32, 2), (2, 48, 3), (2, 64, 4)]
    assert all(m.n_embd == 16 * m.n_head and m.n_layer == max(1, math.floor(m.n_embd / 32 + 0.5)) for m in ladder)
    for t in [2e5 * 1.37 ** k for k in range(20)]:  # 200K .. 80M
        n = sw.model_for_params(t, BASE_MODEL).num_params()
        assert abs(math.log(n / t)) < math.log(1.35 if t < 1e7 else 1.15), (t, n)
    with pytest.raises(LMStackError, match="positive"):
        sw.model_for_params(-5, BASE_MODEL)


def test_flops_per_token_by_hand():
    m = sw.model_with_shape(BASE_MODEL, sw.shape_for_width(64))  # L=2, d=64, 4 heads, V=2048, T=128
    L, d, V, T = 2, 64, 2048, 128
    non_emb = L * (4 * d * d + 2 * 4 * d * d + 2 * d) + d  # attention, gelu mlp (4d), two rmsnorms; final norm
    assert m.num_params(include_embeddings=False) == non_emb == 98_624
    assert m.num_params() == non_emb + V * d == sum(p.numel() for p in Transformer(m).parameters())
    assert sw.flops_per_token(m) == 6 * (non_emb + V * d) + 6 * L * T * d == 1_476_480


def test_grid_brackets_the_optimum_and_plans_spend_the_budget():
    for c in (3e12, 1e13, 1e14, 1e15):
        grid = sw.size_grid(c, 5, BASE_MODEL)
        ns = [m.num_params() for m in grid]
        assert all(a < b for a, b in zip(ns, ns[1:]))
        assert ns[0] < sw.centre_params(c) < ns[-1]
        assert ns[1] < sw.centre_params(c) * 1.3 and ns[3] > sw.centre_params(c) / 1.3
        if c >= 1e14:  # above the ladder's coarse bottom the spacing follows the factor
            assert all(1.4 < b / a < 2.9 for a, b in zip(ns, ns[1:])), ns
        for m in grid:
            p = sw.plan_run(c, m, 2048)
            assert p.tokens == p.steps * 2048 and p.flops == p.tokens * sw.flops_per_token(m)
            assert abs(p.flops - c) <= 2048 * sw.flops_per_token(m)  # within one step of the budget
            assert budget_key(p.flops) == budget_key(c)
    with pytest.raises(LMStackError, match="fewer than"):
        sw.plan_run(1e6, sw.model_for_params(1e6, BASE_MODEL), 2048)


def test_base_recipe_file_matches_the_built_in_defaults():
    assert yaml_load((REPO / "recipes" / "scaling-sweep.yaml").read_text()) == sw.BASE


@pytest.mark.parametrize("budgets, sizes, msg", [([-1e9], 3, "positive FLOP"), ([float("nan")], 3, "positive FLOP"),
                                                 ([1e9], 2, "at least 3")])
def test_bad_input_is_a_clear_error(tmp_path, corpus, budgets, sizes, msg):
    with pytest.raises(LMStackError, match=msg):
        micro_sweep(tmp_path / "s", corpus, budgets, sizes)
    assert not (tmp_path / "s" / "runs.jsonl").exists()


def test_cli_bad_budgets(tmp_path, capsys):
    assert main(["scaling", "sweep", "--budgets", "1e9,lots", "--out", str(tmp_path)]) == 2
    assert "--budgets takes comma-separated" in capsys.readouterr().err
    assert main(["scaling", "sweep", "--budgets=-3e12", "--out", str(tmp_path)]) == 2
    assert "positive FLOP counts" in capsys.readouterr().err
    assert main(["scaling", "check", str(tmp_path / "nothing")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


# ---- micro sweeps end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("sweep") / "s"
    recs = micro_sweep(out, corpus, plot="raw")
    return out, recs


def test_micro_sweep_writes_runs_that_fit_loads(micro):
    out, recs = micro
    assert len(recs) == 6 and len({r["name"] for r in recs}) == 6
    assert (out / "sweep.png").stat().st_size > 0 and (out / "data" / "meta.json").exists()
    assert not list((out / "runs").glob("*/data"))  # one dataset for all runs
    runs = load_runs(out / "runs.jsonl")
    assert len(runs) == 6
    for r, n in zip(recs, runs):
        assert {"name", "budget", "params", "non_embedding_params", "n_layer", "n_embd", "n_head", "tokens", "flops",
                "steps", "final_loss", "final_bpb", "wall_s", "tokens_per_sec"} <= set(r)
        assert n["params"] == r["params"] and n["tokens"] == r["tokens"] and n["loss"] == r["final_loss"]
        assert r["tokens"] == r["steps"] * 4 * 32 and r["flops"] == r["tokens"] * r["flops_per_token"]
        assert budget_key(r["flops"]) == budget_key(r["budget"])
        assert r["final_eval_tokens"] == 16 * 32  # the same fixed validation windows for every run
        assert 0 < r["final_loss"] < math.log(64)
        metrics = [json.loads(x) for x in open(f"{r['out_dir']}/metrics.jsonl")]
        last = [m for m in metrics if "lr" in m][-1]
        assert last["step"] == r["steps"] and last["lr"] < 0.2 * 3e-3  # decayed to the end of each run
    for c in (1e9, 3e9):
        assert len({r["params"] for r in recs if r["budget"] == c}) == 3


def test_rerun_skips_finished_runs(micro, corpus, monkeypatch):
    out, recs = micro
    calls = []
    real = sw.pretrain
    monkeypatch.setattr(sw, "pretrain", lambda cfg, log=print: calls.append(cfg) or real(cfg, log))
    again = micro_sweep(out, corpus)
    assert calls == [] and [r["name"] for r in again] == [r["name"] for r in recs]
    assert len(sw.read_records(out)) == 6
    # a grid with one more budget trains only the new runs
    more = micro_sweep(out, corpus, budgets=(1e9, 2e9, 3e9))
    assert len(calls) == 3 and len(more) == 9 and len(sw.read_records(out)) == 9
    with pytest.raises(LMStackError, match="other settings"):
        sw.run_sweep(out, [1e9], 3, corpus=corpus, overrides=MICRO + ["lr=1e-2"], progress=False, log=lambda *a: None)


def test_interrupted_run_resumes_exactly(tmp_path, corpus):
    whole = micro_sweep(tmp_path / "a", corpus, budgets=(1e9,))
    assert micro_sweep(tmp_path / "b", corpus, budgets=(1e9,), max_steps=7) == []  # interrupted: no records
    assert not (tmp_path / "b" / "runs.jsonl").exists()
    assert all((tmp_path / "b" / "runs" / r["name"] / "last").exists() for r in whole)
    resumed = micro_sweep(tmp_path / "b", corpus, budgets=(1e9,))
    assert [r["resumed"] for r in resumed] == [True] * 3 and [r["resumed"] for r in whole] == [False] * 3
    for a, b in zip(whole, resumed):
        assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)


def test_check_predicts_trains_and_skips(micro, corpus, monkeypatch, capsys):
    """check on a sweep whose records follow a known law: it predicts at 2x the largest budget, trains the shape
    nearest the predicted N_opt for that budget, compares, and skips when done. (The fit itself, slow and tested in
    test_scaling.py, is replaced by the exact law here.)"""
    out, _ = micro
    law = Parametric(E=1.0, A=30.0, B=100.0, alpha=0.5, beta=0.5)
    synthetic = []
    for c in (1e9, 3e9):
        n0 = law.n_opt(c)
        for k in (0.4, 1, 2.5):
            n, d = n0 * k, c / (6 * n0 * k)
            synthetic.append({"name": f"syn-{c:g}-{k}", "budget": c, "params": n, "tokens": d, "flops": c,
                              "final_loss": law.loss(n, d), "kind": "sweep"})
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic))
    a3 = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta}
    a2 = {"a": law.a, "b": law.b, "log_kn": math.log(law.G) - law.a * math.log(6),
          "log_kd": -math.log(law.G) - law.b * math.log(6), "budgets": [1e9, 3e9],
          "n_opt": [law.n_opt(1e9), law.n_opt(3e9)], "loss_min": [0.0, 0.0]}
    seen = []

    def exact_fit(runs, predict=(), bootstrap=0, seed=0):
        seen.append(([r["params"] for r in runs], list(predict)))
        return {"runs": len(runs), "budgets": 2, "approach2": a2, "approach3": a3,
                "predictions": [{"flops": c, "approach2": approach2_predict(a2, c, a3),
                                 "approach3": approach3_predict(a3, c)} for c in predict]}
    monkeypatch.setattr(ck, "fit_runs", exact_fit)
    calls = []
    real = sw.pretrain
    monkeypatch.setattr(sw, "pretrain", lambda cfg, log=print: calls.append(cfg) or real(cfg, log))
    res = ck.check(out, 2, log=lambda *a: None, progress=False)
    assert seen == [([r["params"] for r in synthetic], [6e9])]
    assert len(calls) == 1 and res["budget"] == 6e9
    p2 = res["predicted"]["approach2"]
    assert p2["params"] == pytest.approx(law.n_opt(6e9), rel=1e-9)
    assert res["predicted"]["approach3"]["loss"] == pytest.approx(law.loss(law.n_opt(6e9), law.d_opt(6e9)))
    run = res["measured"]
    assert run["params"] == sw.model_for_params(p2["params"], sw.base_model(*_cfg_tok(out))).num_params()
    assert run["kind"] == "check" and budget_key(run["flops"]) == budget_key(6e9)
    assert res["predicted_loss"] == pytest.approx(law.loss(run["params"], run["tokens"]))
    assert res["rel_error"]["at_trained_model"] == pytest.approx(
        (res["predicted_loss"] - res["measured_loss"]) / res["measured_loss"])
    assert json.loads((out / "check.json").read_text())["measured_loss"] == res["measured_loss"]
    assert len(sw.read_records(out)) == 6  # the check run is not a sweep record
    assert main(["scaling", "check", str(out), "--budget-multiple", "2", "--no-progress"]) == 0
    assert len(calls) == 1 and "measured" in capsys.readouterr().out


def _cfg_tok(out):
    cfg, _ = sw.load_sweep(out)
    from lmstack.data.shards import TokenDataset
    return cfg, TokenDataset(out / "data").tokenizer
