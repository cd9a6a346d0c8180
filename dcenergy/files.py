"""Durable, owner-only state files (saved limits, sequence numbers, last plan)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_private_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600, fsynced: a crash leaves the old or the new.

    A temporary file beside it (never following a symlink) is renamed into
    place, and the directory is fsynced so the rename itself survives power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
