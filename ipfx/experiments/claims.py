"""Run claims: a run is trained by one process at a time, however many sweeps share an output folder.

Before a sweep trains a run it takes the run's claim: an exclusive, non-blocking ``fcntl.flock`` on
``<folder>/<run name>.lock``. The lock belongs to the open file, so it is released when the sweep
releases it (its record is stored), and also when the process ends in any way, a kill included: a
claim is never left held by a dead process, and nothing needs cleaning up. A second sweep that finds a
run claimed leaves it to its holder, runs the others, then waits for each such claim, and trains the
run itself only if its record is still missing once the claim is free (the holder died). The lock
files stay (empty): removing one while another process waits on it would let two hold "the same" lock.

Without ``fcntl`` (Windows) claims always succeed: one sweep per folder is then the user's to ensure.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint as ckpt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class Claims:
    """The claims this process holds in ``folder`` (module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._held: dict[tuple, int] = {}  # run key -> the open lock file's descriptor

    def take(self, spec, *, wait: bool = False) -> bool:
        """Claim ``spec``'s run; False when another process holds it (``wait``: block until it is free)."""
        key = spec.key()
        if key in self._held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{ckpt.run_name(spec)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
        self._held[key] = fd
        return True

    def release(self, spec) -> None:
        fd = self._held.pop(spec.key(), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def release_all(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
