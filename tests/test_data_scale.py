"""Corpora at scale: the built-in `stdlib` corpus (deterministic, deduplicated, fixed document-level split), tables
(Parquet / Arrow / Feather / CSV) and `hf:` datasets with a chosen text column, and parallel tokenization that
writes the same bytes as serial."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest

from lmstack.data import corpora, shards, stdlib, tabular
from lmstack.data.shards import TokenDataset, prepare_dataset
from lmstack.errors import LMStackError
from lmstack.tokenizer import train_char

pa = pytest.importorskip("pyarrow")

DOCS = ["first document\nwith two lines\n", "", "ünïcödé — text, with \"quotes\" and, commas\n\nand a blank line",
        "short", "x" * 500] + [f"row {i}: the quick brown fox {i * 7 % 13}\n" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_char(DOCS + ["abcdefghijklmnopqrstuvwxyz0123456789 \n:.,_-=()#'\"\\"])


def bins(d) -> bytes:
    meta = json.loads((d / "meta.json").read_text())
    return b"".join((d / s["file"]).read_bytes() for s in meta["shards"])


def write_tables(dirpath, docs, column="text"):
    """The same rows as .jsonl, .parquet (many small row groups), .feather (IPC file), .arrow (IPC stream, the
    `datasets` cache format) and .csv, with an extra integer column."""
    import pyarrow.csv as pcsv
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq
    dirpath.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(docs))), column: docs})
    paths = {"jsonl": dirpath / "c.jsonl", "parquet": dirpath / "c.parquet", "feather": dirpath / "c.feather",
             "arrow": dirpath / "c.arrow", "csv": dirpath / "c.csv"}
    paths["jsonl"].write_text("".join(json.dumps({"id": i, column: t}) + "\n" for i, t in enumerate(docs)),
                              encoding="utf-8")
    pq.write_table(table, paths["parquet"], row_group_size=7)
    feather.write_feather(table, paths["feather"], chunksize=5)
    with ipc.new_stream(str(paths["arrow"]), table.schema) as w:
        for b in table.to_batches(max_chunksize=6):
            w.write_batch(b)
    pcsv.write_csv(table, paths["csv"])
    return paths


# ---- stdlib --------------------------------------------------------------------------------------------------
def test_stdlib_real_corpus_is_deterministic_deduplicated_and_split_by_document():
    a, b = list(stdlib.iter_stdlib()), list(stdlib.iter_stdlib())
    assert a == b and len(a) > 100
    paths = [d.path for d in a]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert not any(set(p.split("/")[:-1]) & {"site-packages", "__pycache__"} or p.startswith(stdlib.SKIP_PREFIXES)
                   for p in paths)
    assert not any(stdlib.GENERATED_MARK in d.text for d in a)  # no generated codec tables
    assert any(p.startswith("test/") for p in paths) == (stdlib.stdlib_root() / "test").is_dir()
    digests = [hashlib.sha1(d.text.encode()).digest() for d in a]
    assert len(set(digests)) == len(digests)
    assert all(d.split == stdlib.doc_split(d.path) for d in a)
    val = {d.path for d in a if d.split == "val"}
    assert 0.03 < len(val) / len(a) < 0.2
    assert sum(len(d.text) for d in a) > 5_000_000  # several MB of text
    # the split is a function of the path alone (the same on every machine and Python version)
    assert stdlib.doc_split("json/decoder.py") == stdlib.doc_split("json/decoder.py")
    assert [stdlib.doc_split(f"m{i}.py", 10) for i in range(200)].count("val") in range(8, 40)


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A small stand-in for the stdlib directory: duplicates, near-duplicates, tests, caches, non-UTF-8."""
    root = tmp_path / "lib"
    long_body = "".join(f"def function_number_{i}(argument):\n    return argument * {i} + 12345\n" for i in range(12))
    files = {
        "alpha.py": '"""Alpha module."""\r\nimport os   \r\n\r\nX = 1\r\n',
        "beta.py": "# beta\n" + long_body,
        "beta_copy.py": "# beta\n" + long_body,                                       # exact duplicate
        "beta_near.py": "# a near-verbatim copy\n" + long_body + "EXTRA = 1\n",       # near duplicate
        "pkg/__init__.py": "",                                                       # empty: skipped
        "pkg/gamma.py": "def gamma():\n    '''Gamma.'''\n    return 3\n",
        "pkg/test/test_gamma.py": "assert True\n",
        "tests/t.py": "assert 1\n",
        "idlelib/idle_test/x.py": "pass_me = 1\n",
        "lib2to3/tests/data/bom.py": "broken = (\n",                              # test input data: skipped
        "encodings/cp999.py": "### Encoding table\ndecoding_table = ()\n",       # generated codec: skipped
        "idlelib/editor.py": "class Editor:\n    pass\n",
        "__pycache__/alpha.py": "cached = 1\n",
        "site-packages/pkg3/mod.py": "third_party = 1\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "cfg = 1\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "notes.txt": "not a module\n",
    } | {f"m{i:02d}.py": f"value_{i} = {i}  # module {i}\n" for i in range(30)}
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))                 # not UTF-8: skipped
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: root)
    return root


def test_stdlib_reads_modules_and_tests_skips_duplicates_and_bad_files(fake_stdlib):
    docs = list(stdlib.iter_stdlib())
    paths = [d.path for d in docs]
    assert paths == (["alpha.py", "beta.py", "idlelib/editor.py", "idlelib/idle_test/x.py"]
                     + [f"m{i:02d}.py" for i in range(30)] + ["pkg/gamma.py", "pkg/test/test_gamma.py", "tests/t.py"])
    assert docs[0].text == '"""Alpha module."""\nimport os\n\nX = 1\n'   # normalised newlines and trailing blanks
    assert list(corpora.iter_corpus("stdlib")) == [(d.text, True) for d in docs]
    train = [t for t, _ in corpora.iter_corpus("stdlib", split="train")]
    val = [t for t, _ in corpora.iter_corpus("stdlib", split="val")]
    assert val and train and sorted(train + val) == sorted(d.text for d in docs) and not set(train) & set(val)
    assert list(corpora.iter_texts("stdlib")) == train     # tokenizers never see validation modules
    assert len(list(corpora.iter_texts("stdlib#tokenizer_sample_bytes=40"))) < len(train)
    assert [t for t, _ in corpora.iter_corpus("stdlib#val_percent=0", split="val")] == []


def test_stdlib_shards_hold_train_documents_then_val_documents(fake_stdlib, tok, tmp_path):
    train = [t for t, _ in corpora.iter_corpus("stdlib", split="train")]
    val = [t for t, _ in corpora.iter_corpus("stdlib", split="val")]
    eos = [tok.eos_id]
    want_train = [i for t in train for i in tok.encode(t) + eos]    # every train doc ends with EOS
    want_val = [i for k, t in enumerate(val) for i in (eos if k else []) + tok.encode(t)]
    ds = TokenDataset(prepare_dataset("stdlib", tok, tmp_path / "d", val_fraction=0.5, workers=1))
    assert ds.meta["split"] == len(want_train) and ds.meta["split_by"] == "document"
    a, b = ds.split_range("train")
    assert ds.read(a, b - a).tolist() == want_train
    a, b = ds.split_range("val")
    assert ds.read(a, b - a).tolist() == want_val
    # the split is fixed by the corpus: val_fraction does not move it
    other = TokenDataset(prepare_dataset("stdlib", tok, tmp_path / "e", val_fraction=0.1, workers=1))
    assert other.split == ds.split and bins(other.dir) == bins(ds.dir)


# ---- tables ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["parquet", "feather", "arrow", "csv"])
def test_table_files_give_the_same_tokens_as_jsonl(kind, tok, tmp_path):
    paths = write_tables(tmp_path / "src", DOCS)
    assert [t for t, _ in corpora.iter_corpus(str(paths[kind]))] == DOCS
    ref = prepare_dataset(str(paths["jsonl"]), tok, tmp_path / "ref", workers=1)
    got = prepare_dataset(str(paths[kind]), tok, tmp_path / kind, workers=1)
    assert bins(got) == bins(ref)
    assert json.loads((got / "meta.json").read_text())["split"] == json.loads((ref / "meta.json").read_text())["split"]


def test_table_directory_glob_and_text_column(tok, tmp_path):
    paths = write_tables(tmp_path / "src", DOCS, column="body")
    for p in ("jsonl", "feather", "arrow", "csv"):
        paths[p].unlink()
    (tmp_path / "src" / "more.parquet").write_bytes(paths["parquet"].read_bytes())
    want = DOCS + DOCS
    assert [t for t, _ in corpora.iter_corpus(str(tmp_path / "src") + "#text_column=body")] == want
    assert [t for t, _ in corpora.iter_corpus(str(tmp_path / "src" / "*.parquet"), text_column="body")] == want
    assert list(corpora.iter_texts(str(tmp_path / "src"), text_column="body")) == want


@pytest.mark.parametrize("kind", ["parquet", "feather", "arrow", "csv", "jsonl"])
def test_missing_text_column_names_the_columns(kind, tmp_path):
    paths = write_tables(tmp_path / "src", DOCS[:3], column="content")
    with pytest.raises(LMStackError, match="text") as e:
        list(corpora.iter_corpus(str(paths[kind])))
    if kind != "jsonl":
        assert "'id'" in str(e.value) and "'content'" in str(e.value) and "text_column" in str(e.value)
    with pytest.raises(LMStackError, match="holds int64, not text"):
        list(corpora.iter_corpus(str(paths["parquet"]) + "#text_column=id"))


def test_corpus_options_are_checked(tmp_path):
    with pytest.raises(LMStackError, match="bad option"):
        list(corpora.iter_corpus("stdlib#colour=blue"))
    with pytest.raises(LMStackError, match="not a number"):
        list(corpora.iter_texts("stdlib#tokenizer_sample_bytes=lots"))
    with pytest.raises(LMStackError, match="no document-level split"):
        list(corpora.iter_corpus("pydocs", split="val"))
    assert corpora.parse_corpus_spec("x.parquet#text_column=a, val_percent=5") == (
        "x.parquet", {"text_column": "a", "val_percent": "5"})


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = write_tables(tmp_path / "src", DOCS[:2])["parquet"]
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(LMStackError, match=r"pip install 'lmstack\[data\]'"):
        list(corpora.iter_corpus(str(p)))


# ---- parallel tokenization ------------------------------------------------------------------------------------
def test_parallel_tokenization_writes_the_same_bytes(tok, tmp_path, monkeypatch, fake_stdlib):
    monkeypatch.setattr(shards, "BATCH_PIECES", 3)   # many batches from a small corpus
    src = write_tables(tmp_path / "src", DOCS)["jsonl"]
    for corpus in (str(src), "stdlib"):
        one = prepare_dataset(corpus, tok, tmp_path / "one", workers=1, shard_tokens=500)
        two = prepare_dataset(corpus, tok, tmp_path / "two", workers=2, shard_tokens=500)
        assert bins(one) == bins(two) and len(json.loads((one / "meta.json").read_text())["shards"]) > 1
        assert (one / "meta.json").read_text() == (two / "meta.json").read_text()
    assert shards.default_workers() >= 1
    monkeypatch.setenv("LMSTACK_TOKENIZE_WORKERS", "3")
    assert shards.default_workers() == 3


# ---- Hugging Face datasets ------------------------------------------------------------------------------------
def test_hf_spec_parsing():
    assert tabular.parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert tabular.parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext", "wikitext-2-raw-v1", "validation")
    assert tabular.parse_hf_spec("hf:name::test") == ("name", None, "test")
    with pytest.raises(LMStackError, match="hf:NAME"):
        tabular.parse_hf_spec("hf:")


def test_hf_streams_rows_through_load_dataset(monkeypatch, tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(*args, **kw):
        calls.append((args, kw))
        return iter([{"content": t, "n": i} for i, t in enumerate(DOCS)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert [t for t, _ in corpora.iter_corpus("hf:org/name:cfg:validation#text_column=content")] == DOCS
    assert calls[0] == (("org/name", "cfg"), {"split": "validation", "streaming": True})
    ref = prepare_dataset(str(write_tables(tmp_path / "src", DOCS)["jsonl"]), tok, tmp_path / "ref", workers=1)
    got = prepare_dataset("hf:org/name#text_column=content", tok, tmp_path / "hf", workers=1)
    assert bins(got) == bins(ref)
    with pytest.raises(LMStackError, match="no text column 'text'.*'content', 'n'"):
        list(corpora.iter_corpus("hf:org/name"))


def test_hf_local_parquet_files_with_the_real_datasets_library(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    p = write_tables(tmp_path / "src", DOCS)["parquet"]
    assert [t for t, _ in corpora.iter_corpus(f"hf:{p}")] == DOCS


def test_hf_offline_error_is_one_clear_message(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LMStackError, match="offline") as e:
        list(corpora.iter_corpus("hf:org/name"))
    msg = str(e.value)
    assert "org/name" in msg and "--corpus" in msg and "\n" not in msg and "ConnectionError" in msg


def test_train_summary_table():
    from lmstack.cli.train import summary_table
    out = summary_table({"out_dir": "runs/x", "steps": 800, "params": 2590848, "train_loss": 2.5, "val_loss": 2.7,
                         "val_bpb": 1.1, "final_val_loss": 2.6, "final_val_bpb": 1.05, "elapsed_s": 301.0,
                         "plot": "runs/x/loss.png"})
    lines = out.splitlines()
    assert lines[0].split() == ["steps", "800"] and "2,590,848" in lines[1]
    assert any(ln.split() == ["val", "loss", "2.6000"] for ln in lines)
    assert any("5 min 1 s" in ln for ln in lines) and lines[-1].endswith("runs/x/loss.png")
