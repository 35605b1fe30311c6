"""The README's quick start, run as written (at reduced size through overrides) in a folder laid out like a fresh
clone: train the tiny default -> `mmrlsd eval --model RUN/checkpoint-N` -> `from_pretrained` on the checkpoint's
Hugging Face folder -> the notebook with the image overlay. The README's test-install commands are what CI runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SMALL = ["trainer.total_steps=2", "trainer.val_every=2", "data.max_val_items=16", "trainer.dump_every=1"]
"""Overrides that shrink the tiny default for the test (the README runs 100 steps: checkpoint-100)."""


def quick_start_blocks() -> tuple[str, str, str]:
    """The README quick start's ```bash blocks: (install + train, what to run after training, install + tests)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)

    def the(marker: str) -> str:
        found = [b for b in blocks if marker in b]
        assert len(found) == 1, (marker, blocks)
        return found[0]

    return the("mmrlsd train configs/tiny_cpu.yaml"), the("mmrlsd eval"), the("python -m pytest -q\n")


def commands(block: str) -> list[str]:
    """The commands of a block: one per line, `&&` chains split."""
    return [c.strip() for line in block.splitlines() if line.strip() for c in line.split("&&")]


def test_readme_install_commands_are_what_ci_runs():
    train_block, _, test_block = quick_start_blocks()
    ci = (REPO / ".ci" / "run").read_text()
    installs = [c for c in commands(test_block) if c.startswith("pip install")]
    assert installs, test_block
    for c in installs:
        assert f"python -m pip install -q {c.removeprefix('pip install ')}" in ci, c
    assert "python -m pytest -q" in commands(test_block) and "python -m pytest -q" in ci
    torch_pins = [c for c in commands(train_block) if "torch==" in c]
    assert torch_pins == [c for c in installs if "torch==" in c]  # the same pair everywhere


def _run(cmd: str, cwd: Path, extra: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd) + list(extra)
    if argv[0] == "mmrlsd":  # the console script, without relying on this environment's PATH
        argv = [sys.executable, "-m", "mmrlsd", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_readme_quick_start_path(tmp_path):
    pytest.importorskip("matplotlib")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    from test_bench_e2e import mathvista_data

    train_block, after_block, _ = quick_start_blocks()
    clone = tmp_path / "clone"  # the checkout's files, not its runs/ (a fresh clone has none)
    clone.mkdir()
    for name in ("configs", "data", "notebooks"):
        (clone / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    (train,) = [c for c in commands(train_block) if c.startswith("mmrlsd train")]
    assert train == "mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny"
    r = _run(train, clone, SMALL, env)
    assert "validation accuracy:" in r.stdout and "runs/tiny/checkpoint-2" in r.stdout
    assert (clone / "runs" / "tiny" / "summary.json").is_file()

    evaluate, load, notebook = [c.replace("checkpoint-100", "checkpoint-2") for c in commands(after_block)
                                if not c.startswith("pip install")]  # fmt: skip
    assert evaluate.startswith("mmrlsd eval --bench mathvista --model runs/tiny/checkpoint-2 ")
    data, split = mathvista_data(tmp_path / "mathvista")  # a local MathVista file instead of the hub
    _run(
        evaluate,
        clone,
        ["--data", str(data), "--split", split, "--max-new-tokens", "8", "--device", "cpu"],
        env,
    )
    assert (clone / "runs" / "tiny" / "eval" / "scores.json").is_file()

    assert "from_pretrained" in load and "runs/tiny/checkpoint-2/hf" in load
    assert _run(load, clone, env=env).stdout.strip().splitlines()[-1] == "qwen2_vl"

    var, jupyter, verb, path = shlex.split(notebook)
    assert (var, jupyter, verb, path) == (
        "MMRLSD_RUN_DIR=runs/tiny",
        "jupyter",
        "lab",
        "notebooks/token_credit.ipynb",
    )
    nb_path = clone / path
    nb = nbformat.read(nb_path, as_version=4)
    # `jupyter lab` started in the clone: the server's (and so the kernel's) $PWD, while the kernel's working
    # directory is the notebook's folder
    kernel_env = {**env, "PWD": str(clone), var.split("=")[0]: var.split("=", 1)[1], "MMRLSD_VIZ_STATIC": "1"}
    old = dict(os.environ)
    os.environ.update(kernel_env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(nb_path.parent)}}).execute()  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    views = {o.metadata["mmrlsd"] for o in outputs if o.get("metadata", {}).get("mmrlsd")}
    assert "overlay" in views, [o.get("text", o.get("data", {}).get("text/html", ""))[:200] for o in outputs]
    assert any("runs/tiny" in o.get("text", "") for o in outputs)  # the run the notebook opened
