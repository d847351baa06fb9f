"""Atomic writes: a folder or file appears under its final name only when it is complete.

Everything is written into a hidden temp folder beside the target, fsynced, and renamed into place
last, so a reader (or `--resume auto`) that sees the final name can trust it, even after a SIGKILL
mid-write. Model folders, adapters and training checkpoints all go through `atomic_dir`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yield a temp folder; on success it replaces `out_dir` by rename, on failure it is removed."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        for f in os.listdir(tmp):
            _fsync(os.path.join(tmp, f))
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(tmp, out_dir)
        _fsync(parent)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
