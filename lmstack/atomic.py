"""Atomic writes: the one helper every writer of a file or directory uses, so a crash (even SIGKILL) at any point
leaves either the old content or the new, never a mix or a half-written file.

    write_text(path, text) / write_bytes(path, data)    temp file beside it, fsync, rename, fsync the directory
    with atomic_path(path) as tmp: ...write tmp...      the same for a writer that wants a file name
    with atomic_dir(path) as tmp: ...write into tmp...  temp directory beside it, fsync, swap in by renames
    recover_dir(path)                                   finish a directory swap a crash interrupted
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (e.g. a library's own writer): when the
    block ends without an error the file is fsync'ed and renamed onto `path` (and the directory fsync'ed); on an
    error it is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename, fsync the directory)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def atomic_dir(path: str | Path, keep_others: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden temp directory beside `path`, then swap it in: on a clean exit every file is
    fsync'ed, the old `path` (if any) is renamed aside, the new one renamed into place, the old one deleted. An
    exception inside the block deletes the temp directory and leaves `path` untouched. A crash between the two
    renames leaves `.<name>.old-<pid>`, which `recover_dir` moves back. keep_others=True: entries of the old
    directory that the block did not write are carried over (hard links, so the old directory stays whole until
    the swap) — for writing into a directory the user owns, such as an export target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if keep_others and path.is_dir():
            for entry in path.iterdir():
                if not (tmp / entry.name).exists():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(entry), str(tmp / entry.name))
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)          # crash after this line: recover_dir() moves `old` back
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> Path:
    """If `path` is missing because a swap was interrupted, move the newest `.<name>.old-*` back; returns path."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    return path


def has_interrupted_swap(path: str | Path) -> bool:
    """Whether a directory swap of `path` was interrupted (an `.<name>.old-*` sibling is left)."""
    path = Path(path)
    return any(path.parent.glob(f".{path.name}.old-*"))
