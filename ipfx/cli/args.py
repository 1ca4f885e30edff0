"""Argument types for the ``ipfx`` command line: every option is checked when it is parsed.

Each factory returns a function for argparse's ``type=``. A bad value raises
``argparse.ArgumentTypeError`` with a message that says what is allowed, so argparse prints
``ipfx compare: error: argument --batch-size: must be a positive integer, got 0`` and exits with
status 2 before any data is loaded or any run starts (a traceback, or a sweep that trains for zero
epochs, is what a user got before).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, Sequence

Error = argparse.ArgumentTypeError


def _number(text: str, kind: type, what: str):
    """``text`` as an int or a finite float, else an error that names what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise Error(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise Error(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: epochs, batch size, width, threads, rounds)."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise Error(f"must be a positive integer, got {value}")
    return value


def thread_count(text: str) -> int:
    """A torch thread count: 1 up to 4 per core (torch crashes on a count far past the machine's; more
    threads than cores only slow a run down)."""
    value = positive_int(text)
    limit = 4 * (os.cpu_count() or 1)
    if value > limit:
        raise Error(f"must be at most {limit} (4 per core on this machine), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate of 0 would train nothing)."""
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise Error(f"must be a positive number, got {text}")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def rate(text: str) -> float:
    """A learning rate: a positive number that float32 holds (the optimizer multiplies float32 tensors by it;
    past 3.4e38 torch fails in the first step, after the data and the model were loaded)."""
    value = positive_float(text)
    if value > FLOAT32_MAX:
        raise Error(f"must be at most 3.4e38 (float32), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay)."""
    value = _number(text, float, "a non-negative number")
    if value < 0:
        raise Error(f"must be a non-negative number, got {text}")
    if value > FLOAT32_MAX:
        raise Error(f"must be at most 3.4e38 (float32), got {text}")
    return value


def non_negative_count(text: str) -> float:
    """A finite number >= 0, fractions allowed (GPUs per run: 0.5 lets two runs share one GPU)."""
    return non_negative_float(text)


def ray_address(text: str) -> str:
    """Where a Ray cluster is: ``auto`` (the one this machine is part of), ``host:port`` or
    ``ray://host:port`` (Ray Client); anything else would only fail inside ``ray.init``."""
    import re

    if text == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", text):
        return text
    raise Error(f"must be auto, host:port or ray://host:port, got {text!r}")


def fraction(text: str) -> float:
    """A number in [0, 1) (momentum, a sparsity, IMP's rewind point)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise Error(f"must be a number in [0, 1), got {text}")
    return value


def _items(text: str, what: str) -> list[str]:
    """The non-empty entries of a comma list, each once: an empty list would run nothing and a repeat
    would run (and record) the same runs twice."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise Error(f"must be a comma-separated list of {what}, got {text!r}")
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise Error(f"lists {', '.join(repeated)} more than once; give each value once")
    return items


def fraction_list(text: str) -> list[float]:
    """Comma-separated numbers in [0, 1) (``--sparsities``)."""
    items = _items(text, "numbers in [0, 1)")
    try:
        values = [float(v) for v in items]
    except ValueError:
        raise Error(f"must be comma-separated numbers in [0, 1), got {text!r}") from None
    bad = [v for v, f in zip(items, values) if not 0 <= f < 1]  # also catches nan
    if bad:
        raise Error(f"every value must be in [0, 1), got {', '.join(bad)}")
    return _distinct(items, values)


def seed_list(text: str) -> list[int]:
    """Comma-separated integers >= 0 (``--seeds``)."""
    items = _items(text, "integers >= 0")
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise Error(f"must be comma-separated integers >= 0, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < MAX_SEED]
    if bad:
        raise Error(f"seeds must be integers from 0 to 2**63 - 1 (torch's generators take 64 bits), got "
                    f"{', '.join(map(str, bad))}")
    return _distinct(items, values)


MAX_SEED = 2**63


def _distinct(items: list[str], values: list) -> list:
    """``values`` when no two are equal: ``0.9,0.90`` or ``1,01`` spell one value twice, which would run
    (and record) the same runs twice."""
    repeated = [f"{a} and {b}" for i, (a, x) in enumerate(zip(items, values))
                for b, y in zip(items[i + 1:], values[i + 1:]) if x == y]
    if repeated:
        raise Error(f"{', '.join(repeated)} are the same value; give each value once")
    return values


def name_list(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``valid`` (``--methods``, ``--spaces``)."""

    def parse(text: str) -> list[str]:
        values = _items(text, f"names from {', '.join(valid)}")
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise Error(f"unknown {', '.join(unknown)}; choose from {', '.join(valid)}")
        return values

    return parse


def one_of(valid: Sequence[str], what: str) -> Callable[[str], str]:
    """One name from ``valid`` (``--data``), with the list in the message."""

    def parse(text: str) -> str:
        if text not in valid:
            raise Error(f"unknown {what} {text!r}; choose from {', '.join(valid)}")
        return text

    return parse


def model_name(text: str) -> str:
    """A built-in model or a torchvision classification model (only then is torchvision's list read)."""
    from ..errors import IPFXValueError
    from ..experiments.models import check_model_name

    try:
        check_model_name(text)
    except IPFXValueError as exc:
        raise Error(str(exc)) from None
    return text


def device(text: str) -> str:
    """A torch device this machine has: a CUDA device asked for where there is none fails here, not
    inside the first run."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise Error(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise Error(f"{text!r} asked for, but this machine has no usable CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise Error(f"{text!r} does not exist: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise Error(f"{text!r} asked for, but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise Error(f"device type {dev.type!r} is not supported here; use cpu, cuda[:N] or mps")
    return text


def compile_backend(text: str) -> str:
    """A ``torch.compile`` backend this torch has (``--compile``; bare, it means inductor)."""
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if text not in backends:
        raise Error(f"unknown torch.compile backend {text!r}; choose from {', '.join(sorted(backends))}")
    return text


def output_folder(text: str) -> str:
    """A folder to write into: it may not exist yet, but it must not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise Error(f"{text!r} is a file, not a folder; name a folder (it is created if missing)")
    return text


def file_or_model(text: str) -> str:
    """``ipfx inspect``'s MODEL: an existing file, or else a model name (what looks like a path, with a
    folder or a suffix, is reported as a missing file rather than as an unknown model)."""
    path = Path(text).expanduser()
    if path.is_file():
        return text
    if (path / "results.jsonl").is_file():
        return text  # the output folder of ipfx compare or ipfx demo: its results are shown
    if path.exists():
        raise Error(f"{text!r} is a folder without results.jsonl; pass a saved file (.pt2, .pt), a model name, "
                    "or an output folder of ipfx compare")
    if path.suffix or len(path.parts) > 1:
        raise Error(f"no such file {text!r}; pass an existing file (.pt2, .pt) or a model name")
    return model_name(text)
