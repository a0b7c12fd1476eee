"""`python -m lmstack ...` (and `torchrun ... -m lmstack train RECIPE`): the CLI."""
from .cli import entry

entry()
