"""Where the selected response tokens look in the image: one extra forward pass on a dumped response, on demand,
from a checkpoint in the run directory (never during training).

The sequence is rebuilt exactly as training scored it: the run's student prompt (its Jinja template and chat
template) with the sample's images, followed by the dumped response token ids. Response token t sits at column
P + t and is chosen by the hidden state at column P + t − 1, so that is the query whose attention we read.

Two attributions, each a score per image token (one token per merge×merge block of patches):

    attention   mean over text layers, heads and selected tokens of softmax attention from column P + t − 1 to
                each image token (eager attention, `output_attentions=True`)
    grad        |Σ_d x_d · ∂(Σ_t log π(y_t))/∂x_d| at each image token, x = the input of the first text decoder
                layer (gradient × input; any attention kernel)

Image token k of an image with `image_grid_thw` (t, h, w) and merge size m lies in block (k // (w/m), k % (w/m))
of the (h/m) × (w/m) grid, frames averaged; `grid_to_pixels` stretches that grid over the image the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mmrlsd.viz.data import Run, checkpoint_for, image_paths, top_tokens

METHODS = ("attention", "grad")


def merged_grids(image_grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int, int]]:
    """`(t, h/m, w/m)` per image: the layout of its image tokens in the language model's sequence."""
    return [(int(t), int(h) // merge_size, int(w) // merge_size) for t, h, w in image_grid_thw.tolist()]


def split_image_scores(scores: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Per-image-token scores `(n_image_tokens,)`, in sequence order, -> one `(h/m, w/m)` array per image (mean
    over frames)."""
    sizes = [t * h * w for t, h, w in grids]
    if scores.numel() != sum(sizes):
        raise ValueError(f"{scores.numel()} image-token scores for grids {grids} ({sum(sizes)} tokens)")
    out = []
    for chunk, (t, h, w) in zip(torch.split(scores.detach().float().cpu(), sizes), grids):
        out.append(chunk.reshape(t, h, w).mean(0).numpy())
    return out


def grid_to_pixels(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a `(gh, gw)` grid to `(height, width)`: pixel (y, x) takes cell
    (y·gh // height, x·gw // width)."""
    gh, gw = grid.shape
    rows = np.arange(height) * gh // height
    cols = np.arange(width) * gw // width
    return grid[rows[:, None], cols[None, :]]


def attention_to_image(
    attentions: list[torch.Tensor], queries: list[int], image_mask: torch.Tensor
) -> torch.Tensor:
    """Mean attention from the `queries` columns to the image tokens.

    attentions: per text layer `(1, heads, S, S)`; image_mask: `(S,)` bool. Returns `(n_image_tokens,)`."""
    stacked = torch.stack([a[0, :, queries, :].float() for a in attentions])  # (layers, heads, q, S)
    return stacked.mean(dim=(0, 1, 2))[image_mask]  # (n_image_tokens,)


@dataclass
class Overlay:
    """Heat maps of one response over its images (`grids[i]` is `(h/m, w/m)`, for `images[i]` as the model saw it)."""

    images: list  # PIL images
    grids: list[np.ndarray]
    tokens: list[int]
    """Response token indices whose attribution was summed."""
    method: str
    checkpoint_step: int


def _load_sharded(path: Path, dtype: str, attn: str):
    """A checkpoint saved as `state/` (torch.distributed.checkpoint) with the config and processor beside it."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mmrlsd.model.load import DTYPES
    from mmrlsd.train.checkpoint import load_policy_weights

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[dtype], attn_implementation=attn)
    model.load_state_dict(load_policy_weights(path))
    processor = AutoProcessor.from_pretrained(path)  # saved by training with its pixel budget applied
    processor.tokenizer.padding_side = "left"
    return model, processor


@lru_cache(maxsize=2)
def _load(path: str, dtype: str, device: str, attn: str, min_pixels: int, max_pixels: int):
    """`(model, processor)` of a checkpoint: its Hugging Face folder (`hf/`), else training's sharded `state/`."""
    from transformers.utils import logging as hf_logging

    from mmrlsd.model.load import load_model

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a notebook would show the weight-loading bar as a widget
    try:
        if (Path(path) / "state").is_dir() and not (Path(path) / "hf").is_dir():  # saved without hf/
            model, processor = _load_sharded(Path(path), dtype, attn)
        else:
            model, processor = load_model(path, dtype=dtype, device=device, attn_implementation=attn,
                                          min_pixels=min_pixels, max_pixels=max_pixels)  # fmt: skip
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), processor


def build_inputs(run: Run, row: dict, processor):
    """`(inputs, images, P)`: model inputs for `[student prompt | response]`, the images, the prompt length."""
    from mmrlsd.config import load_config
    from mmrlsd.data.encoding import encode
    from mmrlsd.data.images import load_image
    from mmrlsd.data.prompts import PromptBuilder
    from mmrlsd.types import Sample

    # the run's config.yaml holds absolute paths; relative ones (older runs) resolve against the run directory,
    # then the current directory, and template file names to the packaged templates
    cfg = load_config(run.path / "config.yaml", validate=False)
    ip = processor.image_processor
    max_pixels = (
        cfg.model.max_pixels or getattr(ip, "max_pixels", None) or (ip.size or {}).get("longest_edge")
    )
    images = [load_image(p, int(max_pixels or 1280 * 28 * 28)) for p in image_paths(run, row)]
    prompts = PromptBuilder(
        processor, cfg.data.student_template, cfg.data.teacher_template, cfg.algo.teacher_info
    )
    sample = Sample(id=row["id"], problem=row["problem"], answer=str(row["answer"]), images=row["images"])
    enc = encode(processor, [prompts.student(sample)], [images])
    response = torch.tensor([row["token_ids"]], dtype=enc["input_ids"].dtype)
    P = enc["input_ids"].shape[1]
    inputs = {"input_ids": torch.cat([enc["input_ids"], response], 1)}  # (1, P+T)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if enc.get("mm_token_type_ids") is not None:
        inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(response)], 1)
    if enc.get("pixel_values") is not None:
        inputs["pixel_values"], inputs["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    return inputs, images, P


def _first_layer(model) -> torch.nn.Module:
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return lm.layers[0]


def _grad_x_input(model, inputs: dict, targets: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """`(S,)` |Σ_d x·∂L/∂x| at the first decoder layer's input, L = Σ log π(targets) at `positions`."""
    captured = {}

    def hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        captured["x"] = h
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = _first_layer(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits[0].float()  # (S, V)
            logp = torch.log_softmax(logits[positions], dim=-1).gather(-1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, captured["x"])
    finally:
        handle.remove()
    return (grad * captured["x"]).sum(-1)[0].abs().detach()  # (S,)


def image_overlay(run: Run, step: int, row: dict, tokens: list[int] | None = None, method: str = "attention",
                  signal: str = "w", k: int = 5, device: str = "cpu") -> Overlay:  # fmt: skip
    """Attribution of response `tokens` (default: the `k` tokens furthest from neutral in `signal`) to the image
    tokens of `row`, computed with the checkpoint nearest to the policy that sampled `step`."""
    if method not in METHODS:
        raise KeyError(f"unknown overlay method {method!r}; known: {', '.join(METHODS)}")
    if not row["images"]:
        raise ValueError(f"sample {row['sample']} ({row['id']}) has no image to overlay")
    ckpt_step, ckpt = checkpoint_for(run, step)
    mcfg = run.config.get("model", {})
    model, processor = _load(str(ckpt), mcfg.get("dtype", "float32"), device, "eager",
                             int(mcfg.get("min_pixels", 0)), int(mcfg.get("max_pixels", 0)))  # fmt: skip
    inputs, images, P = build_inputs(run, row, processor)
    inputs = {key: v.to(device) for key, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tokens = sorted(tokens if tokens is not None else top_tokens(row, signal, k))
    positions = [P + t - 1 for t in tokens]  # the state that chose y_t
    ids = inputs["input_ids"][0]
    image_mask = (ids == model.config.image_token_id).cpu()  # (S,)
    S = ids.shape[0]
    if method == "attention":
        with torch.no_grad():
            out = model(**inputs, use_cache=False, output_attentions=True)
        text_layers = [a for a in out.attentions if a is not None and a.dim() == 4 and a.shape[-2:] == (S, S)]
        scores = attention_to_image([a.cpu() for a in text_layers], positions, image_mask)
    else:
        scores = _grad_x_input(model, inputs, ids[[P + t for t in tokens]], positions).cpu()[image_mask]
    grids = split_image_scores(
        scores, merged_grids(inputs["image_grid_thw"].cpu(), processor.image_processor.merge_size)
    )
    return Overlay(images, grids, tokens, method, ckpt_step)
