"""Exceptions raised by ipfx.

Every error says what is wrong and what to do about it. They subclass the builtin
exception a user would catch anyway (``TypeError``/``ValueError``/``RuntimeError``), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

import os
import sys

import torch


class IPFXError(Exception):
    """Base class of every ipfx error."""


class IPFXTypeError(IPFXError, TypeError):
    """An argument has the wrong type (e.g. not an ``nn.Module``)."""


class IPFXValueError(IPFXError, ValueError):
    """An argument has a wrong value (unknown space, basis, sparsity out of range, ...)."""


class TraceError(IPFXError, RuntimeError):
    """torch.fx could not trace (a part of) the model."""


class NotTransformedError(IPFXError, ValueError):
    """An operation needs a model produced by :func:`ipfx.transform`."""


class SingularBasisError(IPFXValueError):
    """A filter basis is not invertible, so weights cannot be expressed in it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"``, for one-line reports of an exception; the type alone for an
    exception without a message (a bare ``assert``)."""
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(": ")[:limit]


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by this function's caller at the first frame outside
    ipfx and torch: the user's line, however deep the call (module hooks, graph modules, mode switches)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
