"""Output folders: each belongs to the command that first wrote into it, and no other command writes there.

``ipfx demo`` starts its store afresh and overwrites its table, plot and deployment files; ``ipfx compare``
appends to its store and resumes. Pointed at each other's folder, the demo would delete a sweep's records
and the sweep would count the demo's runs as its own. So a command *claims* its folder before it writes
anything: a marker file (:data:`MARKER`, JSON ``{"command": ...}``) names the owner. A folder that is
missing or empty is claimed; a folder claimed by the same command is used; anything else is refused with
one line saying what is there and what to do. Folders written before markers existed are recognised by
their store: a ``results.jsonl`` whose records all name ``ipfx demo`` is the demo's, any other store a
sweep's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import is_temporary, write_atomically
from ..errors import IPFXValueError

MARKER = ".ipfx-output.json"
COMMANDS = ("demo", "compare")


def claim(folder: Path, command: str) -> None:
    """Make ``folder`` ``command``'s output folder, or raise :class:`IPFXValueError` (module docstring)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise IPFXValueError(f"--out {str(folder)!r} is a file, not a folder; name a folder")
    owner = owner_of(folder)
    if owner is not None and owner != command:
        what = "files ipfx did not write" if owner == "unknown" else f"the results of `ipfx {owner}`"
        raise IPFXValueError(f"--out {str(folder)!r} holds {what}; `ipfx {command}` would overwrite or mix with "
                             "them. Pass another --out (a new or empty folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / MARKER, json.dumps({"command": command}) + "\n")  # (whole: other processes read it)
    except OSError as exc:
        raise IPFXValueError(f"cannot write into --out {str(folder)!r} ({exc.strerror or exc}); "
                             "pass a folder you can write to") from None


def owner_of(folder: Path) -> str | None:
    """The command that owns ``folder``: from its marker, else from its store; ``None`` for a missing or
    empty folder, ``"unknown"`` for a folder holding files of neither."""
    if not folder.is_dir():
        return None
    owner = _owner_by_files(folder)
    if owner is not None:
        return owner
    # a claim in progress (another process between writing its marker and renaming it into place), or one
    # killed there, leaves only its temporary marker: that folder is still unclaimed, not someone else's (the
    # claim's own write removes a dead writer's temporary)
    others = [p for p in folder.iterdir() if not is_temporary(p.name, MARKER)]
    if not others:
        return None
    # (what another sweep claimed or wrote since the look above: two sweeps started on one new folder)
    return _owner_by_files(folder) or "unknown"


def _owner_by_files(folder: Path) -> str | None:
    """The owner the marker or the store names, or None where the folder has neither."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("command")
        except (ValueError, OSError, AttributeError, RecursionError):
            owner = None
        return owner if owner in COMMANDS else "unknown"
    store = folder / "results.jsonl"
    if store.is_file():
        return "demo" if _all_demo(store) else "compare"
    if (folder / "checkpoints").is_dir():  # a sweep stopped before its first record
        return "compare"
    return None


def write_text(path: Path, text: str) -> None:
    """``path``'s text, written whole or not at all (:func:`ipfx.atomic.write_atomically`): a kill while
    writing a report leaves the previous one, not an empty file."""
    data = text.encode("utf-8")
    write_atomically(Path(path), lambda f: f.write(data))


def _all_demo(store: Path) -> bool:
    commands = []
    try:
        with store.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    commands.append(str(json.loads(line).get("command", "")))
                except (ValueError, AttributeError, RecursionError):
                    return False
    except OSError:
        return False
    return bool(commands) and all(c.startswith("ipfx demo") for c in commands)
