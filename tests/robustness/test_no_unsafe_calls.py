"""No code path in `mmrlsd/` may execute or unpickle untrusted strings.

An AST scan of every module in the package fails on:

* `eval(...)`, `exec(...)`, `sympy.sympify(...)`, `parse_expr(...)` (sympy's string parsers call `eval`);
* `yaml.load` / `yaml.load_all` without `Loader=SafeLoader` (or `CSafeLoader`/`BaseLoader`), and
  `yaml.unsafe_load` / `yaml.full_load` (and their `_all` forms);
* `torch.load(...)` without the literal `weights_only=True`;
* `torch.distributed.checkpoint.load(...)` without both `storage_reader=` and `planner=` (torch's default reader
  unpickles `.metadata` and its default planner unpickles non-tensor entries with `weights_only=False`);
* `pickle`/`cPickle`/`dill`/`marshal` `load(s)`, `pickle.Unpickler`, `pandas.read_pickle`,
  `numpy.load(..., allow_pickle=True)`;
* a literal `trust_remote_code=True` (keyword or dict entry);
* `subprocess.*(..., shell=True)`, `os.system(...)`, `os.popen(...)`.

Names are resolved through the module's imports (`import pickle as pk`, `from yaml import load`), so aliases do
not hide a call. Anything legitimate goes into `ALLOWED` with the reason; an entry that no longer matches fails
too, so the list cannot rot.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mmrlsd"

# (path relative to mmrlsd/, rule, enclosing function or "<module>") -> why it is safe
ALLOWED: dict[tuple[str, str, str], str] = {
    ("config.py", "yaml.load without SafeLoader", "_safe_load"): "Loader=_UniqueKeyLoader, a yaml.SafeLoader "
    "subclass that only adds duplicate-key detection (tested in test_config_loader.py)",
}

SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}
ALWAYS_UNSAFE = {
    "eval": "eval",
    "exec": "exec",
    "builtins.eval": "eval",
    "builtins.exec": "exec",
    "sympy.sympify": "sympify",
    "sympy.core.sympify.sympify": "sympify",
    "sympy.parsing.sympy_parser.parse_expr": "parse_expr",
    "sympy.parse_expr": "parse_expr",
    "yaml.unsafe_load": "yaml.unsafe_load",
    "yaml.unsafe_load_all": "yaml.unsafe_load",
    "yaml.full_load": "yaml.full_load",
    "yaml.full_load_all": "yaml.full_load",
    "pickle.load": "pickle",
    "pickle.loads": "pickle",
    "pickle.Unpickler": "pickle",
    "_pickle.load": "pickle",
    "_pickle.loads": "pickle",
    "cPickle.load": "pickle",
    "cPickle.loads": "pickle",
    "dill.load": "pickle",
    "dill.loads": "pickle",
    "marshal.load": "marshal",
    "marshal.loads": "marshal",
    "pandas.read_pickle": "pickle",
    "os.system": "shell",
    "os.popen": "shell",
}
DCP_LOADS = {
    "torch.distributed.checkpoint.load",
    "torch.distributed.checkpoint.state_dict_loader.load",
    "torch.distributed.checkpoint.load_state_dict",
}
SUBPROCESS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
              "subprocess.Popen", "subprocess.getoutput", "subprocess.getstatusoutput"}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    where: str
    code: str

    def __str__(self) -> str:
        return f"mmrlsd/{self.path}:{self.line} [{self.rule}] in {self.where}: {self.code}"


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module (at any depth)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`pk.loads` -> "pickle.loads" (through the aliases); None for calls on anything but names/attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _call_rule(call: ast.Call, name: str) -> str | None:
    """The rule a call breaks, or None."""
    if name in ALWAYS_UNSAFE:
        return ALWAYS_UNSAFE[name]
    if name in ("yaml.load", "yaml.load_all"):
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        loader_name = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
        return None if loader_name in SAFE_YAML_LOADERS else "yaml.load without SafeLoader"
    if name == "torch.load":
        return None if _is_true(_kw(call, "weights_only")) else "torch.load without weights_only=True"
    if name in DCP_LOADS and (_kw(call, "storage_reader") is None or _kw(call, "planner") is None):
        return "dcp.load without a safe reader and planner"
    if name in ("numpy.load", "np.load") and _is_true(_kw(call, "allow_pickle")):
        return "pickle"
    if name in SUBPROCESS and _is_true(_kw(call, "shell")):
        return "shell"
    if _is_true(_kw(call, "trust_remote_code")):
        return "trust_remote_code=True"
    return None


class _Scanner(ast.NodeVisitor):
    def __init__(self, rel: str, source: str, aliases: dict[str, str]):
        self.rel, self.lines, self.aliases = rel, source.splitlines(), aliases
        self.scope: list[str] = []
        self.found: list[Finding] = []

    def _add(self, node: ast.AST, rule: str) -> None:
        where = ".".join(self.scope) or "<module>"
        self.found.append(Finding(self.rel, node.lineno, rule, where, self.lines[node.lineno - 1].strip()))

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func, self.aliases)
        rule = _call_rule(node, name) if name else None
        if rule is None and name is None and _is_true(_kw(node, "trust_remote_code")):
            rule = "trust_remote_code=True"
        if rule:
            self._add(node, rule)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v):
                self._add(node, "trust_remote_code=True")
        self.generic_visit(node)


def scan_source(source: str, rel: str = "<string>") -> list[Finding]:
    """Every unsafe call in one module's source."""
    tree = ast.parse(source)
    scanner = _Scanner(rel, source, _aliases(tree))
    scanner.visit(tree)
    return scanner.found


def scan_package(root: Path = PACKAGE) -> list[Finding]:
    return [f for p in sorted(root.rglob("*.py")) for f in scan_source(p.read_text(encoding="utf-8"),
                                                                       p.relative_to(root).as_posix())]  # fmt: skip


def test_package_has_no_unsafe_calls():
    assert PACKAGE.is_dir() and len(list(PACKAGE.rglob("*.py"))) > 10, PACKAGE
    found = scan_package()
    bad = [f for f in found if (f.path, f.rule, f.where) not in ALLOWED]
    assert not bad, "unsafe calls (fix them, or add to ALLOWED with a reason):\n" + "\n".join(map(str, bad))
    used = {(f.path, f.rule, f.where) for f in found}
    stale = [k for k in ALLOWED if k not in used]
    assert not stale, f"ALLOWED entries that match nothing any more (remove them): {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


BAD_SNIPPETS = [
    ("eval(s)", "eval"),
    ("exec(code)", "exec"),
    ("import builtins\nbuiltins.eval(s)", "eval"),
    ("from sympy import sympify\nsympify(s)", "sympify"),
    ("from sympy.parsing.sympy_parser import parse_expr as pe\npe(s)", "parse_expr"),
    ("import yaml\nyaml.load(f)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load(f, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load(f, yaml.FullLoader)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.unsafe_load(f)", "yaml.unsafe_load"),
    ("from yaml import full_load\nfull_load(f)", "yaml.full_load"),
    ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only=True"),
    ("import torch as T\nT.load(p, map_location='cpu')", "torch.load without weights_only=True"),
    ("from torch import load\nload(p)", "torch.load without weights_only=True"),
    ("import pickle\npickle.loads(b)", "pickle"),
    ("import pickle as pk\npk.load(f)", "pickle"),
    ("from pickle import loads\nloads(b)", "pickle"),
    ("import pickle\npickle.Unpickler(f).load()", "pickle"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "pickle"),
    ("import torch.distributed.checkpoint as dcp\ndcp.load(s, checkpoint_id=p)", "dcp.load without a safe reader and planner"),
    ("from torch.distributed.checkpoint import load\nload(s, storage_reader=r)", "dcp.load without a safe reader and planner"),
    ("import pandas as pd\npd.read_pickle(p)", "pickle"),
    ("import marshal\nmarshal.loads(b)", "marshal"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
     "trust_remote_code=True"),
    ("kw = {'trust_remote_code': True}", "trust_remote_code=True"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)", "shell"),
    ("from subprocess import Popen\nPopen(cmd, shell=True)", "shell"),
    ("import os\nos.system(cmd)", "shell"),
    ("def f():\n    import os\n    return os.popen(cmd).read()", "shell"),
]  # fmt: skip

GOOD_SNIPPETS = [
    "import yaml\nyaml.safe_load(f)",
    "import yaml\nyaml.load(f, Loader=yaml.SafeLoader)",
    "from yaml import CSafeLoader, load\nload(f, CSafeLoader)",
    "import torch\ntorch.load(p, weights_only=True, map_location='cpu')",
    "model.eval()",  # nn.Module.eval is not builtins.eval
    "import re\nre.compile(p)",
    "import subprocess\nsubprocess.run([exe, '-c', code], check=True)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)",
    "import numpy as np\nnp.load(p)",
    "import ast\nast.literal_eval(s)",
    "import torch.distributed.checkpoint as dcp\ndcp.load(s, storage_reader=r, planner=p)",
]


@pytest.mark.parametrize("source,rule", BAD_SNIPPETS, ids=[s.splitlines()[-1][:40] for s, _ in BAD_SNIPPETS])
def test_scanner_catches(source, rule):
    """The scanner itself: each unsafe pattern is found (so a clean package scan means something)."""
    assert [f.rule for f in scan_source(source)] == [rule]


@pytest.mark.parametrize("source", GOOD_SNIPPETS, ids=[s.splitlines()[-1][:40] for s in GOOD_SNIPPETS])
def test_scanner_passes_safe_calls(source):
    assert scan_source(source) == []


def test_trust_remote_code_is_off_by_default():
    import inspect

    from mmrlsd.config import Config
    from mmrlsd.model.load import load_model

    assert Config().model.trust_remote_code is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
