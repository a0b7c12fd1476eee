"""Run every `lmstack ...` line of README.md as written, top to bottom, the way a new user would: in a fresh clone
of this repository with ../shared beside it and the clone's .venv on PATH. Shell variable lines of the README's
code blocks (GGUF=..., SHAKES=..., MINILM=$(...)), `torchrun ...` and `python -c ...` lines and their `mkdir`/`head`/`printf`
helper lines run too, in one bash
session, so each command sees what the ones before it made.

    python benchmarks/readme_check.py [--clone /tmp/readme-clone] [--timeout 900] [--only PATTERN]

Servers and REPLs (`lmstack serve`, `lmstack feedback` without --export, `lmstack chat` without -p) run until a
timeout of --server-seconds and count as passed when they were still running then (they run until Ctrl-C), or
ended by themselves with exit 0. `lmstack download` is expected to fail offline with a one-line error (exit 2).
Prints one line per command (status, seconds, command) and a summary; exit 1 if any failed."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = re.compile(r"^lmstack (serve\b|feedback\b(?!.*--export)|chat\b(?!.*(-p|--prompt)\b))")


def commands(readme: str) -> list[str]:
    """Shell lines of the README's ```bash blocks: `lmstack ...` commands (with continuation lines joined) and the
    variable / helper lines they depend on. Comments after the command are kept (bash ignores them)."""
    out, block, buf = [], False, ""
    for line in readme.splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh") if not block else False
            continue
        if not block:
            continue
        if buf:
            buf += "\n" + line
            if not line.rstrip().endswith("\\"):
                out.append(buf)
                buf = ""
            continue
        s = line.strip()
        if s.startswith(("lmstack ", "torchrun ", "python -c ")) or re.match(r"^[A-Z_]+=", s) or \
                s.startswith(("mkdir ", "head ", "printf ")):
            if s.endswith("\\"):
                buf = s
            else:
                out.append(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clone", default="/tmp/readme-clone/main", help="where to clone (its parent gets shared/)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per command")
    ap.add_argument("--server-seconds", type=int, default=60)
    ap.add_argument("--only", help="run only commands matching this regex (variable lines always run)")
    ap.add_argument("--reuse", action="store_true", help="keep an existing clone (and its .venv and runs/)")
    a = ap.parse_args()
    clone = Path(a.clone)
    if not a.reuse or not clone.exists():
        shutil.rmtree(clone, ignore_errors=True)
        clone.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shared = clone.parent / "shared"
    if not shared.exists():
        shared.symlink_to(ROOT.parent / "shared")
    venv = clone / ".venv"
    if not (venv / ".installed").exists():  # the clone's own venv, made the way `make test` / `make demo` make it
        subprocess.run(["make", ".venv/.installed"], cwd=clone, check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    state = clone / ".readme-env.sh"
    state.write_text("")
    results = []
    for cmd in commands((clone / "README.md").read_text()):
        is_var = not cmd.startswith("lmstack ")
        if a.only and not is_var and not re.search(a.only, cmd):
            continue
        server = bool(SERVER.match(cmd))
        limit = a.server_seconds if server else a.timeout
        script = f"set -a; source {shlex.quote(str(state))}; set +a\n{cmd}\n"
        if is_var:  # remember the variable for the next commands
            script += f"declare -p $(compgen -v | grep -E '^[A-Z_]+$') > {shlex.quote(str(state))} 2>/dev/null\n"
        t0 = time.perf_counter()
        try:
            p = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                               timeout=limit, stdin=subprocess.DEVNULL)
            rc, tail = p.returncode, (p.stderr or p.stdout)[-300:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", ((e.stderr or b"") if isinstance(e.stderr, bytes) else (e.stderr or "").encode())[-300:].decode(errors="replace")
        dt = time.perf_counter() - t0
        if is_var:
            continue
        offline = cmd.startswith("lmstack download")
        ok = (rc == 0) or (server and rc == "timeout") or (offline and rc == 2)
        results.append((ok, dt, cmd, rc, tail))
        print(f"{'PASS' if ok else 'FAIL'} {dt:7.1f}s  {cmd.splitlines()[0][:120]}", flush=True)
        if not ok:
            print(f"      rc={rc}: {tail.strip()[-300:]}", flush=True)
    n_ok = sum(r[0] for r in results)
    print(f"{n_ok} passed, {len(results) - n_ok} failed ({sum(r[1] for r in results):.0f} s)")
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
