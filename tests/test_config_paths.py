"""Paths in a config resolve against the config file's folder, then the current directory (overrides: the current
directory); templates ship in the package; `validate` and `train` check that files exist; a run made from one
directory is viewed (image overlay included) from any other."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmrlsd.cli import main as cli_main
from mmrlsd.config import load_config, packaged_prompt
from mmrlsd.errors import ConfigError, DataError, ModelError
from mmrlsd.train import preflight

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "plugins"))


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """`cfg/c.yaml` with `cfg/data/train.jsonl` and `cfg/my_student.jinja` beside it; returns (config, a cwd)."""
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "cfg" / "my_student.jinja").write_text("{{ problem }}\n")
    (tmp_path / "cfg" / "model").mkdir()
    (tmp_path / "cfg" / "model" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    cfg = tmp_path / "cfg" / "c.yaml"
    cfg.write_text(
        "model: {path: model}\n"
        "data:\n  train_files: [data/train.jsonl, hub:org/ds]\n  val_files: [cwd_only.jsonl]\n"
        "  student_template: my_student.jinja\n  teacher_template: tiny_teacher.jinja\n"
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "cwd_only.jsonl").write_text("{}\n")
    return cfg, cwd


def test_paths_resolve_against_the_config_then_the_cwd(tmp_path, monkeypatch):
    cfg_file, cwd = _layout(tmp_path)
    monkeypatch.chdir(cwd)
    cfg = load_config(cfg_file)
    base = tmp_path / "cfg"
    assert cfg.model.path == str(base / "model")
    assert cfg.data.train_files == [str(base / "data" / "train.jsonl"), "hub:org/ds"]  # hub: untouched
    assert cfg.data.val_files == [str(cwd / "cwd_only.jsonl")]  # not beside the config: the cwd
    assert cfg.data.student_template == str(base / "my_student.jinja")
    assert cfg.data.teacher_template == str(packaged_prompt("tiny_teacher.jinja"))  # a packaged template
    # the config's folder wins over the cwd when both have the path
    (cwd / "data").mkdir()
    (cwd / "data" / "train.jsonl").write_text("{}\n")
    assert load_config(cfg_file).data.train_files[0] == str(base / "data" / "train.jsonl")
    # overrides are typed in the shell: relative to the cwd
    over = load_config(
        cfg_file, ["data.train_files=[data/train.jsonl]", "model.path=Qwen/Qwen2-VL-7B-Instruct"]
    )
    assert over.data.train_files == [str(cwd / "data" / "train.jsonl")]
    assert over.model.path == "Qwen/Qwen2-VL-7B-Instruct"  # a hub id stays a hub id
    absolute = load_config(cfg_file, [f"data.val_files=[{tmp_path / 'x.jsonl'}]"]).data.val_files
    assert absolute == [str(tmp_path / "x.jsonl")]


def test_default_and_legacy_templates_are_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = load_config(None, ["model.path=m", "data.train_files=[d.jsonl]"]).data
    assert (d.student_template, d.teacher_template) == (
        str(packaged_prompt("student.jinja")),
        str(packaged_prompt("teacher.jinja")),
    )
    assert Path(d.student_template).is_file() and "mmrlsd" in Path(d.student_template).parts
    old = load_config(None, ["model.path=m", "data.train_files=[d.jsonl]",
                             "data.student_template=configs/prompts/tiny_student.jinja"]).data  # fmt: skip
    assert old.student_template == str(packaged_prompt("tiny_student.jinja"))


def test_missing_files_are_reported_by_key_before_anything_runs(tmp_path, monkeypatch, capsys):
    cfg_file, cwd = _layout(tmp_path)
    monkeypatch.chdir(tmp_path)  # cwd_only.jsonl is not found from here
    cfg = load_config(cfg_file, ["trainer.val_every=1"])
    assert cfg.data.val_files == ["cwd_only.jsonl"]  # left as given: found nowhere
    with pytest.raises(DataError, match=r"data.val_files: cwd_only.jsonl: file not found"):
        preflight.check(cfg)
    assert cli_main(["validate", str(cfg_file), "trainer.val_every=1"]) == 2  # what train would stop on
    assert "error: data.val_files: cwd_only.jsonl: file not found" in capsys.readouterr().err
    assert cli_main(["validate", str(cfg_file), "trainer.val_every=1", "--no-data-check"]) == 0
    assert "warning: data.val_files: cwd_only.jsonl: file not found" in capsys.readouterr().err
    cases = {"data.student_template=nope.jinja": (ConfigError, "data.student_template: nope.jinja: prompt template"),
             "model.path=./no_model": (ModelError, "no_model: model directory not found")}  # fmt: skip
    for override, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            preflight.check(load_config(cfg_file, [override]))
    from mmrlsd.train.loop import train

    with pytest.raises(DataError, match="cwd_only.jsonl"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no empty run directory left behind


def test_shipped_tiny_configs_work_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny_cpu", "grpo_tiny_cpu", "opsd_tiny_cpu", "sdpo_tiny_cpu"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        preflight.check(cfg, output_dir=False)
        assert cfg.model.path == str(REPO / "data" / "tiny" / "sft-qwen2vl"), name
        assert cfg.data.train_files == [str(REPO / "data" / "tiny" / "lab" / "train.jsonl")], name


def test_run_made_with_relative_paths_is_viewed_from_anywhere(tiny_model, tmp_path, monkeypatch):
    """The README's path: a config with relative paths, training started in one directory, the overlay drawn
    from another. Dumped image references and the run's config.yaml are absolute."""
    pytest.importorskip("matplotlib")
    from tinydata import write_records

    from mmrlsd.log import read_dump
    from mmrlsd.train.loop import train
    from mmrlsd.viz import image_overlay, open_run

    project = tmp_path / "project"
    write_records(project / "data", n=4, text_only_every=0)
    model = Path(tiny_model("qwen2_5_vl"))
    (project / "cfg.yaml").write_text(
        f"model: {{path: {model}}}\ndata:\n  train_files: [data/train.jsonl]\n"
        "  student_template: tiny_student.jinja\n  teacher_template: tiny_teacher.jinja\n"
        "reward: {name: charcount, plugins: [charcount_reward]}\n"
        "rollout: {n: 4, batch_size: 1, max_new_tokens: 8}\noptim: {micro_batch_size: 4}\n"
        "trainer: {total_steps: 1, save_every: 0, dump_max: 4}\n"
    )
    monkeypatch.chdir(tmp_path)  # training starts outside the project folder
    run = train(load_config(project / "cfg.yaml"), "runs/rel", progress=False)
    saved = load_config(run / "config.yaml", validate=False)
    assert Path(saved.data.train_files[0]).is_absolute() and Path(saved.data.student_template).is_absolute()
    rows = read_dump(run, 1)
    assert rows and all(Path(img).is_absolute() and Path(img).is_file() for r in rows for img in r["images"])
    other = tmp_path / "somewhere" / "else"
    other.mkdir(parents=True)
    monkeypatch.chdir(other)
    view = open_run(tmp_path / "runs" / "rel")
    ov = image_overlay(view, 1, rows[0], k=2)
    assert len(ov.images) == 1 and ov.grids[0].size > 0 and ov.checkpoint_step == 1


def test_relative_run_dir_for_the_notebook(tmp_path, monkeypatch):
    from mmrlsd.viz.data import default_run_dir

    (tmp_path / "repo" / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "repo" / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "notebooks")  # where a Jupyter kernel starts
    monkeypatch.setenv("MMRLSD_RUN_DIR", "runs/tiny")
    monkeypatch.delenv("PWD", raising=False)
    assert default_run_dir() == tmp_path / "repo" / "runs" / "tiny"  # found from the folder above
    (tmp_path / "launch" / "r").mkdir(parents=True)
    monkeypatch.setenv("PWD", str(tmp_path / "launch"))  # where `jupyter lab` was started
    monkeypatch.setenv("MMRLSD_RUN_DIR", "r")
    assert default_run_dir() == tmp_path / "launch" / "r"
    monkeypatch.setenv("MMRLSD_RUN_DIR", "missing/run")
    with pytest.raises(FileNotFoundError, match="run directory 'missing/run' not found"):
        default_run_dir()


def test_wheel_ships_the_templates_and_protocols(tmp_path):
    """A non-editable install has the prompt templates and benchmark protocols (package data)."""
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "mmrlsd", src / "mmrlsd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mmrlsd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in sorted((REPO / "mmrlsd" / "prompts").glob("*.jinja")):
        assert f"mmrlsd/prompts/{f.name}" in names
    assert "mmrlsd/bench/protocols/mathvista.yaml" in names
