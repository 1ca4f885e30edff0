"""The shape guards torch.export derives, kept in the captured graph as plain torch nodes.

A graph exported with free dimensions (``Dim.AUTO``) is valid only for inputs that satisfy the
conditions torch.export recorded while it ran the model: dimensions it specialised (``x.size()[1] ==
3``), ranges, equalities between inputs (``x.size()[0] == mask.size()[0]``) and relations the model's
own Python imposed (``8 * x.size()[2] * x.size()[3] == 2048`` for a ``view`` before a linear layer).
``ep.module()`` checks them in a ``_guards_fn`` submodule, a generated function that cannot be pickled;
ipfx used to drop it, and a graph then computed something else on a shape it had never admitted.

:func:`install_guards` writes the same conditions into the graph itself, right after the placeholders,
as ``x.size(d)``, ``operator`` arithmetic and comparisons, and ``torch._assert(condition, message)``:

* nothing but torch and the standard library (a dense lowering still runs without ipfx, a pickled
  model keeps its guards, every pass sees ordinary nodes);
* a call that breaks a condition raises ``AssertionError`` naming the input and dimension;
* re-exporting the graph (``ipfx.deploy``, ``torch.export`` of a lowered model) traces through the
  checks, so the new program inherits the same guards.

The conditions come from two sources: the placeholders' symbolic shapes with
``ExportedProgram.range_constraints`` (what torch checks before a call: specialised sizes, ranges,
sizes shared by several inputs, sizes derived from another), and ``ExportedProgram._guards_code``
(the conditions the model's Python imposed while tracing), where the installed torch records them.
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

GUARD_PREFIX = "ipfx shape guard"  # every message starts with it: how ipfx tells a guard from other errors

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow, ast.Div: operator.truediv}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_CALLS = {"max": torch.sym_max, "Max": torch.sym_max, "min": torch.sym_min, "Min": torch.sym_min,
          "floor": math.floor, "ceil": math.ceil, "abs": abs, "int": int, "float": float, "bool": bool,
          "Eq": operator.eq, "Ne": operator.ne, "Mod": operator.mod, "PythonMod": operator.mod,
          "FloorDiv": operator.floordiv}


class UnsupportedGuard(ValueError):
    """A guard expression this module cannot write as graph nodes."""


def input_names(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> list[tuple[str, str]]:
    """Per flat input of ``(args, kwargs)`` (pytree order: the graph's placeholders), ``(source, label)``:
    how torch.export's guards name it (``L['x']``, ``L['d']['a']``, ``L['args'][1]``) and how a message
    does (``x``, ``d['a']``)."""
    params = list(signature.parameters.values()) if signature is not None else []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    names = []
    for path, _ in pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]:
        group, key, rest = path[0].idx, path[1], path[2:]
        if group == 0:
            index = key.idx
            if index < len(positional):
                head = [pytree.MappingKey(positional[index].name)]
            else:
                head = [pytree.MappingKey(var_positional or "args"), pytree.SequenceKey(index - len(positional))]
        else:
            named = any(p.name == key.key and p.kind is not p.VAR_KEYWORD for p in params)
            head = [key] if named or var_keyword is None else [pytree.MappingKey(var_keyword), key]
        full = (*head, *rest)
        label = f"{full[0].key}{pytree.keystr(full[1:])}"
        names.append((f"L{pytree.keystr(full)}", label))
    return names


def guard_conditions(placeholders: list[fx.Node], range_constraints: dict, guards_code: list[str],
                     names: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(expression, readable)`` per condition, in one small language over ``_a<i>`` (flat input ``i``)
    and ``size(_a<i>, d)``; the readable form names the inputs as the user does."""
    conditions: dict[str, str] = {}  # in order, each once
    sources: dict[Any, str] = {}  # sympy symbol -> expression of the first size that carries it
    derived: list[tuple[Any, str]] = []

    def add(expression: str) -> None:
        if expression not in conditions:
            conditions[expression] = _readable(expression, names)

    for i, node in enumerate(placeholders):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            dims = [(f"size(_a{i}, {d})", size) for d, size in enumerate(value.shape)]
        elif isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
            dims = [(f"_a{i}", value)]
        else:
            continue
        for source, size in dims:
            if isinstance(size, int):
                add(f"{source} == {size}")
                continue
            expr = size.node.expr
            if expr.is_Symbol:
                if expr in sources:
                    add(f"{source} == {sources[expr]}")
                    continue
                sources[expr] = source
                bounds = range_constraints.get(expr)
                if bounds is not None:
                    lower, upper = bounds.lower, bounds.upper
                    if _finite(lower) and int(lower) > 2:  # 0/1 are specialised away: torch admits them
                        add(f"{source} >= {int(lower)}")
                    if _finite(upper):
                        add(f"{source} <= {int(upper)}")
            else:
                derived.append((expr, source))
    for expr, source in derived:  # sizes computed from another input's (a derived Dim)
        if expr.free_symbols <= set(sources):
            add(f"{_print(expr.subs({s: _symbol(sources[s]) for s in expr.free_symbols}))} == {source}")
    replacements = sorted(((n, f"_a{i}") for i, (n, _) in enumerate(names)), key=lambda r: -len(r[0]))
    for code in guards_code:
        for old, new in replacements:
            code = code.replace(old, new)
        add(_sizes(code))
    return list(conditions.items())


def install_guards(gm: fx.GraphModule, conditions: list[tuple[str, str]]) -> None:
    """Write ``conditions`` into ``gm``'s graph after its placeholders (module docstring)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not conditions or not placeholders:
        return
    emitter = _Emitter(graph, placeholders)
    with graph.inserting_before(placeholders[-1].next):  # in order (inserting_after would reverse them)
        for expression, readable in conditions:
            emitter.check(expression, readable)
    gm.recompile()


def is_guard_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a call refused by an installed guard."""
    return isinstance(exc, AssertionError) and str(exc).startswith(GUARD_PREFIX)


def _finite(bound) -> bool:
    try:
        return math.isfinite(float(bound))
    except (TypeError, ValueError, OverflowError):
        return False


# -- the expression language -----------------------------------------------------------------------
def _sizes(code: str) -> str:
    """``_a0.size()[3]`` -> ``size(_a0, 3)``."""
    tree = ast.parse(code, mode="eval")

    class Sizes(ast.NodeTransformer):
        def visit_Subscript(self, node):
            self.generic_visit(node)
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "size"
                    and not value.args and isinstance(node.slice, ast.Constant)):
                return ast.Call(ast.Name("size", ast.Load()), [value.func.value, node.slice], [])
            return node

    tree = Sizes().visit(tree)
    body = tree.body
    if (isinstance(body, ast.Compare) and len(body.ops) == 1 and isinstance(body.ops[0], (ast.Eq, ast.NotEq))
            and isinstance(body.left, ast.Constant)):  # "3 == x" -> "x == 3": one form per condition
        body.left, body.comparators = body.comparators[0], [body.left]
    return ast.unparse(tree)


def _symbol(source: str):
    import sympy

    return sympy.Symbol(source.replace("size(", "size__").replace(", ", "__").replace(")", ""), integer=True)


def _print(expr) -> str:
    from torch.utils._sympy.printers import PythonPrinter

    text = PythonPrinter().doprint(expr)
    return ast.unparse(_Unsymbol().visit(ast.parse(text, mode="eval")))


class _Unsymbol(ast.NodeTransformer):
    def visit_Name(self, node):
        if node.id.startswith("size___a"):
            _, index, dim = node.id.split("__")
            return ast.Call(ast.Name("size", ast.Load()), [ast.Name(index, ast.Load()), ast.Constant(int(dim))], [])
        return node


def _readable(expression: str, names: list[tuple[str, str]]) -> str:
    tree = ast.parse(expression, mode="eval")

    class Names(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance(node.func, ast.Name) and node.func.id == "size" and len(node.args) == 2:
                return ast.Subscript(ast.Attribute(node.args[0], "shape", ast.Load()), node.args[1], ast.Load())
            return node

        def visit_Name(self, node):
            if node.id.startswith("_a") and node.id[2:].isdigit() and int(node.id[2:]) < len(names):
                return ast.Name(names[int(node.id[2:])][1], ast.Load())
            return node

    return ast.unparse(Names().visit(tree))


# Norms whose eager functional checks its input in training (torch.nn.functional: batch_norm's
# _verify_batch_size, instance_norm's _verify_spatial_size) where the aten op torch.export records does not:
# op -> (index of the training flag, whether the check leaves out the batch, eager's message)
_NORMS = {
    "batch_norm": (5, False, "Expected more than 1 value per channel when training"),
    "_native_batch_norm_legit_functional": (5, False, "Expected more than 1 value per channel when training"),
    "native_batch_norm": (5, False, "Expected more than 1 value per channel when training"),
    "instance_norm": (5, True, "Expected more than 1 spatial element when training"),
}


def install_norm_checks(gm: fx.GraphModule) -> int:
    """Before each train-mode batch (instance) norm of ``gm``'s graph, the check torch's functional makes in
    eager mode and the exported aten op does not: one value per channel (one sample of a 1-d batch norm, a 1x1
    map at batch 1) raised ``ValueError`` in the model, while the graph computed a zero-count variance, NaN,
    into the running statistics, silently (every later eval output NaN). The graph raises ``AssertionError``
    with eager's words instead. Returns how many checks it wrote."""
    written = 0
    for node in list(gm.graph.nodes):
        name = getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""
        if name not in _NORMS or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        flag, spatial_only, words = _NORMS[name]
        training = node.args[flag] if len(node.args) > flag else node.kwargs.get("training", node.kwargs.get(
            "use_input_stats"))
        if training is not True:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            numel = gm.graph.call_method("numel", (x,))
            per = gm.graph.call_function(operator.mul, (gm.graph.call_method("size", (x, 0)),
                                                         gm.graph.call_method("size", (x, 1)))) if spatial_only \
                else gm.graph.call_method("size", (x, 1))
            gm.graph.call_function(torch._assert, (gm.graph.call_function(operator.ne, (numel, per)),
                                                   f"{words} (as torch.nn.functional checks; ipfx keeps the check in "
                                                   "the exported graph)"))
        written += 1
    if written:
        gm.recompile()
    return written


class _Emitter:
    """Graph nodes for one condition: ``torch._assert(<expression>, message)``."""

    def __init__(self, graph: fx.Graph, placeholders: list[fx.Node]) -> None:
        self.graph = graph
        self.placeholders = placeholders
        self.sizes: dict[tuple[int, int], fx.Node] = {}

    def check(self, expression: str, readable: str) -> None:
        condition = self.value(ast.parse(expression, mode="eval").body)
        message = (f"{GUARD_PREFIX}: {readable} does not hold for this call. The model was captured by "
                   "torch.export for inputs where it holds (the example inputs fixed or related these sizes); "
                   "transform it with example inputs of this shape, or pass dynamic_shapes=... to ipfx.transform")
        self.graph.call_function(torch._assert, (condition, message))

    def value(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id.startswith("_a") and node.id[2:].isdigit():
                return self.placeholders[int(node.id[2:])]
            if node.id in ("inf", "oo"):
                return math.inf
            raise UnsupportedGuard(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.call(_BINARY[type(node.op)], self.value(node.left), self.value(node.right))
        if isinstance(node, ast.UnaryOp):
            operand = self.value(node.operand)
            if isinstance(node.op, ast.USub):
                return self.call(operator.neg, operand)
            if isinstance(node.op, ast.Not):
                return self.call(operator.not_, operand)
        if isinstance(node, ast.BoolOp):
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            values = [self.value(v) for v in node.values]
            result = values[0]
            for v in values[1:]:
                result = self.call(combine, result, v)
            return result
        if isinstance(node, ast.Compare):
            result, left = None, self.value(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                if type(op) not in _COMPARE:
                    raise UnsupportedGuard(ast.unparse(node))
                right = self.value(right_node)
                part = self.call(_COMPARE[type(op)], left, right)
                result = part if result is None else self.call(operator.and_, result, part)
                left = right
            return result
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id == "size" and len(node.args) == 2:
                index, dim = int(node.args[0].id[2:]), node.args[1].value
                key = (index, dim)
                if key not in self.sizes:
                    self.sizes[key] = self.graph.call_method("size", (self.placeholders[index], dim))
                return self.sizes[key]
            function = _CALLS.get(node.func.id)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords
              and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "math")):
            function = getattr(torch if node.func.value.id == "torch" else math, node.func.attr, None)  # torch.sym_max
        else:
            function = None
        if function is not None and node.args:
            values = [self.value(a) for a in node.args]
            result = values[0]
            for v in values[1:]:  # Max(a, b, c) -> sym_max(sym_max(a, b), c)
                result = self.call(function, result, v)
            return result if len(values) > 1 else self.call(function, result)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
            return getattr(math, node.attr)
        raise UnsupportedGuard(ast.unparse(node))

    def call(self, function, *args):
        if not any(isinstance(a, fx.Node) for a in args):
            return function(*args)  # constants fold
        return self.graph.call_function(function, args)
