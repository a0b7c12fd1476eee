"""lmstack.rag.sources: files, folders, globs, .jsonl, pydocs -> Documents; titles; HTML to text; errors."""
from __future__ import annotations

import hashlib
import re
import sys

import pytest

from lmstack.errors import LMStackError
from lmstack.rag.sources import Document, DocumentSource, html_to_text, iter_documents


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def test_markdown_rst_txt(tmp_path):
    (tmp_path / "a.md").write_text("Some intro\n\n# Install Guide\n\nText.\r\n")
    (tmp_path / "b.rst").write_text("=====\nTitle\n=====\n\nBody.\n")
    (tmp_path / "c.txt").write_text("\ufeffplain words\n")
    (tmp_path / "d.markdown").write_text("Setext Title\n============\n\nx\n")
    docs = list(iter_documents([str(tmp_path / n) for n in ("a.md", "b.rst", "c.txt", "d.markdown")]))
    assert [d.title for d in docs] == ["Install Guide", "Title", "c", "Setext Title"]
    assert docs[0].text == "Some intro\n\n# Install Guide\n\nText.\n"  # \r\n normalised
    assert docs[2].text == "plain words\n"  # BOM dropped
    assert docs[0].path == str(tmp_path / "a.md")
    assert all(isinstance(d, Document) and d.sha256 == sha(d.text) for d in docs)


def test_html(tmp_path):
    page = ("<html><head><title>My  Page</title><style>p {color: red}</style><script>var x = 1;</script></head>"
            "<body><h1>Top</h1><p>First &amp; <b>bold</b>\n paragraph.</p><h2>Sub</h2><ul><li>one</li><li>two</li>"
            "</ul><pre>def f():\n    return 1</pre><p>End</p></body></html>")
    (tmp_path / "p.html").write_text(page)
    [d] = iter_documents([str(tmp_path / "p.html")])
    assert d.title == "My Page"
    assert d.text == ("# Top\n\nFirst & bold paragraph.\n\n## Sub\n\n- one\n\n- two\n\n```\ndef f():\n    return 1\n```"
                      "\n\nEnd\n")
    assert "color" not in d.text and "var x" not in d.text
    title, text = html_to_text("<h1>Only heading</h1><p>x</p>")
    assert title == "Only heading" and text.startswith("# Only heading")


def test_jsonl(tmp_path):
    f = tmp_path / "faq.jsonl"
    f.write_text('{"text": "first", "title": "One"}\n\n{"text": "second", "id": "q2"}\n{"text": "third", "id": 7}\n'
                 '{"text": "fourth"}\n')
    docs = list(iter_documents([str(f)]))
    assert [(d.path, d.title, d.text) for d in docs] == [
        (f"{f}:1", "One", "first"), (f"{f}:q2", "q2", "second"), (f"{f}:7", "7", "third"), (f"{f}:5", "faq:5", "fourth")]


@pytest.mark.parametrize("content,match", [
    ('{"title": "no text"}\n', r"bad\.jsonl:1: expected an object with a string 'text' field"),
    ('{"text": "a"}\nnot json\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n', r"bad\.jsonl:2: duplicate id '1' \(first on line 1\)"),
])
def test_jsonl_errors(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(LMStackError, match=match):
        list(iter_documents([str(f)]))


def test_pdf(tmp_path):
    pytest.importorskip("pypdf")
    f = tmp_path / "paper.pdf"
    f.write_bytes(tiny_pdf("Hello PDF world"))
    [d] = iter_documents([str(f)])
    assert "Hello PDF world" in d.text and d.title == "Hello PDF world" and d.path == str(f)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(LMStackError, match=r"broken\.pdf: could not read the PDF"):
        list(iter_documents([str(tmp_path / "broken.pdf")]))


def test_pdf_without_pypdf(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # makes `import pypdf` raise ImportError
    f = tmp_path / "paper.pdf"
    f.write_bytes(tiny_pdf("x"))
    with pytest.raises(LMStackError, match=r"paper\.pdf: reading PDF files needs pypdf; .*pip install pypdf"):
        list(iter_documents([str(f)]))


def test_folder_recursive_sorted_with_skips(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.md").write_text("# B\n")
    (tmp_path / "a.txt").write_text("a text")
    (tmp_path / "sub" / "c.rst").write_text("c text")
    (tmp_path / "sub" / "deeper" / "d.htm").write_text("<p>d text</p>")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "sub" / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "sub" / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".git" / "HEAD.txt").write_text("ignored")
    (tmp_path / ".hidden.md").write_text("ignored")
    src = DocumentSource([str(tmp_path)])
    docs = list(src)
    assert [d.path for d in docs] == [str(tmp_path / p) for p in ("a.txt", "b.md", "sub/c.rst", "sub/deeper/d.htm")]
    assert docs[3].text == "d text\n"
    assert sorted(src.skipped) == sorted(str(tmp_path / p) for p in ("empty.txt", "logo.png", "sub/latin1.md",
                                                                      "sub/nul.txt"))
    assert src.reasons[str(tmp_path / "logo.png")] == "unsupported file type .png"
    assert src.reasons[str(tmp_path / "sub/nul.txt")].startswith("binary")
    assert src.reasons[str(tmp_path / "empty.txt")] == "empty text"
    skipped: list[str] = []
    assert len(list(iter_documents([str(tmp_path)], skipped=skipped))) == 4 and len(skipped) == 4


def test_glob_and_dedupe(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "one.md").write_text("one")
    (tmp_path / "x" / "two.md").write_text("two")
    (tmp_path / "x" / "three.bin").write_text("skipped")
    docs = list(iter_documents([str(tmp_path / "x" / "one.md"), str(tmp_path / "**" / "*"), str(tmp_path / "x")]))
    assert [d.text for d in docs] == ["one", "two"]


def test_pydocs():
    docs = list(iter_documents(["pydocs"]))
    assert len(docs) > 50
    titles = [d.title for d in docs]
    assert len(set(titles)) == len(titles)
    assert all(d.path == f"pydocs:{d.title}" for d in docs)
    by_title = {d.title: d for d in docs}
    from pydoc_data.topics import topics
    assert by_title["if"].text == topics["if"] and by_title["if"].sha256 == sha(topics["if"])


def test_hash_tracks_content(tmp_path):
    f = tmp_path / "n.md"
    f.write_text("version one")
    h1 = next(iter_documents([str(f)])).sha256
    assert next(iter_documents([str(f)])).sha256 == h1
    f.write_text("version two")
    assert next(iter_documents([str(f)])).sha256 != h1


def error_of(sources: list[str]) -> str:
    with pytest.raises(LMStackError) as info:
        list(iter_documents(sources))
    msg = str(info.value)
    assert "\n" not in msg, "user errors are one line"
    return msg


def test_errors(tmp_path):
    assert "no sources given" in error_of([])
    assert re.search(r"source '.*nope\.md' does not exist; pass an existing file", error_of([str(tmp_path / "nope.md")]))
    assert "matches no files" in error_of([str(tmp_path / "*.md")])
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    assert re.search(r"img\.png: unsupported file type '\.png'; supported: \.txt .*\.jsonl",
                     error_of([str(tmp_path / "img.png")]))
    (tmp_path / "nul.txt").write_bytes(b"a\x00b")
    assert re.search(r"nul\.txt: binary file \(contains NUL bytes\); .*UTF-8", error_of([str(tmp_path / "nul.txt")]))
    (tmp_path / "latin.md").write_bytes(b"caf\xe9")
    assert re.search(r"latin\.md: binary file \(is not UTF-8 text \(bad byte at offset 3\)\)",
                     error_of([str(tmp_path / "latin.md")]))
