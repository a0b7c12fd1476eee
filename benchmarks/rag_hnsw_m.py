"""HNSW graph density at 1M rows: recall@10 and single-query latency for one (M, efConstruction) over an efSearch
sweep, on benchmarks/rag_scale.py's clustered data (the follow-up that chose lmstack's default M=48).

    .venv/bin/python benchmarks/rag_hnsw_m.py [--n 1000000] [--m 48] [--ef-construction 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rag_scale import mixture  # noqa: E402

from lmstack.generate.bench import cpu_name  # noqa: E402
from lmstack.rag import vectors as V  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=V.HNSW_M)
    ap.add_argument("--ef-construction", type=int, default=V.HNSW_EF_CONSTRUCTION)
    ap.add_argument("--threads", type=int, default=2, help="faiss threads for the build (queries: 1)")
    a = ap.parse_args()
    x, q = mixture(a.n, 1000, 384, 1000)
    truth = V.Exact(x).search(q, 10)[1]
    faiss.omp_set_num_threads(a.threads)
    t = time.perf_counter()
    h = V.HNSW.build(x, m=a.m, ef_construction=a.ef_construction)
    build_s = time.perf_counter() - t
    print(f"{cpu_name()}; n={a.n:,} M={a.m} efConstruction={a.ef_construction}: built in {build_s:.1f} s", flush=True)
    faiss.omp_set_num_threads(1)
    for ef in (128, 256, 512):
        h.ef_search = ef
        lat, rows = [], []
        with threadpool_limits(1):
            for qq in q:
                t = time.perf_counter()
                rows.append(h.search(qq, 10)[1])
                lat.append(time.perf_counter() - t)
        rec = float(np.mean([len(set(r) & set(g)) / 10 for r, g in zip(rows, truth)]))
        print(json.dumps(dict(M=a.m, efC=a.ef_construction, ef=ef, build_s=round(build_s, 1),
                              p50_ms=round(float(np.percentile(lat, 50)) * 1e3, 3),
                              p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3), recall_at_10=round(rec, 4),
                              index_mb=round(h.nbytes / 2**20, 1))), flush=True)


if __name__ == "__main__":
    main()
