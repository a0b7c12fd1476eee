"""Corpora and token shards: file kinds, dtypes, split, document separators, batches, multi-shard reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack.data import corpora
from lmstack.data.shards import TokenDataset, prepare_dataset
from lmstack.errors import LMStackError
from lmstack.tokenizer import train_bpe, train_char

DOCS = ["First document.\nIt has two lines.\n", "Second one: naïve ☃ text", "Third\n\nwith blank line\n"]


@pytest.fixture(scope="module")
def char_tok(corpus_text):
    return train_char([corpus_text, *DOCS])


def stream(ds: TokenDataset) -> list[int]:
    return [int(t) for t in ds.read(0, ds.total)]


def test_txt_file(tmp_path, char_tok, corpus_file, corpus_text):
    out = prepare_dataset(str(corpus_file), char_tok, tmp_path / "d", val_fraction=0.1)
    ds = TokenDataset(out)
    assert ds.meta["dtype"] == "uint16" and ds.shards[0].dtype == np.uint16
    assert stream(ds) == char_tok.encode(corpus_text)
    assert ds.total == len(corpus_text) == ds.meta["total_tokens"]
    assert ds.tokenizer.encode(corpus_text) == char_tok.encode(corpus_text)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]  # no temp or old dir left beside it


def test_prepare_failure_keeps_previous_data(tmp_path, char_tok, corpus_file):
    """A prepare that fails midway (here: a corpus too small) leaves the previous data directory untouched."""
    out = prepare_dataset(str(corpus_file), char_tok, tmp_path / "d", val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(LMStackError, match="too small"):
        prepare_dataset(str(tiny), char_tok, tmp_path / "d", val_fraction=0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]


def test_md_file_and_bpe_tokenizer(tmp_path):
    text = "# Title\n\nSome *markdown* text, repeated. " * 30 + "\n"
    (tmp_path / "doc.md").write_text(text)
    tok = train_bpe([text], vocab_size=300)
    ds = TokenDataset(prepare_dataset(str(tmp_path / "doc.md"), tok, tmp_path / "d"))
    assert stream(ds) == tok.encode(text)
    assert tok.decode(stream(ds)) == text


def test_glob_and_directory_separate_files_with_eos(tmp_path, char_tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text(DOCS[1])
    (src / "a.txt").write_text(DOCS[0])
    (src / "sub" / "c.md").write_text(DOCS[2])
    (src / "ignored.py").write_text("print('not a corpus file')\n")
    eos = char_tok.eos_id
    enc = [char_tok.encode(d) for d in DOCS]

    ds = TokenDataset(prepare_dataset(str(src / "*.txt"), char_tok, tmp_path / "g"))
    assert stream(ds) == enc[0] + [eos] + enc[1]  # sorted file order, EOS between files, none at the ends

    ds = TokenDataset(prepare_dataset(str(src / "**" / "*.*"), char_tok, tmp_path / "g2"))
    assert stream(ds).count(eos) == 3  # a.txt, b.txt, ignored.py, sub/c.md: a glob takes every matched file

    ds = TokenDataset(prepare_dataset(str(src), char_tok, tmp_path / "dir"))
    assert stream(ds) == enc[0] + [eos] + enc[1] + [eos] + enc[2]  # a directory: .txt/.md/.jsonl only


def test_jsonl_documents_separated_by_eos(tmp_path, char_tok):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    ds = TokenDataset(prepare_dataset(str(f), char_tok, tmp_path / "d"))
    eos = char_tok.eos_id
    want = char_tok.encode(DOCS[0]) + [eos] + char_tok.encode(DOCS[1]) + [eos] + char_tok.encode(DOCS[2])
    assert stream(ds) == want
    assert char_tok.decode(stream(ds)) == f"{char_tok.eos_token}".join(DOCS)


def test_large_file_read_in_pieces_has_no_spurious_eos(tmp_path, char_tok, corpus_file, corpus_text, monkeypatch):
    monkeypatch.setattr(corpora, "CHUNK_CHARS", 100)
    pieces = list(corpora.iter_corpus(str(corpus_file)))
    assert len(pieces) > 10
    assert [new for _, new in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(p for p, _ in pieces) == corpus_text
    assert all(p.endswith("\n") for p, _ in pieces)  # cut at line ends
    ds = TokenDataset(prepare_dataset(str(corpus_file), char_tok, tmp_path / "d"))
    assert stream(ds) == char_tok.encode(corpus_text)


@pytest.mark.parametrize("bad,line", [('{"text": "ok"}\n{"text": broken\n', 2),
                                      ('{"text": "ok"}\n\n{"text": 3}\n', 3),
                                      ('["a list"]\n', 1)])
def test_malformed_jsonl_names_file_and_line(tmp_path, char_tok, bad, line):
    f = tmp_path / "bad.jsonl"
    f.write_text(bad)
    with pytest.raises(LMStackError) as e:
        prepare_dataset(str(f), char_tok, tmp_path / "d")
    assert f"{f}:{line}:" in str(e.value)
    assert not (tmp_path / "d").exists()


def test_non_utf8_file_is_a_user_error(tmp_path, char_tok):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café olé\n".encode("latin-1"))
    with pytest.raises(LMStackError, match="not UTF-8"):
        prepare_dataset(str(f), char_tok, tmp_path / "d")


def test_missing_corpus_and_empty_corpus(tmp_path, char_tok):
    with pytest.raises(LMStackError, match="matches no files"):
        prepare_dataset(str(tmp_path / "nope*.txt"), char_tok, tmp_path / "d")
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(LMStackError, match="only 2 tokens"):
        prepare_dataset(str(tmp_path / "tiny.txt"), char_tok, tmp_path / "d")
    with pytest.raises(LMStackError, match="val_fraction"):
        prepare_dataset(str(tmp_path / "tiny.txt"), char_tok, tmp_path / "d", val_fraction=1.0)
    with pytest.raises(LMStackError, match="meta.json"):
        TokenDataset(tmp_path)


def test_uint32_for_large_vocab(tmp_path):
    tok = train_char(["abc"])
    tok.hf.add_tokens([f"<t{i}>" for i in range(65600)])
    assert tok.vocab_size > 65536
    text = "abc<t65599>cab<t0>" * 10
    ids = tok.encode(text)
    assert max(ids) > 65535
    (tmp_path / "c.txt").write_text(text)
    ds = TokenDataset(prepare_dataset(str(tmp_path / "c.txt"), tok, tmp_path / "d"))
    assert ds.meta["dtype"] == "uint32" and ds.shards[0].dtype == np.uint32
    assert stream(ds) == ids
    assert (tmp_path / "d" / "tokens-00000.bin").stat().st_size == 4 * len(ids)


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_split_is_the_last_fraction(tmp_path, char_tok, corpus_file, corpus_text, val_fraction):
    ds = TokenDataset(prepare_dataset(str(corpus_file), char_tok, tmp_path / "d", val_fraction=val_fraction))
    n = len(corpus_text)
    k = int(n * (1 - val_fraction))
    assert ds.split == k
    assert ds.num_tokens("train") == k and ds.num_tokens("val") == n - k
    ids = char_tok.encode(corpus_text)
    a, b = ds.split_range("val")
    assert [int(t) for t in ds.read(a, b - a)] == ids[k:]
    # eval windows cover the validation split in order, without overlap
    wins = list(ds.eval_windows("val", 16))
    assert len(wins) == (n - k - 1) // 16
    for i, (x, y) in enumerate(wins):
        assert x.tolist() == ids[k + 16 * i: k + 16 * i + 16]
        assert y.tolist() == ids[k + 16 * i + 1: k + 16 * i + 17]
    assert len(list(ds.eval_windows("val", 16, max_windows=3))) == 3


@pytest.fixture(scope="module")
def one_and_many(tmp_path_factory, char_tok, corpus_file):
    d = tmp_path_factory.mktemp("shards")
    one = TokenDataset(prepare_dataset(str(corpus_file), char_tok, d / "one"))
    many = TokenDataset(prepare_dataset(str(corpus_file), char_tok, d / "many", shard_tokens=1000))
    return one, many


def _windows_in(stream_arr: np.ndarray, rows: np.ndarray) -> bool:
    w = np.lib.stride_tricks.sliding_window_view(stream_arr, rows.shape[1])
    return all(bool((w == r).all(axis=1).any()) for r in rows)


def test_batches_deterministic_and_shifted(one_and_many):
    ds, _ = one_and_many
    x1, y1 = ds.batch("train", 16, 32, np.random.default_rng(7))
    x2, y2 = ds.batch("train", 16, 32, np.random.default_rng(7))
    x3, _ = ds.batch("train", 16, 32, np.random.default_rng(8))
    assert x1.shape == y1.shape == (16, 32) and str(x1.dtype) == "torch.int64"
    assert (x1 == x2).all() and (y1 == y2).all()
    assert not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()
    full = np.concatenate([x1.numpy(), y1[:, -1:].numpy()], axis=1)
    train = np.asarray(ds.read(0, ds.split), dtype=np.int64)
    assert _windows_in(train, full)  # every window is a real, contiguous, train-split window
    xv, yv = ds.batch("val", 8, 32, np.random.default_rng(0))
    val = np.asarray(ds.read(ds.split, ds.total - ds.split), dtype=np.int64)
    assert _windows_in(val, np.concatenate([xv.numpy(), yv[:, -1:].numpy()], axis=1))


def test_multi_shard_reads_equal_single_shard(one_and_many):
    one, many = one_and_many
    assert len(many.shards) == -(-one.total // 1000) and len(one.shards) == 1
    assert [s["tokens"] for s in many.meta["shards"][:-1]] == [1000] * (len(many.shards) - 1)
    assert many.total == one.total and many.split == one.split
    assert stream(many) == stream(one)
    for start, length in [(995, 10), (1000, 1), (999, 1), (1500, 2100), (0, one.total), (one.total - 3, 3)]:
        assert many.read(start, length).tolist() == one.read(start, length).tolist()
    # whole random batches (many windows cross a shard boundary at block 200) are identical
    xa, ya = one.batch("train", 64, 200, np.random.default_rng(3))
    xb, yb = many.batch("train", 64, 200, np.random.default_rng(3))
    assert (xa == xb).all() and (ya == yb).all()
    for (xa, ya), (xb, yb) in zip(one.eval_windows("val", 100), many.eval_windows("val", 100)):
        assert (xa == xb).all() and (ya == yb).all()


def test_split_too_small_for_block(one_and_many):
    ds, _ = one_and_many
    with pytest.raises(LMStackError, match="val split has"):
        ds.batch("val", 1, ds.num_tokens("val"), np.random.default_rng(0))


def test_shakespeare_via_data_path(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = train_char([text])
    ds = TokenDataset(prepare_dataset("shakespeare", tok, tmp_path / "d", val_fraction=0.1,
                                      data_path=str(shakespeare_path)))
    n = len(text)
    assert ds.total == n
    assert tok.decode(ds.read(0, n).tolist()) == text
    assert ds.split == int(n * 0.9)
    assert tok.decode(ds.read(ds.split, n - ds.split).tolist()) == text[int(n * 0.9):]
    if shakespeare_path.name in corpora.SHAKESPEARE_NAMES:  # a directory holding the file works too
        assert corpora.shakespeare_path(str(shakespeare_path.parent)) == shakespeare_path


def test_shakespeare_missing_data_path_is_a_user_error(tmp_path):
    with pytest.raises(LMStackError, match="does not exist"):
        corpora.shakespeare_path(str(tmp_path / "missing.txt"))
