"""The feedback page's strategies (sequential / random / active), its richer votes (1-7 ratings, tags, critique) and
their checks, the three exports (pairs, ratings, SFT) read back by the training loaders, and a restart while the
background refit of the reward model is still running. A stub LM and a stub featurizer keep it fast and exact; the
real ActiveLearner (lmstack.train.active) does the ranking."""
from __future__ import annotations

import hashlib
import json
import random
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from conftest import ARTIFACTS, chromium_page, make_chat_checkpoint, read_jsonl  # noqa: E402
from lmstack.data.jsonl import JsonlLog  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.serve.feedback import MAX_CRITIQUE, create_feedback_app, export_votes  # noqa: E402
from lmstack.serve.feedback_active import ActiveSession, order_prompts  # noqa: E402
from lmstack.serve.feedback_state import candidate_seed  # noqa: E402
from lmstack.train.active import ActiveLearner  # noqa: E402


@pytest.fixture(scope="module")
def chat_lm(tiny_run, tmp_path_factory):
    import lmstack
    out, _ = tiny_run
    return lmstack.load(make_chat_checkpoint(out, tmp_path_factory.mktemp("fbchat") / "ckpt"))

PROMPTS = [{"id": f"p{i}", "prompt": f"prompt {i} "} for i in range(10)]
PLAIN = ["The king ", "Where is the ", "My good lady ", "The sun and "]
SAMPLING = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95}


class StubLM:
    """Each seed gives its own completion: "<prompt>#<seed>"."""
    path = None
    tokenizer = type("Tok", (), {"chat_template": None, "end_of_turn_ids": None})()

    def stream(self, text, truncate, stop_ids, seed, **sampling):
        yield f"{text}#{seed % 100003}"


def feats(prompts, completions):
    """A fixed 8-d feature per completion (from its hash): the stub featurizer."""
    rows = [[b / 127.5 - 1.0 for b in hashlib.sha256(c.encode()).digest()[:8]] for c in completions]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 8)


def client(app):
    from fastapi.testclient import TestClient
    return TestClient(app, raise_server_exceptions=False)


def vote(c, choice="a", **extra) -> dict:
    nxt = c.get("/api/next").json()
    assert not nxt["done"]
    r = c.post("/api/vote", json={"id": nxt["id"], "choice": choice, **extra})
    assert r.status_code == 200, r.text
    return nxt


def test_bad_rich_votes_are_422_and_nothing_appended(tmp_path):
    out = tmp_path / "votes.jsonl"
    app = create_feedback_app(StubLM(), PROMPTS[:2], out, annotator="ann", tags=("unsafe", "boring"))
    c = client(app)
    nxt = c.get("/api/next").json()
    ok = {"id": nxt["id"], "choice": "a"}
    cases = [
        ({"ratings": 5}, "ratings must be an object"), ({"ratings": {"a": 0}}, "ratings.a"),
        ({"ratings": {"a": 8}}, "ratings.a"), ({"ratings": {"b": 3.5}}, "ratings.b"),
        ({"ratings": {"a": "5"}}, "ratings.a"), ({"ratings": {"a": True}}, "ratings.a"),
        ({"ratings": {"c": 3}}, "ratings: unknown side"), ({"tags": ["unsafe"]}, "tags must be an object"),
        ({"tags": {"a": "unsafe"}}, "tags.a must be a list"), ({"tags": {"b": ["wrong"]}}, "tags.b: unknown tag"),
        ({"tags": {"a": [1]}}, "tags.a must be a list"), ({"tags": {"a": ["boring", "boring"]}}, "tags.a"),
        ({"tags": {"z": []}}, "tags: unknown side"), ({"critique": 5}, "critique must be a string"),
        ({"critique": "x" * (MAX_CRITIQUE + 1)}, "critique: at most"),
    ]
    for extra, msg in cases:
        r = c.post("/api/vote", json={**ok, **extra})
        assert r.status_code == 422, (extra, r.status_code, r.text)
        assert msg in r.json()["error"]["message"], (extra, r.json())
    assert not out.exists()  # nothing reached the file
    good = {"ratings": {"b": 2, "a": 6}, "tags": {"a": [], "b": ["boring", "unsafe"]}, "critique": "  B rambles  "}
    r = c.post("/api/vote", json={**ok, **good})
    assert r.status_code == 200, r.text
    rec = read_jsonl(out)[0]
    assert rec["ratings"] == {"a": 6, "b": 2} and rec["tags"] == {"b": ["boring", "unsafe"]}
    assert rec["critique"] == "B rambles" and r.json()["saved"] == rec
    assert c.get("/api/config").json()["tags"] == ["unsafe", "boring"]
    nxt = c.get("/api/next").json()  # empty extras are left out of the record
    assert c.post("/api/vote", json={"id": nxt["id"], "choice": "tie", "ratings": {}, "tags": {"a": []},
                                     "critique": " "}).status_code == 200
    assert not {"ratings", "tags", "critique"} & set(read_jsonl(out)[1])
    with pytest.raises(LMStackError, match="tags"):
        create_feedback_app(StubLM(), PROMPTS, tmp_path / "v2.jsonl", tags=("a,b",))


def test_exports_each_format_round_trip(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.data.prefs import load_prefs, load_ratings
    from lmstack.data.sft import load_records
    out = tmp_path / "votes.jsonl"
    c = client(create_feedback_app(StubLM(), PROMPTS[:3], out, annotator="ann"))
    v1 = vote(c, "a", ratings={"a": 6, "b": 2}, tags={"b": ["wrong"]}, critique="B is wrong")
    v2 = vote(c, "b", edited_text="a better answer", ratings={"b": 7})
    v3 = vote(c, "tie", ratings={"a": 4})
    log = JsonlLog(out, fsync=True)  # records of an older page: no ratings, tags or critique
    old = {"completion_a": "x", "completion_b": "y", "choice": "a", "chosen": "x!", "rejected": "y", "edited": True,
           "original_chosen": "x", "annotator": "ann"}
    log.append({"id": "old1", "prompt": "old prompt ", "chat": False, **old})
    log.append({"id": "old2", "prompt": "<user>hi", "chat": True, "messages": [{"role": "user", "content": "hi"}],
                **old})
    log.close()
    tok = type("T", (), {"apply_chat_template": lambda self, m, add_generation_prompt: "<user>" + m[0]["content"]})()

    counts = export_votes(out, tmp_path / "pairs.jsonl", format="pairs")
    assert (counts["written"], counts["tie"], counts["edited"]) == (4, 1, 3)
    ex = load_prefs(tmp_path / "pairs.jsonl", tok)
    assert [(e.prompt, e.chosen, e.rejected) for e in ex] == [
        (v1["prompt"], v1["completion_a"], v1["completion_b"]), (v2["prompt"], "a better answer", v2["completion_a"]),
        ("old prompt ", "x!", "y"), ("<user>hi", "x!", "y")]

    counts = export_votes(out, tmp_path / "ratings.jsonl", format="ratings")
    assert counts == {"votes": 5, "written": 4, "rated_votes": 3, "duplicates": 0}
    rows = load_ratings(tmp_path / "ratings.jsonl", tok)
    assert [(r.prompt, r.completion, r.rating, r.tags, r.critique) for r in rows] == [
        (v1["prompt"], v1["completion_a"], 6.0, (), "B is wrong"),
        (v1["prompt"], v1["completion_b"], 2.0, ("wrong",), "B is wrong"),
        (v2["prompt"], v2["completion_b"], 7.0, (), ""),  # the sampled text the annotator read and rated
        (v3["prompt"], v3["completion_a"], 4.0, (), "")]

    counts = export_votes(out, tmp_path / "sft.jsonl", format="sft")
    assert counts == {"votes": 5, "written": 3, "duplicates": 0}
    assert read_jsonl(tmp_path / "sft.jsonl")[0] == {"prompt": v2["prompt"], "completion": "a better answer"}
    recs = load_records(tmp_path / "sft.jsonl")
    assert [r.messages for r in recs] == [
        [{"role": "user", "content": v2["prompt"]}, {"role": "assistant", "content": "a better answer"}],
        [{"role": "user", "content": "old prompt "}, {"role": "assistant", "content": "x!"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x!"}]]  # a chat keeps its turns

    for fmt, n in (("pairs", 4), ("ratings", 4), ("sft", 3)):
        dst = tmp_path / f"cli-{fmt}.jsonl"
        assert main(["feedback", "--out", str(out), "--export", str(dst), "--format", fmt]) == 0
        assert f"wrote {n} " in capsys.readouterr().out and len(read_jsonl(dst)) == n
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temp file behind
    learner = ActiveLearner(feats, min_votes=100)  # old and new records feed an active restart alike
    st = create_feedback_app(StubLM(), PROMPTS[:3], out, strategy="active", learner=learner,
                             prefetch=False).state.feedback_state
    assert st.active.wait_idle(60) and (learner.status()["votes"], learner.status()["ratings"]) == (4, 4)
    st.close()
    with pytest.raises(LMStackError, match="format"):
        export_votes(out, tmp_path / "x.jsonl", format="csv")
    with pytest.raises(LMStackError, match="overwrite"):
        export_votes(out, out, format="ratings")


def test_strategies_order_the_prompts(tmp_path):
    ids = [p["id"] for p in PROMPTS]
    assert order_prompts(ids, "sequential", 3) == ids
    shuffled = ids.copy()
    random.Random(3).shuffle(shuffled)  # "random" is exactly a seeded shuffle of the file order
    assert order_prompts(ids, "random", 3) == shuffled != ids
    assert order_prompts(ids, "random", 4) != shuffled and sorted(order_prompts(ids, "random", 4)) == sorted(ids)
    with pytest.raises(LMStackError, match="strategy"):
        order_prompts(ids, "best", 0)
    for strategy, expected in (("sequential", ids), ("random", shuffled)):
        out = tmp_path / f"{strategy}.jsonl"
        c = client(create_feedback_app(StubLM(), PROMPTS, out, annotator="ann", strategy=strategy, seed=3))
        served = [vote(c)["id"] for _ in range(4)]
        c2 = client(create_feedback_app(StubLM(), PROMPTS, out, annotator="ann", strategy=strategy, seed=3))
        assert c2.get("/api/progress").json()["strategy"] == strategy
        served += [vote(c2)["id"] for _ in range(6)]  # a restart carries on in the same order
        assert served == expected
        assert c2.get("/api/next").json()["done"] is True


def test_choose_takes_the_most_informative_sampled_prompt():
    infos = {"t1": (0.1, 0, 1), "t3": (0.5, 0, 2), "t4": (0.5, 1, 2)}

    class Source:
        def cached_candidates(self, pid):
            return {"p1": ("t1", ["x", "y"]), "p3": ("t3", ["x", "y", "z"]), "p4": ("t4", ["x", "y", "z"])}.get(pid)

    class Learner:
        def rank(self, text, cands):
            return infos[text]

    s = ActiveSession(Learner(), Source(), refit_every=1, prefetch=False)
    assert s.choose(["p1", "p2", "p3", "p4"]) is None  # nothing warm (sampled and featurized ahead) yet
    s.warm.update({"p1", "p2", "p3", "p4"})
    assert s.choose(["p1", "p2", "p3", "p4"]) == ("p3", 0.5, 0, 2)  # p2 is not sampled; ties: the first
    assert s.choose(["p2"]) is None


def test_active_picks_the_max_information_prompt_and_pair(tmp_path):
    learner = ActiveLearner(feats, min_votes=4, heldout_every=0, seed=0)
    app = create_feedback_app(StubLM(), PROMPTS, tmp_path / "votes.jsonl", annotator="ann", strategy="active",
                              candidates=4, window=5, refit_every=4, learner=learner, prefetch=False)
    st, c = app.state.feedback_state, client(app)
    order = order_prompts([p["id"] for p in PROMPTS], "random", 0)
    assert st.order == order
    for choice in "abab":  # before the first fit: the random order, and candidates 0/1 of each prompt
        nxt = vote(c, choice)
        assert nxt["id"] == order[0] and nxt["information"] == 0.0 and nxt["candidates"] == 4
        assert nxt["seed_a"] == candidate_seed(nxt["id"], 0, 0) and nxt["seed_b"] == candidate_seed(nxt["id"], 0, 1)
        order.remove(nxt["id"])
    assert st.active.wait_idle(60) and learner.ready  # the 4th vote started the first refit
    p = c.get("/api/progress").json()["active"]
    assert (p["votes"], p["since_refit"], p["ready"], p["refits"]) == (4, 0, True, 1)
    window = st.window_ids()
    assert window == order[:5]
    assert c.get("/api/next").json()["id"] == window[0]  # nothing sampled ahead yet: the next of the order
    r = c.post("/api/vote", json={"id": window[0], "choice": "a"})
    assert r.status_code == 200 and st.active.wait_idle(60)
    window = st.window_ids()
    st.active.warm_window()  # what the prefetch thread does: sample and featurize the window's candidates
    assert st.active.warm >= set(window)
    ref = {pid: learner.rank(*st.cached_candidates(pid)) for pid in window}
    best = max(window, key=lambda pid: ref[pid][0])
    assert best != window[0] and ref[best][0] > 0  # the choice is not simply the next prompt of the order
    nxt = c.get("/api/next").json()
    _, cands = st.cached_candidates(best)
    info, i, j = ref[best]
    assert nxt["id"] == best and nxt["information"] == pytest.approx(info)
    assert (nxt["completion_a"], nxt["completion_b"]) == (cands[i], cands[j])
    assert c.get("/api/next").json()["id"] == best  # a reload shows the same prompt and pair
    r = c.post("/api/vote", json={"id": best, "choice": "b"})
    assert r.json()["saved"]["information"] == pytest.approx(info) and r.json()["saved"]["strategy"] == "active"
    st.close()


def test_refit_errors_are_shown_not_fatal(tmp_path):
    class Broken(ActiveLearner):
        def fit(self):
            raise RuntimeError("boom")

    app = create_feedback_app(StubLM(), PROMPTS, tmp_path / "votes.jsonl", annotator="ann", strategy="active",
                              refit_every=2, learner=Broken(feats), prefetch=False)
    c = client(app)
    vote(c, "a")
    vote(c, "b")
    assert app.state.feedback_state.active.wait_idle(60)
    p = c.get("/api/progress").json()["active"]
    assert "RuntimeError: boom" in p["refit_error"] and p["agreement"] is None and not p["ready"]
    vote(c, "a")  # the page keeps working
    app.state.feedback_state.close()


def test_restart_resume_with_the_background_refit_running(tmp_path):
    """Votes keep landing (and answering) while a refit is blocked; a restart on the same file, while that refit
    still runs, has every vote once, feeds them all to its learner and ends with the same model as a third start."""
    out = tmp_path / "votes.jsonl"
    entered, gate = threading.Event(), threading.Event()

    class Gated(ActiveLearner):
        def fit(self):
            entered.set()
            assert gate.wait(timeout=120)
            return super().fit()

    def learner(cls=ActiveLearner):
        return cls(feats, min_votes=3, heldout_every=3, seed=0)

    opts = dict(annotator="ann", strategy="active", refit_every=2, prefetch=False)
    app1 = create_feedback_app(StubLM(), PROMPTS, out, learner=learner(Gated), **opts)
    c1 = client(app1)
    ids = [vote(c1, "a")["id"], vote(c1, "b")["id"]]
    assert entered.wait(timeout=60)  # the refit worker is inside fit(), held there
    ids += [vote(c1, "b", ratings={"a": 2, "b": 6})["id"], vote(c1, "tie")["id"], vote(c1, "a")["id"]]
    p1 = c1.get("/api/progress").json()["active"]
    assert not gate.is_set() and (p1["votes"], p1["since_refit"], p1["fitting"]) == (4, 4, True)

    app2 = create_feedback_app(StubLM(), PROMPTS, out, learner=(l2 := learner()), **opts)  # restart, refit running
    st2, c2 = app2.state.feedback_state, client(app2)
    assert st2.active.wait_idle(60)
    assert (l2.status()["votes"], l2.status()["ratings"], l2.ready) == (4, 2, True)  # re-fed: 4 a/b votes, 2 ratings
    p2 = c2.get("/api/progress").json()
    assert (p2["done"], p2["active"]["votes"], p2["active"]["since_refit"]) == (5, 4, 0)
    ids += [vote(c2, "b")["id"], vote(c2, "a")["id"]]
    assert len(set(ids)) == 7 and [r["id"] for r in read_jsonl(out)] == ids  # every vote once, in order
    assert st2.active.wait_idle(60) and l2.status()["votes"] == 6

    gate.set()  # the first server's refit finishes (and catches up with the votes queued meanwhile)
    st1 = app1.state.feedback_state
    assert st1.active.wait_idle(60) and st1.active.learner.status()["votes"] == 4
    st1.close()
    app3 = create_feedback_app(StubLM(), PROMPTS, out, learner=(l3 := learner()), **opts)
    assert app3.state.feedback_state.active.wait_idle(60)
    assert l3.status() == l2.status() and l3.status()["agreement"] is not None
    probe = ("prompt 9 ", ["x", "y", "z", "w"])
    assert l3.rank(*probe) == pytest.approx(l2.rank(*probe))  # the same votes, in the same order: the same model
    st2.close()
    app3.state.feedback_state.close()


def test_prefetch_thread_samples_and_featurizes_the_window_ahead(tmp_path):
    import time
    learner = ActiveLearner(feats, min_votes=2, heldout_every=0)
    app = create_feedback_app(StubLM(), PROMPTS, tmp_path / "votes.jsonl", annotator="ann", strategy="active",
                              window=3, refit_every=2, learner=learner)
    st, c = app.state.feedback_state, client(app)
    vote(c, "a")
    vote(c, "b")
    deadline = time.monotonic() + 60
    while not (learner.ready and st.active.warm >= set(st.window_ids())) and time.monotonic() < deadline:
        time.sleep(0.01)  # a condition another thread makes true, polled with a deadline
    assert learner.ready and st.active.warm >= set(st.window_ids())
    assert all(st.cached_candidates(pid) is not None for pid in st.window_ids())
    window = st.window_ids()
    ref = {pid: learner.rank(*st.cached_candidates(pid))[0] for pid in window}
    assert c.get("/api/next").json()["id"] == max(window, key=ref.get)
    st.close()
    assert not any(th.is_alive() for th in st.active.threads)  # close() stops both threads


def test_feedback_page_rich_feedback_in_chromium(chat_lm, tmp_path, chromium):
    """The new page elements: a 1-7 rating per completion, tag toggles, a critique box and the active-learning
    counter (votes, votes since the last refit, held-out agreement), with the real Featurizer over the tiny model;
    a keyboard vote still works, and the refit in the background updates the counter."""
    expect = pytest.importorskip("playwright.sync_api").expect
    pj = tmp_path / "prompts.jsonl"
    pj.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PLAIN)))
    out = tmp_path / "votes.jsonl"
    app = create_feedback_app(chat_lm, pj, out, annotator="alice", sampling=SAMPLING, strategy="active",
                              candidates=3, refit_every=2, learner_options={"min_votes": 2})
    with chromium_page(chromium, app, (1100, 900)) as (page, url, errors):
        page.goto(url + "/")
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        learner = page.locator("#learner")
        expect(learner).to_have_text("active learning: 0 votes, 0 since refit · held-out agreement —")
        expect(page.locator("#tags-a button")).to_have_text(["unsafe", "wrong", "off-topic", "unhelpful",
                                                              "verbose"])
        page.click("#rating-a button[data-value='5']")
        page.click("#rating-b button[data-value='2']")
        page.click("#rating-b button[data-value='3']")  # a second click on B moves its rating
        expect(page.locator("#rating-b button[aria-pressed='true']")).to_have_text("3")
        page.click("#tags-b button[data-tag='wrong']")
        page.click("#tags-b button[data-tag='verbose']")
        page.click("#tags-b button[data-tag='verbose']")  # toggled off again
        expect(page.locator("#tags-b button[aria-pressed='true']")).to_have_text(["wrong"])
        page.fill("#critique", "B repeats the prompt")
        page.screenshot(path=str(ARTIFACTS / "feedback_rich.png"), full_page=True)
        first = page.locator("body").get_attribute("data-prompt-id")
        page.click("#vote-a")
        expect(page.locator("#status")).to_contain_text("saved: A better with rating, tags, critique",
                                                        timeout=30_000)
        expect(learner).to_have_text("active learning: 1 vote, 1 since refit · held-out agreement —")
        rec = read_jsonl(out)[-1]  # on disk now, with the richer feedback
        assert rec["id"] == first and rec["choice"] == "a" and rec["strategy"] == "active"
        assert rec["ratings"] == {"a": 5, "b": 3} and rec["tags"] == {"b": ["wrong"]}
        assert rec["critique"] == "B repeats the prompt"
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        expect(page.locator(".rating button[aria-pressed='true'], .tags button[aria-pressed='true']")
               ).to_have_count(0)  # fresh controls for the next prompt
        expect(page.locator("#critique")).to_have_value("")
        page.locator("body").press("2")  # keyboard shortcut: B better; the 2nd vote starts a refit
        expect(learner).to_contain_text("active learning: 2 votes, 0 since refit", timeout=60_000)
        expect(learner).not_to_contain_text("refitting", timeout=60_000)
        last = read_jsonl(out)[-1]
        assert last["choice"] == "b" and not {"ratings", "tags", "critique"} & set(last)
        assert app.state.feedback_state.active.learner.ready  # fitted on the two votes
        assert not errors, errors
        app.state.feedback_state.close()
