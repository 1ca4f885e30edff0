"""The result store: one JSON record per finished run, appended to a JSON-lines file.

A sweep asks the store which runs are done and skips them, so a killed sweep resumes where it
stopped; a run killed midway leaves no record and is simply run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .engine import RunSpec

_FIELDS = [f.name for f in dataclasses.fields(RunSpec)]


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open() as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill: that run is redone
                        continue
        return out

    def done(self) -> set[tuple]:
        return {tuple(r.get(k) for k in _FIELDS) for r in self.records()}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
