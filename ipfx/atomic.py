"""Files written whole or not at all.

:func:`write_atomically` writes to a temporary file next to the target, flushes it to disk and moves it into
place with ``os.replace`` (atomic within one file system). A kill, a full disk or an exception while writing
leaves the previous file at the path as it was; two writers at once leave one of their files, whole, not a
mix of both. The temporaries of writers killed midway are deleted by the next writer of that path on the same
machine (:func:`remove_stale_temporaries`); a live writer's, or one of another machine, are left alone.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import BinaryIO, Callable

#: This machine's name as it appears in temporary file names (no dots or separators: they delimit fields).
HOST = socket.gethostname().replace(".", "_").replace(os.sep, "_")


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file next to ``path`` (its folder made if missing), flush it to disk, then
    move it to ``path``; where ``write`` raises (or the process is killed), ``path`` is left unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp")  # (is_temporary)
    attempts = 20  # (another process may remove the folder, once empty, between mkdir and open: again and again
    for attempt in range(attempts):  # in a tight loop of saves and removals; 3 attempts failed in 1 of ~600)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        try:
            f = tmp.open("wb")
            break
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_temporary(name: str, of: str) -> bool:
    """Whether the file name ``name`` is a temporary of :func:`write_atomically` writing the file named ``of``
    (a writer's still in progress, or one killed midway)."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` left by writers of this machine that are no longer alive (a
    kill while writing). A live writer's file, or one written on another machine, is left alone."""
    path = Path(path)
    prefix = f".{path.name}.{HOST}."
    try:
        temporaries = list(path.parent.glob(f".{path.name}.*.tmp"))
    except FileNotFoundError:  # (the folder is gone, or went while it was listed: another process removed it)
        return
    for tmp in temporaries:
        pid = tmp.name[len(prefix):-len(".tmp")].split(".")[0] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
