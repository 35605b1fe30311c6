"""One interface for every rollout engine: `sample(...)` turns B chat prompts into G responses each (`Rollouts`,
rows prompt-major: prompt b owns rows b*G .. b*G+G-1).

    engine: RolloutEngine = HFEngine(policy, processor)         # rollout.engine: hf (the default)
    engine = VLLMEngine(model_path, processor=processor, ...)   # rollout.engine: vllm (the gpu extra)
    rollouts = engine.sample(texts, images, group_size=G, seed=seed, cfg=cfg.rollout, encoding=enc)

`encoding` is the processor encoding of the prompts already repeated G times (`repeat_encoding`); the training
step builds it anyway for the log-prob passes, and the HF engine samples from it directly. Engines that tokenise
themselves (vLLM) ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from mmrlsd.types import Rollouts


class RolloutEngine(Protocol):
    def sample(self, texts: list[str], images: list[list], *, group_size: int, seed: int, cfg,
               encoding=None) -> Rollouts: ...  # fmt: skip

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights (after each optimizer step)."""


class HFEngine:
    """Rollouts on the policy itself (`mmrlsd.rollout.generate`: the lean decode loop or Hugging Face `generate`,
    `rollout.hf_decode`)."""

    def __init__(self, policy, processor):
        self.policy, self.processor = policy, processor

    def sample(self, texts: list[str], images: list[list], *, group_size: int, seed: int, cfg,
               encoding=None) -> Rollouts:  # fmt: skip
        """G samples per prompt with the `rollout` config's settings; `encoding` (the prompts repeated G times)
        saves re-encoding them."""
        from mmrlsd.data.encoding import encode, repeat_encoding
        from mmrlsd.rollout.generate import generate

        if encoding is None:
            encoding = repeat_encoding(encode(self.processor, texts, images), group_size)
        return generate(self.policy, self.processor, encoding, group_size=group_size, seed=seed,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, gen_batch_size=cfg.gen_batch_size,
                        share_prefill=cfg.share_prefill, decode=cfg.hf_decode,
                        cascade=cfg.cascade_attention)  # fmt: skip

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: this engine samples from the policy module itself."""
