"""lmstack: a hackable language-model stack — tokenize, pretrain, generate (and more to come)."""
__version__ = "0.1.0"

import os as _os

# OpenMP (libgomp, loaded with torch) spins a team's idle workers for a while between parallel regions, but only
# ~100 spins once more OpenMP threads exist than CPUs, as soon as a second thread has run parallel torch work (a
# server loads on its main thread and decodes on a batcher thread). Every region then waits for a futex wake-up:
# on 2 cores one decode stream ran at 0.4-0.65x. Bounded spinning in every case (GOMP_SPINCOUNT spins, a few ms, then
# sleep) keeps it at 1.0x and an idle process still sleeps. Read when torch loads; a value you set wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"], _os.environ["GOMP_SPINCOUNT"] = "ACTIVE", "300000"

from .config import ModelConfig, preset
from .errors import ConfigError, ContextLengthError, LMStackError
from .lm import LM, load

__all__ = ["LM", "load", "ModelConfig", "preset", "LMStackError", "ConfigError", "ContextLengthError", "__version__"]
