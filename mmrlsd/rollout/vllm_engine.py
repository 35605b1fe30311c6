"""Colocated vLLM rollouts (the `gpu` extra), behind the same interface as the Hugging Face engine.

One `vllm.LLM` per training rank shares the GPU with the policy: it sleeps (weights and KV cache released) while
the policy trains and wakes up for generation; after every optimizer step the policy's current weights are pushed
into it in memory (no disk round-trip). Images go in as multi-modal data, the vision placeholder tokens are blocked
with a -inf-like logit bias, and sampling settings are the same as `rollout.engine: hf`.

    rollout:
      engine: vllm

Not testable on CPU here: vLLM's CPU build cannot load Qwen-VL models on these machines (see NOTES.md); the
test suite covers everything around the `vllm.LLM` calls with a stand-in object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mmrlsd.types import Rollouts

BLOCK = -100.0  # logit bias that makes a token unsampleable in practice


def rollouts_from_ids(seqs: list[list[int]], eos: list[int], pad: int, tokenizer, group_size: int) -> Rollouts:
    """Right-padded ids and the mask up to and including the first EOS, as the HF engine returns them."""
    n = len(seqs)
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cut = len(s)
        for j, t in enumerate(s):
            if t in eos:
                cut = j + 1
                break
        ids[i, :cut] = torch.tensor(s[:cut], dtype=torch.long)
        mask[i, :cut] = 1
    texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(ids, mask)], skip_special_tokens=True)
    return Rollouts(response_ids=ids, response_mask=mask, texts=texts, group_size=group_size)


class VLLMEngine:
    """Rollouts from a colocated `vllm.LLM`.

    Args:
        model_path: the checkpoint to start from (the policy's initial weights).
        llm_factory: builds the LLM (default `vllm.LLM`); tests pass a stand-in.
    """

    def __init__(self, model_path: str, *, processor, dtype: str = "bfloat16", seed: int = 0,
                 gpu_memory_utilization: float = 0.4, max_model_len: int = 8192, max_images: int = 8,
                 llm_factory: Callable | None = None):  # fmt: skip
        from mmrlsd.rollout.generate import vision_token_ids

        if llm_factory is None:
            from vllm import LLM as llm_factory  # noqa: N811
        self.processor = processor
        self.banned = vision_token_ids(processor)
        self.llm = llm_factory(
            model=model_path, dtype=dtype, seed=seed, enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images}, trust_remote_code=False,
        )  # fmt: skip
        self.asleep = False

    def sampling_params(self, *, n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                        seed: int | None, eos: list[int]):  # fmt: skip
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
            seed=seed, stop_token_ids=eos, logit_bias={t: BLOCK for t in self.banned}, skip_special_tokens=True,
            detokenize=False,
        )  # fmt: skip

    def generate(self, texts: list[str], images: list[list], *, group_size: int, params, eos: list[int], pad: int) -> Rollouts:
        """G samples for each of the B chat texts; rows ordered prompt-major like the HF engine."""
        self.wake()
        requests = []
        for text, imgs in zip(texts, images):
            req = {"prompt": text}
            if imgs:
                req["multi_modal_data"] = {"image": imgs}
            requests.append(req)
        outs = self.llm.generate(requests, params, use_tqdm=False)
        seqs = [list(c.token_ids) for o in outs for c in o.outputs]
        self.sleep()
        return rollouts_from_ids(seqs, eos, pad, self.processor.tokenizer, group_size)

    def sample(self, texts: list[str], images: list[list], *, group_size: int, seed: int, cfg,
               encoding=None) -> Rollouts:  # fmt: skip
        """G samples per chat text with the `rollout` config's settings (`mmrlsd.rollout.engine.RolloutEngine`;
        vLLM tokenises the texts itself, so `encoding` is not used)."""
        tok = self.processor.tokenizer
        eos = sorted({i for i in (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
                      if i is not None and i != tok.unk_token_id})  # fmt: skip
        params = self.sampling_params(n=group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                      max_new_tokens=cfg.max_new_tokens, seed=seed, eos=eos)  # fmt: skip
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        return self.generate(texts, images, group_size=group_size, params=params, eos=eos, pad=pad)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the policy's current weights into the engine's model (in memory)."""
        self.wake(tags=["weights"])
        weights = list(named_tensors)

        def load(model):
            model.load_weights(weights)

        self.llm.apply_model(load)

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()
            self.asleep = tags is not None  # weights-only wake keeps the KV cache released
