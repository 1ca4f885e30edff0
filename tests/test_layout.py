"""The package layering (README, "Layout"): each layer imports only the layers below it.

Read from the source (every ``import``, module-level or inside a function), so a new arrow that runs
upward, or a cycle between packages, fails here with the file and the import that made it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "ipfx"

#: What each layer may import (besides itself); bottom first. A layer is a package of ipfx or a module
#: at its top.
MAY_IMPORT = {
    "errors": set(),
    "inference": set(),
    "atomic": set(),
    "inputs": {"errors"},
    "program_model": set(),
    "program_files": {"errors", "program_model"},
    "form": {"errors"},
    "config": {"errors", "form"},
    "capture": {"errors", "inputs", "config", "form"},
    "ops": {"errors", "inputs", "form"},
    "passes": {"errors", "inputs", "config", "form", "capture", "ops"},
    "pruning": {"errors", "inputs", "form"},
    # (deploy: load_module runs a pass)
    "deploy": {"atomic", "errors", "inference", "inputs", "program_files", "capture", "ops", "passes"},
    "api": {"errors", "inference", "inputs", "config", "form", "capture", "ops", "passes", "pruning"},
    "ipfx": {"api", "errors", "config", "form", "capture", "ops", "pruning"},  # ipfx/__init__.py: the public names
    "integrations": {"api", "errors", "inputs", "config", "form", "pruning"},
    "experiments": {"api", "atomic", "errors", "inputs", "config", "form", "capture", "ops", "pruning", "deploy",
                    "ipfx"},
    "cli": {"api", "errors", "inputs", "config", "form", "capture", "ops", "passes", "pruning", "deploy",
            "program_files", "experiments", "ipfx"},
    "__main__": {"cli"},
}


def _layer(module: str) -> str:
    """``ipfx.capture.modes`` -> ``capture``; ``ipfx`` -> ``ipfx``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ipfx"


def _module_of(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute ipfx module, line) of every import in ``path``."""
    module, is_package = _module_of(path)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "ipfx"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ipfx":
                continue
            if node.module is None or _layer(target) == "ipfx":  # from . import x: x may be a layer
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
    return found


def _arrows() -> list[tuple[str, str, str]]:
    arrows = []
    for path in sorted(ROOT.rglob("*.py")):
        source = _layer(_module_of(path)[0])
        for target, line in _imports(path):
            layer = _layer(target)
            if layer in MAY_IMPORT or layer == "ipfx":
                arrows.append((source, layer, f"{path.relative_to(ROOT.parent)}:{line} imports {target}"))
    return arrows


def test_every_layer_is_in_the_table():
    layers = {_layer(_module_of(p)[0]) for p in ROOT.rglob("*.py")}
    assert layers <= set(MAY_IMPORT), f"layers without a rule: {sorted(layers - set(MAY_IMPORT))}"


def test_each_layer_imports_only_what_it_may():
    wrong = [where for source, target, where in _arrows()
             if source != target and target not in MAY_IMPORT[source]]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layers_form_no_cycle():
    graph = nx.DiGraph((s, t) for s, t, _ in _arrows() if s != t)
    assert nx.is_directed_acyclic_graph(graph), f"cycle between layers: {nx.find_cycle(graph)}"


def test_the_readme_layout_table_names_every_package_and_top_module():
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    missing = [name for name in sorted(MAY_IMPORT) if name not in ("ipfx", "__main__")
               and f"`ipfx/{name}/`" not in table and f"`ipfx/{name}.py`" not in table]
    assert not missing, f"README's layout table lacks {missing}"
