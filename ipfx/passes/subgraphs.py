"""Analysis shared by the lowering passes: locate each weight's compose subgraph in a graph.

The subgraph of a :class:`~ipfx.form.reparam.BasisWeight` at ``prefix`` is matched from the graph alone (no
node metadata, which does not survive pickling) as the exact chain the rewrite pass emits::

    mul(get_attr prefix.coeff, get_attr prefix.mask) [-> matmul(., get_attr prefix.basis)] [-> reshape]

(``matmul`` where the module multiplies by its basis, ``reshape`` where it has one: SP skips its identity.)

Its *output* is the last node of the chain: the composed weight. Anything the model's own forward does
with the weight afterwards (weight standardisation, ...) is not part of it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import torch
import torch.fx as fx

from ..errors import IPFXValueError
from ..form.compose import emit_compose
from ..form.reparam import BasisWeight


@dataclasses.dataclass
class ComposeSubgraph:
    prefix: str
    module: BasisWeight
    nodes: list[fx.Node]  # in graph order
    output: fx.Node | None  # None when the weight is never used


def basis_weights(gm, used: set[str] | frozenset = frozenset()) -> dict[str, BasisWeight]:
    """The BasisWeights ``gm``'s graph reads: not the parametrized modules, which compose themselves, nor
    those of another graph ``gm`` holds (a part captured below Python code that ``gm`` calls as a leaf),
    which that graph reads and lowers. A module held under several paths (a module registered twice) is
    given once, at the path whose ``coeff`` the graph reads (``used``: ``get_attr`` targets), else at its
    first."""
    from ..capture.modes import ModeSwitch
    from ..form.parametrize import is_parametrized

    paths: dict[int, list[str]] = {}
    modules: dict[int, BasisWeight] = {}

    def visit(module, prefix: str, inside: set[int]) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in inside or isinstance(child, (fx.GraphModule, ModeSwitch)):
                continue
            path = prefix + name
            if isinstance(child, BasisWeight) and not is_parametrized(child):
                paths.setdefault(id(child), []).append(path)
                modules[id(child)] = child
            else:
                visit(child, f"{path}.", inside | {id(child)})

    visit(gm, "", {id(gm)})
    found = {}
    for key, module in modules.items():
        read = [p for p in paths[key] if f"{p}.coeff" in used]
        found[(read or paths[key])[0]] = module
    return found


def compose_subgraphs(gm: fx.GraphModule) -> list[ComposeSubgraph]:
    getattrs: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            getattrs.setdefault(node.target, []).append(node)
    return [_match(prefix, module, getattrs) for prefix, module in basis_weights(gm, set(getattrs)).items()]


def _match(prefix: str, module: BasisWeight, getattrs) -> ComposeSubgraph:
    coeffs = getattrs.get(f"{prefix}.coeff", [])
    masks = getattrs.get(f"{prefix}.mask", [])
    bases = getattrs.get(f"{prefix}.basis", [])
    if not coeffs and not masks:
        return ComposeSubgraph(prefix, module, [], None)
    state = {"coeff": coeffs, "mask": masks, "basis": bases}
    nodes = [*coeffs, *masks, *bases]
    chain = coeffs[0] if len(coeffs) == 1 else None
    for target, arguments in _chain(module.multiplies_basis, module.has_basis):
        chain = _only_user(chain, target, arguments, state)
        if chain is None:
            break
        nodes.append(chain)
    if chain is None or len(coeffs) != 1 or len(masks) != 1 or len(bases) != int(module.multiplies_basis):
        raise IPFXValueError(
            f"the compose subgraph of {prefix!r} (mul(coeff, mask) -> matmul(basis) -> reshape) was "
            "changed after ipfx.transform, so it cannot be lowered; transform the original model again"
        )
    return ComposeSubgraph(prefix, module, nodes, chain if chain.users else None)


@functools.lru_cache(maxsize=None)
def _chain(multiplies_basis: bool, has_basis: bool) -> tuple:
    """The calls :func:`~ipfx.form.compose.emit_compose` writes for a weight of this form, in order: each
    call's function and, per argument, ``"chain"`` (the previous call, or the ``coeff`` read), the state it
    reads (``"mask"``, ``"basis"``) or ``None`` (a constant). Taken from an emitted template, so the
    matcher follows the algebra's one definition rather than a copy of it."""
    graph = fx.Graph()
    emit_compose(graph, "w", multiplies_basis, has_basis, (1, 1, 1, 1))
    steps, previous = [], None
    for node in graph.nodes:
        if node.op == "get_attr":
            previous = node if node.target == "w.coeff" else previous
            continue
        arguments = tuple("chain" if a is previous else a.target[2:] if isinstance(a, fx.Node) else None
                          for a in node.args)
        steps.append((node.target, arguments))
        previous = node
    return tuple(steps)


def _only_user(node: fx.Node | None, target, arguments: tuple, state: dict) -> fx.Node | None:
    """The one user of ``node`` when it is the call ``target`` with ``arguments`` (see :func:`_chain`)."""
    if node is None or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function" or user.target is not target or len(user.args) != len(arguments):
        return None
    for argument, expected in zip(user.args, arguments):
        if expected == "chain" and argument is not node:
            return None
        if expected not in ("chain", None) and argument not in state[expected]:
            return None
    return user


def erase_nodes(graph: fx.Graph, ordered_nodes) -> None:
    """Erase ``ordered_nodes`` (given in graph order), users before producers, where unused."""
    for node in reversed(list(ordered_nodes)):
        if not node.users:
            graph.erase_node(node)


def constant_tensor(gm: fx.GraphModule, value):
    """The tensor a ``get_attr`` node names (None stays None); False for anything computed at run time."""
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        found = operator.attrgetter(value.target)(gm)
        return found if isinstance(found, torch.Tensor) else False
    return False
