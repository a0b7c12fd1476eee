"""What importing lmstack does to the process: no torch compile machinery at import, bounded OpenMP spinning."""
from __future__ import annotations

import os
import subprocess
import sys


def test_importing_the_cli_does_not_load_dynamo():
    """torch._dynamo costs ~1.5 s at import; only a compiled decode step or a torch optimizer should pay it."""
    code = "import sys, lmstack.cli; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_importing_lmstack_sets_bounded_openmp_spinning_unless_the_user_did():
    code = "import os, lmstack; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["ACTIVE", "300000"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "PASSIVE"}).stdout
    assert out.split() == ["PASSIVE", "None"]
