"""Scaling laws: published compute-optimal numbers, closed forms vs numeric minimisation, and fits that recover a
known law from synthetic IsoFLOP sweeps."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lmstack.cli import main
from lmstack.errors import LMStackError
from lmstack.scaling import EPOCH, HOFFMANN, LAWS, fit_runs, load_runs, normalize, plan, plot_fit
from lmstack.scaling.fit import approach2

GOPHER = 5.76e23
PUBLISHED = {"rule20": (69e9, 1.4e12), "epoch": (72e9, 1.3e12), "hoffmann": (32e9, 3.0e12)}


@pytest.mark.parametrize("method", list(PUBLISHED))
def test_gopher_budget_matches_published(method):
    r = plan(method, flops=GOPHER)
    n, d = PUBLISHED[method]
    assert r["params"] == pytest.approx(n, rel=0.03)
    assert r["tokens"] == pytest.approx(d, rel=0.03)
    assert 6 * r["params"] * r["tokens"] == pytest.approx(GOPHER, rel=1e-9)


@pytest.mark.parametrize("law", [HOFFMANN, EPOCH], ids=["hoffmann", "epoch"])
@pytest.mark.parametrize("c", [1e19, GOPHER, 1e26])
def test_closed_form_is_the_minimum_along_the_isoflop(law, c):
    res = minimize_scalar(lambda x: law.loss(math.exp(x), c / (6 * math.exp(x))),
                          bounds=(math.log(1e5), math.log(1e15)), method="bounded", options={"xatol": 1e-10})
    assert law.n_opt(c) == pytest.approx(math.exp(res.x), rel=1e-3)
    assert law.n_opt(c) * law.d_opt(c) * 6 == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("method", list(LAWS))
def test_params_and_tokens_round_trip(method):
    r = plan(method, flops=1e22)
    by_n = plan(method, params=r["params"])
    by_d = plan(method, tokens=r["tokens"])
    for other in (by_n, by_d):
        assert other["flops"] == pytest.approx(1e22, rel=1e-9)
        assert other["tokens"] == pytest.approx(r["tokens"], rel=1e-9)
        assert other["loss"] == pytest.approx(r["loss"], rel=1e-9)


def test_kaplan_exponent_and_loss_limits():
    r1, r2 = plan("kaplan", flops=1e21), plan("kaplan", flops=1e23)
    assert math.log(r2["params"] / r1["params"]) / math.log(100) == pytest.approx(0.73)
    # eq. 1.5 reduces to L(N) = (N_c/N)^0.076 as D -> infinity
    assert LAWS["kaplan"].loss_fn(1e9, 1e30) == pytest.approx((8.8e13 / 1e9) ** 0.076, rel=1e-6)


def test_wall_time_and_attention_flops(capsys):
    r = plan("rule20", flops=1e21, gpu="a100", mfu=0.5)
    assert r["seconds"] == pytest.approx(1e21 / (312e12 * 0.5))
    assert main(["scaling", "plan", "--preset", "gpt2-small", "--method", "rule20", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    from lmstack.config import preset
    cfg = preset("gpt2-small")
    assert row["params"] == cfg.num_params() and row["tokens"] == pytest.approx(20 * cfg.num_params())
    assert row["train_flops"] == pytest.approx(cfg.flops_per_token() * row["tokens"])
    assert row["train_flops"] > row["flops"]


def test_cli_json_and_table(capsys):
    assert main(["scaling", "plan", "--flops", str(GOPHER), "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(LAWS)
    assert rows["epoch"]["params"] == pytest.approx(72e9, rel=0.03)
    assert main(["scaling", "plan", "--flops", "5.76e23"]) == 0
    out = capsys.readouterr().out
    assert "| hoffmann | 32.2B | 2.98T |" in out and "Besiroglu" in out


@pytest.mark.parametrize("kw, msg", [({}, "exactly one budget"), ({"flops": -1.0}, "positive"),
                                     ({"flops": 1e20, "params": 1e9}, "exactly one budget"),
                                     ({"flops": 1e20, "mfu": 1.5}, "mfu"), ({"flops": 1e20, "gpu": "tpu"}, "--gpu")])
def test_plan_bad_input(kw, msg):
    with pytest.raises(LMStackError, match=msg):
        plan("epoch", **kw)


def test_cli_bad_input_exit_2(capsys):
    assert main(["scaling", "plan"]) == 2
    assert "exactly one budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: two budgets at once
        main(["scaling", "plan", "--flops", "1e20", "--params", "1e9"])


def synthetic(law=HOFFMANN, budgets=(1e18, 1e19, 1e20, 1e21), sizes=7, noise=1e-3, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        for n in law.n_opt(c) * np.geomspace(1 / 8, 8, sizes):
            d = c / (6 * n)
            runs.append({"params": float(n), "tokens": float(d), "flops": c,
                         "final_loss": float(law.loss(n, d) * math.exp(rng.normal(0, noise)))})
    return runs


@pytest.fixture(scope="module")
def fitted():
    runs = normalize(synthetic())
    return runs, fit_runs(runs, predict=[1e23], bootstrap=20)


def test_fit_recovers_known_law(fitted):
    _, res = fitted
    a3 = res["approach3"]
    assert a3["alpha"] == pytest.approx(HOFFMANN.alpha, rel=0.05)
    assert a3["beta"] == pytest.approx(HOFFMANN.beta, rel=0.05)
    assert a3["E"] == pytest.approx(HOFFMANN.E, rel=0.02)
    lo, hi = a3["ci"]["alpha"]
    assert lo < a3["alpha"] < hi
    a2 = res["approach2"]
    assert a2["a"] == pytest.approx(HOFFMANN.a, rel=0.03)
    assert a2["b"] == pytest.approx(HOFFMANN.b, rel=0.03)
    assert a2["ci"]["a"][0] < a2["a"] < a2["ci"]["a"][1]


def test_fit_predicts_larger_budget(fitted):
    _, res = fitted
    p = res["predictions"][0]
    true_n, true_d = HOFFMANN.n_opt(1e23), HOFFMANN.d_opt(1e23)
    for key in ("approach2", "approach3"):
        assert p[key]["params"] == pytest.approx(true_n, rel=0.10)
        assert p[key]["tokens"] == pytest.approx(true_d, rel=0.10)
    assert p["approach3"]["loss"] == pytest.approx(HOFFMANN.loss(true_n, true_d), rel=0.01)


def test_json_list_input_and_cli(tmp_path, capsys):
    recs = [{"parameters": r["params"], "compute_budget": r["flops"], "final_loss": r["final_loss"]}
            for r in synthetic(noise=0)]
    f = tmp_path / "runs.json"
    f.write_text(json.dumps(recs))
    runs = load_runs(f)
    assert runs[0]["tokens"] == pytest.approx(recs[0]["compute_budget"] / (6 * recs[0]["parameters"]))
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", str(f), "--predict", "1e22", "--bootstrap", "0", "--json", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["approach2"]["a"] == pytest.approx(HOFFMANN.a, rel=0.03)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_jsonl_input(tmp_path):
    f = tmp_path / "runs.jsonl"
    f.write_text("\n".join(json.dumps({"params": r["params"], "tokens": r["tokens"], "final_loss": r["final_loss"]})
                           for r in synthetic()) + "\n")
    runs = load_runs(f)
    assert runs[3]["flops"] == pytest.approx(1e18, rel=1e-9) and len(runs) == 28


def test_fit_bad_input(tmp_path):
    few = [r for r in synthetic() if r["flops"] != 1e19 or r["params"] < HOFFMANN.n_opt(1e19) / 2]
    with pytest.raises(LMStackError, match="fewer than 3 model sizes"):
        approach2(normalize(few))
    with pytest.raises(LMStackError, match="record 2: missing final_loss"):
        normalize([{"params": 1e6, "flops": 1e18, "final_loss": 3.0}, {"params": 1e6, "flops": 1e18}])
    with pytest.raises(LMStackError, match="missing flops or compute_budget"):
        normalize([{"params": 1e6, "final_loss": 3.0}])
    f = tmp_path / "bad.jsonl"
    f.write_text('{"params": 1}\nnot json\n')
    with pytest.raises(LMStackError, match="bad.jsonl:2: not JSON"):
        load_runs(f)


def test_plot_writes_png(fitted, tmp_path):
    runs, res = fitted
    out = plot_fit(runs, res, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 20_000
