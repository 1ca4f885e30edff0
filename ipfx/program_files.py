"""A ``torch.export`` program file (``.pt2``) checked before torch opens it: nothing in it can run code.

``torch.export.load`` reads a zip archive, and unpickles some of its members in full
(``weights_only=False``, which runs whatever the pickle names): a weight or tensor constant whose
config says ``use_pickle``, the sample inputs when they do not load as plain tensors, a custom or opaque
object constant, the older archive layouts. :func:`check_program` reads the archive itself (``zipfile``
and ``json``, no unpickling but one ``weights_only=True`` load) and refuses, with one line saying why:

* a file that is not a zip archive of the ``pt2`` format (the older layouts are read with full pickles);
* two members of one name, or members under two root folders (torch's reader and ``zipfile`` may pick
  different ones: this check would read another copy than torch);
* compressed members, a member whose size as declared, or the members' sizes together, exceed the file's
  own size (what ``torch.export.save`` writes is stored, not compressed: more is a zip bomb), and a member
  whose bytes do not match their checksum (torch does not check them: a damaged weight would load);
* a program JSON (``models/*.json``) with a string torch would turn into code: a symbolic size's
  expression (``sympy.sympify``), a guard (``exec``), a call target, a name in generated source
  (:mod:`ipfx.program_model`);
* members torch.export would load as code or native libraries: AOTInductor, ExecuTorch, MTIA and
  external-weights folders, legacy ``.pt`` weight or constant files, non-tensor constants;
* a weight or constant entry that says ``use_pickle``, or declares a tensor larger than the file;
* sample inputs that ``torch.load(..., weights_only=True)`` does not read (torch would fall back to a
  full unpickle).

What passes holds JSON, raw tensor bytes and tensors-only pickles, which torch.export reads without
running code from the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import torch

from .errors import IPFXValueError
from .program_model import check_model

_FORMAT = "archive_format"
_NOT_READ = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_WEIGHTS_CONFIG = "_weights_config.json"
_CONSTANTS_CONFIG = "_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/"
_MODELS = "models/"


class UnsafeProgram(IPFXValueError):
    """The file is not a program ipfx opens: it could run code, or claims more than it holds."""


def check_program(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeProgram` unless ``torch.export.load(path)`` would run no code from the file
    (module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise _refuse(path, "it is a directory, not a .pt2 file")
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise _refuse(path, "it is not a zip archive, as torch.export.save writes (or it is cut short)")
    with zipfile.ZipFile(path) as archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        members = {_relative(info.filename): info for info in infos}
        roots = {info.filename.split("/", 1)[0] for info in infos if "/" in info.filename}
        if len(members) != len(infos) or len({info.filename for info in infos}) != len(infos) or len(roots) > 1:
            raise _refuse(path, "it holds two members of one name (or members under two root folders): torch "
                                "would read another copy than this check")
        if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
            raise _refuse(path, "its members are compressed; torch.export.save (and ipfx.deploy.save_program) "
                                "store them uncompressed: save it again with either")
        declared = sum(info.file_size for info in members.values())
        if declared > size or any(info.file_size > size for info in members.values()):
            raise _refuse(path, f"its members declare {declared} bytes in a file of {size} (a zip bomb?)")
        damaged = _damaged(archive)
        if damaged is not None:
            raise _refuse(path, f"its member {damaged!r} does not match its checksum (the file is damaged)")
        if _FORMAT not in members or archive.read(members[_FORMAT]).strip() != b"pt2":
            raise _refuse(path, "it is not in the pt2 archive format (older torch.export layouts unpickle in full); "
                                "save it again with torch.export.save")
        for name, info in members.items():
            if name.startswith(_NOT_READ):
                raise _refuse(path, f"it holds {name!r}, which torch would load as code or native library")
            if name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
                raise _refuse(path, f"it holds {name!r}, a legacy pickled weight file")
            if name.endswith((_WEIGHTS_CONFIG, _CONSTANTS_CONFIG)):
                _check_config(path, name, _json(path, archive, info), size)
            elif name.startswith(_MODELS):  # (torch reads every member here as a program, whatever its suffix)
                if not name.endswith(".json"):
                    raise _refuse(path, f"it holds {name!r}, which torch would read as a program, not as JSON")
                try:
                    check_model(_json(path, archive, info))
                except ValueError as e:
                    if isinstance(e, UnsafeProgram):
                        raise
                    raise _refuse(path, f"{name!r}: {e}; torch would run it as code") from None
            elif name.startswith(_SAMPLE_INPUTS):
                _check_sample_inputs(path, name, archive.read(info))


def _damaged(archive: zipfile.ZipFile) -> str | None:
    """The first member whose bytes do not match their CRC-32 (torch's reader does not check them: a flipped
    bit in a weight would load), or None."""
    try:
        return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"? ({exc})"


def _relative(name: str) -> str:
    """A member's name below the archive's root folder (``<stem>/data/...`` -> ``data/...``)."""
    return name.split("/", 1)[1] if "/" in name else name


def _json(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    try:
        return json.loads(archive.read(info))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _refuse(path, f"{_relative(info.filename)!r} is not JSON ({exc})") from None


def _check_config(path: Path, name: str, config, size: int) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"{name!r} has no 'config' table")
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise _refuse(path, f"{name!r}: entry {key!r} is not a table")
        if entry.get("use_pickle"):
            raise _refuse(path, f"{name!r}: {key!r} is stored as a pickle, which torch.export.load unpickles "
                                "in full (it could run code)")
        if name.endswith(_CONSTANTS_CONFIG) and not str(entry.get("path_name", "")).startswith("tensor_"):
            raise _refuse(path, f"{name!r}: {key!r} is not a tensor constant (an object torch would unpickle)")
        numel = 1
        for dim in (entry.get("tensor_meta") or {}).get("sizes", []):
            value = dim.get("as_int") if isinstance(dim, dict) else None
            if not isinstance(value, int) or value < 0:
                raise _refuse(path, f"{name!r}: {key!r} declares a size that is not a whole number")
            numel *= value
        if numel > size:  # one byte per element at the least
            raise _refuse(path, f"{name!r}: {key!r} declares {numel} elements in a file of {size} bytes")


def _check_sample_inputs(path: Path, name: str, data: bytes) -> None:
    """The sample inputs load as plain tensors (else torch unpickles them in full), in tuples, lists and dicts
    whose keys are identifiers (torch pastes each input's path, keys included, into the source of the guards
    it runs), with numbers and None beside them."""
    if not data:
        return
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - anything but plain tensors and containers: torch would unpickle it
        raise _refuse(path, f"its sample inputs {name!r} are not plain tensors ({type(exc).__name__}); torch would "
                            "unpickle them in full") from None
    pending = [inputs]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            bad = next((k for k in value if not (isinstance(k, str) and k.isidentifier())), None)
            if bad is not None:
                raise _refuse(path, f"its sample inputs {name!r} have a key {str(bad)[:80]!r}, not an identifier "
                                    "(torch pastes it into the source of its input guards)")
            pending.extend(value.values())
        elif isinstance(value, (tuple, list)):
            pending.extend(value)
        elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float))):
            raise _refuse(path, f"its sample inputs {name!r} hold a {type(value).__name__}, not a tensor or number")


def _refuse(path: Path, why: str) -> UnsafeProgram:
    return UnsafeProgram(f"{path} is refused: {why}. ipfx opens only programs that run no code when read")
