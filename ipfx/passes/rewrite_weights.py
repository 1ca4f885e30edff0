"""Pass: rewrite every kernel parameter into a coefficient x mask x basis subgraph.

For a kernel parameter ``P`` of shape ``(w0, w1, k_1, ..., k_d)`` with ``K = prod(k) > 1``::

    get_attr P                      coeff = get_attr <prefix>.coeff          (w0, w1, K)
        |               ==>         mask  = get_attr <prefix>.mask           (w0, w1, K)
        v                           masked = mul(coeff, mask)
      conv(x, P, ...)               basis = get_attr <prefix>.basis          (K, K)
                                    flat  = matmul(masked, basis)            (w0, w1, K)
                                    weight = reshape(flat, P.shape)
                                    conv(x, weight, ...)

and in SP form (``K = 1`` kernels, linear weights) ``weight = mul(coeff, mask)`` with ``coeff`` of
``P``'s own shape. ``space="sp"`` has ``basis = I`` and skips the product (``C @ I = C`` exactly):
``weight = reshape(mul(coeff, mask), P.shape)``.

Cost: SP composes with one elementwise op per weight and step, like ``torch.nn.utils.prune``; IP adds
one ``(w0 w1, K) x (K, K)`` product. ``mul`` and ``matmul`` each make one weight-sized tensor and
``reshape`` is a view; backward needs ``mask`` (for the coefficient gradient) and ``mask * coeff``
(for the basis gradient), so there is no copy to spare. The weight is composed once per step however
often it is used: the new ``weight`` node replaces every use of ``P``, so whatever consumed ``P`` (the
conv itself, a second call of the same module, weight standardisation) consumes the same tensor.

Invariant (function preservation): at transform time ``mask = 1`` and ``coeff = P_flat @ inv(basis)``,
so ``weight == P`` up to float rounding and the graph computes what it computed before. The state
lives in a :class:`~ipfx.form.reparam.BasisWeight` placed at ``<prefix>``, which adopts the other
attributes of the module that owned ``P``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.source_attributes import plain_attributes, replace_module, set_submodule
from ..config import TransformConfig, WeightSettings
from ..errors import IPFXValueError
from ..form.bases import coefficients_in_basis, make_basis
from ..form.compose import emit_compose
from ..form.reparam import BasisWeight, ModuleSpec, adopt_attributes
from .find_weights import KernelSite, find_kernel_sites
from .manager import GraphPass, GraphSite, PassResult
from .restore_modules import restore_module_calls


def state_prefix(param_name: str) -> str:
    """``"layer1.0.conv1.weight" -> "layer1.0.conv1"``; any other name is its own prefix."""
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


class RewriteWeights(GraphPass):
    """Rewrite the kernel parameters ``config`` selects in each captured graph (module docstring), with one
    :class:`CoefficientFactory` for all of them. Changed: the prefixes rewritten, as named in the model;
    skipped: kernels of a module the graph calls as a leaf (the parametrize-unreached pass takes those)."""

    name = "rewrite weights"

    def __init__(self, config: TransformConfig, factory: "CoefficientFactory | None" = None) -> None:
        self.config = config
        self.factory = factory if factory is not None else CoefficientFactory(config)

    def run_graph(self, site: GraphSite) -> PassResult:
        rewrite = _GraphRewrite(self.config, self.factory, site)
        rewrite.run()
        for module in rewrite.rewritten.values():
            module.capture = site.front_end
        changed = [site.name_prefix + prefix for prefix in rewrite.rewritten]
        if rewrite.restored and not changed:
            changed = [f"{site.name_prefix or '<model>'} (modules restored)"]
        return PassResult(changed, rewrite.skipped)


class _GraphRewrite:
    """The rewrite of one graph: which weights became which :class:`BasisWeight` (``rewritten``, by prefix
    in the graph), which were left and why (``skipped``, by name in the model), and whether standard
    modules went back to being modules (``restored``)."""

    def __init__(self, config: TransformConfig, factory: "CoefficientFactory", site: GraphSite) -> None:
        self.config, self.factory, self.gm = config, factory, site.gm
        self.name_prefix = site.name_prefix  # the traced module's path in the user's model, for config patterns
        self.owners = site.owners  # module path -> the original module (for the config's type filter)
        self.inlined = site.inlined  # standard modules traced through (so lowering can rebuild them)
        self.rewritten: dict[str, BasisWeight] = {}
        self.skipped: dict[str, str] = {}
        self.rewritten_params: list[nn.Parameter] = []  # the original parameters, by identity
        self.restored = False

    def run(self) -> None:
        gm = self.gm
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # the rewrite adds none
        for site in find_kernel_sites(gm):
            self._rewrite(gm, site, called)
        self.restored = self._restore_untouched(gm)

    def _restore_untouched(self, gm: fx.GraphModule) -> bool:
        """Standard modules traced through whose weight was left alone go back to being modules.

        (A weight shared with a leaf module such as an embedding is left dense; its linear layer must then
        stay an ``nn.Linear`` with its tied weight, as in a plain trace.)
        """
        done = {id(p) for p in self.rewritten_params}
        getattrs = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                try:
                    getattrs.setdefault(id(operator.attrgetter(node.target)(gm)), []).append(node)
                except AttributeError:
                    pass
        restored = False
        for path, module in self.inlined.items():
            weight = module._parameters.get("weight")
            if weight is None or id(weight) in done or id(weight) not in getattrs:
                continue
            set_submodule(gm, path, module)
            for node in getattrs[id(weight)]:
                restore_module_calls(gm, path, ModuleSpec.of(module), node)
                if not node.users:
                    gm.graph.erase_node(node)
            restored = True
        return restored

    # -- one site ----------------------------------------------------------------------------
    def _rewrite(self, gm: fx.GraphModule, site: KernelSite, called: set[str]) -> None:
        owner_path, _, attr = site.name.rpartition(".")
        owner = self.owners.get(owner_path)
        is_linear = site.kind == "linear"
        kernel = () if is_linear else tuple(site.param.shape[2:])
        settings = self.config.settings_for(self.name_prefix + site.name,
                                            type(owner) if owner is not None else None, kernel, is_linear)
        if settings is None:
            return  # excluded by the config: leave it exactly as it was
        prefix = state_prefix(site.name)
        if prefix in called:
            self.skipped[self.name_prefix + site.name] = f"module {prefix!r} is called as a leaf"
            return
        source = (ModuleSpec.of(self.inlined[owner_path])
                  if owner_path in self.inlined and site.name.endswith(".weight") else None)
        module = self.factory.make(site.param, site.name, site.kind, settings, source)
        module.aliases = {path: ModuleSpec.of(m) for path, m in self.inlined.items()
                          if path != owner_path and m._parameters.get("weight") is site.param}
        module.tied_names = _drop_dead_aliases(gm, site.param, site.name, self.owners)
        self._install(gm, site, prefix, owner_path, attr, module)
        self._insert_subgraph(gm, site, prefix, module)
        self.rewritten[prefix] = module
        self.rewritten_params.append(site.param)

    # -- the module hierarchy ----------------------------------------------------------------
    def _install(self, gm, site, prefix, owner_path, attr, module: BasisWeight) -> None:
        parent_path, _, leaf = prefix.rpartition(".")
        if prefix == owner_path:  # "<owner>.weight": the BasisWeight takes the owner's place
            old = gm.get_submodule(prefix)
            if any(n in ("coeff", "mask", "basis") for n in (*old._parameters, *old._buffers, *old._modules)):
                raise IPFXValueError(
                    f"module {prefix!r} already has an attribute named coeff, mask or basis; "
                    "exclude its weight with TransformConfig(exclude=[...])"
                )
            adopt_attributes(module, old, skip=attr)
            original = self.owners.get(owner_path)  # what outer code may read: out_channels, padding, ...
            module.__dict__.update(plain_attributes(original if original is not None else old, module))
            module.training = old.training
        else:  # "<owner>.w": the BasisWeight becomes a child named like the parameter
            parent = gm.get_submodule(owner_path)
            delattr(parent, attr)
            module.training = parent.training
        parent = gm.get_submodule(parent_path) if parent_path else gm
        if prefix == owner_path:  # the owner under every other name too (a module registered twice)
            replace_module(gm, old, module)
        setattr(parent, leaf, module)

    # -- the graph ---------------------------------------------------------------------------
    def _insert_subgraph(self, gm, site: KernelSite, prefix: str, module: BasisWeight) -> None:
        graph = gm.graph
        with graph.inserting_before(site.getattrs[0]):
            weight = emit_compose(graph, prefix, module.multiplies_basis, module.has_basis, module.weight_shape)
        for node in site.getattrs:
            node.replace_all_uses_with(weight)
            graph.erase_node(node)


class CoefficientFactory:
    """Makes the :class:`BasisWeight` of one weight: ``coeff = W @ inv(basis)``, ``mask = 1``.

    One factory serves a whole transform (every part's rewrite and the parametrized weights), so
    ``share_basis`` shares one basis object across all of them and ``basis="random"`` draws from one
    seeded generator.
    """

    def __init__(self, config: TransformConfig) -> None:
        self._shared: dict[tuple, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(config.seed)

    def make(self, param: torch.Tensor, name: str, kind: str, settings: WeightSettings,
             source: ModuleSpec | None = None) -> BasisWeight:
        w = param.detach()
        shape = tuple(w.shape)
        kernel = () if kind == "linear" else shape[2:]
        K = math.prod(kernel) if kernel else 1
        common = dict(weight_shape=shape, weight_name=name, kind=kind, source=source,
                      requires_grad=param.requires_grad)
        if K == 1:  # SP form: nothing to gain from a basis
            module = BasisWeight(w.clone(), None, space="sp", basis_init="none", train_basis=False, **common)
        else:
            basis = self._basis(settings, kernel, w, name)
            coeff = coefficients_in_basis(w.reshape(shape[0], shape[1], K), basis)
            if isinstance(basis, nn.Parameter) and not param.requires_grad and not settings.share_basis:
                basis.requires_grad_(False)  # a frozen layer keeps its basis frozen too
            basis_name = settings.basis if isinstance(settings.basis, str) else "custom"
            module = BasisWeight(coeff, basis, space=settings.space, basis_init=basis_name,
                                 train_basis=settings.train_basis, **common)
            module.shared_basis = bool(settings.share_basis)
        module.memory_format = _memory_format(param)
        return module

    def _basis(self, settings: WeightSettings, kernel, w: torch.Tensor, where: str) -> torch.Tensor:
        key = (kernel, settings.space, _basis_key(settings.basis), settings.train_basis, w.dtype, w.device)
        if settings.share_basis and key in self._shared:
            return self._shared[key]
        basis = make_basis(settings.basis, kernel, dtype=w.dtype, device=w.device,
                           generator=self._generator, where=where)
        if settings.train_basis:
            basis = nn.Parameter(basis)
        if settings.share_basis:
            self._shared[key] = basis
        return basis


def _drop_dead_aliases(gm: fx.GraphModule, param: torch.Tensor, name: str, owners: dict) -> tuple[str, ...]:
    """Other attribute paths of ``gm`` holding ``param`` (a weight tied to another module's: an embedding and the
    output layer of a language model) that no node reads: torch.export reads a tied parameter under one name
    and leaves the other behind. Left in place, that name kept the original, untrained tensor in the
    transformed model's state dict and in the lowered one (under the tied key, so a model class that loads it
    last got it back). Deleted here, with their unused ``get_attr`` nodes; the names, for the lowering to give
    the folded weight (:func:`ipfx.passes.lower_dense.fold_subgraph`). Not a module registered under two
    paths (the same module of the original model, ``owners``: path -> original module): one holder, two names."""
    def owner_of(path: str) -> nn.Module:
        owner_path = path.rpartition(".")[0]
        return gm.get_submodule(owner_path) if owner_path else gm

    dead, mine = [], owner_of(name)
    mine_originally = owners.get(name.rpartition(".")[0])
    for path in [path for path, p in gm.named_parameters(remove_duplicate=False) if p is param and path != name]:
        theirs_originally = owners.get(path.rpartition(".")[0])
        if owner_of(path) is mine or (mine_originally is not None and theirs_originally is mine_originally):
            continue  # the same module under another path (registered twice): not another holder
        if type(owner_of(path)) is not nn.Module:
            continue  # a module of its own (a leaf the graph calls reads its weight itself): only torch.export's
            # attribute holders, plain modules, are left with names nobody reads
        reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == path]
        if any(n.users for n in reads):
            continue
        for n in reads:
            gm.graph.erase_node(n)
        delattr(owner_of(path), path.rpartition(".")[2])
        dead.append(path)
    return tuple(dead)


def _memory_format(weight: torch.Tensor) -> str | None:
    if weight.is_contiguous():
        return None
    for name, dims in (("channels_last", 4), ("channels_last_3d", 5)):
        if weight.dim() == dims and weight.is_contiguous(memory_format=getattr(torch, name)):
            return name
    return None


def _basis_key(spec) -> object:
    return spec if isinstance(spec, str) else id(spec)
