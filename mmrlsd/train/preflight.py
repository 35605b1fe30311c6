"""Checks `mmrlsd train` runs before it loads a model, shared with `mmrlsd validate`.

Reward name and plugins, the names that registries hold (`check_registered`), the prompt templates (exist, are files, compile, render with the known variables, read no
other file, and the teacher's actually shows the privileged information when the method needs it), the data
files and the model directory. Every failure names the key and the file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from jinja2 import TemplateError, nodes

from mmrlsd.algo.advantage import ADVANTAGES
from mmrlsd.algo.methods import METHODS, get_method
from mmrlsd.config import Config
from mmrlsd.data.prompts import _ENV, VARIABLES, load_template
from mmrlsd.errors import ConfigError, DataError
from mmrlsd.model.packing import ATTENTION_KERNELS
from mmrlsd.reward.rewards import REWARDS

PRIVILEGED = ("reference", "answer", "solution", "demonstration")
_FILE_NODES = {nodes.Include: "include", nodes.Extends: "extends", nodes.Import: "import",
               nodes.FromImport: "from ... import"}  # fmt: skip
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv"}


def needs_privileged(cfg: Config) -> bool:
    """Whether the teacher prompt must carry r: whenever the method's teacher pass can matter at λ_0 (RLSD with
    λ_0 > 0, OPSD and GRPO+OPSD; GRPO never uses it). An unknown method is `check_registered`'s to report."""
    a = cfg.algo
    return a.token_adv in METHODS and get_method(a.token_adv).needs_teacher(a.lam0, False)


def _render(path: str, key: str, values: dict) -> str:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {path} is a directory, not a prompt template")
    if not p.is_file():
        raise ConfigError(f"{key}: {path}: prompt template not found")
    tpl = load_template(p)
    try:
        tree = _ENV.parse(p.read_text(encoding="utf-8"))
    except TemplateError as e:  # load_template compiled it already; kept for a defensive message
        raise ConfigError(f"{key}: {path}: not a valid prompt template: {e}") from None
    for node_type, what in _FILE_NODES.items():
        node = next(tree.find_all(node_type), None)
        if node is not None:
            raise ConfigError(f"{key}: {path} (line {node.lineno}) uses {{% {what} %}}, which reads other files; "
                              "prompt templates must be self-contained")  # fmt: skip
    try:
        return tpl.render(**values)
    except Exception as e:  # noqa: BLE001 - UndefinedError, SecurityError, OverflowError...: all template faults
        raise ConfigError(f"{key}: {path}: prompt template cannot render: {e} (variables: "
                          f"{', '.join(VARIABLES)})") from None  # fmt: skip


def check_templates(cfg: Config) -> None:
    sentinel = {v: f"\x00{7001 + i}\x00" for i, v in enumerate(VARIABLES)}  # survives |upper, |lower, |trim
    student = _render(cfg.data.student_template, "data.student_template", sentinel)
    leaked = [v for v in PRIVILEGED if sentinel[v] in student]
    if leaked:
        raise ConfigError(f"data.student_template: {cfg.data.student_template} shows the student {leaked[0]!r}, "
                          "the privileged information only the teacher may see")  # fmt: skip
    teacher = _render(cfg.data.teacher_template, "data.teacher_template", sentinel)
    if needs_privileged(cfg) and not any(sentinel[v] in teacher for v in PRIVILEGED):
        raise ConfigError(
            f"data.teacher_template: {cfg.data.teacher_template} never uses the privileged information "
            f"({', '.join(PRIVILEGED)}), so the teacher sees what the student sees and "
            f"algo.token_adv={cfg.algo.token_adv} degenerates to GRPO; add {{{{ reference }}}} to the template"
        )


def check_reward(cfg: Config) -> None:
    from mmrlsd.reward.rewards import get_reward

    for module in cfg.reward.plugins:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"reward.plugins: cannot import {module!r} ({e})") from None
    try:
        get_reward(cfg.reward.name)
    except KeyError as e:
        raise ConfigError(f"reward.name: {e.args[0]}") from None


def registered_choices() -> dict[str, list[str]]:
    """Config keys whose valid values are the names a registry holds (in registration order): the registries are
    the lists, so a newly registered method, advantage, reward or kernel is valid at once. `mmrlsd ls` prints them;
    the config loader checks only what the config itself defines."""
    return {
        "algo.token_adv": list(METHODS),
        "algo.adv": list(ADVANTAGES),
        "reward.name": list(REWARDS),
        "model.packed_attention": list(ATTENTION_KERNELS),
    }


def check_registered(cfg: Config, src: str = "<config>") -> Config:
    """`check_reward` (imports the reward plugins), then every registry-backed key; returns `cfg`."""
    check_reward(cfg)
    for key, names in registered_choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in names:
            raise ConfigError(f"{src}: '{key}' is {value!r}; valid choices: {', '.join(names)}")
    return cfg


def _looks_local(source: str) -> bool:
    return (Path(source).suffix.lower() in _LOCAL_SUFFIXES or os.path.isabs(source)
            or source.startswith((".", "~")) or os.path.exists(source))  # fmt: skip


def missing_data(cfg: Config) -> list[str]:
    """`key: path: file not found` for each local data file that does not exist."""
    missing = []
    keys = [("data.train_files", cfg.data.train_files)]
    if cfg.trainer.val_every:
        keys.append(("data.val_files", cfg.data.val_files))
    for key, files in keys:
        for f in files:
            if f.startswith("hub:") or not _looks_local(f):
                continue
            if not Path(f).expanduser().exists():
                missing.append(f"{key}: {f}: file not found")
    return missing


def check(cfg: Config, output_dir: bool = True, data: bool = True) -> list[str]:
    """Everything `train` checks before it loads a model (`output_dir`: also `trainer.output_dir`). Missing data
    files are an error, or with `data=False` returned (`mmrlsd validate` reports them as warnings: a recipe's data
    may be prepared on the training machine only)."""
    from mmrlsd.model.load import check_checkpoint

    check_registered(cfg)
    check_templates(cfg)
    missing = missing_data(cfg)
    if missing and data:
        raise DataError(missing[0])
    check_checkpoint(cfg.model.path)
    out = Path(cfg.trainer.output_dir)
    if output_dir and out.exists() and not out.is_dir():
        raise ConfigError(f"trainer.output_dir: {out} exists and is not a directory")
    return missing
