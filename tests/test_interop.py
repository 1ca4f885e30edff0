"""Interop: transformed and lowered models work with the rest of PyTorch, and keep the model's details.

* torch.compile: a training step of the compiled transformed model equals eager, and masked coefficients
  get exactly zero gradient (``aot_eager`` by default; ``inductor`` is slow on CPU, ~45 s to compile,
  and marked slow);
* torch.export (beyond ``test_lower``): a dynamic batch dimension for the transformed model and both
  lowerings, and training through the exported transformed model (the mask stays a buffer);
* ONNX export of the dense-lowered model (TorchScript-based and dynamo-based exporters), run by ONNX Runtime;
* strict state_dict round trips, deepcopy, ``torch.save`` of whole modules (also partially traced ones);
* dtypes bfloat16, float16, float64 (transform in that dtype, or convert a transformed model);
* channels_last models and inputs; CUDA (skipped without a GPU; the same code runs on the CPU here);
* DDP training with two gloo processes: identical parameters on both ranks, all-reduced gradients,
  masked coefficients keep zero gradient;
* model details: buffers (persistent or not), training flags, weights shared between modules, modules
  called several times, forward hooks (leaf modules keep theirs; hooks on traced-through modules are
  reported, and run once at trace time on torch.fx proxies, so a hook's returned value is part of the graph).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ipfx
from helpers import RTOL, assert_close, perturb_bases, randomize_masks
from gloo import run_on_ranks
from strategies import TinyResNet


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def prepared(model: nn.Module | None = None, keep: float = 0.5, seed: int = 0, **kwargs) -> nn.Module:
    """A transformed model with random masks and perturbed bases (so lowering has something to fold)."""
    model = TinyResNet(seed=0, width=4) if model is None else model
    t = quiet(ipfx.transform, model, **kwargs)
    randomize_masks(t, keep, seed=seed)
    perturb_bases(t, seed=seed)
    return t


def weights(model: nn.Module) -> dict[str, ipfx.BasisWeight]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ipfx.BasisWeight)}


def assert_masked_grads_zero(model: nn.Module) -> int:
    """Every masked coefficient has an exactly zero gradient; returns how many were checked."""
    checked = 0
    for name, m in weights(model).items():
        assert m.coeff.grad is not None, name
        masked = m.coeff.grad[m.mask == 0]
        assert torch.all(masked == 0), f"{name}: masked coefficients got gradient {masked.abs().max():.3g}"
        checked += masked.numel()
    assert checked > 0
    return checked


def batch(n: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


# -- torch.compile -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_training_step_equals_eager(backend):
    torch._dynamo.reset()
    eager = prepared()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled_model)]
    before = {n: m.coeff.detach().clone() for n, m in weights(eager).items()}
    for step in range(2):
        x, y = batch(seed=step)
        losses = []
        for fn, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            loss = F.cross_entropy(fn(x), y)
            loss.backward()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], kind=f"compile {backend}: loss")
        assert_masked_grads_zero(compiled_model)
        grads = dict(compiled_model.named_parameters())
        for name, p in eager.named_parameters():
            assert_close(grads[name].grad, p.grad, kind=f"compile {backend}: grads")
        for opt in opts:
            opt.step()
    for name, m in weights(compiled_model).items():  # no weight decay: masked coefficients never move
        assert torch.equal(m.coeff.detach()[m.mask == 0], before[name][m.mask == 0]), name
    eager.eval(), compiled_model.eval()
    x, _ = batch(seed=5)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), kind=f"compile {backend}: eval after training")


# -- torch.export ----------------------------------------------------------------------------------------------
def test_torch_export_with_a_dynamic_batch_dimension():
    t = prepared().eval()
    x, _ = batch(2)
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    with torch.no_grad():
        for name, m in (("transformed", t), ("dense", ipfx.lower(t)), ("fused", quiet(ipfx.lower, t, "fused"))):
            ep = torch.export.export(m, (x,), dynamic_shapes=dims)
            for n in (3, 5):
                xn, _ = batch(n, seed=n)
                assert_close(ep.module()(xn), t(xn), kind=f"export dynamic: {name}")


def test_training_through_the_exported_transformed_model():
    t = prepared()  # train mode: batch norm uses batch statistics
    reference = copy.deepcopy(t)
    x, y = batch()
    ep = torch.export.export(t, (x,))
    masks = [f"{name}.mask" for name in weights(t)]
    assert set(masks) <= set(ep.graph_signature.buffers), "masks must stay buffers, not constants"
    exported = ep.module()
    loss = F.cross_entropy(exported(x), y)
    loss.backward()
    expected = F.cross_entropy(reference(x), y)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), kind="export: training loss")
    params, buffers = dict(exported.named_parameters()), dict(exported.named_buffers())
    for name, m in weights(reference).items():
        grad = params[f"{name}.coeff"].grad
        assert torch.all(grad[buffers[f"{name}.mask"] == 0] == 0), name
        assert_close(grad, m.coeff.grad, kind="export: coefficient gradients")


# -- ONNX ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_the_dense_lowering_runs_in_onnxruntime(dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo-based exporter translates through onnxscript
    model = TinyResNet(seed=0, width=4).eval()
    dense = ipfx.lower(prepared(model).eval())
    x, _ = batch(2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        if dynamo:
            torch.onnx.export(dense, (x,), buf, dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}, verbose=False)
        else:
            torch.onnx.export(dense, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    ops = [node.op_type for node in proto.graph.node]
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops.count("Conv") == convs, ops  # plain convolutions with folded weights
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n in (2, 3):
            xn, _ = batch(n, seed=n)
            (y,) = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
            assert_close(torch.from_numpy(y), dense(xn), kind=f"onnx ({'dynamo' if dynamo else 'torchscript'})")


# -- state, copies, pickling ---------------------------------------------------------------------------------
class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


class Untraceable(nn.Module):
    """Control flow in the root's own forward (kept as Python), which reads a plain attribute of a child."""

    def __init__(self):
        super().__init__()
        self.body = Body()
        self.body.out_channels = 4  # a plain attribute, read by untraced code (like RAFT's hidden_state_size)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        h = self.body(x)[:, : self.body.out_channels]
        if h.mean() > 100:  # data-dependent: torch.fx cannot trace this
            h = -h
        return self.head(h)


def test_strict_state_dict_round_trips():
    t = prepared()
    x, _ = batch()
    t.eval()
    with torch.no_grad():
        y = t(x)
    # into a freshly transformed model of another initialisation
    fresh = quiet(ipfx.transform, TinyResNet(seed=1, width=4)).eval()
    fresh.load_state_dict(t.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh(x), y, kind="state_dict: transformed", rtol=0)
    assert ipfx.sparsity(fresh) == ipfx.sparsity(t) > 0
    # the dense lowering's state_dict loads into the original architecture
    plain = TinyResNet(seed=1, width=4).eval()
    plain.load_state_dict(ipfx.lower(t).state_dict(), strict=True)
    with torch.no_grad():
        assert_close(plain(x), y, kind="state_dict: dense into the original class")


def test_deepcopy_is_equal_and_independent():
    t = prepared(share_basis=True)
    c = copy.deepcopy(t)
    x, _ = batch()
    t.eval(), c.eval()
    with torch.no_grad():
        assert_close(c(x), t(x), kind="deepcopy", rtol=0)
        c.get_submodule("conv1").mask.zero_()
        assert ipfx.sparsity(c) > ipfx.sparsity(t)
        assert not torch.equal(c(x), t(x))
    # a basis shared by several layers stays shared inside the copy, and is not the original's
    shared = [m.basis for m in weights(c).values() if m.basis is not None]
    assert len(shared) > 1 and all(b is shared[0] for b in shared)
    assert shared[0] is not weights(t)["conv1"].basis


def test_partially_traced_models_copy_save_and_lower():
    """Plain attributes that untraced code reads off a traced child survive deepcopy, pickling and lowering."""
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="could not trace Untraceable as a whole"):
        t = ipfx.transform(model)
    assert isinstance(t.body, fx.GraphModule) and t.body.out_channels == 4
    randomize_masks(t, 0.5)
    with torch.no_grad():
        y = t(x)
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        assert_close(torch.load(buf, weights_only=False)(x), y, kind="partial: torch.save")
        assert_close(copy.deepcopy(t)(x), y, kind="partial: deepcopy")
        assert_close(ipfx.lower(t)(x), y, kind="partial: lower")


def test_torch_save_of_whole_modules():
    t = prepared()
    x, y = batch()
    for name, m in (("transformed", t), ("dense", ipfx.lower(t)), ("fused", quiet(ipfx.lower, t, "fused"))):
        m.eval()
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():  # the fused op picks its evaluation order by timing: equal up to rounding
            assert_close(loaded(x), m(x), kind=f"torch.save: {name}", rtol=None if name == "fused" else 0)
        assert set(loaded.state_dict()) == set(m.state_dict())
    # the reloaded transformed model is still transformed and trains with its masks
    loaded = torch.load(_saved(t), weights_only=False)
    assert [w.name for w in ipfx.rewritten_weights(loaded)] == [w.name for w in ipfx.rewritten_weights(t)]
    loaded.train()
    F.cross_entropy(loaded(x), y).backward()
    assert_masked_grads_zero(loaded)


def _saved(module: nn.Module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


# -- dtypes and memory formats -------------------------------------------------------------------------------
DTYPES = [torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transforming_a_model_in_another_dtype(dtype):
    model = TinyResNet(seed=0, width=4).to(dtype).eval()
    x, _ = batch(2, dtype=dtype)
    t = quiet(ipfx.transform, model)
    for name, m in weights(t).items():
        tensors = [m.coeff, m.mask] + ([m.basis] if m.basis is not None else [])
        assert all(v.dtype == dtype for v in tensors), name
    with torch.no_grad():
        assert_close(t(x), model(x), kind=f"dtype {dtype}: transform")
        randomize_masks(t, 0.5)
        y = t(x)
        for target in ("dense", "fused"):
            lowered = quiet(ipfx.lower, t, target)
            assert all(p.dtype == dtype for p in lowered.parameters())
            assert_close(lowered(x), y, kind=f"dtype {dtype}: lower {target}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_converting_a_transformed_model_to_another_dtype(dtype):
    model = TinyResNet(seed=0, width=4).eval()
    t = quiet(ipfx.transform, model).to(dtype)
    x, _ = batch(2, dtype=dtype)
    assert all(p.dtype == dtype for p in t.parameters()) and all(m.mask.dtype == dtype for m in weights(t).values())
    with torch.no_grad():
        # coefficients were computed in float32: compare at the coarser of the two precisions
        tol = max(RTOL[dtype], RTOL[torch.float32])
        assert_close(t(x), model.to(dtype)(x), kind=f"dtype {dtype}: converted after transform", rtol=tol)
        assert_close(ipfx.lower(t)(x), t(x), kind=f"dtype {dtype}: converted, lowered")


def _cl_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Conv2d(8, 4, 1)).eval()


def test_channels_last_models_and_inputs():
    model = _cl_net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    t = quiet(ipfx.transform, model)
    with torch.no_grad():
        assert_close(t(x), model(x), kind="channels_last: transform")
        assert cl(t(x)) and cl(model(x))  # activations stay channels_last
        randomize_masks(t, 0.5)
        perturb_bases(t)
        y = t(x)
        dense, fused = ipfx.lower(t), quiet(ipfx.lower, t, "fused")
        assert_close(dense(x), y, kind="channels_last: dense")
        assert cl(dense(x))
        assert_close(fused(x), y, kind="channels_last: fused")
        # converting the transformed model afterwards works too
        t2 = quiet(ipfx.transform, _cl_net()).to(memory_format=torch.channels_last)
        assert_close(t2(x), _cl_net()(x), kind="channels_last: converted after transform")


def test_dense_lowering_keeps_channels_last_weights():
    """Deployment speed: weights stored channels_last in the original come back channels_last."""
    model = _cl_net().to(memory_format=torch.channels_last)
    dense = ipfx.lower(prepared(model))
    original = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        if p.dim() == 4:
            assert cl(p) == cl(original[name]), f"{name} lost its channels_last layout"


# -- devices ---------------------------------------------------------------------------------------------------
def _device_round_trip(device: str) -> None:
    model = TinyResNet(seed=0, width=4).to(device)
    x, y = (v.to(device) for v in batch())
    t = quiet(ipfx.transform, model)
    assert all(v.device.type == device for v in [*t.parameters(), *t.buffers()])
    model.eval(), t.eval()
    with torch.no_grad():
        assert_close(t(x), model(x), kind=f"{device}: transform")
    randomize_masks(t, 0.5)  # masks are drawn on the CPU and copied in place
    t.train()
    F.cross_entropy(t(x), y).backward()
    assert_masked_grads_zero(t)
    t.eval()
    with torch.no_grad():
        out = t(x)
        for target in ("dense", "fused"):
            lowered = quiet(ipfx.lower, t, target)
            assert all(p.device.type == device for p in lowered.parameters())
            assert_close(lowered(x), out, kind=f"{device}: lower {target}")
    # a model transformed on the CPU moves over, shared bases staying shared
    moved = quiet(ipfx.transform, TinyResNet(seed=0, width=4).eval(), share_basis=True).to(device)
    bases = [m.basis for m in weights(moved).values() if m.basis is not None]
    assert all(b is bases[0] for b in bases) and bases[0].device.type == device
    with torch.no_grad():
        assert_close(moved(x), model(x), kind=f"{device}: moved after transform")


def test_device_round_trip_on_cpu():
    _device_round_trip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_round_trip_on_cuda():
    _device_round_trip("cuda")


# -- DDP -------------------------------------------------------------------------------------------------------
WORLD = 2
DDP_STEPS = 3


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _ddp_train(rank: int) -> dict:
    def gather(t):
        out = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(out, t.contiguous())
        return out

    model = prepared()  # seeded: the same masks and bases on every rank
    local = prepared()  # a plain replica: this rank's own gradient, for comparison
    initial = {n: m.coeff.detach().clone() for n, m in weights(model).items()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    steps = []
    for step in range(DDP_STEPS):
        x, y = batch(seed=100 * rank + step)
        local.load_state_dict(model.state_dict())
        local.zero_grad()
        F.cross_entropy(local(x), y).backward()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        params, local_params = dict(model.named_parameters()), dict(local.named_parameters())
        grad = _flat(params[n].grad for n in names)
        own = _flat(local_params[n].grad for n in names)
        mean = torch.stack(gather(own)).mean(0)
        steps.append({
            "err_to_mean": float((grad - mean).abs().max() / mean.abs().max()),
            "err_to_own": float((grad - own).abs().max() / mean.abs().max()),
            "masked_grad": max(float(m.coeff.grad[m.mask == 0].abs().max()) for m in weights(model).values()),
        })
        opt.step()
    params = _flat(model.parameters())
    masks = _flat(m.mask for m in weights(model).values())
    return {
        "steps": steps,
        "params_same": all(torch.equal(p, params) for p in gather(params)),
        "masks_same": all(torch.equal(m, masks) for m in gather(masks)),
        "masked_kept": all(torch.equal(m.coeff.detach()[m.mask == 0], initial[n][m.mask == 0])
                           for n, m in weights(model).items()),
        "trained": any(not torch.equal(m.coeff.detach(), initial[n]) for n, m in weights(model).items()),
    }


@pytest.mark.slow  # 12 s; tests/test_ddp.py trains data-parallel over two gloo processes by default
def test_ddp_training_with_two_gloo_processes(tmp_path):
    results = run_on_ranks(_ddp_train, str(tmp_path), WORLD)
    for r in results:
        assert r["params_same"] and r["masks_same"] and r["masked_kept"] and r["trained"], r
        assert len(r["steps"]) == DDP_STEPS
        for s in r["steps"]:
            assert s["err_to_mean"] < 1e-6, s  # DDP averaged the ranks' gradients
            assert s["err_to_own"] > 1e-3, s  # ... which differ, or the test shows nothing
            assert s["masked_grad"] == 0, s


# -- model details -------------------------------------------------------------------------------------------
class BufferConv(nn.Conv2d):
    """A conv subclass with its own buffers, one persistent and one not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.full((self.out_channels, 1, 1), 2.0))
        self.register_buffer("offset", torch.full((self.out_channels, 1, 1), 0.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.gain + self.offset


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = BufferConv(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.block.register_buffer("shift", torch.ones(1) * 0.25, persistent=False)
        self.register_buffer("scale", torch.ones(1) * 3.0, persistent=False)
        self.register_buffer("bias", torch.ones(1) * 4.0)

    def forward(self, x):
        return self.block(self.conv(x)) * self.scale + self.bias + self.block.shift


def _buffer_split(model: nn.Module) -> tuple[set, set]:
    """(persistent, non-persistent) buffer names, leaving out ipfx's own state (masks, fixed bases, and
    the kept coefficients and their indices of the fused lowering)."""
    state = set(model.state_dict())
    names = {n for n, _ in model.named_buffers() if n.rpartition(".")[2] not in ("mask", "basis", "values", "indices")}
    return names & state, names - state


def test_buffers_keep_their_persistence_through_transform_lower_copy_and_save():
    model = Buffers().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = _buffer_split(model)
    assert expected == ({"conv.gain", "block.1.running_mean", "block.1.running_var", "block.1.num_batches_tracked",
                         "bias"}, {"conv.offset", "block.shift", "scale"})
    t = prepared(model)
    y = t(x)
    for name, m in (("transformed", t), ("dense", ipfx.lower(t)), ("fused", quiet(ipfx.lower, t, "fused")),
                    ("deepcopy", copy.deepcopy(t)), ("torch.save", torch.load(_saved(t), weights_only=False))):
        assert _buffer_split(m) == expected, name
        with torch.no_grad():
            assert_close(m(x), y.detach(), kind=f"buffers: {name}")
    assert set(ipfx.lower(t).state_dict()) == set(model.state_dict())


def test_training_flags_survive_transform_and_lower():
    model = TinyResNet(seed=0, width=4).train()
    model.bn1.eval()
    model.layer2.eval()  # the whole block, batch norms included
    flags = {n: m.training for n, m in model.named_modules()}
    x, _ = batch()
    t = quiet(ipfx.transform, model)
    with torch.no_grad():  # mixed modes: bn1 and layer2 use running statistics, layer1 batch statistics
        assert_close(t(x), copy.deepcopy(model)(x), kind="training flags: mixed modes")
    for name, m in (("transformed", t), ("dense", ipfx.lower(t)), ("fused", quiet(ipfx.lower, t, "fused"))):
        for path, module in m.named_modules():
            if path in flags:
                assert module.training == flags[path], f"{name}: {path or '<root>'}"


class SharedWeights(nn.Module):
    """``b`` shares ``a``'s weight; ``c`` is called twice; ``alias`` is a second name for ``c``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.alias = self.c

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))
        return self.alias(F.relu(self.c(h)))


def test_shared_weights_and_modules_called_twice_are_transformed_once():
    model = SharedWeights().eval()
    x = torch.randn(2, 3, 6, 6)
    t = quiet(ipfx.transform, model)
    # c's module under both its names, as in the state dict; one set of coefficients
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"a.weight", "c.weight", "alias.weight"}
    assert t.get_submodule("alias") is t.get_submodule("c")
    other = copy.deepcopy(t)  # torch.fx would drop the second name
    assert other.get_submodule("alias") is other.get_submodule("c")
    assert "b.coeff" not in t.state_dict()  # b reads a's coefficients: the weights stay tied in training
    with torch.no_grad():
        assert_close(t(x), model(x), kind="shared: transform")
    randomize_masks(t, 0.5)
    perturb_bases(t)
    t.train()
    t(x).square().sum().backward()
    assert_masked_grads_zero(t)
    t.eval()
    with torch.no_grad():
        assert_close(ipfx.lower(t)(x), t(x), kind="shared: lower")


def test_dense_lowering_restores_shared_weights_as_shared():
    """The lowered model holds what the original holds: ``b`` is a Conv2d again, whose weight is ``a``'s
    (one tensor), ``alias`` is ``c`` again (torch.fx itself drops that second name), and the state_dict has
    the original's keys and loads strictly into the original class."""
    model = SharedWeights().eval()
    dense = ipfx.lower(prepared(model))
    assert set(dense.state_dict()) == set(model.state_dict())
    assert isinstance(dense.b, nn.Conv2d) and dense.b.weight is dense.a.weight and dense.alias is dense.c
    SharedWeights().load_state_dict(dense.state_dict(), strict=True)


class TiedEmbedding(nn.Module):
    """A linear head tied to an embedding (an fx leaf that reads the same weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, idx):
        return self.head(self.conv(x).mean((2, 3)) + self.emb(idx))


def test_a_weight_shared_with_a_leaf_module_is_coefficient_form_in_both_and_stays_tied():
    model = TiedEmbedding().eval()
    x, idx = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    t = ipfx.transform(model)
    infos = {w.name: w for w in ipfx.rewritten_weights(t)}
    assert {"conv.weight", "head.weight"} <= set(infos) and infos["head.weight"].capture == "parametrized"
    assert t.head.coeff is t.emb.coeff and t.head.mask is t.emb.mask  # one tensor, read by both modules
    with torch.no_grad():
        assert_close(t(x, idx), model(x, idx), kind="tied embedding: transform")
        randomize_masks(t, 0.5)
        assert torch.equal(t.head.weight, t.emb.weight)
        assert (t.emb.weight == 0).any()  # the embedding reads the pruned matrix too
        expected = t(x, idx)
    plain = set(fx.symbolic_trace(model).state_dict())
    lowered = ipfx.lower(t)
    assert set(lowered.state_dict()) == plain
    assert lowered.head.weight is lowered.emb.weight  # the tie survives lowering
    with torch.no_grad():
        assert_close(lowered(x, idx), expected, kind="tied embedding: lower")


# -- forward hooks ---------------------------------------------------------------------------------------------
def test_hooks_on_leaf_modules_keep_working():
    model = TinyResNet(seed=0, width=4).eval()
    calls = []
    model.bn1.register_forward_hook(lambda m, i, o: calls.append("bn1"))
    model.layer1[0].bn2.register_forward_pre_hook(lambda m, i: calls.append("layer1.0.bn2"))
    x, _ = batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: these hooks keep working
        t = ipfx.transform(model)
    assert calls == []
    t(x)
    assert calls == ["bn1", "layer1.0.bn2"]
    calls.clear()
    for lowered in (ipfx.lower(t), quiet(ipfx.lower, t, "fused"), copy.deepcopy(t)):
        lowered(x)
        assert calls == ["bn1", "layer1.0.bn2"]
        calls.clear()


def test_hooks_on_traced_through_modules_are_reported():
    model = TinyResNet(seed=0, width=4).eval()
    seen = []
    model.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.append(type(o).__name__))
    model.fc.register_forward_pre_hook(lambda m, i: seen.append("fc"))
    with pytest.warns(UserWarning, match=r"layer1\.0\.conv2 \(Conv2d\).*fc \(Linear\)") as record:
        t = ipfx.transform(model)
    assert "bn1" not in str([str(w.message) for w in record])
    # they ran once, while torch.fx traced through the modules (on proxies, not tensors), never after that
    assert "Tensor" not in seen
    traced = list(seen)
    t(batch(2)[0])
    ipfx.lower(t)(batch(2)[0])
    assert seen == traced


def test_a_hook_that_changes_the_output_is_part_of_the_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"0 \(Conv2d\)"):
        t = ipfx.transform(model)
    with torch.no_grad():
        assert_close(t(x), model(x), kind="hooks: output-changing hook")
        assert_close(ipfx.lower(t)(x), model(x), kind="hooks: output-changing hook, lowered")


class TwoModes(nn.Module):
    """A forward that reads ``self.training`` in Python: each mode gets its own graph (an ipfx.ModeSwitch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x, scale: float = 1.0):
        h = self.conv(x).relu()
        if self.training:
            h = h * 0.5
        return self.head(h.mean((2, 3))) * scale


@pytest.mark.parametrize("examples", [True, False], ids=["example-inputs", "no-example"])
def test_every_result_form_exports_the_standard_way(examples):
    """``torch.export.export(result, (x,), dynamic_shapes=({0: batch},))`` on the transformed model and both
    lowerings, mode switches included: their forward shows the model's own arguments, not (*args, **kwargs)."""
    import inspect

    torch.manual_seed(0)
    model = TwoModes().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, example_inputs=(x,)) if examples else ipfx.transform(model)
        t.eval()(x)
        results = {"transformed": t, "dense": ipfx.lower(t, "dense"), "fused": ipfx.lower(t, "fused")}
    assert isinstance(t, ipfx.ModeSwitch)
    batch = torch.export.Dim("batch", min=1, max=64)
    for name, result in results.items():
        assert list(inspect.signature(result.forward).parameters)[0] == "x", (name, type(result))
        with torch.no_grad():
            program = torch.export.export(result.eval(), (x,), dynamic_shapes=({0: batch},))
            other = torch.randn(5, 3, 8, 8)
            assert_close(program.module()(other), model(other), kind=f"export standard form: {name}")
