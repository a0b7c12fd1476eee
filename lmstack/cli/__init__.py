"""`lmstack <verb>`: thin argument parsing over the library. Each verb group is one small module here that declares
its flags (`register(sub)`) and calls one library function; user errors print one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import threading

from . import compare, evaluate, fill_mask, finetune, grpo, models, rag, rlhf, run, scaling, serving, train, translate

GROUPS = (train, run, fill_mask, translate, models, serving, evaluate, finetune, rlhf, grpo, rag, scaling, compare)  # the order of `lmstack --help`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack", description="A hackable language-model stack.")
    sub = p.add_subparsers(dest="verb", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def _end_distributed() -> None:
    """Under torchrun, every command that joined a process group leaves it together (train.distributed.shutdown)."""
    if "lmstack.train.distributed" in sys.modules:
        from ..train import distributed
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    from ..errors import LMStackError
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints results (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        args.fn(args)
        _end_distributed()
    except LMStackError as e:
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"lmstack: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The `lmstack` console script and `python -m lmstack`: main(), then a fast exit. Stdio is flushed and the atexit
    handlers run as usual; only the interpreter's module teardown is skipped (about 1 s once torch, torch._dynamo and
    matplotlib are loaded). A normal exit instead while another non-daemon thread is alive, or LMSTACK_FAST_EXIT=0."""
    rc = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or os.environ.get("LMSTACK_FAST_EXIT", "1") == "0":
        sys.exit(rc)
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`lmstack ... | head`) or stream: nothing left to write
            pass
    os._exit(rc)
