"""Fit scaling laws to your own runs (Hoffmann et al. 2022, approaches 2 and 3) and predict larger budgets.

Records are dicts with params (or parameters), tokens, flops (or compute_budget) and final_loss; tokens = C / (6N)
when missing, flops = 6ND when missing. `load_runs` reads a JSONL file of such records or a JSON list of them.

Approach 2 (IsoFLOP profiles): group runs by compute budget (rounded to 2 significant digits), fit a parabola of
loss vs log N per budget, take its vertex as N_opt(C), then fit log N_opt = a log C + c and log D_opt = b log C + c'
with D_opt = C / (6 N_opt). Its loss at a new budget is approach 3's L(N, D) at approach 2's (N_opt, D_opt): the
parabolas alone give no law for how the minimum loss falls with C.

Approach 3 (parametric): L(N, D) = E + A/N^alpha + B/D^beta, fitted as in the paper: minimise the Huber loss
(delta = 1e-3) of log L_hat - log L, log L_hat = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b,
E = e^e, by L-BFGS-B from the best points of a grid of starts. Both report bootstrap percentile intervals
(records resampled with replacement within each budget).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from ..errors import LMStackError
from .laws import Parametric

HUBER_DELTA = 1e-3


def _field(rec: dict, names: tuple[str, ...], where: str, required: bool = True) -> float | None:
    for k in names:
        if rec.get(k) is not None:
            try:
                v = float(rec[k])
            except (TypeError, ValueError):
                raise LMStackError(f"{where}: {k} must be a number, got {rec[k]!r}") from None
            if not (math.isfinite(v) and v > 0):
                raise LMStackError(f"{where}: {k} must be positive and finite, got {v}")
            return v
    if required:
        raise LMStackError(f"{where}: missing {' or '.join(names)} (each run needs params, final_loss and flops or "
                           "tokens)")
    return None


def normalize(records: list[dict], source: str = "runs") -> list[dict]:
    """{params, tokens, flops, loss} per record, validated."""
    out = []
    for i, rec in enumerate(records):
        where = f"{source} record {i + 1}"
        if not isinstance(rec, dict):
            raise LMStackError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        n = _field(rec, ("params", "parameters", "N"), where)
        loss = _field(rec, ("final_loss", "loss"), where)
        d = _field(rec, ("tokens", "D"), where, required=False)
        c = _field(rec, ("flops", "compute_budget", "C"), where, required=d is None)
        out.append({"params": n, "tokens": d if d is not None else c / (6 * n),
                    "flops": c if c is not None else 6 * n * d, "loss": loss})
    return out


def load_runs(path: str | Path) -> list[dict]:
    """Records from a JSONL file (one run per line) or a JSON list."""
    p = Path(path)
    text = p.read_text()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LMStackError(f"{p}:{i + 1}: not JSON ({e.msg}); give a JSONL file of runs or a JSON list")
    if not records:
        raise LMStackError(f"{p} holds no runs; give a JSONL file of runs (params, tokens or flops, final_loss)")
    return normalize(records, str(p))


def budget_key(c: float) -> float:
    """A compute budget rounded to 2 significant digits (runs of one IsoFLOP profile share it)."""
    return float(f"{c:.2g}")


def group_by_budget(runs: list[dict]) -> dict[float, list[dict]]:
    groups: dict[float, list[dict]] = {}
    for r in runs:
        groups.setdefault(budget_key(r["flops"]), []).append(r)
    return dict(sorted(groups.items()))


def _vertex(runs: list[dict]) -> tuple[float, float, np.ndarray]:
    x = np.log([r["params"] for r in runs])
    y = np.array([r["loss"] for r in runs])
    coef = np.polyfit(x, y, 2)
    if coef[0] <= 0:
        raise ValueError("not convex")
    xv = -coef[1] / (2 * coef[0])
    return float(np.exp(xv)), float(np.polyval(coef, xv)), coef


def _approach2_point(groups: dict[float, list[dict]]) -> dict:
    cs, ns, ls, coefs = [], [], [], []
    for c, runs in groups.items():
        n, lmin, coef = _vertex(runs)
        cs.append(c), ns.append(n), ls.append(lmin), coefs.append(coef)
    lc, ln = np.log(cs), np.log(ns)
    a, ka = np.polyfit(lc, ln, 1)
    b, kb = np.polyfit(lc, np.log(np.array(cs) / (6 * np.array(ns))), 1)
    return {"a": float(a), "b": float(b), "log_kn": float(ka), "log_kd": float(kb),
            "budgets": cs, "n_opt": ns, "loss_min": ls, "parabolas": [c.tolist() for c in coefs]}


def approach2(runs: list[dict], bootstrap: int = 0, seed: int = 0) -> dict:
    """IsoFLOP fit: N_opt = exp(log_kn) C^a, D_opt = exp(log_kd) C^b (+ 95% bootstrap intervals of a and b)."""
    groups = group_by_budget(runs)
    for c, g in groups.items():
        if len({budget_key(r["params"]) for r in g}) < 3:
            raise LMStackError(f"budget {c:.2g} FLOPs has {len(g)} run(s) at fewer than 3 model sizes; an IsoFLOP "
                               "parabola needs at least 3 sizes per budget (drop the budget or add runs)")
    if len(groups) < 2:
        raise LMStackError(f"approach 2 needs at least 2 compute budgets, got {len(groups)}: add runs at other budgets")
    try:
        fit = _approach2_point(groups)
    except ValueError:
        raise LMStackError("an IsoFLOP profile is not convex (loss does not dip at any size): widen its size range "
                           "so the best size lies inside it") from None
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        res = {c: [g[i] for i in rng.integers(0, len(g), len(g))] for c, g in groups.items()}
        if any(len({r["params"] for r in g}) < 3 for g in res.values()):
            continue  # a parabola through fewer than 3 distinct sizes is not a fit: draw again
        try:
            p = _approach2_point(res)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if not all(min(r["params"] for r in res[c]) <= n <= max(r["params"] for r in res[c])
                   for c, n in zip(p["budgets"], p["n_opt"])):
            continue  # the resample's dip lies outside its sizes: an extrapolated vertex, not a measurement
        samples.append((p["a"], p["b"]))
    if len(samples) >= 10:
        s = np.array(samples)
        fit["ci"] = {"a": np.percentile(s[:, 0], [2.5, 97.5]).tolist(),
                     "b": np.percentile(s[:, 1], [2.5, 97.5]).tolist()}
    return fit


def approach2_predict(fit: dict, c: float, parametric: dict | None = None) -> dict:
    """N_opt and D_opt at budget c; the loss there by the `parametric` (approach 3) L(N, D) when given."""
    n, d = math.exp(fit["log_kn"]) * c ** fit["a"], math.exp(fit["log_kd"]) * c ** fit["b"]
    out = {"params": n, "tokens": d}
    if parametric:
        out["loss"] = Parametric(*(parametric[k] for k in ("E", "A", "B", "alpha", "beta"))).loss(n, d)
    return out


def _huber_objective(theta: np.ndarray, ln: np.ndarray, ld: np.ndarray, ll: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * ln, b - beta * ld, np.full_like(ln, e)])
    m = u.max(axis=0)
    w = np.exp(u - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - ll
    w /= s
    small = np.abs(r) <= delta
    f = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    psi = np.where(small, r, delta * np.sign(r))
    grad = np.array([(psi * w[0]).sum(), (psi * w[1]).sum(), (psi * w[2]).sum(),
                     -(psi * w[0] * ln).sum(), -(psi * w[1] * ld).sum()])
    return float(f), grad


GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
            alpha=np.arange(0.0, 2.5, 0.5), beta=np.arange(0.0, 2.5, 0.5))


def _minimize(starts, args) -> np.ndarray:
    from scipy.optimize import minimize
    best = None
    for x0 in starts:
        res = minimize(_huber_objective, x0, args=args, jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "ftol": 1e-16, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def _fit_theta(runs: list[dict], delta: float, starts=None, n_starts: int = 16) -> np.ndarray:
    ln = np.log([r["params"] for r in runs])
    ld = np.log([r["tokens"] for r in runs])
    ll = np.log([r["loss"] for r in runs])
    args = (ln, ld, ll, delta)
    if starts is None:  # score the whole grid, refine the best few (the paper refines every grid point)
        grid = np.array(list(itertools.product(*GRID.values())))
        scores = np.array([_huber_objective(t, *args)[0] for t in grid])
        starts = grid[np.argsort(scores)[:n_starts]]
    return _minimize(starts, args)


def _params(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = (float(t) for t in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def approach3(runs: list[dict], bootstrap: int = 0, seed: int = 0, delta: float = HUBER_DELTA) -> dict:
    """Parametric fit {E, A, B, alpha, beta} (+ 95% bootstrap intervals, each resample started from the best fit)."""
    if len(runs) < 5:
        raise LMStackError(f"approach 3 fits 5 parameters and needs at least 5 runs, got {len(runs)}")
    theta = _fit_theta(runs, delta)
    fit = _params(theta)
    if fit["alpha"] <= 0 or fit["beta"] <= 0:
        raise LMStackError(f"the parametric fit found no scaling (alpha={fit['alpha']:.3g}, beta={fit['beta']:.3g}): "
                           "runs need to span a wider range of sizes and budgets")
    groups = group_by_budget(runs)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        res = [g[i] for g in groups.values() for i in rng.integers(0, len(g), len(g))]
        samples.append(list(_params(_fit_theta(res, delta, starts=[theta])).values()))
    if samples:
        s = np.array(samples)
        fit["ci"] = {k: np.percentile(s[:, j], [2.5, 97.5]).tolist() for j, k in enumerate(("E", "A", "B", "alpha",
                                                                                              "beta"))}
    return fit


def approach3_predict(fit: dict, c: float) -> dict:
    f = Parametric(*(fit[k] for k in ("E", "A", "B", "alpha", "beta")))
    n, d = f.n_opt(c), f.d_opt(c)
    return {"params": n, "tokens": d, "loss": f.loss(n, d)}


def fit_runs(runs: list[dict], predict: list[float] = (), bootstrap: int = 0, seed: int = 0) -> dict:
    """Both approaches over `runs` and their predictions at each budget in `predict`."""
    for c in predict:
        if not (math.isfinite(c) and c > 0):
            raise LMStackError(f"--predict budgets must be positive FLOP counts, got {c}")
    a2 = approach2(runs, bootstrap, seed)
    a3 = approach3(runs, bootstrap, seed)
    preds = [{"flops": c, "approach2": approach2_predict(a2, c, a3), "approach3": approach3_predict(a3, c)}
             for c in predict]
    return {"runs": len(runs), "budgets": len(a2["budgets"]), "approach2": a2, "approach3": a3, "predictions": preds}


def plot_fit(runs: list[dict], result: dict, path: str | Path) -> Path:
    """PNG: loss vs N per budget with its parabola; N_opt and D_opt vs C with both approaches' lines."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    a2 = result["approach2"]
    for c, coef in zip(a2["budgets"], a2["parabolas"]):
        g = group_by_budget(runs)[c]
        x = np.log([r["params"] for r in g])
        pts = ax1.scatter(np.exp(x), [r["loss"] for r in g], s=14, label=f"{c:.2g} FLOPs")
        xs = np.linspace(x.min(), x.max(), 100)
        ax1.plot(np.exp(xs), np.polyval(coef, xs), color=pts.get_facecolor()[0], lw=1)
    ax1.scatter(a2["n_opt"], a2["loss_min"], marker="*", color="k", s=50, zorder=3, label="N_opt (approach 2)")
    ax1.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles")
    ax1.legend(fontsize=7)
    cs = np.array(a2["budgets"] + [p["flops"] for p in result["predictions"]])
    cl = np.geomspace(cs.min(), cs.max(), 50)
    ax2.scatter(a2["budgets"], a2["n_opt"], color="C0", label="N_opt per budget")
    ax2.scatter(a2["budgets"], np.array(a2["budgets"]) / (6 * np.array(a2["n_opt"])), color="C1",
                label="D_opt per budget")
    p2 = [approach2_predict(a2, c) for c in cl]
    p3 = [approach3_predict(result["approach3"], c) for c in cl]
    ax2.plot(cl, [p["params"] for p in p2], "C0-", label=f"N ∝ C^{a2['a']:.3f} (approach 2)")
    ax2.plot(cl, [p["tokens"] for p in p2], "C1-", label=f"D ∝ C^{a2['b']:.3f} (approach 2)")
    ax2.plot(cl, [p["params"] for p in p3], "C0--", label="N_opt (approach 3)")
    ax2.plot(cl, [p["tokens"] for p in p3], "C1--", label="D_opt (approach 3)")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N or D", title="compute-optimal frontier")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=110)
    return out


def fit_table(result: dict) -> str:
    """Markdown summary of fit_runs()."""
    from .laws import human
    a2, a3 = result["approach2"], result["approach3"]

    def ci(fit: dict, k: str) -> str:
        return f" [{fit['ci'][k][0]:.3g}, {fit['ci'][k][1]:.3g}]" if "ci" in fit else ""
    lines = [f"{result['runs']} runs over {result['budgets']} compute budgets",
             f"approach 2 (IsoFLOP): N_opt ∝ C^{a2['a']:.3f}{ci(a2, 'a')}, D_opt ∝ C^{a2['b']:.3f}{ci(a2, 'b')}",
             f"approach 3 (parametric): L = {a3['E']:.3f}{ci(a3, 'E')} + {a3['A']:.4g}{ci(a3, 'A')} / "
             f"N^{a3['alpha']:.4f}{ci(a3, 'alpha')} + {a3['B']:.4g}{ci(a3, 'B')} / D^{a3['beta']:.4f}{ci(a3, 'beta')}"]
    if result["predictions"]:
        lines += ["", "| budget | N_opt (2) | D_opt (2) | loss (2) | N_opt (3) | D_opt (3) | loss (3) |",
                  "|---|---|---|---|---|---|---|"]
        for p in result["predictions"]:
            q2, q3 = p["approach2"], p["approach3"]
            lines.append(f"| {p['flops']:.3g} | {human(q2['params'])} | {human(q2['tokens'])} | {q2['loss']:.3f} | "
                         f"{human(q3['params'])} | {human(q3['tokens'])} | {q3['loss']:.3f} |")
    return "\n".join(lines)
