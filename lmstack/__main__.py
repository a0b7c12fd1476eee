"""`python -m lmstack ...` (and `torchrun ... -m lmstack train RECIPE`): the CLI."""
import sys

from .cli import main

sys.exit(main())
