"""The result store: one JSON record per finished run, appended to a JSON-lines file.

A sweep asks the store which runs are done and skips them, so a killed sweep resumes where it
stopped; a run killed midway leaves no record and is run again (from its checkpoint, if it has one).

Several processes may append at once (``ipfx compare --workers N``, or several sweeps sharing one
folder): each record is one line, written with a single ``write`` under an exclusive lock on the
file (``fcntl.flock``), then flushed and fsynced, so no record is lost, duplicated or interleaved with
another. A process killed while writing can still leave a cut last line: reading reports it (a
warning naming the line) and skips it, so that run is redone, and the next append starts on a new
line instead of gluing its record to the fragment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer at a time is then the user's to ensure
    fcntl = None


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def records(self) -> list[dict]:
        """Every whole record; a cut or unreadable line is reported (one warning) and skipped.

        A line is a record when it parses as a JSON object (a record whose newline alone was cut is
        whole); a write cut earlier leaves a fragment that does not parse.
        """
        if not self.path.exists():
            return []
        out, bad = [], []
        with self.path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:  # (ValueError: JSON's own, and an integer of more digits than Python converts)
                    record = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    bad.append((number, "cut or not JSON"))
                    continue
                wrong = problem(record)
                if wrong is not None:
                    bad.append((number, wrong))
                    continue
                out.append(record)
        if bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
            warnings.warn(f"{self.path}: {len(bad)} line(s) are not records ({shown}); skipped: a sweep on this "
                          f"store runs them again (a run killed while writing leaves a cut line)", stacklevel=2)
        return self._once(out)

    def _once(self, records: list[dict]) -> list[dict]:
        """Each run's first record: a run recorded twice (a line copied by hand, two sweeps of a version
        without run claims) is counted once, with a warning, never as a second seed."""
        fields = _key_fields()
        seen, out, repeated = set(), [], 0
        for record in records:
            key = tuple(_hashable(record.get(k)) for k in fields)
            if "method" in record and key in seen:
                repeated += 1
                continue
            seen.add(key)
            out.append(record)
        if repeated:
            warnings.warn(f"{self.path}: {repeated} record(s) repeat a run recorded before; each run is counted once",
                          stacklevel=3)
        return out

    def done(self) -> set[tuple]:
        """The keys (:meth:`RunSpec.key`) of the runs the store holds."""
        fields = _key_fields()
        return {tuple(r.get(k) for k in fields) for r in self.records()}

    def append(self, record: dict) -> None:
        """Add one record as one line, safely when other processes append at the same time."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        line = json.dumps(clean) + "\n"
        with self.path.open("ab") as f, _locked(f):
            if f.tell() and not _ends_with_newline(self.path):  # after a cut line: start a new one
                line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(f):
    """Hold an exclusive lock on the open file ``f`` (no-op where ``fcntl`` does not exist)."""
    if fcntl is None:
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        f.seek(0, os.SEEK_END)  # another writer may have grown the file while we waited
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


#: What the readers of a record use besides its key and its ``dataset_name``: the result, a number (a
#: fraction of the test set).
RESULTS = {"accuracy": (0.0, 1.0)}


def problem(record) -> str | None:
    """Why ``record`` (a parsed line) cannot be used, or None: it must be a JSON object whose run key
    fields (:class:`~.engine.RunSpec`) have their types and whose results (:data:`RESULTS`) are numbers in
    range. A line edited by hand, or written by another program, is then skipped rather than failing a
    table after every run has trained."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kinds in _key_types().items():
        value = record.get(name)
        if name not in record and type(None) in kinds:
            continue  # an optional field, absent in records written before it existed
        if name not in record:
            return f"no {name!r}"
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{name!r} is {value!r}, not {' or '.join(k.__name__ for k in kinds)}"
    if not isinstance(record.get("dataset_name"), str):
        return f"'dataset_name' is {record.get('dataset_name')!r}, not a name"
    from ..config import SPACES  # (here: appending needs neither torch nor the rest of ipfx)

    if record.get("space") not in SPACES:
        return f"'space' is {str(record.get('space'))[:40]!r}, not one of {', '.join(SPACES)}"
    for name, (low, high) in RESULTS.items():
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            return f"{name!r} is {value!r}, not a number in [{low:g}, {high:g}]"
    return None


@functools.lru_cache(maxsize=None)
def _key_types() -> dict[str, tuple[type, ...]]:
    """Each run key field and the JSON types it may hold (an int where a float is declared: 0 for 0.0)."""
    import typing

    from .engine import RunSpec

    hints = typing.get_type_hints(RunSpec)
    out = {}
    for f in dataclasses.fields(RunSpec):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        kinds = tuple({int: (int,), float: (int, float), str: (str,), type(None): (type(None),)}[a] for a in args)
        out[f.name] = tuple(k for group in kinds for k in group)
    return out


def _key_fields() -> list[str]:
    from .engine import RunSpec  # here, not at the top: writing records needs neither torch nor the engine

    return [f.name for f in dataclasses.fields(RunSpec)]


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
