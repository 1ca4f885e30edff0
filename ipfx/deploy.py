"""Deployment files that are safe to open: a plain state dict and a ``torch.export`` program.

A whole-module pickle (``torch.save(model)``) can only be read with ``torch.load(weights_only=False)``,
which runs whatever code the file names, so a downloaded model file is a program. The files written
here need no unpickling of code:

* ``<stem>.state_dict.pt``: the tensors only, readable with ``torch.load(path, weights_only=True)``; load
  them into the same architecture (for a dense lowering: the plain, untransformed model).
* ``<stem>.pt2``: the model as a ``torch.export`` program (graph, tensors, batch size left free), read
  with ``torch.export.load(path)``. A dense lowering holds only ATen ops and runs without ipfx; a fused
  one calls ``torch.ops.ipfx.ip_conv`` / ``sparse_linear``, registered by ``import ipfx``.

Both are written whole or not at all (:mod:`ipfx.atomic`): a kill or an error while saving leaves the file
that was there before. :func:`load` opens either kind the same safe way and refuses any other pickle unless
``trust=True``; a ``.pt2`` is checked before torch reads it (:mod:`ipfx.program_files`), since
``torch.export.load`` unpickles parts of some archives in full. :func:`load_module` opens a ``.pt2`` as a
module to call, the deployment form: the program's graph with its fused op calls run by ipfx's modules
(:mod:`ipfx.passes.fused_modules`), each planned once per kind of input.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .atomic import write_atomically
from .errors import IPFXValueError
from .inputs import as_args
from .capture.shapes import dynamic_spec
from .inference import outside_inference_mode

STATE_DICT_SUFFIX = ".state_dict.pt"
PROGRAM_SUFFIX = ".pt2"


# a program's extra file (``extra/`` in the archive, read as text): the mode save_program exported it in
MODE_FILE = "ipfx_mode"
_MODES = {"train": True, "eval": False}


def _file_path(stem: str | os.PathLike, suffix: str, whole: tuple[str, ...] = ()) -> Path:
    """``<stem><suffix>`` (``stem`` as given where it already ends so, or in one of ``whole``), its folder made if
    missing."""
    path = Path(stem) if str(stem).lower().endswith((suffix, *whole)) else Path(f"{stem}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_state_dict(model: nn.Module, stem: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``<stem>.state_dict.pt`` (tensors only); a ``stem`` ending in ``.pt`` or
    ``.pth`` is the whole file name (``"net"`` writes ``net.state_dict.pt``, ``"net.pt"`` writes ``net.pt``)."""
    path = _file_path(stem, STATE_DICT_SUFFIX, whole=(".pt", ".pth"))
    state = model.state_dict()
    write_atomically(path, lambda f: torch.save(state, f))
    return path


def save_program(model: nn.Module, stem: str | os.PathLike, example: torch.Tensor | tuple) -> Path:
    """Export ``model`` (in the mode it is in) on ``example`` (one tensor or a tuple of positional
    arguments) and write ``<stem>.pt2`` (``stem`` may end in ``.pt2`` already).

    Every size the model lets vary (batch, image size, ...) is exported free (``Dim.AUTO``); the sizes
    it fixes stay fixed, and the program checks them on every call. The mode is fixed too (batch norm,
    dropout): it is recorded in the file (:data:`MODE_FILE`), so that :func:`load_module`'s module accepts
    ``.eval()`` / ``.train()`` where they ask for that mode.
    """
    args = as_args(example, "example")
    modes = {m.training for m in model.modules()}
    mode = "mixed" if len(modes) > 1 else "train" if model.training else "eval"
    if any(isinstance(a, torch.Tensor) and a.dim() > 1 and a.shape[0] == 1 for a in pytree.tree_leaves(args)):
        warnings.warn("save_program: the example's batch is 1, and torch.export fixes a size it sees as 1, so the "
                      "program will take batches of 1 only; save it on an example of 2 samples or more for any "
                      "batch", stacklevel=2)
    try:
        program = torch.export.export(model, args, dynamic_shapes=dynamic_spec(model.forward, args, {}),
                                      strict=False)
    except AssertionError as exc:  # the model's own size checks (ipfx.capture.shape_guards) refuse the example
        if not str(exc).startswith("ipfx shape guard"):
            raise
        condition = str(exc).partition(": ")[2].split(" does not hold")[0]
        raise IPFXValueError(f"save_program: the example does not fit {type(model).__name__} ({condition} does not "
                             "hold for it); give an example of the sizes the model takes") from None
    path = _file_path(stem, PROGRAM_SUFFIX)
    write_atomically(path, lambda f: torch.export.save(program, f, extra_files={MODE_FILE: mode}))
    return path


def load(path: str | os.PathLike, *, trust: bool = False):
    """Open a saved file without running code from it.

    ``.pt2``: ``torch.export.load`` (an ``ExportedProgram``), after :func:`ipfx.program_files.check_program`
    (``trust`` does not lift it: such a file is not a program ipfx makes). Anything else: ``torch.load`` with
    ``weights_only=True`` (tensors, containers, numbers, strings); a pickle that needs more raises
    :class:`~ipfx.errors.IPFXValueError` saying so, unless ``trust=True``, which loads it in full
    (unpickling runs the code the file names: only for files you trust).
    """
    path = Path(path)
    if path.suffix == PROGRAM_SUFFIX:
        return _load_program(path)
    try:
        return torch.load(path, weights_only=not trust, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if not trust and "Weights only load failed" in str(exc):
            raise IPFXValueError(
                f"{path} is a pickle that needs more than tensors to load ({_needs(exc)}), and unpickling it "
                "would run the code it names; pass --trust to load it anyway (trust=True in Python), only for a "
                "file you trust, or save a state dict or a torch.export program (.pt2) instead"
            ) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch.load's errors on a file that is not a torch file vary: KeyError, RuntimeError
        raise _unreadable(path, exc) from None


@outside_inference_mode
def load_module(path: str | os.PathLike) -> nn.Module:
    """The ``.pt2`` program at ``path`` as a module to call: ``load(path).module()`` (the same checks; the
    program's own checks of its inputs' sizes on every call), with each fused op call on the program's
    tensors run by :class:`~ipfx.ops.SparseIPConv` / :class:`~ipfx.ops.SparseLinear`, which compute that op
    and in eager inference keep its plan (:mod:`ipfx.passes.fused_modules`): the same numbers, without a
    getattr chain and the dispatcher's Python per call. The containers on the paths the forward walks keep
    their submodules as attributes too (:mod:`ipfx.passes.module_paths`: no ``nn.Module.__getattr__`` per
    step). In eager inference on CPU the whole graph then runs as one native call where the native kernel is
    built (:mod:`ipfx.ops.program`: the same kernels and operators in the same order, without Python between
    them; a model changed after loading is followed). It is in the mode the program was saved in, and takes
    ``.eval()`` / ``.train()`` for that mode only (:func:`_keep_mode`); a deep copy keeps all this."""
    from .passes.fused_modules import FusedOpsAsModules
    from .passes.manager import PassManager
    from .passes.module_paths import ModulePathsAsAttributes
    from .passes.native_pooling import NativePooling

    path = Path(path)
    if path.suffix != PROGRAM_SUFFIX:
        raise IPFXValueError(f"{path} is not a torch.export program (.pt2); load_module opens those only "
                             "(ipfx.deploy.load opens state dicts)")
    extra = {MODE_FILE: ""}
    exported = _load_program(path, extra)
    module = exported.module()
    PassManager([FusedOpsAsModules(), NativePooling(), ModulePathsAsAttributes()], sites=lambda m: [(m, {})])(module)
    _as_loaded(module, extra[MODE_FILE], path, _example_shapes(exported))
    return module


def _example_shapes(exported) -> str:
    """The shapes of the example a program was exported on (``2x3x64x64``), where the file records it."""
    shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(getattr(exported, "example_inputs", None))
              if isinstance(t, torch.Tensor)]
    return ", ".join("x".join(map(str, s)) or "a number" for s in shapes)


def _check_arguments(module: nn.Module, path: Path) -> None:
    """Refuse a call with other arguments than the program was saved with, saying so and what to do, before
    torch's own check (a forward pre-hook), whose message is ``Ran into a kwarg keyword mismatch`` or a tree spec.
    """
    spec = getattr(module, "_in_spec", None)
    try:  # (children(): torch 2.10 and later; children_specs before)
        kids = list(spec.children()) if callable(getattr(spec, "children", None)) else spec.children_specs
        count, keys = kids[0].num_children, list(kids[1].context or [])
    except (AttributeError, IndexError, TypeError):  # not the (args, kwargs) spec torch.export writes: torch's check
        return

    def check(_, args, kwargs):
        if len(args) != count or sorted(kwargs) != sorted(keys):
            given = f"{len(args)} positional" + (f" and {', '.join(map(repr, kwargs))}" if kwargs else "")
            wanted = f"{count} positional" + (f" and {', '.join(map(repr, keys))}" if keys else "")
            raise IPFXValueError(f"{path} was saved for calls with {wanted} argument(s), and is called with {given}: "
                                 "a program takes the arguments of the example it was saved with; save it again with "
                                 "an example of this call: ipfx.deploy.save_program(model, stem, example)")

    module.register_forward_pre_hook(check, with_kwargs=True, prepend=True)


def _explain_guards(module: nn.Module, path: Path, example: str) -> None:
    """Give torch.export's input checks (its ``GuardsFn`` submodule, first in the graph) a message that says what
    refuses the call and what to do: its own is ``Guard failed: 1 + (-1 + x.size()[3]) // 32 != 1`` (a resnet
    saved on 64x64 images, called on 32x32: torch.export assumes a size it saw above 1 is never 1, here the last
    feature map's). The same ``AssertionError``, starting as ipfx's shape guards do (:func:`ipfx.capture.
    shape_guards.is_guard_failure`). In the instance's ``forward``, where torch puts its checks."""
    from .capture.shape_guards import GUARD_PREFIX
    from .ops.program import GUARDS_FN

    for sub in module.modules():
        check = sub.__dict__.get("forward")  # (torch's checks: a function set on the instance)
        if GUARDS_FN is None or type(sub) is not GUARDS_FN or check is None or getattr(check, "explained", False):
            continue

        def forward(*args, _check=check):
            try:
                return _check(*args)
            except AssertionError as exc:
                condition = str(exc)
                if not condition.startswith("Guard failed"):
                    raise
                condition = condition.partition(":")[2].strip()
                exported = f" exported on an example of {example}" if example else ""
                raise AssertionError(
                    f"{GUARD_PREFIX}: {path} refuses this call: torch.export's condition {condition} does not hold. "
                    f"The program was{exported} and takes the sizes its example left free, under the conditions torch.export "
                    "derived (it assumes a size it saw above 1 is never 1: a ResNet saved on 64x64 images refuses "
                    "32x32 ones, whose last feature map is 1x1). Save it again on an example of the sizes you will "
                    "run: ipfx.deploy.save_program(model, stem, example)") from None

        forward.explained = True
        sub.forward = forward


def _as_loaded(module: nn.Module, mode: str, path: Path, example: str) -> None:
    """The explained input checks (:func:`_explain_guards`), the program forward (:func:`ipfx.ops.program.
    install`) and the mode's rules (:func:`_keep_mode`), given again to each deep copy: fx's ``GraphModule.
    __deepcopy__`` builds the copy on a class of its own from the graph and the state, so these were lost there
    (a copy ran the per-op forward, and took ``.train()`` while it computed eval mode)."""
    from .ops import program

    _explain_guards(module, path, example)
    _check_arguments(module, path)
    program.install(module)
    _keep_mode(module, mode, path)
    deepcopy = type(module).__deepcopy__

    def copy_(self, memo):
        other = deepcopy(self, memo)
        _as_loaded(other, mode, path, example)
        return other

    module.__deepcopy__ = copy_.__get__(module)

    def refuse_pickling(self, protocol=None):
        raise IPFXValueError(
            f"the program loaded from {path} cannot be pickled (torch.save, pickle, multiprocessing): torch's loaded "
            "modules hold generated functions; keep the .pt2 file and load it again where it is needed, or write "
            "it anew with ipfx.deploy.save_program(module, stem, example) (its state_dict() saves as any)")

    module.__reduce_ex__ = refuse_pickling.__get__(module)


def _keep_mode(module: nn.Module, mode: str, path: Path) -> None:
    """A loaded program computes the mode it was exported in, whatever ``module.training`` says (torch's
    loaded modules refuse ``train()`` and ``eval()`` for that reason). Here they are accepted where they ask
    for that mode, recorded by :func:`save_program` (``module.training`` then tells it; ``.eval()`` on a
    model holding the program works), and raise saying what to do where they ask for another."""
    training = _MODES.get(mode)
    if training is not None:
        nn.Module.train(module, training)

    def train(self, wanted: bool = True):
        if training is not None and bool(wanted) == training:
            return self
        name = "train" if wanted else "eval"
        exported = (f"was exported in {mode} mode and computes that mode only" if training is not None else
                    "was exported with modules in train and in eval mode, and computes just that" if mode == "mixed"
                    else "does not record the mode it was exported in (it was not written by "
                         "ipfx.deploy.save_program), and computes that mode only")
        raise IPFXValueError(f"{path} {exported} (torch.export fixes batch norm's and dropout's mode); to run it "
                             f"in {name} mode, export the model in that mode: "
                             f"ipfx.deploy.save_program(model.{name}(), stem, example)")

    module.train = train.__get__(module)
    module.eval = (lambda self: self.train(False)).__get__(module)


def _load_program(path: Path, extra_files: dict | None = None):
    from . import ops  # noqa: F401  registers ipfx::ip_conv and ipfx::sparse_linear, which fused programs call
    from .program_files import check_program

    try:
        check_program(path)  # torch.export.load unpickles parts of some archives in full: refuse those first
    except OSError as exc:
        raise IPFXValueError(f"{path} could not be read: {exc.strerror or exc}") from None
    try:
        return torch.export.load(path, extra_files=extra_files)
    except Exception as exc:
        raise IPFXValueError(f"{path} could not be read as a torch.export program (.pt2): {exc}".strip()) from None


def _needs(exc: Exception) -> str:
    """What the refused pickle asked for, from torch's message (the first class or function it names)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return f"it names {found.group(1)}" if found else "it holds objects other than tensors"


def _unreadable(path: Path, exc: Exception) -> IPFXValueError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return IPFXValueError(f"{path} could not be read with torch.load ({type(exc).__name__}: {first}); "
                          "pass a file written by torch.save or torch.export.save")
