"""The package's layers read one way: every module imports only from its own package and from the layers before
its own (lazy imports inside functions included).

    core (types, config, errors, log, dist) -> data, reward, algo -> model -> rollout -> train, bench
        -> viz, recipes, experiments -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmrlsd"
LAYERS = [
    ("types", "config", "errors", "log", "dist"),
    ("data", "reward", "algo"),
    ("model",),
    ("rollout",),
    ("train", "bench"),
    ("viz", "recipes", "experiments"),
    ("cli",),
    ("__main__",),  # `python -m mmrlsd`: the CLI
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """`mmrlsd.model.vision` -> `model`: the top-level package or core module a dotted name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """`(line, dotted module)` of every `mmrlsd` import in a file; `from mmrlsd import x` counts as `mmrlsd.x`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mmrlsd"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmrlsd":
            if node.module == "mmrlsd":
                out += [(node.lineno, f"mmrlsd.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _is_module(root: Path, name: str) -> bool:
    return (root / name).is_dir() or (root / f"{name}.py").is_file()


def upward_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        me = rel.parts[1] if len(rel.parts) > 1 else ""
        if me == "__init__":
            continue  # the package root is empty
        if me not in LAYER:
            bad.append(f"{rel}: {me!r} is in no layer (add it to LAYERS)")
            continue
        for line, module in imports(path):
            other = unit(module)
            if other == me or other == "" or not _is_module(root, other):
                continue  # the package itself, or a name defined in its `__init__` (`__version__`)
            if other not in LAYER:
                bad.append(f"{rel}.py:{line}: imports {module}, which is in no layer")
            elif LAYER[other] > LAYER[me] or (LAYER[other] == LAYER[me] and LAYER[me] != 0):
                bad.append(
                    f"{rel}.py:{line}: {me} (layer {LAYER[me]}) imports {module} (layer {LAYER[other]})"
                )
    return bad


def test_no_module_imports_from_a_later_layer():
    bad = upward_imports()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """A model module importing the rollout layer, and a data module importing its sibling algo, are reported."""
    pkg = tmp_path / "mmrlsd"
    (pkg / "model").mkdir(parents=True)
    (pkg / "data").mkdir()
    (pkg / "algo").mkdir()
    (pkg / "rollout").mkdir()
    (pkg / "model" / "x.py").write_text("def f():\n    from mmrlsd.rollout.generate import generate\n")
    (pkg / "data" / "y.py").write_text("from mmrlsd import algo\nfrom mmrlsd.errors import DataError\n")
    bad = upward_imports(pkg)
    assert len(bad) == 2
    assert "model/x.py:2: model (layer 2) imports mmrlsd.rollout.generate (layer 3)" in bad[1]
    assert "data/y.py:1: data (layer 1) imports mmrlsd.algo (layer 1)" in bad[0]


@pytest.mark.parametrize("name", [n for names in LAYERS for n in names if n != "__main__"])
def test_every_layer_exists(name):
    assert (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
