"""The console entry (`lmstack`, `python -m lmstack`): main() then a fast exit that still flushes stdio, runs the
atexit handlers and returns main's exit code; a normal exit while another non-daemon thread is running."""
from __future__ import annotations

import json
import subprocess
import sys


def _run(tmp_path, body: str, *argv: str, env=None) -> subprocess.CompletedProcess:
    code = ("import atexit, sys, threading\n"
            f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').write('ran'))\n"
            f"sys.argv = ['lmstack', *{list(argv)!r}]\n"
            "import lmstack.cli as cli\n" + body + "cli.entry()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_fast_exit_flushes_runs_atexit_and_keeps_the_exit_code(tmp_path):
    r = _run(tmp_path, "", "info", "--preset", "gpt2-small", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"]["total"] > 0  # the whole JSON document arrived
    assert (tmp_path / "atexit").read_text() == "ran"
    bad = _run(tmp_path, "", "info", "--preset", "no-such-preset")
    assert bad.returncode == 2 and "lmstack: error" in bad.stderr


def test_a_running_non_daemon_thread_is_joined(tmp_path):
    """The thread may only finish after main() returned (it waits for that): the fast path would kill it."""
    body = ("done = threading.Event()\n"
            f"t = threading.Thread(target=lambda: (done.wait(), open({str(tmp_path / 'thread')!r}, 'w')"
            f".write('finished')), daemon=False)\n"
            "t.start()\n"
            "real = cli.main\n"
            "def main():\n"
            "    rc = real()\n"
            "    done.set()\n"
            "    return rc\n"
            "cli.main = main\n")
    r = _run(tmp_path, body, "info", "--preset", "gpt2-small")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"
