"""Zoo coverage: every torchvision model transforms and lowers with its outputs preserved.

For each classification, segmentation, video, detection and optical-flow model of torchvision (random
weights, eval mode, small valid inputs) :func:`check_model` asserts nothing and measures:

* rewritten: ``ipfx.rewritten_weights(t)`` names exactly the ``weight`` parameter of every
  ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear`` module of the model (subclasses
  included, e.g. ``nn.MultiheadAttention.out_proj``);
* transform: ``t(x)`` equals ``model(x)``, every output tensor compared relative to its largest magnitude
  (1e-4 in float32, 1e-9 in float64; integer tensors such as labels must be equal);
* lower: after random masks (half kept) and perturbed bases, ``ipfx.lower(t, "dense")(x)`` equals
  ``t(x)`` the same way, holds no ipfx module, and has the state_dict keys of a plain ``torch.fx`` trace
  of the model (of the model itself when it is traced in parts), ``_tensor_constant<N>`` aside;
* the training flag: ``t`` and the lowered model are in eval mode throughout.

Freshly initialised weights alone make a vacuous test for some models: ViT's head is initialised to
zero (every output is 0), ConvNeXt scales each residual branch by 1e-6 (a wrong conv weight would change
the output by 1e-6), and with batch-norm running statistics at their initial values (mean 0, variance 1)
the activations of e.g. SSDLite shrink to 1e-25 so that every output equals the last biases. So before
the reference output is computed, :func:`randomize_constant_parameters` redraws every parameter whose
entries are all equal (zero heads, layer scales, norm weights and biases), and
:func:`calibrate_batch_norm` rescales every batch norm so that its output has unit mean square on the
example input: then every output depends on every weight.

Detection models run in float64 (everything else in float32). Their outputs come after data-dependent
selection (top-k, score thresholds, non-maximum suppression, detections per image): a float32 rounding
difference of 1e-7 can swap two nearly tied scores and change which boxes come out, which says nothing
about the transform. In float64 the rounding differences (~1e-15) are far below the smallest score gaps,
so the whole output is comparable: every box, score, label, mask and keypoint. Score thresholds are set
to 0 so that the outputs are not empty with random weights (with 91 classes every softmax score is
about 1/91, below the default thresholds), and the number of proposals/detections is kept small for
speed. The float32 detection path is covered by :func:`test_detection_float32_backbone_features`,
which compares the selection-free backbone features.

The fast subset (``FAST``) runs by default; the whole zoo is ``pytest -m slow tests/test_zoo.py`` (109
models, ~6 min on one core, 14 GB of memory at the peak; a model that would not fit into the memory
available is skipped with the reason). ``benchmarks/zoo_coverage.py`` prints the same measurements as a
table. Models that fail a property
are listed in ``KNOWN_GAPS`` with the reason; the slow test asserts that each of them still fails in
exactly that way (so the list cannot go stale) and that every other property holds for them.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import re
import time
import warnings
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import ipfx
from ipfx import ModeSwitch
from ipfx.capture.shape_guards import is_guard_failure
from helpers import LEDGER, graph_modules, perturb_bases, randomize_masks, relative_error

KERNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear)
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}

FAMILIES = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
    "optical_flow": tvm.optical_flow,
}


# -- what each model is built and called with ---------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    name: str
    family: str
    kwargs: dict  # builder arguments besides weights=None
    inputs: Callable[[], tuple]  # positional inputs, built after torch.manual_seed
    call_kwargs: dict = dataclasses.field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def build(self) -> nn.Module:
        extra = {"weights_backbone": None} if self.family in ("segmentation", "detection") else {}
        model = tvm.get_model(self.name, weights=None, **extra, **self.kwargs)
        return model.to(self.dtype).eval()

    def make_inputs(self) -> tuple:
        return tuple(_to(x, self.dtype) for x in self.inputs())


def _to(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, dtype) for v in x)
    return x


def _image(*shape):
    return lambda: (torch.randn(shape),)


_VIT_SIZE = {"vit_b_16": 32, "vit_l_16": 32, "vit_b_32": 32, "vit_l_32": 32, "vit_h_14": 28}
_RCNN = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
             box_score_thresh=0.0, box_detections_per_img=10)
_ONE_STAGE = dict(min_size=64, max_size=64, score_thresh=0.0, topk_candidates=100, detections_per_img=10)
_SSD = dict(score_thresh=0.0, topk_candidates=100, detections_per_img=10)


def spec(name: str) -> Spec:
    """How ``name`` is built and called: random weights, small inputs that the architecture accepts."""
    family = next(f for f, module in FAMILIES.items() if name in tvm.list_models(module=module))
    if family == "classification":
        if name in _VIT_SIZE:  # the position embedding fixes the image size; pass a small one
            s = _VIT_SIZE[name]
            return Spec(name, family, {"image_size": s}, _image(1, 3, s, s))
        if name == "maxvit_t":  # the window/grid partitions fix the input size
            return Spec(name, family, {"input_size": (224, 224)}, _image(1, 3, 224, 224))
        if name == "inception_v3":  # needs at least 75x75
            return Spec(name, family, {}, _image(1, 3, 80, 80))
        return Spec(name, family, {}, _image(1, 3, 64, 64))
    if family == "segmentation":
        return Spec(name, family, {}, _image(1, 3, 64, 64))
    if family == "video":
        if name == "s3d":  # final AvgPool3d((2, 7, 7)) after /8 in time and /32 in space
            return Spec(name, family, {}, _image(1, 3, 16, 224, 224))
        if name.startswith("mvit"):  # position embeddings fixed to 16x224x224
            return Spec(name, family, {}, _image(1, 3, 16, 224, 224))
        return Spec(name, family, {}, _image(1, 3, 4, 32, 32))
    if family == "detection":
        images = lambda: ([torch.rand(3, 64, 64)],)  # noqa: E731
        if name.startswith("ssd"):  # fixed 300x300 / 320x320 internal size
            return Spec(name, family, dict(_SSD), images, dtype=torch.float64)
        if "rcnn" in name:
            return Spec(name, family, dict(_RCNN), images, dtype=torch.float64)
        return Spec(name, family, dict(_ONE_STAGE), images, dtype=torch.float64)
    # optical flow: two frames (the correlation pyramid needs 128x128), a couple of refinement steps
    return Spec(name, family, {}, lambda: (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)),
                call_kwargs={"num_flow_updates": 2})


ALL = sorted(name for module in FAMILIES.values() for name in tvm.list_models(module=module))

#: Run by default: one or two models per family, chosen to cover different kinds of graphs (grouped
#: convolutions and channel shuffles, ASPP-style heads, 3-d convolutions, partial tracing of a detector,
#: loops in RAFT). About 10 s on one thread.
FAST = [
    "resnet18",
    "shufflenet_v2_x0_5",
    "lraspp_mobilenet_v3_large",
    "r2plus1d_18",
    "ssdlite320_mobilenet_v3_large",
    "raft_small",
]


class Gap(NamedTuple):
    kinds: tuple[str, ...]  # the properties that fail: "rewritten", "transform", "lower"
    reason: str
    missing: str = ""  # for "rewritten": a regex that every weight left dense must match (fullmatch)


#: Models that fail some property, and why (none at present). The tests assert that each still fails exactly
#: there (and that every other property holds), so the list cannot go stale.
KNOWN_GAPS: dict[str, Gap] = {}


# -- measuring one model ----------------------------------------------------------------------------------
def kernel_weights(model: nn.Module) -> set[str]:
    """``<module>.weight`` of every conv/transposed conv/linear module (subclasses included), plus the
    input projections ``nn.MultiheadAttention`` holds as raw parameters (``in_proj_weight`` or q/k/v)."""
    names = {f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, KERNEL_TYPES) and isinstance(m._parameters.get("weight"), nn.Parameter)}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            names |= {f"{name}.{p}" for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                      if m._parameters.get(p) is not None}
    return names


def flatten(out: Any, path: str = "out") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a nested output (tensors, lists, tuples, dicts; ``None`` as an empty tensor), with
    where it sits."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if out is None:  # an optional output left out (torchaudio's lengths when none were given)
        return [(path, torch.empty(0))]
    if isinstance(out, dict):
        return [item for key, v in out.items() for item in flatten(v, f"{path}[{key!r}]")]
    if isinstance(out, (list, tuple)):
        return [item for i, v in enumerate(out) for item in flatten(v, f"{path}[{i}]")]
    raise TypeError(f"unexpected output type {type(out).__name__} at {path}")


def compare(actual: Any, expected: Any, kind: str) -> tuple[float, list[str]]:
    """(worst relative error over the float tensors, the mismatches found)."""
    a, e = flatten(actual), flatten(expected)
    if [p for p, _ in a] != [p for p, _ in e]:
        return float("inf"), [f"output structure differs: {[p for p, _ in a]} vs {[p for p, _ in e]}"]
    worst, bad = 0.0, []
    for (path, x), (_, y) in zip(a, e):
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(f"{path}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            worst = float("inf")
        elif not y.is_floating_point():
            if not torch.equal(x, y):
                bad.append(f"{path}: integer values differ")
                worst = float("inf")
        else:
            rel = relative_error(x, y)
            LEDGER.add(kind, rel)
            worst = max(worst, rel)
            if not rel <= RTOL[y.dtype]:  # also catches NaN
                bad.append(f"{path}: relative error {rel:.3g} > {RTOL[y.dtype]:g}")
    return worst, bad


@dataclasses.dataclass
class Result:
    name: str
    family: str
    params: int = 0
    expected: int = 0
    rewritten: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)  # kernel weights left dense
    unexpected: list[str] = dataclasses.field(default_factory=list)  # rewritten but not expected
    partial: bool = False  # torch.fx could not trace the model as a whole
    transform_s: float = 0.0
    total_s: float = 0.0
    err_transform: float = float("nan")
    err_lower: float = float("nan")
    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # kind -> messages
    skipped: str = ""  # why the model was not run

    @property
    def kinds(self) -> set[str]:
        return {k for k, v in self.problems.items() if v}

    def add(self, kind: str, messages: list[str]) -> None:
        if messages:
            self.problems.setdefault(kind, []).extend(messages)


@torch.no_grad()
def randomize_constant_parameters(model: nn.Module, seed: int = 0) -> list[str]:
    """Redraw every parameter whose entries are all equal; returns their names.

    Vectors (norm weights and biases, layer scales, biases) get U(0.5, 1.5), matrices and kernels
    N(0, 1/fan_in), like a default initialisation.
    """
    g = torch.Generator().manual_seed(seed)
    redrawn = []
    for name, p in model.named_parameters():
        if p.numel() < 2 or not p.is_floating_point() or not torch.all(p == p.reshape(-1)[0]):
            continue
        if p.dim() <= 1:
            new = torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5
        else:
            new = torch.randn(p.shape, generator=g, dtype=torch.float64) / p[0].numel() ** 0.5
        p.copy_(new.to(p.dtype))
        redrawn.append(name)
    return redrawn


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, inputs: tuple, call_kwargs: dict) -> None:
    """Scale each batch norm's input to unit mean square on ``inputs`` (eval mode, one pass).

    Sets ``running_mean = 0`` and ``running_var`` to the mean square of the layer's input over all its
    channels: one number per layer, so the layer rescales without changing relative errors. (Per-channel
    centred statistics from a single small input would blow up nearly constant channels, and with them
    float rounding, by orders of magnitude.)
    """

    def set_stats(m, args):
        power = args[0].double().square().mean()
        m.running_mean.zero_()
        m.running_var.fill_(power.item() if power > 0 else 1.0)

    handles = [m.register_forward_pre_hook(set_stats) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    try:
        model(*inputs, **call_kwargs)
    finally:
        for h in handles:
            h.remove()


def _runtime_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that run: a ModeSwitch (a model whose graph depends on the training flag) runs one of
    its two graph modules, which share its children."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ModeSwitch):
            out += [(f"{name}<{mode}>", gm) for mode, gm in graph_modules(m).items()]
        else:
            out.append((name, m))
    return out


def _all_eval(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if m.training]


def _fx_constant(key: str) -> bool:
    """torch.fx stores tensors created in forward as ``_tensor_constant<N>`` buffers (a plain trace too)."""
    return key.rpartition(".")[2].startswith("_tensor_constant")


def _plain_trace_keys(model: nn.Module) -> set[str] | None:
    """The state_dict keys of a plain torch.fx trace of ``model``; ``None`` if it does not trace.

    A plain trace drops what its graph never reads and buffers it reads as constants. ipfx traces in
    both modes (auxiliary heads run only in training), so the reference is the union of a plain trace
    in train mode and one in eval mode. The constants the tracer attaches to ``model`` are removed again.
    """
    before = set(vars(model))
    flags = {m: m.training for m in model.modules()}
    try:
        keys = set()
        for mode in (True, False):
            model.train(mode)
            keys |= set(fx.GraphModule(model, fx.Tracer().trace(model)).state_dict())
        return keys
    except Exception:  # noqa: BLE001 - untraceable as a whole
        return None
    finally:
        for key in set(vars(model)) - before:
            del model.__dict__[key]
        for m, flag in flags.items():
            m.training = flag


def memory_check(s: Spec) -> str:
    """Why ``s`` cannot run here ("" if it can): at the peak, while ``ipfx.lower`` copies the transformed
    model (coefficients and masks) and folds it, about five copies of the weights are alive, 14 GB for
    regnet_y_128gf (650M parameters). The size comes from torchvision's weight metadata (nothing is
    downloaded), else from a build on the meta device."""
    try:
        counts = [w.meta.get("num_params", 0) for w in tvm.get_model_weights(s.name)]
        if counts and max(counts):
            weights = max(counts) * torch.finfo(s.dtype).bits // 8
        else:
            with torch.device("meta"):
                weights = sum(p.numel() * p.element_size() for p in s.build().parameters())
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except Exception:  # noqa: BLE001 - no estimate: just try
        return ""
    needed = 6 * weights + 2**30
    if needed <= available:
        return ""
    return f"needs about {needed / 2**30:.0f} GiB of memory, {available / 2**30:.0f} GiB available"


def check_model(name: str) -> Result:
    """Transform and lower ``name``; measure every property of the module docstring (asserts nothing).

    An exception is recorded under the stage it happened in: "build" (the zoo's own set-up),
    "transform" (transforming or running the transformed model) or "lower". A model that would not
    fit into the memory available is not run (``skipped`` says why).
    """
    r = Result(name, spec(name).family)
    r.skipped = memory_check(spec(name))
    if r.skipped:
        return r
    start = time.perf_counter()
    try:
        _measure(spec(name), r)
    finally:
        gc.collect()  # the big models need their memory back before the next one is built
    r.total_s = time.perf_counter() - start
    return r


def _measure(s: Spec, r: Result) -> None:
    stage = "build"
    try:
        torch.manual_seed(0)
        model = s.build()
        inputs = s.make_inputs()
        r.params = sum(p.numel() for p in model.parameters())
        expected = kernel_weights(model)
        randomize_constant_parameters(model)
        calibrate_batch_norm(model, inputs, s.call_kwargs)
        own_keys, plain_keys = set(model.state_dict()), _plain_trace_keys(model)
        with torch.no_grad():
            y = model(*inputs, **s.call_kwargs)
        stage = "transform"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            t = ipfx.transform(model)
            r.transform_s = time.perf_counter() - t0
        del model  # only copies from here on: keep the peak memory of the largest models down
        gc.collect()  # (tracing leaves reference cycles behind)
        r.partial = any("as a whole" in str(w.message) for w in caught)
        rewritten = {w.name for w in ipfx.rewritten_weights(t)}
        r.expected, r.rewritten = len(expected), len(rewritten)
        r.missing, r.unexpected = sorted(expected - rewritten), sorted(rewritten - expected)
        r.add("rewritten", [f"left dense: {', '.join(r.missing)}"] if r.missing else [])
        r.add("rewritten", [f"not a module kernel: {', '.join(r.unexpected)}"] if r.unexpected else [])
        r.add("transform", [f"in training mode: {m}" for m in _all_eval(t)])
        with torch.no_grad():
            r.err_transform, bad = compare(t(*inputs, **s.call_kwargs), y, "zoo: transform")
            r.add("transform", bad)
            randomize_masks(t, 0.5)
            perturb_bases(t, scale=0.1)
            y = t(*inputs, **s.call_kwargs)
            stage = "lower"
            dense = ipfx.lower(t, "dense")
            del t
            gc.collect()
            r.err_lower, bad = compare(dense(*inputs, **s.call_kwargs), y, "zoo: lower dense")
        r.add("lower", bad)
        r.add("lower", [f"ipfx module left: {n}" for n, m in _runtime_modules(dense)
                        if type(m).__module__.startswith("ipfx")])
        keys = {k for k in dense.state_dict() if not _fx_constant(k)}
        # at least what a plain torch.fx trace keeps (it drops unused modules), at most the model's own keys
        # (a module registered under two names keeps both)
        must = own_keys if r.partial or plain_keys is None else plain_keys
        must, own = ({k for k in keys_ if not _fx_constant(k)} for keys_ in (must, own_keys))
        r.add("lower", [f"state_dict lacks {sorted(must - keys)[:4]}"] if must - keys else [])
        r.add("lower", [f"state_dict adds {sorted(keys - own)[:4]}"] if keys - own else [])
        r.add("lower", [f"in training mode: {m}" for m in _all_eval(dense)])
    except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
        r.add(stage, [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])


def describe(r: Result) -> str:
    return "; ".join(f"[{k}] " + " | ".join(v) for k, v in r.problems.items() if v) or "ok"


def assert_model(r: Result) -> None:
    if r.skipped:
        pytest.skip(f"{r.name}: {r.skipped}")
    gap = KNOWN_GAPS.get(r.name)
    if gap is None:
        assert not r.kinds, f"{r.name}: {describe(r)}"
        return
    assert r.kinds, f"{r.name} passes now: remove it from KNOWN_GAPS ({gap.reason})"
    assert r.kinds == set(gap.kinds), \
        f"{r.name} was known to fail only {sorted(gap.kinds)} ({gap.reason}), now: {describe(r)}"
    if gap.missing:
        other = [w for w in r.missing if not re.fullmatch(gap.missing, w)]
        assert not other and not r.unexpected, f"{r.name}: more weights left dense than known: {other}"


# -- the tests ----------------------------------------------------------------------------------------------
def test_the_zoo_lists_every_family_and_the_gaps_are_real_models():
    assert all(any(spec(n).family == f for n in ALL) for f in FAMILIES)
    assert set(FAST) <= set(ALL) and set(KNOWN_GAPS) <= set(ALL)
    assert not set(FAST) & set(KNOWN_GAPS), "the fast subset is made of models that pass"
    assert {spec(n).family for n in FAST} == set(FAMILIES)


@pytest.mark.parametrize("name", FAST)
def test_fast_zoo_subset(name):
    assert_model(check_model(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_whole_zoo(name):
    assert_model(check_model(name))


def test_detection_float32_backbone_features():
    """Float32 detectors: the selection-free part (backbone + FPN features) is preserved exactly."""
    torch.manual_seed(0)
    model = tvm.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, **_RCNN).eval()
    with pytest.warns(UserWarning, match="could not trace FasterRCNN as a whole"):
        t = ipfx.transform(model)
    assert isinstance(t.backbone, torch.fx.GraphModule)
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        batch, _ = model.transform(images)
        worst, bad = compare(t.backbone(batch.tensors), model.backbone(batch.tensors), "zoo: detection float32")
        assert not bad, bad
        out = t(images)  # the whole float32 model runs, with the outputs' structure unchanged
    assert [p for p, _ in flatten(out)] == [p for p, _ in flatten(model(images))]


#: Models whose result refuses the second shape with ipfx's guard error, and why.
FIXED_SHAPE = {
    **{name: "batch: RAFT runs both frames through one encoder (torch.cat on the batch, then chunk); exported "
             "on two samples (ipfx's way to free a one-sample batch), torch.export assumes the chunk is not of "
             "size 1 and guards batch != 1, which the one-sample example fails, so ipfx keeps the example's batch"
       for name in ("raft_small", "raft_large")},
    "mvit_v2_s": "batch: exported on two samples, torch.export guards a size derived from the batch against 1 "
                 "(`5376 * n * k // 448 != 5376 * k // 448`), which the one-sample example fails, so ipfx keeps "
                 "the example's batch (and says so at transform)",
    "alexnet": "height and width: on the 64x64 example the last feature map is 1x1; torch's contiguity check "
               "guards that size being 1 and torch.export cannot solve the guard for the input size, so the "
               "dynamic export fails and the example's size is kept (a 96x96 example exports with free sizes)",
    **{name: "height and width: torchvision's shifted-window attention pads each map to whole windows and "
             "compares the padded size with the window in Python (`if window_size >= pad_H: shift = 0`); "
             "torch.export specialises those decisions to the example's size"
       for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")},
}


def _second_inputs(s: Spec, inputs: tuple) -> tuple:
    """One more sample and, for images and clips, a larger frame: what a model meets after its example."""
    def grow(x):
        if isinstance(x, list):  # detection: a list of images of their own sizes
            return [*x, torch.rand(3, 80, 72, dtype=x[0].dtype)]
        x = x[torch.arange(x.shape[0] + 1) % x.shape[0]]
        if s.family in ("classification", "segmentation") and s.name not in _VIT_SIZE and s.name != "maxvit_t":
            x = F.interpolate(x, size=(x.shape[2] + 32, x.shape[3] + 32))
        return x

    return tuple(grow(x) for x in inputs)


def _untie_scores(model: nn.Module, s: Spec, inputs: tuple) -> None:
    """Give a detector scores without ties, and leave it never called: with random weights every class
    score of some detectors is the same 1/91, so top-k and NMS order ties arbitrarily (module docstring).
    The weights are set up on a copy (:func:`randomize_constant_parameters`, :func:`calibrate_batch_norm`,
    which calls it) and only the tensors come back: whatever the copy's calls cached stays on the copy."""
    twin = copy.deepcopy(model)
    randomize_constant_parameters(twin)
    calibrate_batch_norm(twin, inputs, s.call_kwargs)
    model.load_state_dict(twin.state_dict())


# 35 s each with examples (raft, ssdlite), or 10-15 s both ways (the others; test_fast_zoo_subset covers them)
_NEVER_CALLED_SLOW = ("raft_small", "ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                      "shufflenet_v2_x0_5", "r2plus1d_18")


@pytest.mark.parametrize("examples", [True, False], ids=["example-inputs", "no-example"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST and n not in _NEVER_CALLED_SLOW
                                               else pytest.mark.slow) for n in ALL])
def test_never_called_model_on_a_second_shape(name, examples):
    """A freshly built model, transformed with and without example inputs: every kernel weight rewritten,
    and the transformed, dense and fused models compute the model's outputs in eval mode on the example and
    on one more sample in a larger frame (or refuse it with ipfx's guard error, for :data:`FIXED_SHAPE`)."""
    s = spec(name)
    too_big = memory_check(s)
    if too_big:
        pytest.skip(f"{name}: {too_big}")
    torch.manual_seed(0)
    model = s.build()
    x = s.make_inputs()
    if s.family == "detection":
        _untie_scores(model, s, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, example_inputs=x, example_kwargs=s.call_kwargs) if examples else ipfx.transform(model)
    rewritten = {w.name for w in ipfx.rewritten_weights(t)}
    assert rewritten == kernel_weights(model), f"left dense: {sorted(kernel_weights(model) - rewritten)[:8]}"
    results = {"transformed": t}
    for inputs, what in ((x, "example"), (_second_inputs(s, x), "second shape")):
        with torch.no_grad():
            expected = model(*inputs, **s.call_kwargs)
        if what == "second shape":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.update(dense=ipfx.lower(t, "dense"), fused=ipfx.lower(t, "fused"))
        for kind, result in results.items():
            with torch.no_grad():
                try:
                    got = result(*inputs, **s.call_kwargs)
                except AssertionError as exc:  # a size torch.export had to fix (FIXED_SHAPE says which, and why)
                    assert examples and name in FIXED_SHAPE and is_guard_failure(exc), exc
                    continue
                _, bad = compare(got, expected, f"zoo: {what}, {kind}")
            assert not bad, f"{name}, {kind}, on {[tuple(getattr(i, 'shape', ())) for i in inputs]}: {bad}"
