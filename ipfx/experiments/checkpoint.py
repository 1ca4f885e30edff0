"""Epoch-end checkpoints of one run, so that a killed run resumes where it stopped instead of from zero.

A checkpoint holds everything the rest of the run depends on: the model's state (coefficients, masks,
bases, batch-norm statistics), the optimizer's state (momentum), the pruning schedule's state, the step
reached (which fixes the learning rate, a function of the step), the generator of the data order, the
global random states (torch, CUDA, Python's ``random``, numpy's when numpy is loaded) and the running loss.
Resuming from it continues the very same computation, so the resumed run ends bitwise equal to an
uninterrupted one (on the same device and thread count).

Everything is stored as tensors or plain Python values, so a checkpoint opens with
``torch.load(weights_only=True)``: no code runs when it is read. It is written to a temporary file
and moved into place with ``os.replace``, so a kill while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import warnings
from pathlib import Path

import torch

from ..atomic import remove_stale_temporaries, write_atomically
from ..errors import IPFXValueError, first_line

# Bump when the layout changes: an older checkpoint is then ignored, not misread.
# 2: an IMP run's schedule exists from step 0 (it was built at the rewind point).
FORMAT = 2


def run_name(spec) -> str:
    """A file name for one run (a :class:`~.engine.RunSpec`): readable fields first, then a hash of the
    whole key, which tells apart runs that differ only in, say, the learning rate."""
    digest = hashlib.sha256(json.dumps(list(spec.key())).encode()).hexdigest()[:12]
    readable = f"{spec.model}-{spec.method}-{spec.space}-s{spec.sparsity:g}-seed{spec.seed}"
    return f"{readable}-{digest}".replace("/", "_").replace(os.sep, "_")


def checkpoint_path(folder: str | os.PathLike | None, spec) -> Path | None:
    """Where ``spec``'s checkpoint lives in ``folder`` (None: no checkpoints)."""
    return None if folder is None else Path(folder) / f"{run_name(spec)}.pt"


def rng_state(device: torch.device) -> dict:
    """The global random states, as tensors and plain values (for ``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # only a library that imported numpy can have drawn from it
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def save(path: Path, state: dict) -> None:
    """Write ``state`` atomically (:func:`ipfx.atomic.write_atomically`: a temporary file next to ``path``,
    fsynced, then ``os.replace``; the temporaries of writers killed midway are deleted first). A file system
    that refuses the write (read-only, full) raises :class:`IPFXValueError` saying so: the epochs since the
    last checkpoint are lost, the finished runs' records are kept."""
    try:
        write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except OSError as exc:
        raise IPFXValueError(f"cannot write the checkpoint {path} ({exc.strerror or exc}); free space or make the "
                             "folder writable and rerun the same command to resume (finished runs are kept)") from None


def load(path: Path, key: tuple) -> dict | None:
    """The checkpoint at ``path`` if it is one of this run (same key and format), else None.

    A file that cannot be read, or that belongs to another run or layout, is not an error: the run
    then starts from the beginning, with a warning that says why.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file means "start over", never a crash
        warnings.warn(f"checkpoint {path} cannot be read ({first_line(exc, 160)}); the run starts over",
                      stacklevel=2)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or \
            not isinstance(state.get("key"), (list, tuple)) or list(state["key"]) != list(key):
        warnings.warn(f"checkpoint {path} belongs to another run or version; the run starts over", stacklevel=2)
        return None
    return state


def remove(path: Path | None) -> None:
    """Delete a finished run's checkpoint and its stale temporaries (and the folder, once empty)."""
    if path is None:
        return
    path.unlink(missing_ok=True)
    remove_stale_temporaries(path)
    try:
        path.parent.rmdir()
    except OSError:  # other runs' checkpoints are still there
        pass
