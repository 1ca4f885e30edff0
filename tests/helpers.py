"""Shared test helpers: tolerant comparison with a ledger of relative errors, graph isomorphism."""

from __future__ import annotations

import dataclasses
import operator
import threading
import warnings

import networkx as nx
import torch
import torch.fx as fx


@dataclasses.dataclass
class Ledger:
    count: int = 0
    worst: float = 0.0
    by_kind: dict = dataclasses.field(default_factory=dict)

    def add(self, kind: str, rel: float) -> None:
        self.count += 1
        self.worst = max(self.worst, rel)
        c, w = self.by_kind.get(kind, (0, 0.0))
        self.by_kind[kind] = (c + 1, max(w, rel))


LEDGER = Ledger()

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1e-12)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / max(scale, 1e-12)


def assert_close(actual, expected, *, kind: str, rtol: float | None = None) -> float:
    """Assert outputs agree to ``rtol`` relative to the largest expected magnitude; record the error."""
    if isinstance(expected, (tuple, list)):
        return max(assert_close(a, e, kind=kind, rtol=rtol) for a, e in zip(actual, expected, strict=True))
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    rel = relative_error(actual, expected)
    LEDGER.add(kind, rel)
    tol = RTOL.get(expected.dtype, 1e-4) if rtol is None else rtol
    assert rel <= tol, f"relative error {rel:.3g} > {tol:.1g} ({kind})"
    return rel


def _label(node: fx.Node) -> tuple:
    target = node.target
    if callable(target):
        target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    return (node.op, str(target))


def graph_to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph with one node per fx node labelled (op, target) and an edge per data dependency."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, label=_label(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def isomorphic(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    return nx.is_isomorphic(graph_to_networkx(a), graph_to_networkx(b), node_match=operator.eq)


def randomize_masks(model: torch.nn.Module, keep: float, seed: int = 0) -> None:
    """Give every BasisWeight a random mask keeping about ``keep`` of its coefficients."""
    import ipfx

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, ipfx.BasisWeight):
            m.mask.copy_((torch.rand(m.mask.shape, generator=g) < keep).to(m.mask.dtype))


def perturb_bases(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every basis away from its (orthonormal) initialisation, keeping it well-conditioned."""
    import ipfx

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ipfx.BasisWeight) and m.basis is not None:
                noise = torch.randn(m.basis.shape, generator=g, dtype=torch.float64).to(m.basis.dtype)
                m.basis.add_(scale * noise / m.basis.shape[0] ** 0.5)


def brute_force_dense_grads(model: torch.nn.Module, batch) -> list[torch.Tensor]:
    """dL/dcoeff of every prunable tensor (in ``targets`` order) through a lowered plain copy:
    dL/dC = dL/dW_flat @ B^T, or dL/dW in SP form."""
    import torch.nn.functional as F

    import ipfx
    from ipfx.pruning.targets import targets

    plain = ipfx.lower(model, "dense")
    plain.train(model.training)
    params = dict(plain.named_parameters())
    found = targets(model)
    loss = F.cross_entropy(plain(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, [params[t.name] for t in found])
    return [g if t.module.basis is None else g.reshape(t.coeff.shape) @ t.module.basis.detach().T
            for t, g in zip(found, grads)]


def graph_modules(model: torch.nn.Module) -> dict[bool, fx.GraphModule]:
    """The graph module run in each training mode: two for an ipfx.ModeSwitch, else the model itself."""
    import ipfx

    if isinstance(model, ipfx.ModeSwitch):
        return {mode: model.graph_module(mode) for mode in (True, False)}
    return {True: model, False: model}


def store_record(**fields) -> dict:
    """A well-formed result-store record (every run key field, an accuracy), with ``fields`` changed."""
    from ipfx.experiments import RunSpec

    return {**dataclasses.asdict(RunSpec()), "accuracy": 0.5, "dataset_name": "cifar10", **fields}


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def run_in_threads(work, count: int = 4) -> None:
    """``work(i)`` in ``count`` threads at once (i = 0 .. count-1), returning when all have ended."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class OptionalScale(torch.nn.Module):
    """A conv with an optional argument: ``forward(x, scale=None)``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x, scale=None):
        y = self.conv(x)
        return y if scale is None else y * scale
