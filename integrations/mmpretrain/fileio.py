"""Atomic checkpoint files for mmengine: the ``atomic_local`` file backend.

mmengine serialises a checkpoint into memory and hands the bytes to a file backend;
its ``LocalBackend.put`` opens the final path with ``'wb'`` and writes into it. A
process killed (or a disk that fills up) during that write leaves a truncated
``epoch_N.pth`` under the real name, and when N is an existing name (a best
checkpoint, an overwritten ``epoch_N.pth``) the previous good file is already gone.

``AtomicLocalBackend`` is ``LocalBackend`` whose ``put``/``put_text`` write through
``cdd_plugin.files.atomic_open``: a temporary file in the same folder, flushed and
fsync'ed, given the permissions a plain ``open()`` would give (umask), then
``os.replace``'d over the destination. A file therefore appears whole or not at all.
Everything else (reading, ``remove``, ``join_path``, ``isfile``) is ``LocalBackend``'s.

The configs select it for their checkpoints with mmengine's own option::

    default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10,
                                         backend_args=dict(backend='atomic_local')))

``CheckpointHook`` passes ``backend_args`` to ``get_file_backend`` for the epoch/iter
checkpoints and the best checkpoints (and to ``Runner.save_checkpoint``), so all of
them go through it. The ``last_checkpoint`` pointer is the one file ``CheckpointHook``
writes with a plain ``open()``; ``compat.checkpoint_pointer_atomic`` makes that write
atomic too. The backend is for local paths only: for ``out_dir='s3://...'`` and other
remote storage, use that storage's backend (its uploads are whole-object writes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.fileio.backends import backends as _BACKENDS

from cdd_plugin.files import atomic_open

BACKEND_NAME = "atomic_local"


class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` whose writes are atomic (temporary file, fsync, ``os.replace``)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        """Write ``obj`` to ``filepath`` atomically (creating its folder, as ``LocalBackend`` does)."""
        with atomic_open(filepath, "wb") as fh:
            fh.write(obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = "utf-8") -> None:
        """Write ``obj`` encoded with ``encoding`` to ``filepath`` atomically."""
        self.put(obj.encode(encoding), filepath)


def register_atomic_backend() -> str:
    """Register ``AtomicLocalBackend`` as ``atomic_local`` (idempotent); returns the name."""
    current = _BACKENDS.get(BACKEND_NAME)
    if current is AtomicLocalBackend:
        return BACKEND_NAME
    ours = current is not None and (current.__module__, current.__qualname__) == (
        AtomicLocalBackend.__module__, AtomicLocalBackend.__qualname__)  # this module, reloaded
    if current is not None and not ours:
        raise ValueError(f"an mmengine file backend named {BACKEND_NAME!r} is already registered "
                         f"({current.__module__}.{current.__qualname__}); cdd_plugin cannot register its atomic "
                         "checkpoint backend under that name")
    register_backend(BACKEND_NAME, AtomicLocalBackend, force=ours)
    return BACKEND_NAME


__all__ = ["AtomicLocalBackend", "BACKEND_NAME", "register_atomic_backend"]
