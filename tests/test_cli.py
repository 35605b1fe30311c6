"""Every subcommand's --help works, ends with examples and imports no torch; `ls` lists the registries."""

import subprocess
import sys

import pytest

from mmrlsd.cli import COMMANDS, build_parser

NESTED = {"data": ["synth"], "lab": ["data", "compare", "credit", "check"]}
ALL = [[c] for c in COMMANDS] + [[c, s] for c, subs in NESTED.items() for s in subs]


@pytest.mark.parametrize("cmd", ALL, ids=" ".join)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"mmrlsd {' '.join(cmd)}" in out


def test_every_subcommand_is_listed():
    """`NESTED` above covers every nested subcommand, so `test_help` runs them all."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS) == sorted(c[0] for c in ALL if len(c) == 1)
    for name, nested in NESTED.items():
        inner = next(a for a in sub.choices[name]._actions if a.dest.endswith("_command"))
        assert sorted(inner.choices) == sorted(nested)


def test_no_help_imports_torch():
    """Building the parser and printing every subcommand's --help, in a fresh process, imports no torch."""
    code = (
        "import contextlib, io, sys\n"
        "from mmrlsd.cli import build_parser\n"
        f"for cmd in {ALL!r}:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        build_parser().parse_args(cmd + ['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_top_level_help_is_fast_and_has_examples():
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mmrlsd", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "mmrlsd train configs/tiny_cpu.yaml" in r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    assert "torch" not in imported and "transformers" not in imported, "--help must not import torch"


def test_ls(capsys):
    from mmrlsd.cli import main

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "rlsd" in out and "grpo" in out and "math" in out and "qwen3_vl" in out
    assert "answer, solution, sibling" in out and "sampled, jsd" in out


def test_overrides_may_follow_options(monkeypatch, tmp_path):
    """`mmrlsd train CFG --output-dir D key=value` (the README's torchrun command) keeps the overrides."""
    import mmrlsd.train.loop as loop
    from mmrlsd.cli import main

    seen = {}
    monkeypatch.setattr(loop, "train", lambda cfg, out, **kw: seen.update(cfg=cfg, out=out) or tmp_path)
    assert (
        main(
            ["train", "configs/qwen2vl_7b.yaml", "algo.lam0=0", "--output-dir", "d", "trainer.total_steps=2"]
        )
        == 0
    )
    assert seen["out"] == "d" and seen["cfg"].trainer.total_steps == 2 and seen["cfg"].algo.lam0 == 0.0
    with pytest.raises(SystemExit):
        main(["train", "configs/qwen2vl_7b.yaml", "--output-dir", "d", "--bogus"])
