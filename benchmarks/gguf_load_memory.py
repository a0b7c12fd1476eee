"""Peak memory of loading a GGUF file with lmstack.convert.gguf.load_gguf, as a user's process sees it.

    python benchmarks/gguf_load_memory.py [PATH.gguf]      (default: $LMSTACK_GGUF or ../shared/models/SmolLM2-...)

Runs the load in a fresh subprocess (so nothing else inflates the numbers) and reports: peak RSS of that process,
RSS after the imports alone (torch + gguf + lmstack, the floor any load pays), the float32 weight bytes of the
loaded model, and peak RSS / float32 weight bytes. Target: peak RSS <= ~2 x float32 weight bytes (i.e. the
loader never holds several float32 copies of the weights at once).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = Path(os.environ.get("LMSTACK_GGUF", ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

CHILD = r"""
import json, resource, sys, time
def rss_mb():  # current RSS
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
import torch, gguf
from lmstack.convert.gguf import load_gguf
base = rss_mb()
t0 = time.perf_counter()
model, tok = load_gguf(sys.argv[1])
dt = time.perf_counter() - t0
seen, nbytes = set(), 0
for p in model.parameters():
    if id(p) not in seen:
        seen.add(id(p)); nbytes += p.numel() * 4
print(json.dumps(dict(load_s=dt, rss_after_imports_mb=base, rss_after_load_mb=rss_mb(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      weights_f32_mb=nbytes / 2**20, params=sum(p.numel() for p in model.parameters()))))
"""


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.is_file():
        sys.exit(f"no GGUF file at {path}; pass one or set LMSTACK_GGUF")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["file_mb"] = path.stat().st_size / 2**20
    res["peak_over_f32_weights"] = res["peak_rss_mb"] / res["weights_f32_mb"]
    res["peak_minus_imports_over_f32_weights"] = (res["peak_rss_mb"] - res["rss_after_imports_mb"]) / res["weights_f32_mb"]
    print(f"file: {path.name} ({res['file_mb']:.0f} MiB), {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"load time            {res['load_s']:.1f} s")
    print(f"float32 weights      {res['weights_f32_mb']:.0f} MiB (unique parameters, tied head counted once)")
    print(f"RSS after imports    {res['rss_after_imports_mb']:.0f} MiB")
    print(f"RSS after load       {res['rss_after_load_mb']:.0f} MiB")
    print(f"peak RSS             {res['peak_rss_mb']:.0f} MiB = {res['peak_over_f32_weights']:.2f} x float32 weights "
          f"({res['peak_minus_imports_over_f32_weights']:.2f} x without the import floor); target <= ~2 x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
