"""Atomic file writes: every file the project writes appears whole or not at all.

A temporary file is written in the destination folder (same file system), flushed to
disk, given the permissions an ordinary ``open()`` would give it, and renamed over the
destination with ``os.replace``. A crash or an exception while writing leaves the
previous file (if any) untouched and removes the temporary file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Iterator

import torch


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: os.PathLike | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, made atomic (``mode``: ``"w"``, ``"wb"``, ``"wt"``).

    The destination only changes when the ``with`` block ends without an exception.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes whole files; mode must be 'w', 'wt' or 'wb', not {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write '{path}': it is a folder; give a file name")
    if os.path.exists(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        # os.replace would silently replace a file that open() refuses to write (or that is marked
        # read-only, which the superuser's open() ignores)
        raise PermissionError(f"cannot write '{path}': the file is read-only; make it writable "
                              f"(chmod u+w '{path}') or choose another path")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write '{path}' ({exc.strerror}); choose a writable folder") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        # name the user's file, not the hidden temporary one
        raise type(exc)(exc.errno, f"cannot write '{path}' ({exc.strerror or exc}); the previous file, if any, is "
                        "unchanged. Free disk space or choose another folder") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: os.PathLike | str) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


__all__ = ["atomic_open", "atomic_save"]
