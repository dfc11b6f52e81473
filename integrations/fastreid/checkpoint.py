"""FastReID's ``Checkpointer`` with atomic writes.

FastReID opens ``OUTPUT_DIR/<name>.pth`` and ``last_checkpoint`` for writing and streams
into them: a run killed while saving (pre-emption, out of disk, Ctrl-C) leaves a truncated
``model_final.pth`` / ``model_best.pth`` in place of the previous good one, and
``last_checkpoint`` can point at a half-written file. ``AtomicCheckpointer`` writes the same
content (same keys, same file names, same ``last_checkpoint`` tag) through a temporary file
that is renamed over the destination only once complete, so an interrupted save leaves the
last good checkpoint -- and the pointer to it -- as they were.
"""
from __future__ import annotations

import os

from fastreid.utils.checkpoint import Checkpointer

from cdd_plugin.files import atomic_open, atomic_save


class AtomicCheckpointer(Checkpointer):
    """``fastreid.utils.checkpoint.Checkpointer`` whose ``save`` and ``tag_last_checkpoint`` are atomic."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as fh:
            fh.write(last_filename_basename)


def make_atomic(checkpointer: Checkpointer) -> Checkpointer:
    """Turn a ``Checkpointer`` FastReID built (already referenced by its hooks) into an ``AtomicCheckpointer``."""
    if not isinstance(checkpointer, AtomicCheckpointer):
        if type(checkpointer) is not Checkpointer:
            raise TypeError(f"cannot make a {type(checkpointer).__name__} atomic: only FastReID's own Checkpointer "
                            "is converted (subclass AtomicCheckpointer instead)")
        checkpointer.__class__ = AtomicCheckpointer
    return checkpointer
