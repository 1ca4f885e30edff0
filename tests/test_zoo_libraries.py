"""Zoo coverage beyond torchvision: models of transformers, timm, MONAI, diffusers, segmentation-models-pytorch.

The catalogue is tests/zoo_libraries.py (tiny configurations, random weights, nothing downloaded). Each
entry is transformed through the torch.export front end, ``ipfx.transform(model, example_inputs=args,
example_kwargs=kwargs)``, and :func:`test_library_model` asserts:

(a) rewritten: ``ipfx.rewritten_weights(t)`` names exactly the weights of :func:`kernel_weight_names`:
    every conv/transposed conv/linear module's weight (subclasses included, e.g. timm's ``StdConv2dSame``),
    ``nn.MultiheadAttention``'s input projections, the direction behind a weight-norm parametrization
    (wav2vec2's positional conv), under every name a shared module has, and nothing else;
(b) outputs preserved: ``t`` computes ``model``'s outputs in eval mode and, after ``t.train()``, in
    training mode (every output tensor relative to its largest magnitude, 1e-4, see test_zoo.compare);
(c) dense lowering: after random masks and perturbed bases, ``ipfx.lower(t, "dense")`` computes ``t``'s
    outputs (eval and training mode), and its state dict loads strictly into a freshly built model of the
    original class, which then computes the same outputs too;
(d) fused lowering: ``ipfx.lower(t, "fused")`` and the frozen deployment form (``freeze=True``: batch norms
    folded, epilogues fused) compute ``t``'s outputs (eval mode);
(e) the input model is unchanged: the same state dict (keys and values) and training flags as before;
(f) :func:`test_never_called_library_model_on_a_second_shape`: a model never called before, transformed with
    and without example inputs, is fully rewritten, and the transformed model computes its outputs on the
    example and on a second shape (one more sample, larger images or sequences), the dense, fused and frozen
    lowerings on the second, or they refuse where it refuses; ``zoo_libraries.FIXED_SHAPE`` and
    ``KNOWN_FAILS`` name the known exceptions.

The models are prepared as in tests/test_zoo.py (constant parameters redrawn, batch norms calibrated) so
that every output depends on every weight, and dropout-like randomness is switched off in the catalogue so
that training mode is deterministic. ``FAST`` (about ten models) runs by default; the whole catalogue is
``python -m pytest -m slow tests/test_zoo_libraries.py``. Each library is optional: its entries are skipped
when it is not installed. ``benchmarks/zoo_libraries.py`` checks the catalogue against torch.export and
torch.fx without ipfx.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import ipfx
import zoo_libraries
from helpers import perturb_bases, randomize_masks
from ipfx.capture.shape_guards import is_guard_failure
from test_zoo import KERNEL_TYPES, calibrate_batch_norm, compare, randomize_constant_parameters
from zoo_libraries import ALL, BY_ID, FAST, Entry

zoo_libraries.offline()  # before any Hugging Face library is imported by a test


def kernel_weight_names(model: nn.Module) -> set[str]:
    """The weights transform must rewrite, by the names ``rewritten_weights`` reports.

    As test_zoo.kernel_weights (the ``weight`` of every conv/linear module, subclasses included, and
    MultiheadAttention's input projections), but under every name the weight has in the state dict (a module
    or parameter that two parents share is listed under both paths, as MONAI's DynUNet and timm's CoaT do),
    plus, for every conv/linear module whose weight is a parametrization (weight norm: the module reads
    ``<module>.weight``, computed from ``parametrizations.weight.original0/1``), the parametrization's
    largest original of the kernel's rank (the direction ``v``; the magnitude ``g`` scales it), which is the
    parameter that becomes coefficients, less the weights that alias an ``nn.Embedding``'s table (a tied
    output projection: the embedding owns it; none of the catalogue's heads ties at present).
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = set()
    for name, m in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(m, KERNEL_TYPES) and parametrize.is_parametrized(m, "weight"):
            rank = m.weight.dim()
            originals = [(p.numel(), f"{prefix}parametrizations.weight.{key}")
                         for key, p in m.parametrizations.weight.named_parameters(recurse=False) if p.dim() == rank]
            names.add(max(originals)[1])
        elif isinstance(m, KERNEL_TYPES) and isinstance(m._parameters.get("weight"), nn.Parameter):
            if id(m.weight) not in embedded:
                names.add(f"{prefix}weight")
        elif isinstance(m, nn.MultiheadAttention):
            names |= {f"{prefix}{p}" for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                      if m._parameters.get(p) is not None}
    return names


def _call(model: nn.Module, args: tuple, kwargs: dict, seed: int = 1):
    torch.manual_seed(seed)  # the same random stream for every call (dropout is off, but just in case)
    with torch.no_grad():
        return model(*args, **kwargs)


def assert_same(actual, expected, what: str) -> None:
    _, bad = compare(actual, expected, f"zoo libraries: {what}")
    assert not bad, f"{what}: " + "; ".join(bad)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _build(entry: Entry):
    for module in entry.modules:
        pytest.importorskip(module)
    torch.manual_seed(0)
    try:
        return entry.build()
    except zoo_libraries.Unavailable as exc:
        pytest.skip(str(exc))


def _params() -> list:
    return [pytest.param(e, id=e.id, marks=() if e.id in FAST else pytest.mark.slow) for e in ALL]


# -- the catalogue itself -----------------------------------------------------------------------------------
def test_the_catalogue_covers_the_families_the_issue_asks_for():
    counts = collections.Counter(e.family for e in ALL)
    assert counts["transformers"] >= 12 and counts["timm"] >= 60, counts
    assert len([f for f in counts if f not in ("transformers", "timm")]) >= 2, counts
    assert len(BY_ID) == len(ALL), "entry ids must be unique"
    assert set(FAST) <= set(BY_ID)
    assert {BY_ID[i].family for i in FAST} == set(zoo_libraries.FAMILIES)


#: The timm layers that compute 'same' padding at run time or standardise their weight in forward.
TIMM_VARIANTS = ("Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame",
                 "MaxPool2dSame", "AvgPool2dSame", "MixedConv2d", "CondConv2d")


def _timm_variants(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()} & set(TIMM_VARIANTS)


@pytest.mark.slow
def test_every_timm_architecture_with_same_padding_or_standardised_convs_is_in_the_catalogue():
    """Builds every timm model on the meta device (about 3 minutes): each (architecture module, variant
    layer) pair timm has must occur in some timm entry of the catalogue, so new ones show up here."""
    timm = pytest.importorskip("timm")

    def pairs(name: str) -> set[tuple[str, str]]:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return {(type(model).__module__, v) for v in _timm_variants(model)}

    in_timm = set().union(*(pairs(name) for name in timm.list_models()))
    in_catalogue = set()
    for e in ALL:
        if e.family == "timm":
            with torch.device("meta"):
                model, _, _ = e.build()
            in_catalogue |= {(type(model).__module__, v) for v in _timm_variants(model)}
    assert in_timm - in_catalogue == set()


# -- every model --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _params())
def test_library_model(entry: Entry):
    model, args, kwargs = _build(entry)
    expected = kernel_weight_names(model)
    assert expected, f"{entry.id} has no kernel weights: not a zoo model"
    randomize_constant_parameters(model)
    calibrate_batch_norm(model, args, kwargs)
    before = _state(model)
    y_eval = _call(model, args, kwargs)
    model.train()
    y_train = _call(model, args, kwargs)
    assert_same(_call(model, args, kwargs, seed=2), y_train, "the catalogue: training mode without randomness")
    model.eval()
    model.load_state_dict(before)  # training-mode batch norm moved the running statistics: put them back
    flags = {name: m.training for name, m in model.named_modules()}

    t = ipfx.transform(model, example_inputs=args, example_kwargs=kwargs)

    # (e) the input model is unchanged
    after = model.state_dict()
    assert after.keys() == before.keys(), f"state dict keys changed: {sorted(after.keys() ^ before.keys())[:6]}"
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"transform changed the input model: {changed[:6]}"
    assert {name: m.training for name, m in model.named_modules()} == flags, "transform changed training flags"

    # (a) every kernel weight is rewritten, and nothing else
    rewritten = {w.name for w in ipfx.rewritten_weights(t)}
    assert rewritten == expected, \
        f"left dense: {sorted(expected - rewritten)[:8]}; not kernel weights: {sorted(rewritten - expected)[:8]}"

    # (b) outputs preserved in both modes
    assert not t.training, "the transformed model should start in the input model's (eval) mode"
    assert_same(_call(t, args, kwargs), y_eval, "transform, eval")
    t.train()
    assert_same(_call(t, args, kwargs), y_train, "transform, train")
    t.eval()

    # (c) dense lowering, with masks and bases away from their initial values
    randomize_masks(t, 0.5)
    perturb_bases(t, scale=0.1)
    y_t = _call(t, args, kwargs)
    dense = ipfx.lower(t, "dense")
    assert_same(_call(dense, args, kwargs), y_t, "lower dense, eval")
    # (d) fused lowering
    fused = ipfx.lower(t, "fused")
    assert_same(_call(fused, args, kwargs), y_t, "lower fused, eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = ipfx.lower(t, "fused", freeze=True)
    assert_same(_call(frozen, args, kwargs), y_t, "lower fused, frozen")
    del fused, frozen
    # (c) the dense state dict belongs to the original class
    torch.manual_seed(0)
    fresh, _, _ = entry.build()
    lowered_keys, own_keys = set(dense.state_dict()), set(fresh.state_dict())
    assert lowered_keys == own_keys, \
        f"missing: {sorted(own_keys - lowered_keys)[:6]}; unexpected: {sorted(lowered_keys - own_keys)[:6]}"
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert_same(_call(fresh.eval(), args, kwargs), y_t, "lower dense, loaded into the original class")
    t.train()
    dense.train()
    assert_same(_call(dense, args, kwargs), _call(t, args, kwargs), "lower dense, train")


# -- a model never called before, on a second shape, with and without example inputs -------------------------------
def _outcome(model: nn.Module, args: tuple, kwargs: dict):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _call(model, args, kwargs), None
    except Exception as exc:  # noqa: BLE001 - what was raised is the outcome
        return None, exc


def _same_outcome(result: nn.Module, model: nn.Module, args: tuple, kwargs: dict, what: str, entry: Entry) -> None:
    expected, refused = _outcome(model, args, kwargs)
    got, error = _outcome(result, args, kwargs)
    if refused is not None:  # the model refuses these inputs: so must the result
        assert error is not None, f"{what}: the model raises {refused!r}, the result computes"
    elif error is not None:  # a shape the export fixed, or (frozen: no fallback kept) a call pattern not captured
        assert (entry.id in zoo_libraries.FIXED_SHAPE and is_guard_failure(error)) or (
            what.endswith("frozen") and "and it has no fallback" in str(error)), f"{what}: raises {error!r}"
    else:
        assert_same(got, expected, what)


def _never_called_params() -> list:
    """Every entry in both modes; by default only :data:`zoo_libraries.NEVER_CALLED_FAST`, and of the entries
    in :data:`zoo_libraries.NEVER_CALLED_FAST_NO_EXAMPLE` only the mode without example inputs."""
    params = []
    for e in ALL:
        for examples in (True, False):
            fast = e.id in zoo_libraries.NEVER_CALLED_FAST and not (
                examples and e.id in zoo_libraries.NEVER_CALLED_FAST_NO_EXAMPLE)
            params.append(pytest.param(e, examples, id=f"{e.id}-{'example-inputs' if examples else 'no-example'}",
                                       marks=() if fast else pytest.mark.slow))
    return params


@pytest.mark.parametrize("entry, examples", _never_called_params())
def test_never_called_library_model_on_a_second_shape(entry: Entry, examples: bool):
    """A freshly built model (never called: detection heads still have nothing cached) transformed with and
    without example inputs: every kernel weight rewritten, the transformed model computes the model's outputs
    in eval mode on the example and on :func:`zoo_libraries.second_inputs` (one more sample, larger images or
    sequences), and so do the dense, fused and frozen (deployment) lowerings on the second, or they refuse
    where the model refuses; entries of
    :data:`zoo_libraries.FIXED_SHAPE` may refuse the second shape with ipfx's guard error instead."""
    known = zoo_libraries.KNOWN_FAILS.get((entry.id, "example-inputs" if examples else "no-example"))
    if known:
        pytest.xfail(known)
    model, args, kwargs = _build(entry)
    expected = kernel_weight_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, example_inputs=args, example_kwargs=kwargs) if examples else ipfx.transform(model)
    rewritten = {w.name for w in ipfx.rewritten_weights(t)}
    assert rewritten == expected, \
        f"left dense: {sorted(expected - rewritten)[:8]}; not kernel weights: {sorted(rewritten - expected)[:8]}"
    second = zoo_libraries.second_inputs(entry, args, kwargs)
    for inputs, what in (((args, kwargs), "example"), (second, "second shape")):
        _same_outcome(t, model, *inputs, f"never called, {what}", entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = {"dense": ipfx.lower(t, "dense"), "fused": ipfx.lower(t, "fused"),
                   "frozen": ipfx.lower(t, "fused", freeze=True)}
    for target, result in lowered.items():
        _same_outcome(result, model, *second, f"never called, second shape, lower {target}", entry)
