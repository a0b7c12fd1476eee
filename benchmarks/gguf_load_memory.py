"""Peak memory and time of loading a GGUF file with lmstack, as a user's process sees it: packed (the default of
`lmstack.load`: quantized tensors kept in their GGUF blocks) and float32 (`dtype="float32"`), side by side.

    python benchmarks/gguf_load_memory.py [PATH.gguf] [--modes packed,float32] [--rounds 2]
        (default path: $LMSTACK_GGUF or ../shared/models/SmolLM2-...)

Each load runs in a fresh subprocess (so nothing else inflates the numbers), the modes alternating A B A B; per mode
the median of the rounds: load time, peak RSS of that process, RSS after the imports alone (torch + gguf + lmstack,
the floor any load pays), the model's weight bytes (uint8 packed blocks + float tensors), and peak RSS over the file
size. Targets: packed peak RSS <= 1.5 x the file size; float32 peak RSS <= ~2 x the float32 weight bytes (the loader
never holds several float32 copies at once).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
model, tok = load_gguf(sys.argv[1], packed=sys.argv[2] == "packed")
dt = time.perf_counter() - t0
seen, nbytes, fmts = set(), 0, set()
for t in list(model.parameters()) + list(model.buffers()):
    if id(t) not in seen and t.data_ptr() not in seen:
        seen.update((id(t), t.data_ptr())); nbytes += t.numel() * t.element_size()
for m in model.modules():
    if hasattr(m, "qweight"):
        fmts.add(m.fmt)
print(json.dumps(dict(load_s=dt, rss_after_imports_mb=base, rss_after_load_mb=rss_mb(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      weights_mb=nbytes / 2**20, formats=sorted(fmts))))
"""


def load_once(path: Path, mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=str(DEFAULT))
    ap.add_argument("--modes", default="packed,float32")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    path = Path(a.path)
    if not path.is_file():
        sys.exit(f"no GGUF file at {path}; pass one or set LMSTACK_GGUF")
    modes = a.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m in modes:
            runs[m].append(load_once(path, m))
    file_mb = path.stat().st_size / 2**20
    print(f"file: {path.name} ({file_mb:.0f} MiB), {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}, median of {a.rounds} alternating rounds")
    out = {}
    for m in modes:
        res = {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0] if k != "formats"}
        res["formats"] = runs[m][0]["formats"]
        res["file_mb"] = file_mb
        res["peak_over_file"] = res["peak_rss_mb"] / file_mb
        res["peak_minus_imports_over_file"] = (res["peak_rss_mb"] - res["rss_after_imports_mb"]) / file_mb
        out[m] = res
        print(f"{m:8s} load {res['load_s']:.2f} s | weights {res['weights_mb']:.0f} MiB "
              f"({', '.join(res['formats']) or 'float'}) | RSS after imports {res['rss_after_imports_mb']:.0f} MiB, "
              f"after load {res['rss_after_load_mb']:.0f} MiB, peak {res['peak_rss_mb']:.0f} MiB = "
              f"{res['peak_over_file']:.2f} x file ({res['peak_minus_imports_over_file']:.2f} x without the import "
              f"floor)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
