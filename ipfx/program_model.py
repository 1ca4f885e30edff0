"""The program JSON of a ``.pt2`` file (``models/*.json``), checked before torch reads it: no string in it
becomes code.

``torch.export.load`` turns some strings of the program into Python that it runs:

* a symbolic size's ``expr_str`` goes through ``sympy.sympify``, which is ``eval``;
* the ``guards_code`` strings are pasted into the source of a function that torch ``exec``s (as the
  condition of an assert and, re-printed, inside its message's string literal);
* a node's ``target`` (and an ``as_operator`` argument) is resolved as an attribute path from ``torch``,
  ``operator`` or ``math`` (``torch.os.system`` resolves), and called when the program runs;
* names end up in the source ``torch.fx`` generates and runs: the forward's argument names as they are,
  attribute paths inside ``getattr(..., "name")``, a string user input inside a guard's quotes.

:func:`check_model` walks the whole JSON and refuses, with the key and the offending text, anything
outside what ``torch.export.save`` writes for a program of tensor operations:

* ``expr_str``: sympy constructor calls only (``Symbol('s0', positive=True, integer=True)``, ``Integer(2)``,
  ``Mul``, ``FloorDiv``, ``Max`` ... the functions torch's deserializer names), numbers and symbol names
  (:data:`SYMPY_CALLS`);
* ``guards_code``: comparisons and arithmetic of numbers and the inputs' sizes (``L['x'].size()[2] // 2``),
  ``max``/``min``/``abs``, ``torch.sym_max``/``sym_min`` and a few ``math`` functions (:func:`_check_guard`);
* call targets: ``torch.ops.<namespace>.<op>.<overload>`` of :data:`OP_NAMESPACES` (of the higher-order
  operators, the control flow of :data:`HIGHER_ORDER_OPS` only), the ``operator`` and ``math`` functions of
  symbolic-size arithmetic, ``torch.sym_*`` (:func:`_check_target`);
* user inputs that are not tensors or numbers (a string input is pasted into a guard);
* the forward's argument names that are not identifiers, and every other string with a quote, a backslash,
  ``#`` or a control character (names, paths, dtypes: see :data:`_PLAIN`), but in the fields torch
  keeps as text and never runs (:data:`TEXT_KEYS`: stack traces, module stacks, ``as_string`` arguments,
  which generated code quotes with ``repr``), and the input/output tree specs, whose names are checked
  after decoding (:func:`_check_spec`).

A program ipfx saves passes (its graphs hold aten and ipfx operators on tensors); a crafted one is
refused before anything in it is read by torch.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Callable, Iterator

#: functions a symbolic size's expression may call (sympy's constructors and torch's sympy functions, as
#: torch's deserializer names them), and the names it may read
SYMPY_CALLS = frozenset((
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Abs", "Max", "Min", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod",
    "CleanDiv", "CeilDiv", "CeilToInt", "FloorToInt", "LShift", "RShift", "IntTrueDiv", "FloatTrueDiv",
    "FloatPow", "PowByNatural", "ToFloat", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "Identity", "IsNonOverlappingAndDenseIndicator", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor",
))
SYMPY_NAMES = frozenset(("true", "false", "oo", "zoo", "nan", "pi", "E", "S"))
#: assumptions a Symbol may carry (keyword arguments), and Float's precision
SYMPY_KEYWORDS = frozenset(("positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                            "zero", "nonzero", "even", "odd", "precision"))

#: what a guard may call: ``torch.<name>`` and ``math.<name>``, and methods of an input tensor
GUARD_TORCH = frozenset(("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_sqrt", "sym_ite"))
GUARD_MATH = frozenset(("isnan", "isinf", "floor", "ceil", "trunc", "sqrt", "inf", "pi", "e"))
GUARD_METHODS = frozenset(("size", "stride", "storage_offset", "dim", "numel"))
#: Python builtins a guard may call (torch's printer of size expressions writes max, min, abs)
GUARD_BUILTINS = frozenset(("max", "min", "abs"))

#: operator namespaces a node may call (``torch.ops.<namespace>...``), and the higher-order operators it may
#: (control flow over the program's own subgraphs; not those that call a function or kernel named elsewhere)
OP_NAMESPACES = frozenset(("aten", "prims", "ipfx", "ipfx_native", "higher_order", "quantized_decomposed"))
HIGHER_ORDER_OPS = frozenset(("cond", "while_loop", "map_impl", "scan", "associative_scan",
                              "wrap_with_set_grad_enabled", "wrap_with_autocast"))
#: functions of symbolic-size arithmetic a node may call, by module
PY_FUNCTIONS = {
    "_operator": frozenset(("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "getitem",
                            "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")),
    "math": frozenset(("ceil", "floor", "trunc", "sqrt")),
}

#: keys whose strings torch keeps as text (metadata, quoted arguments): not checked for characters
TEXT_KEYS = frozenset(("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node", "custom",
                       "as_string", "as_strings", "torch_version"))

#: a name, attribute path or dtype: what every other string of a program is. Module names may hold any
#: character but "." (torchvision's regnet has "block1-0"; a ModuleDict key may have spaces); torch.fx quotes
#: them in the source it generates (getattr(self, "...")), so what is refused is what ends or escapes a string
#: literal or a line: quotes, backslashes, "#", control characters
_PLAIN = re.compile(r"[^'\"\\#\x00-\x1f\x7f]*\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: longest expression or guard read (a program's are a few hundred characters)
MAX_EXPRESSION = 20_000


class _Refused(ValueError):
    """Why the program JSON is refused (program_files turns it into UnsafeProgram with the file's name)."""


def check_model(model) -> None:
    """Raise ``ValueError`` (a line saying which key holds what) unless every string of the program JSON
    ``model`` is one torch reads without running it (module docstring)."""
    for key, value in _walk(model):
        if key == "expr_str":
            _check_text(key, value, _check_sympy)
        elif key == "guards_code":
            if not isinstance(value, list):
                raise _Refused("'guards_code' is not a list")
            for guard in value:
                _check_text(key, guard, _check_guard)
        elif key in ("target", "as_operator") and isinstance(value, str):  # (a node's, or an operator argument)
            _check_target(value)
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            _check_spec(key, value)
        elif key == "user_input":
            for inner, _ in _walk(value):
                if inner in ("as_string", "as_strings", "as_custom_obj", "as_graph", "as_operator"):
                    raise _Refused(f"a user input is {inner[3:]!r}, not a tensor or a number")
        elif key == "range_constraints" and isinstance(value, dict):
            for name in value:
                if not _IDENTIFIER.match(name):
                    raise _Refused(f"range constraint on {name[:80]!r}, not a symbol name")
        if key == "forward_arg_names" and isinstance(value, str) and not _IDENTIFIER.match(value):
            raise _Refused(f"the forward's argument {value[:80]!r} is not an identifier (torch.fx pastes it into "
                           "the source it generates as it is)")
        if isinstance(value, str) and key not in TEXT_KEYS and key not in ("expr_str", "guards_code", "in_spec",
                                                                           "out_spec") and not _PLAIN.match(value):
            raise _Refused(f"{key!r} holds {value[:80]!r}, which is not a name")


def _walk(value, key=None) -> Iterator[tuple]:
    """(key, value) for every value below ``value`` (list items carry their list's key), without recursion (a
    deep JSON does not exhaust the stack)."""
    stack = [(key, value)]
    while stack:
        key, value = stack.pop()
        yield key, value
        if isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list) and key != "guards_code":
            stack.extend((key, v) for v in value)


def _check_text(key: str, text, check: Callable[[ast.AST], None]) -> None:
    if not isinstance(text, str):
        raise _Refused(f"{key!r} holds a {type(text).__name__}, not a string")
    if len(text) > MAX_EXPRESSION or any(c in text for c in '#"\\\n\r\x00'):
        raise _Refused(f"{key!r} holds {text[:80]!r}, which is not an expression of sizes")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Refused(f"{key!r} holds {text[:80]!r}, which is not an expression") from None
    for node in ast.walk(tree):
        try:
            check(node)
        except _Refused as e:
            raise _Refused(f"{key!r} holds {text[:80]!r}: {e}") from None


def _number(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and type(node.value) in (int, float, bool)
            and not (type(node.value) is int and abs(node.value) >= 2**63))


def _check_sympy(node: ast.AST) -> None:
    """One node of a symbolic size's expression: calls of SYMPY_CALLS with numbers, symbol names and
    assumption keywords."""
    if isinstance(node, (ast.Expression, ast.Load, ast.USub, ast.keyword)):
        return
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS):
            raise _Refused("it calls something other than sympy's size functions")
        if any(k.arg not in SYMPY_KEYWORDS or not _number(k.value) for k in node.keywords):
            raise _Refused("a keyword other than a symbol's assumptions")
        return
    if isinstance(node, ast.Name):
        if node.id not in SYMPY_CALLS and node.id not in SYMPY_NAMES:
            raise _Refused(f"it names {node.id!r}")
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _number(node.operand):
        return
    if _number(node) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                         and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|[0-9.eE+-]+", node.value)):
        return
    raise _Refused(f"a {type(node).__name__} in an expression of sizes")


_GUARD_OPERATORS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.Not, ast.USub,
                    ast.UAdd, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div)


def _check_guard(node: ast.AST) -> None:
    """One node of a guard: comparisons, boolean and arithmetic operators (no power) of numbers, the inputs
    (``L['x']``), their sizes by methods of GUARD_METHODS, and GUARD_TORCH / GUARD_MATH functions."""
    if isinstance(node, (ast.Expression, ast.Load, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp,
                         ast.Subscript) + _GUARD_OPERATORS):
        return
    if isinstance(node, ast.Name):
        if node.id not in ("L", "torch", "math", "inf") and node.id not in GUARD_BUILTINS:
            raise _Refused(f"it names {node.id!r}")
        return
    if isinstance(node, ast.Attribute):
        base = node.value.id if isinstance(node.value, ast.Name) else None
        if (base == "torch" and node.attr in GUARD_TORCH) or (base == "math" and node.attr in GUARD_MATH) \
                or (base not in ("torch", "math") and node.attr in GUARD_METHODS):
            return
        raise _Refused(f"it reads {node.attr!r}")
    if isinstance(node, ast.Call):
        builtin = isinstance(node.func, ast.Name) and node.func.id in GUARD_BUILTINS
        if node.keywords or not (builtin or isinstance(node.func, ast.Attribute)):
            raise _Refused("a call other than a size method, max/min/abs or a torch.sym_* / math function")
        if not builtin and node.func.attr in GUARD_METHODS and node.args:
            raise _Refused(f"{node.func.attr}() with arguments")
        return
    if _number(node) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                         and _IDENTIFIER.match(node.value)):
        return
    raise _Refused(f"a {type(node).__name__} in a guard")


def _check_target(target: str) -> None:
    parts = target.split(".")
    if len(parts) in (4, 5) and parts[:2] == ["torch", "ops"] and parts[2] in OP_NAMESPACES and \
            all(_IDENTIFIER.match(p) for p in parts[3:]) and \
            (parts[2] != "higher_order" or (len(parts) == 4 and parts[3] in HIGHER_ORDER_OPS)):
        return  # (op.overload; a higher-order op has no overload)
    if len(parts) == 2 and parts[0] in PY_FUNCTIONS and parts[1] in PY_FUNCTIONS[parts[0]]:
        return
    if len(parts) == 2 and parts[0] == "torch" and parts[1] in GUARD_TORCH:
        return
    raise _Refused(f"a node calls {target[:80]!r}, which is not an operator of {', '.join(sorted(OP_NAMESPACES))}")


#: a string of a tree spec: a type or key name ("builtins.tuple", "x")
_SPEC_NAME = re.compile(r"[A-Za-z0-9_.]*\Z")


def _check_spec(key: str, spec: str) -> None:
    """An input/output tree spec (JSON, with JSON strings inside for each node's context): every string in it,
    decoded, is a type or key name, and no object is one torch's decoder turns into something else (an enum,
    ``{"__enum__": ..., "fqn": "module:Class"}``, makes it import the module named)."""
    try:
        pending = [json.loads(spec)]
    except (ValueError, RecursionError):
        raise _Refused(f"{key!r} is not a tree spec") from None
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            odd = next((k for k in value if not _SPEC_NAME.match(k) or k.startswith("__")), None)
            if odd is not None:
                raise _Refused(f"{key!r} holds an object with the key {odd[:80]!r}")
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str):
            if value.lstrip().startswith(("[", "{", '"')):
                try:
                    pending.append(json.loads(value))
                    continue
                except (ValueError, RecursionError):
                    pass
            if not _SPEC_NAME.match(value):
                raise _Refused(f"{key!r} names {value[:80]!r}, which is not a name")
