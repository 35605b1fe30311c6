"""Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint and its processor by hub id or local directory."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from mmrlsd.errors import ModelError

SUPPORTED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """Where the weights of `path` are: a training checkpoint `RUN/checkpoint-N` -> its Hugging Face folder
    `RUN/checkpoint-N/hf`; a run directory -> that of its newest complete checkpoint; anything else (a model
    folder, a hub id) unchanged."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file() and not (p / "state").is_dir():
        return path
    if (p / "hf" / "config.json").is_file():
        return str(p / "hf")
    if (p / "state").is_dir():
        raise ModelError(
            f"{path}: a training checkpoint without a Hugging Face folder (hf/; saved with trainer.save_hf: false): "
            f"write one with `mmrlsd export {path} --out {p / 'hf'}`"
        )
    done = [c for c in p.glob("checkpoint-*") if c.name[11:].isdigit() and (c / "COMPLETE").is_file()]
    if done:
        return resolve_model_path(str(max(done, key=lambda c: int(c.name[11:]))))
    return path


def check_checkpoint(path: str) -> None:
    """Fail early, naming the path, for a missing directory or an unsupported architecture."""
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if not looks_local:
        return  # a hub id: transformers reports what it can
    if not p.exists():
        raise ModelError(f"{path}: model directory not found")
    if not p.is_dir():
        raise ModelError(f"{path}: is a file, not a model directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg}: not valid JSON ({e})") from None
    if model_type not in SUPPORTED:
        raise ModelError(
            f"{path}: model_type {model_type!r} is not a supported vision-language model; "
            f"supported: {', '.join(SUPPORTED)}"
        )


def set_pixel_budget(processor, min_pixels: int = 0, max_pixels: int = 0) -> None:
    """Make the processor resize every image to between ``min_pixels`` and ``max_pixels`` pixels (0: keep the
    processor's own bound), keeping the aspect ratio and rounding each side to whole vision patches: smaller
    images are upscaled, larger ones downscaled. The bounds live in the image processor's ``size``
    (``shortest_edge`` / ``longest_edge`` count pixels for the Qwen-VL processors)."""
    if min_pixels or max_pixels:
        ip = processor.image_processor
        size = dict(getattr(ip, "size", None) or {})
        if min_pixels:
            size["shortest_edge"] = min_pixels
        if max_pixels:
            size["longest_edge"] = max_pixels
        ip.size = size


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    min_pixels: int = 0,
    max_pixels: int = 0,
    empty: bool = False,
):
    """`(model, processor)` through the transformers Auto classes; the processor pads on the left. `path` may
    also be a training checkpoint or a run directory (`resolve_model_path`).

    `empty`: the model is built from its config with every parameter and buffer on the meta device (no memory,
    no weight file read) and left there (`device` is ignored): what FSDP ranks > 0 start from before receiving
    rank 0's weights (`mmrlsd.train.fsdp.shard_model(from_rank0=True)`). Config, generation config and
    eval mode are those `from_pretrained` gives."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(path)
    check_checkpoint(path)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if empty:
            model = _empty_model(path, kwargs)
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"{path}: cannot load as a vision-language model ({type(e).__name__}: {e})"
        ) from None
    if model.config.model_type not in SUPPORTED:
        raise ModelError(
            f"{path}: model_type {model.config.model_type!r} unsupported; supported: {SUPPORTED}"
        )
    set_pixel_budget(processor, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "left"
    return (model if empty else model.to(device)), processor


def _empty_model(path: str, kwargs: dict):
    """`from_pretrained(path, **kwargs)` without the weights: built under the meta device, as `from_pretrained`
    itself builds before it loads (tied weights stay tied), then the generation config read the same way and
    eval mode set."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, **kwargs)
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: keep the one built from the model config
            pass
    return model.eval()


def master_dtype(compute_dtype: str, mixed_precision: bool) -> str:
    """The dtype parameters, gradients and AdamW states are kept in: float32 under mixed precision (the compute
    dtype is then only the dtype of the forward and backward passes), else the compute dtype itself."""
    return "float32" if mixed_precision else compute_dtype


def compute_autocast(device: torch.device | str, compute_dtype: str, params_dtype: str):
    """The context every forward (and its backward) of a training step runs in: `torch.autocast` to
    `compute_dtype` when parameters are stored wider (float32 master weights under bf16 compute), else a no-op,
    so a float32 run is exactly what it is without it.

    The autocast weight cache is off: parameters change between the optimizer steps of one rollout batch, and a
    cached low-precision copy would go stale. Each matmul casts its weight afresh (cheap next to the matmul).
    """
    if compute_dtype == params_dtype:
        return nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=DTYPES[compute_dtype], cache_enabled=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
