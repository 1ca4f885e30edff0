"""ipfx.program_model: the size expressions and guards torch.export writes pass the check of the program JSON,
whatever their shape (hypothesis over sympy expressions of symbolic sizes, printed as torch prints them), and
the same text with code put into it does not."""

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._sympy.functions import FloorDiv, Max, Min, Mod, PythonMod
from torch.utils._sympy.printers import PythonPrinter

from ipfx.program_model import check_model

SYMBOLS = [sympy.Symbol(f"s{i}", positive=True, integer=True) for i in (0, 27, 53)]
SIZES = {s: sympy.Symbol(f"L['x'].size()[{i + 1}]") for i, s in enumerate(SYMBOLS)}


def expressions():
    """Integer expressions of symbolic sizes, as torch.export's shape environment makes them."""
    leaves = st.sampled_from(SYMBOLS) | st.integers(-64, 4096).map(sympy.Integer)
    return st.recursive(leaves, lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda ab: ab[0] + ab[1]),
        st.tuples(inner, inner).map(lambda ab: ab[0] * ab[1]),
        st.tuples(inner, st.integers(1, 64)).map(lambda ab: FloorDiv(ab[0], ab[1])),
        st.tuples(inner, st.integers(1, 64)).map(lambda ab: PythonMod(ab[0], ab[1])),
        st.tuples(st.sampled_from(SYMBOLS), st.integers(1, 64)).map(lambda ab: Mod(ab[0], ab[1])),  # (of sizes)
        st.tuples(inner, inner).map(lambda ab: Max(ab[0], ab[1])),
        st.tuples(inner, inner).map(lambda ab: Min(ab[0], ab[1])),
    ), max_leaves=12)


RELATIONS = [sympy.Eq, sympy.Ne, sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge]


@settings(max_examples=150, deadline=None)
@given(expression=expressions(), other=expressions(), relation=st.sampled_from(RELATIONS))
def test_the_expressions_and_guards_torch_writes_pass(expression, other, relation):
    """srepr is how torch.export stores a symbolic size (expr_str); its Python printer, the inputs' sizes in
    place of the symbols, is how a guard reads (guards_code)."""
    condition = relation(expression, other, evaluate=False)
    guard = PythonPrinter().doprint(condition.xreplace(SIZES))
    check_model({"graph_module": {"expr_str": sympy.srepr(expression)}, "guards_code": [guard]})


@pytest.mark.parametrize("key, text", [
    ("expr_str", "Add(Symbol('s0', positive=True, integer=True), __import__('os').getpid())"),
    ("expr_str", "Integer(1).__class__"),
    ("expr_str", "Symbol('s0', positive=True, integer=True)(Integer(1))"),  # (calls a symbol: not a constructor)
    ("expr_str", "Lambda(Symbol('x'), Symbol('x'))"),
    ("guards_code", "L['x'].size()[2] == __import__('os').getpid()"),
    ("guards_code", "max(1, L['x'].size()[2]).__class__ == 1"),
    ("guards_code", "L['x'].size()[2] == 1 # \n"),
    ("guards_code", "L['x'].size()[2] == len('a')"),
    ("guards_code", "L['x'].size()[2] ** 99999 == 1"),
])
def test_code_in_an_expression_or_a_guard_is_refused(key, text):
    model = {"graph_module": {"expr_str": text}} if key == "expr_str" else {"guards_code": [text]}
    with pytest.raises(ValueError, match=key):
        check_model(model)
