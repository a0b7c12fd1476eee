"""Vector search at scale: lmstack.rag.vectors' Exact, HNSW and IVF over 100k and 1M chunks of 384-d vectors.

    python benchmarks/rag_scale.py                       # 100k and 1M; IVF at 1M only (--ivf-at to change)
    python benchmarks/rag_scale.py --sizes 100000 --ivf-at 100000

The vectors are synthetic (no embedding model runs): a mixture of 1000 Gaussian clusters on the unit sphere, each
spread in its own random 24-dim subspace plus a little isotropic noise (low intrinsic dimension, like sentence
embeddings; cosine to the cluster centre ~0.6, to the nearest neighbour ~0.8), L2-normalised. Queries are 1000
held-out points of the same mixture, perturbed and re-normalised. Ground truth is the exact top 10.

Per size (each in a fresh subprocess) and backend: build seconds (faiss with --threads OpenMP threads), index bytes
(`nbytes`: vectors + graph / lists, within 5% of the saved file, see tests/test_rag_vectors.py), memory the structure
holds (RSS after build - before) and the process's peak RSS, p50 / p99 latency of single queries timed one at a
time with one thread (faiss OpenMP and BLAS limited to 1), and recall@10 against Exact. Writes a markdown table and
benchmarks/results/rag_scale.json. Targets at 1M: HNSW p50 <= 5 ms and recall@10 >= 0.95.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from lmstack.generate.bench import cpu_name, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "rag_scale.json"
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    import resource
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def mixture(n: int, q: int, dim: int, clusters: int, seed: int = 0):
    """(n, dim) points and (q, dim) queries of the cluster mixture described in the module docstring."""
    import numpy as np
    r = np.random.default_rng(seed)
    sub, spread, iso = 24, 0.27, 0.15
    centres = r.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = r.integers(0, clusters, n + q)
    x = np.empty((n + q, dim), np.float32)
    for c in range(clusters):
        rows = np.flatnonzero(lab == c)
        basis = r.standard_normal((sub, dim)).astype(np.float32) / np.sqrt(dim)
        x[rows] = centres[c] + spread * r.standard_normal((len(rows), sub)).astype(np.float32) @ basis \
            + iso / np.sqrt(dim) * r.standard_normal((len(rows), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[n:] + 0.1 / np.sqrt(dim) * r.standard_normal((q, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return x[:n], queries


def latencies(v, queries, k: int = 10):
    """Per-query seconds (one query at a time) and the (Q, k) rows found."""
    import numpy as np
    rows = np.empty((len(queries), k), np.int64)
    lat = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        _, rows[i] = v.search(q, k)
        lat[i] = time.perf_counter() - t
    return lat, rows


def child(n: int, args) -> dict:
    import faiss
    import numpy as np
    from threadpoolctl import threadpool_limits

    from lmstack.rag import vectors as V
    t = time.perf_counter()
    x, queries = mixture(n, args.queries, args.dim, args.clusters)
    gen_s = time.perf_counter() - t
    exact = V.Exact(x)
    t = time.perf_counter()
    truth = exact.search(queries, 10)[1]
    truth_s = time.perf_counter() - t
    nn = np.einsum("qd,qd->q", x[truth[:, 0]], queries).mean()
    rows_out = []
    kinds = ["exact", "hnsw"] + (["ivf"] if n in args.ivf_at else [])
    for kind in kinds:
        faiss.omp_set_num_threads(args.threads)
        before = rss_mb()
        t = time.perf_counter()
        v = exact if kind == "exact" else V.make_vectors(kind, x)
        build_s = 0.0 if kind == "exact" else time.perf_counter() - t
        held = (x.nbytes / 2**20) if kind == "exact" else rss_mb() - before
        ef = V.default_ef_search(n)
        efs = {ef, 64, 128, 256} | ({512, 1024} if n >= 500_000 else set())
        sweep = {"exact": [None], "hnsw": sorted(efs), "ivf": [None, 64, 128, 512]}[kind]
        for param in sweep:
            if kind == "hnsw":
                v.ef_search = param
            elif kind == "ivf":
                v.nprobe = param or V.default_nprobe(v.index.nlist)
            faiss.omp_set_num_threads(1)
            with threadpool_limits(1):
                nq = args.queries if kind != "exact" or n <= 200_000 else args.exact_queries
                lat, rows = latencies(v, queries[:nq])
            rec = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth[:nq])]))
            label = "" if kind == "exact" else f"M={V.HNSW_M} efConstruction={V.HNSW_EF_CONSTRUCTION} " \
                f"efSearch={v.ef_search}" if kind == "hnsw" else f"nlist={v.index.nlist} nprobe={v.nprobe}"
            default = param == ef if kind == "hnsw" else param is None
            rows_out.append(dict(n=n, backend=kind, params=label, default=default, build_s=round(build_s, 1),
                                 index_mb=round(v.nbytes / 2**20, 1), held_mb=round(held, 1),
                                 p50_ms=round(float(np.percentile(lat, 50)) * 1e3, 3),
                                 p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3), queries=nq,
                                 recall_at_10=round(rec, 4)))
            print(json.dumps(rows_out[-1]), file=sys.stderr, flush=True)
        if kind != "exact":
            del v
    return dict(n=n, generate_s=round(gen_s, 1), ground_truth_s=round(truth_s, 1), mean_nn1_cosine=round(float(nn), 3),
                peak_rss_mb=round(peak_rss_mb(), 0), rows=rows_out)



def table(results: list[dict]) -> str:
    head = ("| chunks | backend | params | build s | index MiB | held MiB | peak RSS MiB | p50 ms | p99 ms | "
            "recall@10 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for res in results:
        for r in res["rows"]:
            mark = "" if r["default"] else " (sweep)"
            lines.append(f"| {r['n']:,} | {r['backend']}{mark} | {r['params']} | {r['build_s']} | {r['index_mb']} | "
                         f"{r['held_mb']} | {res['peak_rss_mb']:.0f} | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{r['recall_at_10']} |")
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--ivf-at", type=int, nargs="*", default=[1_000_000], help="sizes that also get IVF")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=200, help="queries timed for exact search above 200k rows")
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads for building")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    import faiss
    import numpy as np
    results = []
    t0 = time.perf_counter()
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--clusters", str(args.clusters),
               "--queries", str(args.queries), "--exact-queries", str(args.exact_queries), "--threads",
               str(args.threads), "--ivf-at", *map(str, args.ivf_at)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    meta = dict(cpu=cpu_name(), cores=__import__("os").cpu_count(), python=platform.python_version(),
                numpy=np.__version__, faiss=faiss.__version__, build_threads=args.threads, query_threads=1,
                data=f"synthetic: {args.clusters} Gaussian clusters in 24-dim subspaces on the unit sphere, "
                     f"{args.dim}-d, L2-normalised; queries = {args.queries} perturbed held-out points",
                total_s=round(time.perf_counter() - t0, 1), targets="1M: HNSW p50 <= 5 ms, recall@10 >= 0.95")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"CPU: {meta['cpu']} ({meta['cores']} cores); faiss {meta['faiss']}; build threads {args.threads}, "
          f"queries timed one at a time on 1 thread\nData: {meta['data']}\n")
    print(table(results))
    for res in results:
        print(f"\n{res['n']:,}: data {res['generate_s']} s, exact ground truth (batched) {res['ground_truth_s']} s, "
              f"mean cosine of the nearest neighbour {res['mean_nn1_cosine']}")
    print(f"\ntotal {meta['total_s']} s -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
