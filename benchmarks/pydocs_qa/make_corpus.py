"""Write corpus.jsonl of this folder: one line per document of lmstack's built-in `pydocs` source (the Python
documentation topics of pydoc_data.topics), _id and title the topic name, text exactly as the source produces it.

    python benchmarks/pydocs_qa/make_corpus.py      # the topics of the running Python (the file shipped: 3.11)
"""
import json
from pathlib import Path

from lmstack.rag.sources import pydocs_documents

out = Path(__file__).resolve().parent / "corpus.jsonl"
with open(out, "w", encoding="utf-8") as f:
    for doc in pydocs_documents():
        f.write(json.dumps({"_id": doc.title, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
print(out)
