"""Human feedback page (`lmstack feedback`): the API writes each vote to disk at once (valid JSONL after every
vote), a restarted session skips voted prompts, bad votes get 4xx JSON, export writes prompt/chosen/rejected; and a
headless-Chromium run (Playwright) shows two completions, votes (with an edit and a keyboard shortcut) and finds the
lines on disk."""
import json
import os
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import lmstack  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.data.jsonl import JsonlLog, read_log  # noqa: E402
from lmstack.serve.feedback import create_feedback_app, export_preferences, load_prompts  # noqa: E402
from conftest import ARTIFACTS, chromium_page, make_chat_checkpoint, read_jsonl  # noqa: E402

SAMPLING = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95}
PLAIN = ["The king ", "Where is the ", "My good lady ", "The sun and "]


@pytest.fixture(scope="module")
def chat_lm(tiny_run, tmp_path_factory):
    out, _ = tiny_run
    return lmstack.load(make_chat_checkpoint(out, tmp_path_factory.mktemp("fbchat") / "ckpt"))


@pytest.fixture
def prompts_txt(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PLAIN[:3]) + "\n\n", encoding="utf-8")
    return p


def client(app):
    from fastapi.testclient import TestClient
    return TestClient(app, raise_server_exceptions=False)


def test_load_prompts(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\none\n")
    items = load_prompts(t)
    assert [i["prompt"] for i in items] == ["one", "two"]  # blank skipped, repeat kept once
    assert len({i["id"] for i in items}) == 2
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "x", "id": 7}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    items = load_prompts(j)
    assert items[0] == {"prompt": "x", "id": "7"} and items[1]["messages"][0]["content"] == "hi"
    for bad in ('{"text": "x"}', "not json", '{"messages": [{"role": "user"}]}'):
        j.write_text(bad + "\n")
        with pytest.raises(LMStackError, match="p.jsonl:1"):
            load_prompts(j)
    with pytest.raises(LMStackError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


def test_txt_prompts_follow_the_one_rule(tmp_path):
    """A .txt prompts file is read by lmstack.data.prefs.load_prompts (the rule PPO prompts use too): one prompt per
    line, blank lines skipped, a literal \\n becomes a newline, trailing spaces kept."""
    from lmstack.data.prefs import load_prompts as prefs_prompts
    t = tmp_path / "p.txt"
    t.write_text("Dear sir,\\nhello \n\n  \nThe king \n")
    assert [i["prompt"] for i in load_prompts(t)] == prefs_prompts(t) == ["Dear sir,\nhello ", "The king "]


def test_vote_log_fsyncs_and_cuts_a_torn_line(tmp_path, monkeypatch):
    """Votes go through one JsonlLog(fsync=True): nothing is created before the first vote, every vote is fsync'ed
    before append returns, a torn last line is skipped by read_log and cut when the log opens again, and a failed
    write leaves the next vote on a line of its own."""
    import lmstack.data.jsonl as J
    from lmstack.serve.feedback_store import VoteLog
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(J.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    out = tmp_path / "votes.jsonl"
    log = VoteLog(out)
    assert log.ids() == set() and not out.exists()
    log.append({"id": "1"})
    assert out.read_text() == '{"id": "1"}\n' and synced  # on disk (fsync'ed) when append returns
    n = len(synced)
    log.append({"id": "2"})
    assert len(synced) > n
    log.close()
    with open(out, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"id": "to')
    assert [v["id"] for v in read_log(out)] == ["1", "2"]
    log = VoteLog(out)
    assert log.ids() == {"1", "2"}
    log.append({"id": "3"})
    assert out.read_text().splitlines() == ['{"id": "1"}', '{"id": "2"}', '{"id": "3"}']

    def torn_write(text):  # the disk fills up half-way through a line
        real_write(text[:5])
        raise OSError(28, "No space left on device")
    real_write = log._log._f.write
    monkeypatch.setattr(log._log._f, "write", torn_write)
    with pytest.raises(OSError):
        log.append({"id": "4"})
    log.append({"id": "5"})
    log.close()
    assert [v["id"] for v in read_log(out)] == ["1", "2", "3", "5"]


def test_feedback_server_from_config(chat_lm, tmp_path, monkeypatch):
    """FeedbackConfig -> feedback_server (what `lmstack feedback` builds): the page, its notes, and serve()."""
    import uvicorn
    import webbrowser
    from lmstack.serve.feedback import FeedbackConfig, feedback_server
    prompts = tmp_path / "p.txt"
    prompts.write_text("The king \n")
    out = tmp_path / "votes.jsonl"
    srv = feedback_server(FeedbackConfig(model=str(chat_lm.path), prompts=prompts, out=out, annotator="bob",
                                         max_new_tokens=6, port=9123, open_browser=False))
    assert srv.url == "http://localhost:9123/"
    assert srv.notes() == [f"feedback: 0/1 prompts already voted in {out}; open {srv.url}  (Ctrl+C to stop)",
                           "feedback: strategy active: 4 candidates per prompt, the reward model is refit every 10 "
                           "votes (0 so far); random order until its first fit"]  # active is the CLI's default
    c = client(srv.app)
    nxt = c.get("/api/next").json()
    assert nxt["sampling"]["max_new_tokens"] == 6 and nxt["model"] == str(chat_lm.path)
    assert nxt["progress"]["strategy"] == "active" and 2 <= nxt["candidates"] <= 4 and nxt["information"] == 0.0
    assert c.post("/api/vote", json={"id": nxt["id"], "choice": "a"}).json()["saved"]["annotator"] == "bob"
    ran, opened = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    monkeypatch.setattr(webbrowser, "open", opened.append)
    srv.serve()
    assert ran == [{"host": "127.0.0.1", "port": 9123, "log_level": "warning"}] and not opened
    warm = feedback_server(FeedbackConfig(model=str(chat_lm.path), prompts=prompts, out=out, host="0.0.0.0",
                                          temperature=0, chat=True, strategy="sequential"))
    notes = warm.notes()
    assert notes[0].startswith("feedback: 1/1 prompts already voted") and "localhost:8008" in notes[0]
    assert "no login" in notes[1] and "greedy" in notes[2]
    warm.app.state.feedback_state.close()


def test_vote_written_at_once_and_valid_jsonl(chat_lm, prompts_txt, tmp_path):
    out = tmp_path / "votes.jsonl"
    app = create_feedback_app(chat_lm, prompts_txt, out, annotator="ann", sampling=SAMPLING, model_name="tiny")
    c = client(app)
    assert c.get("/api/progress").json()["total"] == 3
    seen = []
    for n, (choice, edit) in enumerate([("a", None), ("b", "a better answer"), ("tie", None)], 1):
        nxt = c.get("/api/next").json()
        assert not nxt["done"] and nxt["chat"] is False and nxt["prompt"] in PLAIN
        assert nxt["seed_a"] != nxt["seed_b"] and isinstance(nxt["completion_a"], str)
        assert c.get("/api/next").json()["completion_b"] == nxt["completion_b"]  # a reload shows the same pair
        body = {"id": nxt["id"], "choice": choice}
        if edit:
            body["edited_text"] = edit
        r = c.post("/api/vote", json=body)
        assert r.status_code == 200, r.text
        lines = out.read_text().splitlines()  # on disk before the response: one valid JSON line per vote
        assert len(lines) == n
        recs = [json.loads(ln) for ln in lines]
        rec = recs[-1]
        seen.append(rec["id"])
        assert rec["prompt"] == nxt["prompt"] and rec["choice"] == choice and rec["annotator"] == "ann"
        assert rec["completion_a"] == nxt["completion_a"] and rec["completion_b"] == nxt["completion_b"]
        assert rec["model"] == "tiny" and rec["timestamp"].endswith("+00:00")
        assert rec["sampling"] == {**SAMPLING, "seed_a": nxt["seed_a"], "seed_b": nxt["seed_b"]}
        if choice == "a":
            assert (rec["chosen"], rec["rejected"], rec["edited"]) == (nxt["completion_a"], nxt["completion_b"],
                                                                       False)
        elif choice == "b":
            assert rec["chosen"] == edit and rec["edited"] is True and rec["original_chosen"] == nxt["completion_b"]
            assert rec["rejected"] == nxt["completion_a"]
        else:
            assert rec["chosen"] is None and rec["rejected"] is None
    assert len(set(seen)) == 3
    assert c.get("/api/next").json()["done"] is True
    assert c.get("/api/progress").json()["done"] == 3


def test_resume_skips_voted(chat_lm, prompts_txt, tmp_path):
    out = tmp_path / "votes.jsonl"
    c = client(create_feedback_app(chat_lm, prompts_txt, out, annotator="ann", sampling=SAMPLING))
    first = c.get("/api/next").json()
    assert c.post("/api/vote", json={"id": first["id"], "choice": "a"}).status_code == 200
    with open(out, "ab") as f:  # a crash in the middle of a write leaves a torn line behind
        f.write(b'{"id": "torn')
    c2 = client(create_feedback_app(chat_lm, prompts_txt, out, annotator="ann", sampling=SAMPLING))  # restart
    p = c2.get("/api/progress").json()
    assert (p["done"], p["remaining"]) == (1, 2)
    nxt = c2.get("/api/next").json()
    assert nxt["id"] != first["id"] and nxt["prompt"] == PLAIN[1]
    assert c2.post("/api/vote", json={"id": nxt["id"], "choice": "both_bad"}).status_code == 200
    assert [v["id"] for v in read_log(out)] == [first["id"], nxt["id"]]  # the torn line is skipped, not fatal
    assert out.read_text().splitlines()[-1].startswith('{"id"')  # the new record starts on its own line
    # the same prompt gets the same pair after a restart (seeds fixed by the prompt id)
    c3 = client(create_feedback_app(chat_lm, prompts_txt, tmp_path / "other.jsonl", sampling=SAMPLING))
    again = c3.get("/api/next").json()
    assert again["id"] == first["id"] and again["completion_a"] == first["completion_a"]


def test_bad_votes_are_4xx(chat_lm, prompts_txt, tmp_path):
    out = tmp_path / "votes.jsonl"
    c = client(create_feedback_app(chat_lm, prompts_txt, out, sampling=SAMPLING))  # no default annotator
    nxt = c.get("/api/next").json()
    ok = {"id": nxt["id"], "choice": "a", "annotator": "ann"}
    cases = [
        ({**ok, "choice": "c"}, 422), ({**ok, "choice": None}, 422), ({"choice": "a", "annotator": "x"}, 422),
        ({**ok, "id": 5}, 422), ({**ok, "id": "nope"}, 404), ({**ok, "annotator": ""}, 422),
        ({**ok, "annotator": 3}, 422), ({**ok, "edited_text": 1}, 422), ({**ok, "extra": 1}, 422),
        ({**ok, "choice": "tie", "edited_text": "x"}, 422), ([1, 2], 422), ("a string", 422),
    ]
    for body, status in cases:
        r = c.post("/api/vote", json=body)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert r.json()["error"]["message"]
    for raw in (b"{not json", b"\xff\xfe", b""):
        r = c.post("/api/vote", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json()
    other = [p for p in load_prompts(prompts_txt) if p["id"] != nxt["id"]][0]
    assert c.post("/api/vote", json={**ok, "id": other["id"]}).status_code == 409  # never shown
    assert not out.exists()  # nothing invalid reached the file
    assert c.post("/api/vote", json=ok).status_code == 200
    r = c.post("/api/vote", json=ok)
    assert r.status_code == 409 and "already" in r.json()["error"]["message"]
    assert len(read_jsonl(out)) == 1
    assert c.post("/api/skip", json={"id": "nope"}).status_code == 404


def test_chat_prompts_use_template(chat_lm, tmp_path):
    pj = tmp_path / "p.jsonl"
    pj.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                  + json.dumps({"prompt": "The king "}) + "\n")
    out = tmp_path / "votes.jsonl"
    c = client(create_feedback_app(chat_lm, pj, out, annotator="ann", sampling=SAMPLING))
    first = c.get("/api/next").json()
    assert first["chat"] is True and first["prompt"] == chat_lm.chat_prompt(first["messages"])
    assert "<|im_end|>" not in first["completion_a"]  # stops at the end-of-turn token
    assert c.post("/api/vote", json={"id": first["id"], "choice": "a"}).status_code == 200
    second = c.get("/api/next").json()
    assert second["chat"] is False and second["prompt"] == "The king "
    assert c.post("/api/vote", json={"id": second["id"], "choice": "b"}).status_code == 200
    recs = read_jsonl(out)
    assert recs[0]["chat"] is True and recs[0]["messages"] == first["messages"] and recs[1]["chat"] is False
    pairs = tmp_path / "pairs.jsonl"
    export_preferences(out, pairs)
    rows = read_jsonl(pairs)
    assert rows[0] == {"prompt": first["messages"], "chosen": first["completion_a"],
                       "rejected": first["completion_b"]}  # a chat prompt is exported as its messages
    assert rows[1]["prompt"] == "The king "
    try:  # the preference loader of the training side reads the export back (same prompt text the model saw)
        from lmstack.data.prefs import load_prefs
    except ImportError:
        load_prefs = None
    if load_prefs is not None:
        ex = load_prefs(pairs, chat_lm.tokenizer)
        assert ex[0].chat is True and ex[0].prompt == first["prompt"] and ex[0].chosen == first["completion_a"]
        assert ex[1].chat is False and ex[1].prompt == "The king " and ex[1].chosen == second["completion_b"]
    # chat=True wraps plain prompts too
    c2 = client(create_feedback_app(chat_lm, pj, tmp_path / "v2.jsonl", sampling=SAMPLING, chat=True))
    c2.post("/api/skip", json={"id": first["id"]})
    wrapped = c2.get("/api/next").json()
    assert wrapped["chat"] is True and wrapped["messages"] == [{"role": "user", "content": "The king "}]
    assert wrapped["prompt"] == chat_lm.chat_prompt(wrapped["messages"])
    with pytest.raises(LMStackError, match="temperature"):
        create_feedback_app(chat_lm, pj, out, sampling={"temperature": -1})


def test_export(tmp_path, capsys):
    votes = tmp_path / "votes.jsonl"
    base = {"prompt": "P", "completion_a": "x", "completion_b": "y", "annotator": "ann"}
    log = JsonlLog(votes, fsync=True)
    for rec in [{**base, "id": "1", "choice": "a", "chosen": "x", "rejected": "y", "edited": False},
                {**base, "id": "2", "choice": "b", "chosen": "fixed", "rejected": "x", "edited": True},
                {**base, "id": "3", "choice": "tie", "chosen": None, "rejected": None},
                {**base, "id": "4", "choice": "both_bad", "chosen": None, "rejected": None},
                {**base, "id": "1", "choice": "b", "chosen": "y", "rejected": "x", "edited": False}]:
        log.append(rec)
    log.close()
    pairs = tmp_path / "pairs.jsonl"
    counts = export_preferences(votes, pairs)
    assert counts == {"votes": 5, "written": 2, "tie": 1, "both_bad": 1, "edited": 1, "skipped_edited": 0,
                      "duplicates": 1}
    rows = read_jsonl(pairs)
    assert rows == [{"prompt": "P", "chosen": "y", "rejected": "x"},  # the later vote on id 1 wins
                    {"prompt": "P", "chosen": "fixed", "rejected": "x"}]
    assert export_preferences(votes, pairs, include_edited=False)["written"] == 1
    with pytest.raises(LMStackError, match="overwrite"):
        export_preferences(votes, votes)
    from lmstack.cli import main
    assert main(["feedback", "--out", str(votes), "--export", str(tmp_path / "cli.jsonl")]) == 0
    assert "wrote 2" in capsys.readouterr().out and len(read_jsonl(tmp_path / "cli.jsonl")) == 2
    assert main(["feedback", "--out", str(votes)]) == 2  # no --model/--prompts: one-line error, exit 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["feedback", "--help"])
    assert e.value.code == 0 and "--no-browser" in capsys.readouterr().out


def test_feedback_page_in_chromium(chat_lm, tmp_path, chromium):
    expect = pytest.importorskip("playwright.sync_api").expect
    pj = tmp_path / "prompts.jsonl"
    pj.write_text(json.dumps({"id": "p1", "prompt": PLAIN[0]}) + "\n" + json.dumps({"id": "p2", "prompt": PLAIN[1]})
                  + "\n" + json.dumps({"id": "p3", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "votes.jsonl"
    app = create_feedback_app(chat_lm, pj, out, annotator="", sampling=SAMPLING, model_name="tiny-chat")
    with chromium_page(chromium, app, (1100, 800)) as (page, url, errors):
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text("tiny-chat")
        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        expect(page.locator("#prompt")).to_have_text(PLAIN[0])
        expect(page.locator("#progress")).to_have_text("0 / 3 judged")
        a, b = page.locator("#completion-a"), page.locator("#completion-b")
        expect(a).to_be_visible()
        expect(b).to_be_visible()
        pair = app.state.feedback["cache"]["p1"]
        assert a.input_value() == pair["completion_a"] and b.input_value() == pair["completion_b"]
        assert a.input_value() != b.input_value()  # two different samples, side by side
        box_a, box_b = a.bounding_box(), b.bounding_box()
        assert box_a["x"] + box_a["width"] <= box_b["x"] and abs(box_a["y"] - box_b["y"]) < 2

        page.click("#vote-a")  # no annotator name yet: the page asks for one, nothing is written
        expect(page.locator("#status")).to_have_class("error")
        assert not out.exists()
        page.fill("#annotator", "alice")

        b.fill(pair["completion_b"] + " (fixed)")  # edit the better one, then vote for it
        expect(page.locator("#cand-b .edited-badge")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "feedback.png"), full_page=True)
        page.click("#vote-b")
        expect(page.locator("#status")).to_contain_text("saved: B better (edited)", timeout=30_000)
        expect(page.locator("#progress")).to_have_text("1 / 3 judged")
        rec = read_jsonl(out)[-1]  # on disk now
        assert rec["id"] == "p1" and rec["choice"] == "b" and rec["annotator"] == "alice"
        assert rec["chosen"] == pair["completion_b"] + " (fixed)" and rec["edited"] is True
        assert rec["rejected"] == pair["completion_a"]

        expect(page.locator("#prompt")).to_have_text(PLAIN[1])  # the next prompt, fresh boxes
        expect(page.locator("#cand-b .edited-badge")).to_be_hidden()
        page.locator("body").press("3")  # keyboard shortcut: tie
        expect(page.locator("#progress")).to_have_text("2 / 3 judged", timeout=30_000)
        assert read_jsonl(out)[-1]["choice"] == "tie" and read_jsonl(out)[-1]["id"] == "p2"

        expect(page.locator("#prompt .turn.user")).to_contain_text("hi")  # a chat prompt shows its turns
        page.keyboard.press("a")
        expect(page.locator("#done")).to_be_visible(timeout=30_000)
        expect(page.locator("#export-cmd")).to_contain_text("--export")
        assert [r["id"] for r in read_jsonl(out)] == ["p1", "p2", "p3"]
        assert not errors, errors


def test_cli_serves_the_page(chat_lm, tmp_path):
    """`lmstack feedback ... --no-browser` serves the page; a vote over HTTP lands in --out."""
    import socket
    import time
    prompts = tmp_path / "p.txt"
    prompts.write_text("The king \n")
    out = tmp_path / "votes.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "feedback", "--model", str(chat_lm.path),
                             "--prompts", str(prompts), "--out", str(out), "--port", str(port), "--no-browser",
                             "--max-new-tokens", "8", "--annotator", "bob", "--candidates", "2"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server comes up: polled with a deadline
            try:
                if httpx.get(url + "/api/progress", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        assert "text/html" in httpx.get(url + "/").headers["content-type"]
        nxt = httpx.get(url + "/api/next", timeout=30).json()
        assert nxt["prompt"] == "The king " and nxt["sampling"]["max_new_tokens"] == 8
        assert nxt["progress"]["strategy"] == "active" and nxt["candidates"] <= 2  # the CLI's default strategy
        assert httpx.post(url + "/api/vote", json={"id": nxt["id"], "choice": "a"}, timeout=30).status_code == 200
        rec = read_jsonl(out)[0]
        assert rec["annotator"] == "bob" and rec["model"] == str(chat_lm.path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
