"""The web playground at `/`: static files over plain HTTP, and a headless-Chromium run (Playwright) that moves a
slider, sets a seed, generates with streaming and checks the coloured token view."""

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import lmstack  # noqa: E402
from lmstack.serve import create_app  # noqa: E402
from conftest import ARTIFACTS, CHROMIUM_ARGS, start_server  # noqa: E402

KEY = "sk-playground"


@pytest.fixture(scope="module")
def server(tiny_run):
    out, _ = tiny_run
    srv, th, url = start_server(create_app(lmstack.load(out / "last"), "tiny", api_key=KEY))
    yield url
    srv.should_exit = True
    th.join(timeout=10)


def test_static_files(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "lmstack playground" in r.text and "/static/playground.js" in r.text
    js = httpx.get(server + "/static/playground.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    css = httpx.get(server + "/static/playground.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    cfg = httpx.get(server + "/playground/config").json()  # open: the page asks before it has a key
    assert cfg == {"model": "tiny", "api_key_required": True, "context_length": cfg["context_length"]}
    assert httpx.get(server + "/static/nope.js").status_code == 404


def test_header_shows_the_model_name_not_its_path(tiny_run, monkeypatch):
    """`serve(run/last)` without a name: the page's header (/playground/config) says '<run>/last', no path."""
    out, _ = tiny_run
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    from lmstack.serve import serve
    serve(str(out / "last"), port=0)
    srv, th, url = start_server(apps[0])
    try:
        cfg = httpx.get(url + "/playground/config").json()
        assert cfg["model"] == f"{out.name}/last" and str(out) not in cfg["model"]
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def test_playground_in_chromium(server, chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            sync_api.expect(page.locator("#model")).to_have_text("tiny")  # config loaded
            sync_api.expect(page.locator("#key-row")).to_be_visible()     # the server has a key
            page.fill("#api-key", KEY)

            temp = page.locator("output[for=temperature]")
            assert temp.text_content() == "1"
            page.focus("#temperature")
            for _ in range(4):
                page.keyboard.press("ArrowLeft")
            sync_api.expect(temp).to_have_text("0.8")
            page.fill("#top_k", "20")  # range inputs take fill() too
            sync_api.expect(page.locator("output[for=top_k]")).to_have_text("20")
            page.fill("#max_tokens", "12")
            page.fill("#seed", "7")
            page.fill("#prompt", "The ")

            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            assert page.locator("#status").get_attribute("class") != "error"
            out = page.locator("#output").text_content()
            assert out
            spans = page.locator("#tokens span.tok")
            n = spans.count()
            assert 1 <= n <= 12
            assert "".join(spans.nth(i).text_content() for i in range(n)) == out
            title = spans.first.get_attribute("title")
            assert "p=" in title and title.count("\n") >= 1  # own probability + top alternatives
            p0 = float(spans.first.get_attribute("data-p"))
            assert 0 < p0 <= 1
            assert spans.first.evaluate("e => e.style.backgroundColor") != ""
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

            page.click("#generate")  # same seed, same text
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            assert page.locator("#output").text_content() == out

            page.check("input[name=mode][value=chat]")  # chat mode: /v1/chat/completions with top_logprobs
            sync_api.expect(page.locator("#prompt")).to_be_hidden()
            page.fill("#user-msg", "hi")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            sync_api.expect(page.locator("#chat-log .msg.user")).to_have_text("hi")
            if page.locator("#output").text_content():  # the reply may be an immediate end-of-turn
                assert "p=" in page.locator("#tokens span.tok").first.get_attribute("title")
            assert not errors
        finally:
            browser.close()
