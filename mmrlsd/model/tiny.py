"""Tiny random-init Qwen-VL checkpoints with a locally trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here by the `tokenizers` library on a small
built-in corpus (plus any extra text), with the Qwen special tokens and a Qwen-style chat template, and the model
is a real `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` /
`Qwen3VLForConditionalGeneration` built from a shrunken config. `make_tiny` saves both in standard Hugging Face
format, so `AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load them
unchanged.

    mmrlsd make-tiny --arch qwen2_5_vl --out /tmp/tiny25
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The Qwen special tokens, in Qwen's order (ids differ: they follow our small vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template without the default system turn (shorter sequences on CPU; a system message passed
# by the caller is rendered as usual).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE_CORPUS = [
    "user assistant system question answer solution reference image picture think thought first then give final",
    "<thought> </thought> <answer> </answer> \\boxed{} \\frac{1}{2} \\sqrt{2} \\pi = + - * / ^ ( ) [ ] { } , . : ; ? !",
    "Here is a reference solution: the final answer inside A B C D E F G H yes no true false",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 0.5 3.14",
    "how many red green blue yellow black white shapes circles squares triangles bars are there in the",
    "which is the largest smallest more less than sum of two numbers compare count read chart height",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


@dataclass
class TinySize:
    """Widths of a tiny model (defaults: well under 1M parameters, CPU-fast). The SFT recipe's `init` section and
    the speed benchmark's settings extend it, so the widths are declared here only."""

    hidden: int = 64
    """Decoder width."""
    layers: int = 2
    """Decoder layers."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads."""
    intermediate: int = 128
    """Decoder MLP width."""
    vision_hidden: int = 32
    """Vision tower width."""
    vision_depth: int = 2
    """Vision tower blocks."""
    vision_heads: int = 2
    """Vision attention heads."""


# Head size 32 in the language model and the vision tower: vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ...
# (the default's 16 is refused there). Same depth as the default, about 0.2M parameters more.
VLLM_SIZE = TinySize(hidden=64, heads=2, kv_heads=1, intermediate=128, vision_hidden=64, vision_heads=2)


def build_tokenizer(
    extra_corpus: list[str] | None = None, vocab_size: int = 512, added_tokens: list[str] | None = None
):
    """Train a byte-level BPE on the built-in corpus (+ `extra_corpus`) and wrap it as a fast HF tokenizer.

    `added_tokens` (e.g. the response tags `<thought>`, `</answer>`) become single, non-special tokens: they are
    matched before BPE, so a tag is one token wherever it appears, and decoding keeps them (unlike special
    tokens, which `skip_special_tokens=True` drops).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_BASE_CORPUS) + list(extra_corpus or []), trainer=trainer)
    if added_tokens:
        tok.add_tokens(
            [AddedToken(t, single_word=False, normalized=False, special=False) for t in added_tokens]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(size: TinySize, vocab: int, tok) -> dict:
    head_dim = size.hidden // size.heads
    half = head_dim // 2  # mRoPE splits the rotary half-dim into (temporal, height, width) sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def tiny_config(arch: str, tok, size: TinySize | None = None):
    """A shrunken config of the given architecture whose special-token ids match `tok` (widths: `size`, default
    `TinySize()`)."""
    size = size or TinySize()
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = _text_config(size, len(tok), tok)
    vh, vd, vn = size.vision_hidden, size.vision_depth, size.vision_heads
    if arch == "qwen2_vl":
        vision = dict(depth=vd, embed_dim=vh, hidden_size=size.hidden, mlp_ratio=2, num_heads=vn)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=vd, hidden_size=vh, intermediate_size=2 * vh, num_heads=vn, out_hidden_size=size.hidden,
            window_size=56, fullatt_block_indexes=[vd - 1],
        )  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if arch == "qwen3_vl":
        vision = dict(
            depth=vd, hidden_size=vh, intermediate_size=2 * vh, num_heads=vn, out_hidden_size=size.hidden,
            num_position_embeddings=64, deepstack_visual_indexes=[0],
        )  # fmt: skip
        # as the released Qwen3-VL configs say: transformers always interleaves the (temporal, height, width)
        # rotary sections for Qwen3-VL, vLLM only when this flag is set (without it vLLM's image-token positions
        # rotate differently and its log-probs drift from transformers' on image prompts)
        text["rope_parameters"]["mrope_interleaved"] = True
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


def build_processor(arch: str, tok, min_pixels: int = 28 * 28, max_pixels: int = 112 * 112):
    """The architecture's processor around `tok`, with a small pixel budget for tiny images."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    patch = 16 if arch == "qwen3_vl" else 14
    image_proc = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    if arch == "qwen3_vl":
        image_proc.image_mean = [0.5, 0.5, 0.5]
        image_proc.image_std = [0.5, 0.5, 0.5]
        video_proc = Qwen3VLVideoProcessor(patch_size=patch)
        return Qwen3VLProcessor(image_proc, tok, video_proc, chat_template=CHAT_TEMPLATE)
    video_proc = Qwen2VLVideoProcessor(patch_size=patch)
    cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_proc, tok, video_proc, chat_template=CHAT_TEMPLATE)


def make_tiny(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    size: TinySize | None = None,
    extra_corpus: list[str] | None = None,
    vocab_size: int = 512,
    max_pixels: int = 112 * 112,
    added_tokens: list[str] | None = None,
) -> Path:
    """Write a random-init tiny `arch` model + processor to `out_dir` and return the path.

    `added_tokens`: extra single tokens for the tokenizer (see `build_tokenizer`)."""
    from transformers import AutoModelForImageTextToText

    if arch not in ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(extra_corpus, vocab_size, added_tokens)
    config = tiny_config(arch, tok, size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    build_processor(arch, tok, max_pixels=max_pixels).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "mmrlsd_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "params": n_params}) + "\n")
    return out
