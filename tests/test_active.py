"""Active learning for feedback (issue 17): the bootstrap reward ensemble learns a known linear preference, the
information measures rank an uncertain pair above a clear one, ActiveLearner's gating / held-out split / ranking /
thread safety, the Featurizer on a tiny checkpoint, and the ratings loader's errors."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from lmstack.data.prefs import load_ratings
from lmstack.errors import LMStackError
from lmstack.train.active import ActiveLearner, Featurizer, RewardEnsemble, pair_information, select_pairs

D = 12


def _w() -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(42))


def _pairs(n: int, seed: int, noise: float = 0.0):
    """(chosen, rejected) feature rows of n random pairs ordered by the known linear score x . w, a `noise`
    fraction of them flipped."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    better = (a @ _w()) > (b @ _w())
    better ^= torch.rand(n, generator=g) < noise
    return torch.where(better[:, None], a, b), torch.where(better[:, None], b, a)


def test_ensemble_learns_a_linear_preference_from_noisy_votes_deterministically():
    ch, rj = _pairs(200, seed=0, noise=0.1)
    ens = RewardEnsemble.fit(ch, rj, members=5, seed=3)
    hc, hr = _pairs(1000, seed=1)                           # noiseless held-out pairs
    agreement = float((ens.mean(hc) > ens.mean(hr)).float().mean())
    assert agreement > 0.75, agreement                      # chance is 0.5 (0.82 here; 0.96 without the noise)
    assert ens.scores(hc).shape == (5, 1000) and ens.mean(hc).shape == (1000,)
    again = RewardEnsemble.fit(ch, rj, members=5, seed=3)
    assert torch.equal(again.weight, ens.weight)            # seeded bootstrap: the same fit
    other = RewardEnsemble.fit(ch, rj, members=5, seed=4)
    assert not torch.allclose(other.weight, ens.weight)     # another seed, other resamples
    # members differ (bootstrap), yet each alone also learns the direction
    cos = torch.nn.functional.cosine_similarity(ens.weight * (1 / ens.sigma), _w()[None], dim=1)
    assert (cos > 0.7).all() and ens.weight.std(0).sum() > 0
    with pytest.raises(LMStackError):
        RewardEnsemble.fit(ch[:0], rj[:0])


def test_ratings_term_fits_the_rating_scale():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, D, generator=g)
    ratings = (4 + 1.5 * (x @ _w()) / (x @ _w()).std()).clamp(1, 7)      # ratings linear in the known score
    ens = RewardEnsemble.fit(torch.zeros(0, D), torch.zeros(0, D), members=3, seed=0, ratings=(x, ratings))
    pred = ens.mean(x)
    assert torch.corrcoef(torch.stack([pred, ratings]))[0, 1] > 0.95
    assert abs(float(pred.mean()) - float((ratings.mean() - 4) / 1.5)) < 0.1   # the documented target scale


@pytest.mark.parametrize("method", ["disagreement", "bt"])  # infogain also values far-apart pairs: tested below
def test_pair_information_ranks_an_uncertain_pair_above_a_clear_one(method):
    ens = RewardEnsemble.fit(*_pairs(150, seed=0, noise=0.1), members=8, seed=0)
    base = torch.randn(2, D, generator=torch.Generator().manual_seed(9))
    w = _w() / _w().norm()
    u = torch.randn(D, generator=torch.Generator().manual_seed(10))
    u = u - (u @ w) * w
    u = u / u.norm()                                            # a direction the preference does not depend on
    fa = torch.stack([base[0] + 10 * w, base[1] + u])           # pair 0: far apart along w (clear); pair 1: differs
    fb = torch.stack([base[0] - 10 * w, base[1] - u])           # only where the votes say nothing (uncertain)
    info = pair_information(ens, fa, fb, method)
    assert info.shape == (2,) and info[1] > info[0] * 5, info
    if method == "bt":
        assert float(pair_information(ens, fa[:1], fa[:1], "bt")) == pytest.approx(1.0)   # a tie is a coin flip
    with pytest.raises(LMStackError, match="disagreement"):
        pair_information(ens, fa, fb, "entropy-ish")


def test_laplace_covariance_is_the_inverse_hessian_of_the_fitted_loss():
    """ens.cov = (n x the Hessian of the fit's loss: mean BT loss + rating MSE + l2 |w|^2, on all votes, at the
    members' mean head)^-1, checked against torch.autograd's Hessian."""
    ch, rj = _pairs(80, seed=4, noise=0.1)
    g = torch.Generator().manual_seed(5)
    rf, rv = torch.randn(30, D, generator=g), torch.randint(1, 8, (30,), generator=g).float()
    ens = RewardEnsemble.fit(ch, rj, members=3, seed=1, ratings=(rf, rv), l2=0.3, rating_weight=0.5)
    d, rz = (ch - rj) / ens.sigma, (rf - ens.mu) / ens.sigma

    def loss(w):
        b = float(ens.bias.mean())
        mse = ((rz @ w + b - (rv - 4) / 1.5) ** 2).mean()
        return torch.nn.functional.softplus(-(d @ w)).mean() + 0.5 * mse + 0.3 * (w * w).sum()
    h = torch.autograd.functional.hessian(loss, ens.weight.mean(0).double().float())
    torch.testing.assert_close(ens.cov, torch.linalg.inv(80 * h), rtol=1e-3, atol=1e-6)


def test_infogain_batch_folds_each_pick_into_the_posterior():
    """select_pairs(infogain) = picking one at a time, each time re-inverting the precision with the picked pair's
    expected vote added; a duplicate of a picked pair drops below a fresh direction; excluded pairs never come."""
    ens = RewardEnsemble.fit(*_pairs(60, seed=0, noise=0.1), members=4, seed=0, l2=0.1)
    g = torch.Generator().manual_seed(7)
    fa, fb = torch.randn(40, D, generator=g), torch.randn(40, D, generator=g)
    fa[1], fb[1] = fa[0], fb[0]                                  # pair 1 repeats pair 0
    exclude = torch.zeros(40, dtype=torch.bool)
    exclude[5] = True
    got = select_pairs(ens, fa, fb, 6, "infogain", exclude=exclude)
    pm = torch.sigmoid(ens.scores(fa) - ens.scores(fb)).mean(0)
    d = (fa - fb) / ens.sigma
    prec, want = torch.linalg.inv(ens.cov.double()), []
    for _ in range(6):
        cov = torch.linalg.inv(prec)
        score = torch.log1p(pm.double() * (1 - pm.double()) * ((d.double() @ cov) * d.double()).sum(-1))
        score[exclude] = -1
        score[want] = -1
        j = int(score.argmax())
        want.append(j)
        prec = prec + float(pm[j] * (1 - pm[j])) * torch.outer(d[j].double(), d[j].double())
    assert got == want and 5 not in got and len(set(got)) == 6
    assert select_pairs(ens, fa, fb, 3, "bt", exclude=exclude) == \
        torch.topk(pair_information(ens, fa, fb, "bt").masked_fill(exclude, -1), 3).indices.tolist()
    info0 = pair_information(ens, fa[:2], fb[:2], "infogain")
    assert info0[0] == pytest.approx(float(info0[1])) and not {0, 1} <= set(select_pairs(ens, fa[:2], fb[:2], 1,
                                                                                         "infogain"))


def _text_featurizer(calls: list | None = None):
    """Texts "v:<comma-separated floats>" -> those floats (the known features of a test candidate)."""
    def featurize(prompts, completions):
        if calls is not None:
            calls.append(len(completions))
        return torch.tensor([[float(x) for x in c.split(":")[1].split(",")] for c in completions])
    return featurize


def _text(v: torch.Tensor) -> str:
    return "v:" + ",".join(f"{x:.6f}" for x in v.tolist())


def _add_votes(al: ActiveLearner, n: int, seed: int):
    ch, rj = _pairs(n, seed=seed)
    for c, r in zip(ch, rj):
        al.add_vote("p", _text(c), _text(r))


def test_active_learner_gating_heldout_split_and_agreement():
    calls: list = []
    al = ActiveLearner(_text_featurizer(calls), members=4, min_votes=8, heldout_every=5, seed=2)
    assert al.rank("p", ["v:1", "v:2"]) == (0.0, 0, 1) and not al.ready
    _add_votes(al, 7, seed=0)
    s = al.fit()
    assert not al.ready and s["votes"] == 7 and s["fitted_on"] == 0 and s["agreement"] is None and not calls
    _add_votes(al, 13, seed=1)                                  # 20 votes: the 5th, 10th, 15th and 20th held out
    s = al.fit()
    assert al.ready and (s["votes"], s["fitted_on"], s["heldout"], s["members"]) == (20, 16, 4, 4)
    assert al.status() == {**s, "ready": True}
    ch, rj = (torch.cat(t) for t in zip(_pairs(7, seed=0), _pairs(13, seed=1)))     # the votes, in order
    ch, rj = (torch.tensor([[float(x) for x in _text(v)[2:].split(",")] for v in t]) for t in (ch, rj))
    held = torch.arange(20) % 5 == 4
    ens = RewardEnsemble.fit(ch[~held], rj[~held], members=4, seed=2)
    hc, hr = ens.mean(ch[held]), ens.mean(rj[held])
    assert s["agreement"] == pytest.approx(float((hc > hr).float().mean()))
    n_feat = sum(calls)
    al.fit()                                                    # features are cached: no new featurizer calls
    assert sum(calls) == n_feat
    al.add_rating("p", "v:" + ",".join(["0"] * D), 4)
    assert al.fit()["ratings"] == 1
    with pytest.raises(LMStackError, match="1 to 7"):
        al.add_rating("p", "x", 9)
    with pytest.raises(LMStackError, match="disagreement"):
        ActiveLearner(_text_featurizer(), method="nope")


@pytest.mark.parametrize("method", ["disagreement", "bt", "infogain"])
def test_rank_returns_the_most_informative_candidate_pair(method):
    al = ActiveLearner(_text_featurizer(), members=5, method=method, min_votes=8, heldout_every=0, l2=1e-2)
    _add_votes(al, 60, seed=0)
    al.fit()
    w = _w() / _w().norm()
    base = torch.randn(D, generator=torch.Generator().manual_seed(3))
    u = torch.randn(D, generator=torch.Generator().manual_seed(10))
    u = u - (u @ w) * w
    u = u / u.norm()                                            # 2 and 3 differ only where the votes say nothing
    cands = [_text(base + 4 * w), _text(base - 4 * w), _text(base + u), _text(base - u), _text(base + 12 * w)]
    info, i, j = al.rank("p", cands)
    assert (i, j) == (2, 3) and info > 0
    f = _text_featurizer()(None, cands)                         # brute force over all pairs agrees
    ch, rj = (torch.tensor([[float(x) for x in _text(v)[2:].split(",")] for v in t]) for t in _pairs(60, seed=0))
    ens = RewardEnsemble.fit(ch, rj, members=5, seed=0, l2=1e-2)   # the learner's ensemble (no held-out votes)
    best = max((float(pair_information(ens, f[a:a + 1], f[b:b + 1], method)), a, b)
               for a in range(5) for b in range(a + 1, 5))
    assert info == pytest.approx(best[0], rel=1e-4) and (i, j) == best[1:]
    assert al.rank("p", cands[:1]) == (0.0, 0, 1)


def test_concurrent_votes_while_fitting_are_all_counted():
    al = ActiveLearner(_text_featurizer(), members=3, min_votes=8)
    _add_votes(al, 10, seed=0)
    done, fits, errors = threading.Event(), [], []

    def refit():
        try:
            while not done.is_set():
                fits.append(al.fit())
        except Exception as e:  # surfaced below
            errors.append(e)
    t = threading.Thread(target=refit)
    t.start()
    ch, rj = _pairs(300, seed=1)
    for k, (c, r) in enumerate(zip(ch, rj)):
        al.add_vote("p", _text(c), _text(r))
        if k % 50 == 0:
            al.rank("p", [_text(c), _text(r), _text(c + r)])
    done.set()
    t.join(timeout=120)
    assert not t.is_alive() and not errors and fits
    s = al.fit()
    assert s["votes"] == 310 and s["fitted_on"] + s["heldout"] == 310 and al.status()["votes"] == 310


def test_featurizer_pools_completion_states_batch_invariantly(tiny_run):
    import lmstack
    lm = lmstack.load(tiny_run[0] / "last")
    prompts, comps = ["The cat", "Where", "A"], [" sat on the mat.", " is my friend?", " dog"]
    f1 = Featurizer(lm, batch_size=1)(prompts, comps)
    f3 = Featurizer(lm, batch_size=3)(prompts, comps)
    assert f1.shape == (3, lm.model.config.n_embd) and f1.dtype == torch.float32
    assert torch.allclose(f1, f3, atol=1e-5)                    # right padding changes nothing
    assert not torch.allclose(f1[0], Featurizer(lm)(["Where"], comps[:1])[0], atol=1e-4)   # the prompt matters


def test_load_ratings_reads_exports_and_names_bad_lines(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completion": "c", "rating": 6, "tags": ["helpful"],
                                "critique": "ok"}) + "\n\n" + json.dumps({"prompt": "q", "completion": {
                                    "role": "assistant", "content": "d"}, "rating": 1.5}) + "\n")
    rows = load_ratings(good)
    assert [(r.prompt, r.completion, r.rating, r.tags, r.critique) for r in rows] == [
        ("p", "c", 6.0, ("helpful",), "ok"), ("q", "d", 1.5, (), "")]
    ok = json.dumps({"prompt": "p", "completion": "c", "rating": 4})
    for bad, msg in [({"prompt": "p", "rating": 4}, "missing 'completion'"),
                     ({"prompt": "p", "completion": "c", "rating": 0}, "1 to 7"),
                     ({"prompt": "p", "completion": "c", "rating": "5"}, "number"),
                     ({"prompt": "p", "completion": "c", "rating": True}, "number"),
                     ({"prompt": "p", "completion": "c", "rating": 3, "tags": "x"}, "tags"),
                     ({"prompt": [{"role": "user", "content": "hi"}], "completion": "c", "rating": 3}, "tokenizer")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(ok + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(LMStackError, match=msg) as e:
            load_ratings(f)
        assert f"{f}:2" in str(e.value)
    f.write_text(ok + "\n{not json\n")
    with pytest.raises(LMStackError, match=":2: invalid JSON"):
        load_ratings(f)
    with pytest.raises(LMStackError, match="no ratings file"):
        load_ratings(tmp_path / "missing.jsonl")
