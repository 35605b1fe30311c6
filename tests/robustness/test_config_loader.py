"""Config loader, `mmrlsd validate` and numeric bounds: every bad input is one `error:` line naming the file or
key, exit code 2, no traceback. `mmrlsd validate` runs the checks `train` runs before it loads a model
(templates, reward, data files, model directory), so the cases are run through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmrlsd.cli import main
from mmrlsd.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _validate(capsys, *argv: str) -> tuple[int, str]:
    code = main(["validate", *argv])
    out = capsys.readouterr()
    return code, out.err + out.out


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_tiny_config_validates(capsys):
    code, out = _validate(capsys, TINY)
    assert code == 0 and "OK" in out, out


LOADER_CASES = [
    ("duplicate_section", "algo:\n  lam0: 0.1\noptim:\n  lr: 1.0e-5\nalgo:\n  eps_w: 0.3\n",
     r"error: .*dup\.yaml: not valid YAML: key 'algo' is given twice \(lines 1 and 5\)"),
    ("duplicate_key", "algo:\n  lam0: 0.1\n  lam0: 0.2\n", r"key 'lam0' is given twice \(lines 2 and 3\)"),
    ("deep_list", "a: " + "[" * 20000 + "]" * 20000 + "\n", r"error: .*dup\.yaml: nested too deeply"),
    ("deep_map", "a: " + "{b: " * 20000 + "1" + "}" * 20000 + "\n", r"nested too deeply"),
    ("not_utf8", "model:\n  path: caf\xe9\n".encode("latin-1"), r"error: .*dup\.yaml: not UTF-8 text \(byte 18"),
    ("binary", b"\x00\x01\x02\xff" * 100, r"error: .*dup\.yaml: not"),
    ("top_level_list", "- a\n- b\n", r"the top level must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize("text,pattern", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_bad_config_file(tmp_path, capsys, text, pattern):
    import re

    code, out = _validate(capsys, _write(tmp_path / "dup.yaml", text))
    assert code == 2 and re.search(pattern, out), out
    assert "Traceback" not in out


def test_config_path_is_a_directory(tmp_path, capsys):
    code, out = _validate(capsys, str(tmp_path))
    assert code == 2 and f"error: {tmp_path}: is a directory, not a config file" in out


OVERRIDE_CASES = [
    (["algo=3", "algo.lam0=0"], "override 'algo.lam0=0': 'algo' was already set to a value by another override"),
    (["algo.lam0=0", "algo=3"], "override 'algo=3': 'algo' is a section already given keys by another override"),
    (["data.train_files=[a"], "override 'data.train_files=[a': not valid YAML"),
    (["=3"], "override '=3': '' is not a dotted key"),
    (["optim..lr=1"], "override 'optim..lr=1': 'optim..lr' is not a dotted key"),
    (["optim.lr=" + "[" * 5000 + "]" * 5000], "override 'optim.lr=" + "[" * 68 + "...': nested too deeply"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,message", OVERRIDE_CASES, ids=[" ".join(c[0])[:30] for c in OVERRIDE_CASES]
)
def test_bad_override(capsys, overrides, message):
    code, out = _validate(capsys, TINY, *overrides)
    assert code == 2 and f"error: {message}" in out, out
    assert "Traceback" not in out


BOUND_CASES = [
    ("optim.lr=1e308", "'optim.lr' must be <= 1, got 1e+308"),
    ("optim.lr=2", "'optim.lr' must be <= 1"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("optim.lr=-1e-6", "'optim.lr' must be > 0"),
    ("optim.weight_decay=5", "'optim.weight_decay' must be <= 1"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas' must be in [0, 1)"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must be >= 0"),
    ("rollout.temperature=1e9", "'rollout.temperature' must be <= 10"),
    ("rollout.temperature=-0.5", "'rollout.temperature' must be >= 0"),
    ("rollout.val_temperature=50", "'rollout.val_temperature' must be <= 10"),
    ("algo.clip_low=1.5", "'algo.clip_low' must be <= 0.99"),
    ("algo.clip_c=0.5", "'algo.clip_c' must be 0 (off) or > 1"),
    ("rollout.n=-4", "'rollout.n' must be > 0"),
    ("trainer.total_steps=-1", "'trainer.total_steps' must be > 0"),
    ("reward.format_weight=-1", "'reward.format_weight' must be >= 0"),
    ("reward.timeout=1e9", "'reward.timeout' must be <= 3600"),
]  # fmt: skip


@pytest.mark.parametrize("override,message", BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_value_no_run_can_mean(capsys, override, message):
    code, out = _validate(capsys, TINY, override)
    assert code == 2 and message in out, out


def test_bounds_keep_meaningful_values():
    cfg = load_config(TINY, ["optim.lr=1.0", "rollout.temperature=0", "algo.clip_c=0", "algo.clip_c=3"])
    assert cfg.optim.lr == 1.0 and cfg.rollout.temperature == 0


def _templates(tmp_path: Path, student: str, teacher: str) -> list[str]:
    return [f"data.student_template={_write(tmp_path / 's.jinja', student)}",
            f"data.teacher_template={_write(tmp_path / 't.jinja', teacher)}"]  # fmt: skip


TEMPLATE_CASES = [
    ("include", "{{ problem }}", "{% include '/etc/passwd' %}{{ reference }}",
     r"data\.teacher_template: .*t\.jinja \(line 1\) uses \{% include %\}, which reads other files"),
    ("extends", "{% extends 'base.jinja' %}", "{{ problem }} {{ reference }}", r"uses \{% extends %\}"),
    ("import", "{% from 'm.jinja' import x %}{{ problem }}", "{{ problem }} {{ reference }}",
     r"uses \{% from \.\.\. import %\}"),
    ("unknown_variable", "{{ problme }}", "{{ problem }} {{ reference }}",
     r"data\.student_template: .*s\.jinja: prompt template cannot render: 'problme' is undefined"),
    ("syntax", "{{ problem ", "{{ problem }} {{ reference }}", r"s\.jinja: not a valid prompt template"),
    ("unsafe_attribute", "{{ problem.__class__ }}", "{{ problem }} {{ reference }}", r"cannot render: access to "),
    ("teacher_without_reference", "{{ problem }}", "{{ problem }}\nthink step by step",
     r"data\.teacher_template: .*t\.jinja never uses the privileged information .* degenerates to GRPO"),
    ("student_sees_answer", "{{ problem }} (answer: {{ answer|upper }})", "{{ problem }} {{ reference }}",
     r"data\.student_template: .*s\.jinja shows the student 'answer'"),
]  # fmt: skip


@pytest.mark.parametrize("student,teacher,pattern", [c[1:] for c in TEMPLATE_CASES],
                         ids=[c[0] for c in TEMPLATE_CASES])  # fmt: skip
def test_bad_template(tmp_path, capsys, student, teacher, pattern):
    import re

    code, out = _validate(capsys, TINY, *_templates(tmp_path, student, teacher))
    assert code == 2 and re.search(pattern, out), out
    assert "Traceback" not in out


def test_grpo_may_leave_out_the_reference(tmp_path, capsys):
    code, out = _validate(
        capsys, TINY, "algo.lam0=0", *_templates(tmp_path, "{{ problem }}", "{{ problem }}")
    )
    assert code == 0, out


def test_template_is_a_directory_or_missing(tmp_path, capsys):
    code, out = _validate(capsys, TINY, f"data.student_template={tmp_path}")
    assert code == 2 and f"error: data.student_template: {tmp_path} is a directory" in out
    code, out = _validate(capsys, TINY, f"data.teacher_template={tmp_path / 'nope.jinja'}")
    assert (
        code == 2
        and "error: data.teacher_template: " in out
        and "nope.jinja: prompt template not found" in out
    )


def test_validate_checks_data_files_model_and_reward(tmp_path, capsys):
    # a missing data file: an error from validate and train; a warning with --no-data-check (data prepared elsewhere)
    code, out = _validate(capsys, TINY, f"data.train_files=[{tmp_path / 'missing.jsonl'}]")
    assert code == 2 and f"error: data.train_files: {tmp_path / 'missing.jsonl'}: file not found" in out
    code, out = _validate(capsys, TINY, f"data.val_files=[{tmp_path / 'v.parquet'}]", "--no-data-check")
    assert code == 0 and "warning: data.val_files: " in out
    code = main(["train", TINY, f"data.train_files=[{tmp_path / 'missing.jsonl'}]", "--output-dir",
                 str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: data.train_files: {tmp_path / 'missing.jsonl'}: file not found" in err
    assert not (tmp_path / "run").exists()
    code, out = _validate(capsys, TINY, f"model.path={tmp_path / 'nomodel'}")
    assert code == 2 and "model directory not found" in out
    code, out = _validate(capsys, TINY, "reward.plugins=[no_such_module_xyz]")
    assert code == 2 and "error: reward.plugins: cannot import 'no_such_module_xyz'" in out
    code, out = _validate(capsys, TINY, "reward.name=nope")
    assert code == 2 and "error: reward.name: unknown reward 'nope'; known: " in out
    (tmp_path / "afile").write_text("x")
    code, out = _validate(capsys, TINY, f"trainer.output_dir={tmp_path / 'afile'}")
    assert code == 2 and "trainer.output_dir: " in out and "is not a directory" in out


@pytest.mark.parametrize(
    "text,pattern", [c[1:] for c in LOADER_CASES[:5]], ids=[c[0] for c in LOADER_CASES[:5]]
)
def test_bad_sft_config_file(tmp_path, capsys, text, pattern):
    """`mmrlsd sft` reads its recipe with the same loader."""
    import re

    code = main(["sft", _write(tmp_path / "dup.yaml", text), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err) and "Traceback" not in err, err
