"""Drive any registered benchmark: generate answers, score them, write the result files.

    records = bench.load(data, split)                       # gold, official format
    rows = generate_predictions(bench, records, model, cfg)  # [{"id", "prompt", "response", ...}]
    write predictions.jsonl; result = bench.score(records, bench.read_predictions(it), mode=...)
    write scores.json and summary.md

Scoring always re-reads `predictions.jsonl`, so `mmrlsd eval --predictions` on that file gives the same
numbers. Protocol settings (split, mode, sampling, `max_new_tokens`) live in the package, one YAML per
benchmark (`mmrlsd/bench/protocols/<bench>.yaml`, read with `importlib.resources`, so they ship with
every install).
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from mmrlsd.bench.base import Bench, Record, check_mode
from mmrlsd.config import load_dataclass
from mmrlsd.errors import ConfigError

PROTOCOLS = "protocols"
"""Folder of `mmrlsd.bench` holding the protocol files `<bench>.yaml` (package data)."""


@dataclass
class EvalConfig:
    """Protocol settings of one benchmark run (`protocols/<bench>.yaml`); CLI flags override them."""

    split: str = ""
    """Split to load; "" means the benchmark's default split."""
    mode: str = ""
    """Scoring mode for generated answers; "" means the benchmark's `generate_mode`."""
    max_new_tokens: int = 1024
    """Cap on generated tokens per answer."""
    temperature: float = 0.0
    """0 = greedy decoding (the official protocols all decode greedily)."""
    top_p: float = 1.0
    batch_size: int = 8
    """Prompts per generation batch."""
    seed: int = 0
    """Sampling seed (only matters when temperature > 0)."""
    samples: int = 0
    """k: sampled answers per record besides the main one, for pass@k and k/k reliability (ZeroBench);
    0 = none. Written to `predictions.jsonl` as `responses`."""
    sample_temperature: float = 0.7
    """Temperature of the k sampled answers."""
    sample_top_p: float = 0.95
    """top-p of the k sampled answers."""


def load_eval_config(path: str | Path | Traversable | None) -> EvalConfig:
    """An `EvalConfig` from YAML (`mmrlsd.config.load_dataclass`: an unknown key fails with a suggestion, a wrong
    type names the key); `path` may be a packaged resource."""
    cfg = load_dataclass(EvalConfig, None if path is None else Path(str(path)))
    if cfg.samples < 0:
        raise ConfigError(f"{path}: samples must be >= 0, got {cfg.samples}")
    return cfg


def default_config_path(bench_name: str) -> Traversable | None:
    """The packaged protocol file `mmrlsd/bench/protocols/<bench>.yaml`, when there is one."""
    path = resources.files("mmrlsd.bench").joinpath(PROTOCOLS, f"{bench_name}.yaml")
    return path if path.is_file() else None


# ---------------------------------------------------------------- generation engines


def hf_generate(model_path: str, prompts: list[tuple[str, list]], cfg: EvalConfig, *, dtype: str, device: str,
                progress: bool) -> list[str]:  # fmt: skip
    """Greedy/sampled answers with transformers (`mmrlsd.rollout.generate.generate_texts`)."""
    from mmrlsd.model.load import load_model
    from mmrlsd.rollout.generate import generate_texts

    model, processor = load_model(model_path, dtype=dtype, device=device)
    model.eval()
    return generate_texts(model, processor, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, batch_size=cfg.batch_size, progress=progress, seed=cfg.seed)  # fmt: skip


def vllm_generate(model_path: str, prompts: list[tuple[str, list]], cfg: EvalConfig, *, dtype: str, device: str,
                  progress: bool) -> list[str]:  # fmt: skip
    """The same answers with vLLM: the chat text, images, EOS ids, blocked vision tokens, sampling settings and
    decoding of `hf_generate` (greedy answers are the same tokens)."""
    from transformers import AutoProcessor, GenerationConfig

    from mmrlsd.data.encoding import chat_text
    from mmrlsd.rollout.generate import eos_token_ids
    from mmrlsd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    processor = AutoProcessor.from_pretrained(model_path)
    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen = GenerationConfig()
    eos = eos_token_ids(types.SimpleNamespace(generation_config=gen), processor)
    max_images = max((len(images) for _, images in prompts), default=1)
    engine = VLLMEngine(model_path, processor=processor, dtype=dtype, seed=cfg.seed, max_images=max(max_images, 1),
                        settings=VLLMSettings(gpu_memory_utilization=0.85, sleep="off"))  # fmt: skip
    chats = [(chat_text(processor, text, len(images)), images) for text, images in prompts]
    return engine.eval_sample(chats, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=cfg.seed, eos=eos)  # fmt: skip


ENGINES = {"hf": hf_generate, "vllm": vllm_generate}


def pick_engine(name: str) -> str:
    """`auto` -> `vllm` when it imports and a GPU is present, else `hf`."""
    if name != "auto":
        if name not in ENGINES:
            raise KeyError(f"unknown engine {name!r}; known: auto, {', '.join(ENGINES)}")
        return name
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm" if torch.cuda.is_available() else "hf"


def generate_predictions(bench: Bench, records: list[Record], model_path: str, cfg: EvalConfig, *,
                         data_root: Path | None = None, engine: str = "hf", dtype: str = "float32",
                         device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """One `predictions.jsonl` row per record: `{"id", "prompt", "response", **bench.prediction_fields}`, plus
    `responses` (`cfg.samples` answers sampled at `sample_temperature`/`sample_top_p`) when `cfg.samples > 0`.
    The sampled pass is a second engine call (the model is loaded again)."""
    prompts = [(bench.prompt(r), bench.images(r, data_root)) for r in records]
    generate = ENGINES[engine]
    responses = generate(model_path, prompts, cfg, dtype=dtype, device=device, progress=progress)
    rows = [
        {"id": bench.record_id(r), "prompt": text, "response": resp, **bench.prediction_fields(r)}
        for r, (text, _), resp in zip(records, prompts, responses)
    ]
    if cfg.samples > 0:
        k = cfg.samples
        sampling = dataclasses.replace(cfg, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p)
        flat = generate(model_path, [p for p in prompts for _ in range(k)], sampling, dtype=dtype, device=device,
                        progress=progress)  # fmt: skip
        for i, row in enumerate(rows):
            row["responses"] = flat[i * k : (i + 1) * k]
    return rows


# ---------------------------------------------------------------- outputs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def summary_markdown(result: dict[str, Any]) -> str:
    """A Markdown report of a result: headline, every breakdown table, scalar extras and warnings."""
    lines = [f"# {result['bench']} {result['split']} (mode: {result['mode']})", ""]
    if result.get("label"):
        lines += [f"**{result['label']}**", ""]
    lines += ["| n | correct | accuracy |", "|---|---|---|",
              f"| {result['n']} | {result['correct']} | {_pct(result['accuracy'])} |", ""]  # fmt: skip
    for key, value in result.items():  # flat dicts of numbers: leaderboard columns, four-dimensional metrics
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            lines += [f"## {key}", "", "| " + " | ".join(value) + " |", "|" + "---|" * len(value),
                      "| " + " | ".join(str(v) for v in value.values()) + " |", ""]  # fmt: skip
    for group, table in result.get("breakdown", {}).items():
        lines += [f"## by {group}", "", f"| {group} | correct | total | accuracy |", "|---|---|---|---|"]
        for value, cell in table.items():
            lines.append(f"| {value} | {cell['correct']} | {cell['total']} | {_pct(cell['accuracy'])} |")
        lines.append("")
    if result.get("warnings"):
        lines += ["## warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    return "\n".join(lines)


def write_result(out_dir: Path, result: dict[str, Any]) -> None:
    """`scores.json` and `summary.md` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "scores.json", result)
    (out_dir / "summary.md").write_text(summary_markdown(result), encoding="utf-8")


def evaluate(bench: Bench, records: list[Record], model_path: str, out_dir: Path, cfg: EvalConfig, *,
             data_root: Path | None = None, engine: str = "hf", dtype: str = "float32", device: str = "cpu",
             progress: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """Generate, write `predictions.jsonl`, score it and write `scores.json` + `summary.md`.
    Returns the result, or None for a split whose answers are withheld (predictions only)."""
    split = cfg.split or bench.default_split
    mode = cfg.mode or bench.generate_mode
    check_mode(bench, mode)
    rows = generate_predictions(bench, records, model_path, cfg, data_root=data_root, engine=engine, dtype=dtype,
                                device=device, progress=progress)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    write_jsonl(pred_path, rows)
    if split in bench.unscored_splits:
        return None
    result = bench.score(records, bench.read_predictions(pred_path), mode=mode, split=split)
    settings = {**dataclasses.asdict(cfg), "split": split, "mode": mode}
    result["generation"] = {"model": model_path, "engine": engine, "dtype": dtype, **settings}
    write_result(out_dir, result)
    return result
