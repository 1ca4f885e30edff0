"""``example_inputs`` means one thing wherever it appears: a tuple of positional arguments.

As in ``torch.export.export`` and ``prepare_fx``. A bare tensor is accepted as the one argument; where
only a shape is needed (SynFlow's all-ones input) a shape works too.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import IPFXTypeError


def as_args(example_inputs: Any, what: str = "example_inputs") -> tuple | None:
    """``example_inputs`` as a tuple of positional arguments (``None`` stays ``None``)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise IPFXTypeError(f"{what} must be a tuple of positional arguments (or one tensor), got "
                        f"{type(example_inputs).__name__}; e.g. example_inputs=(torch.randn(2, 3, 32, 32),)")


def as_kwargs(example_kwargs: Any) -> dict:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict):
        raise IPFXTypeError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
    return dict(example_kwargs)


def is_shape(value: Any) -> bool:
    """``(1, 3, 32, 32)`` or ``torch.Size``: a shape, not a tuple of arguments."""
    return isinstance(value, (tuple, list, torch.Size)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
