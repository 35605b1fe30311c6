"""Neutralising special-token text in dataset text and model outputs.

A question that contains the literal text `<|image_pad|>` would be read by the tokenizer as the image
placeholder token (the processor then counts one image too many and fails), and `<|im_end|><|im_start|>` in a
question or a reference answer would end the user turn and start a new one. Model outputs can carry the same
text: several ordinary tokens can decode to `<|image_pad|>`, and SDPO puts a sampled response into the
teacher's prompt.

`neutralize_special_tokens` inserts a zero-width space (U+200B) after the first character of every such
occurrence: `<|im_end|>` becomes `<\\u200b|im_end|>`, which reads the same to a person but is no longer the
token (it is tokenised as ordinary text). It covers the tokenizer's special tokens and every `<|name|>` text,
the form of all Qwen control tokens (`<|vision_start|>`, `<|image_pad|>`, `<|video_pad|>`, `<|endoftext|>`,
...). The prompt builder applies it to every value it puts into a prompt (problem, answer, solution,
demonstration); prompt templates themselves are the user's and are left as written.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from mmrlsd.errors import ImageError, RecordError

ZERO_WIDTH_SPACE = "\u200b"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
"""Used when no tokenizer is given."""
_CONTROL_LIKE = r"<\|[^\s<>|]{1,64}\|>"  # any `<|name|>`


def special_tokens(tokenizer=None) -> tuple[str, ...]:
    """The special-token texts of `tokenizer` (a tokenizer, a processor holding one, or a list of strings);
    Qwen's list when None."""
    if tokenizer is None:
        return QWEN_SPECIAL_TOKENS
    if isinstance(tokenizer, str):
        return (tokenizer,)
    if isinstance(tokenizer, Iterable):
        return tuple(str(t) for t in tokenizer)
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor
    found = set(getattr(tok, "all_special_tokens", ()) or ())
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    for attr in ("image_token", "video_token", "vision_start_token", "vision_end_token"):  # on processors
        value = getattr(tokenizer, attr, None)
        if isinstance(value, str):
            found.add(value)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=32)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    literal = sorted({t for t in tokens if len(t) >= 2}, key=len, reverse=True)
    return re.compile("|".join([_CONTROL_LIKE, *map(re.escape, literal)]))


def neutralize_special_tokens(text: str, tokenizer=None) -> str:
    """`text` with every special-token text broken by a zero-width space after its first character.

    `tokenizer`: a tokenizer, a processor, or a list of token strings (None: Qwen's special tokens). Text without
    special tokens is returned unchanged. Idempotent.

    >>> neutralize_special_tokens("a <|image_pad|> b") == "a <\\u200b|image_pad|> b"
    True
    """
    if not text:
        return text
    tokens = special_tokens(tokenizer)
    if "<" not in text and not any(t[:1] != "<" and len(t) >= 2 and t in text for t in tokens):
        return text
    pattern = _pattern(tokens)
    # inserting never creates a new occurrence (no token contains U+200B), so overlapping occurrences that the
    # first pass hid are found by the next one; the count of occurrences falls every pass
    while True:
        new = pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)
        if new == text:
            return new
        text = new


class PromptCheck:
    """`data.max_prompt_tokens`, counted exactly for a record whose images are loaded: the longer of its student
    and teacher prompts (chat template and image tokens included; for SDPO the teacher prompt without the
    demonstration). A record over the limit, or whose image the vision processor refuses, raises `RecordError`
    (the dataset skips and counts it). Called once per record, before its first batch."""

    def __init__(self, prompts, processor, max_tokens: int):
        self.prompts, self.processor, self.max_tokens = prompts, processor, max_tokens

    def image_tokens(self, sample) -> int:
        ip = self.processor.image_processor
        merge = int(getattr(ip, "merge_size", 1) or 1)
        total = 0
        for j, img in enumerate(sample.pil_images):
            try:
                total += ip.get_number_of_image_patches(img.height, img.width, {}) // merge**2
            except Exception as e:  # qwen's smart_resize: ValueError for an aspect ratio it refuses
                raise ImageError(f"{sample.images[j]}: image refused by the vision processor ({img.width}x"
                                 f"{img.height}; {type(e).__name__}: {e})") from None  # fmt: skip
        return total

    def __call__(self, sample) -> None:
        if not self.max_tokens:
            self.image_tokens(sample)
            return
        try:
            texts = [self.prompts.student(sample), self.prompts.teacher(sample, demonstration="")]
        except ValueError as e:  # e.g. teacher_info solution and a record without one
            raise RecordError(str(e)) from None
        tok = self.processor.tokenizer
        longest = max(len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts)
        n = longest - len(sample.pil_images) + self.image_tokens(sample)  # one placeholder token per image
        if n > self.max_tokens:
            raise RecordError(f"prompt too long ({n:,} tokens with its images; data.max_prompt_tokens is "
                              f"{self.max_tokens:,})")  # fmt: skip
