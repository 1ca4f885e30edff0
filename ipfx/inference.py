"""Models built outside ``torch.inference_mode`` whatever the caller's mode (:func:`outside_inference_mode`)."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_inference_mode(fn: F) -> F:
    """``fn`` run with ``torch.inference_mode`` off, so that the tensors it makes for a model (coefficients,
    masks, bases, a lowered or loaded model's buffers) are ordinary tensors even when it is called inside
    ``torch.inference_mode()``. Tensors made in that mode are *inference tensors*, which have no version
    counter, and ipfx keys every plan and native program on the versions of a model's tensors to see in-place
    edits: such a model raised torch's ``RuntimeError: Inference tensors do not track version counter`` on its
    first call (``with torch.inference_mode(): m = ipfx.deploy.load_module(path); m(x)``). The model then runs
    in inference mode as any other."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
