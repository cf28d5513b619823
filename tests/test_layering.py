"""The layout holds: no module imports a layer above its own, and no import circle among the project's modules.

Every module's imports are read with ``ast`` (nothing is imported): module-level ones and those inside
functions (lazy), noted apart; ``importlib.import_module("metaplastic....")`` counts as an import of that
module. The layers, from the bottom (docs/architecture.md):

- core: the modules of ``unify/metaplastic`` (objective, closed forms, registry, the front door of every scan,
  the reference scan, safe output, ...) except the application modules below;
- kernels (``metaplastic.kernels``), then models (``metaplastic.models``);
- the application: the command line, training, experiments, the demo, evaluation.

A core module may not import kernels, models or the application; kernels may not import models or the
application; models may not import the application. A cycle of imports (lazy ones included) among the
project's modules is refused whatever the layers.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
# where each subpackage's files live (models/, kernels/, derivations/ are linked into unify/metaplastic)
SOURCES = {"metaplastic": ROOT / "unify" / "metaplastic", "metaplastic.models": ROOT / "models",
           "metaplastic.kernels": ROOT / "kernels", "metaplastic.derivations": ROOT / "derivations"}
APPLICATION = ("metaplastic.cli", "metaplastic.__main__", "metaplastic.registry_cli", "metaplastic.demo",
               "metaplastic.finetune", "metaplastic.finetune_data", "metaplastic.finetune_launch",
               "metaplastic.evaluate", "metaplastic.experiments")
# (importer, imported prefix): why this upward import is allowed, inside a function only (never at import)
ALLOWED_LAZY = {
    ("metaplastic", "metaplastic.models"): "the package's __getattr__ resolves the public model names "
                                           "(from metaplastic import MetaplasticForCausalLM) on first access, and "
                                           "the model registers with transformers' Auto classes once the program "
                                           "imports transformers: neither at `import metaplastic`",
}


def modules() -> Dict[str, Path]:
    """Every source module of the package: dotted name -> file."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if package == "metaplastic" and rel.parts[0] in ("models", "kernels", "derivations"):
                continue  # the links to the namespace subpackages: listed under their own names
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, path: Path) -> bool:
    return path.name == "__init__.py" or name in SOURCES


def imports(name: str, path: Path, known: Set[str]) -> List[Tuple[str, bool, int]]:
    """``(imported module, lazy, line)`` for every import of a project module in ``path``; ``lazy``: inside a
    function."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(name, path) else name.rpartition(".")[0]
    found = []

    def add(target: str, lazy: bool, line: int) -> None:
        while target not in known and target not in SOURCES and "." in target:
            target = target.rpartition(".")[0]  # an attribute of a module: the module
        if target in known or target in SOURCES:
            found.append((target, lazy, line))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, lazy, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in known else base, lazy, child.lineno)
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                  == "import_module" and child.args):
                arg = child.args[0]
                text = arg.value if isinstance(arg, ast.Constant) else (
                    arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                    and isinstance(arg.values[0], ast.Constant) else "")
                if isinstance(text, str) and text.startswith("metaplastic"):
                    add(text.rstrip("."), lazy, child.lineno)
            visit(child, inner)

    visit(tree, False)
    return found


def layer(name: str) -> int:
    """0 core, 1 kernels, 2 models, 3 application (derivations: beside the core, checked for circles only)."""
    if name == "metaplastic.kernels" or name.startswith("metaplastic.kernels."):
        return 1
    if name == "metaplastic.models" or name.startswith("metaplastic.models."):
        return 2
    if any(name == app or name.startswith(app + ".") for app in APPLICATION):
        return 3
    return 0


def graph() -> Dict[str, List[Tuple[str, bool, int]]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_the_parser_sees_module_level_and_lazy_imports():
    g = graph()
    assert any(t == "metaplastic.kernels.chunk" and not lazy for t, lazy, _ in g["metaplastic.kernels.chunk_triton"])
    assert any(t == "metaplastic.kernels.chunk_triton" and lazy for t, lazy, _ in g["metaplastic.kernels.dispatch"])
    assert any(t == "metaplastic.models" and lazy for t, lazy, _ in g["metaplastic"])  # through import_module
    assert len(g) > 60


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for name, targets in graph().items():
        if name.startswith("metaplastic.derivations"):
            continue
        for target, lazy, line in targets:
            if layer(target) <= layer(name) or target.startswith("metaplastic.derivations"):
                continue
            if lazy and any(name == imp and (target == pre or target.startswith(pre + "."))
                            for imp, pre in ALLOWED_LAZY):
                continue
            upward.append(f"{name}:{line} imports {target}{' (lazily)' if lazy else ''}")
    assert not upward, "imports of a layer above:\n" + "\n".join(upward)


def test_no_import_circle():
    g = {name: sorted({t for t, _, _ in targets if t != name}) for name, targets in graph().items()}
    # the package root re-exports its submodules: importing a name from `metaplastic` is not a circle
    g = {name: [t for t in targets if t != "metaplastic"] for name, targets in g.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            strong(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
