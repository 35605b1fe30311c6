"""Colocated vLLM rollouts (`rollout.engine: vllm`), behind the same interface as the Hugging Face engine.

Each training process owns one `vllm.LLM` beside the policy. After every optimizer step the policy's current
weights are pushed into it in memory (no disk round-trip); images go in as multi-modal data; the vision
placeholder tokens are blocked with a -inf-like logit bias; sampling settings are those of `rollout.engine: hf`.

    rollout:
      engine: vllm
      vllm_gpu_memory_utilization: 0.5   # share of the GPU for vLLM's weights + KV cache
      vllm_max_model_len: 0              # 0: the model's own limit
      vllm_tensor_parallel_size: 1       # under torchrun: ranks per engine
      vllm_enforce_eager: false

Where the engine runs, and how weights reach it:

- **In this process** (the default): the engine core runs inside the training process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; executor `uni` in a single process, `external_launcher` under torchrun,
  where the ranks of one tensor-parallel group drive one engine together). Weights go in through the workers'
  `reload_weights` (`collective_rpc`), which loads checkpoint-format tensors into the model in place, repacked
  linear layers included. This works on CPU and GPU.
- **In its own process** (`rollout.vllm_in_process: false`, single process only): the weight-update API that vLLM
  provides for RL (`init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
  `finish_weight_update`) with its CUDA-IPC backend on GPUs: the engine maps the trainer's tensors, no copy through
  the host. On CPU (no such backend there) the tensors travel as bytes through `collective_rpc` to a small
  worker extension (`mmrlsd.rollout.vllm_worker`) that calls the same `reload_weights`.

Platform-aware settings: sleep mode (weights and KV cache released while the policy trains) only where vLLM
supports it (CUDA), `max_model_len` left to vLLM unless configured, the CPU build's KV cache sized by
`rollout.vllm_cpu_kvcache_gb`. vLLM's CPU worker replaces `torch.set_num_threads` for the whole process with a
no-op; the engine restores the real function and the thread count the trainer had set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable

import torch

from mmrlsd.types import Rollouts

BLOCK = -100.0  # logit bias that makes a token unsampleable in practice
log = logging.getLogger("mmrlsd.rollout")


@dataclasses.dataclass(frozen=True)
class VLLMSettings:
    """The engine's limits (the `rollout.vllm_*` config keys)."""

    gpu_memory_utilization: float = 0.5
    max_model_len: int = 0
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_num_seqs: int = 0
    cpu_kvcache_gb: float = 1.0
    sleep: str = "auto"
    in_process: bool = True

    @classmethod
    def from_config(cls, rollout_cfg) -> VLLMSettings:
        return cls(**{f.name: getattr(rollout_cfg, f"vllm_{f.name}") for f in dataclasses.fields(cls)})


def current_platform() -> str:
    """`cuda` or `cpu` (or another name vLLM's platform reports)."""
    from vllm.platforms import current_platform as p

    return "cpu" if p.is_cpu() else ("cuda" if p.is_cuda_alike() else str(p.device_type))


def checkpoint_config(model_path: str):
    """The checkpoint's transformers config, or None when it cannot be read."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def model_positions(cfg) -> int | None:
    """The `max_position_embeddings` of a checkpoint's config `cfg` (its text config), or None (no config)."""
    return getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings", None)


def hf_overrides(cfg) -> dict | None:
    """Config overrides (`vllm.LLM(hf_overrides=...)`) under which vLLM runs the checkpoint whose config is `cfg`
    as transformers, the trainer, does; None when none is needed (or there is no config).

    Qwen3-VL: transformers always interleaves the (temporal, height, width) sections of the rotary dimensions;
    vLLM interleaves them only when the text config's rope parameters say `mrope_interleaved: true`, as the
    released checkpoints do. A checkpoint without the flag would otherwise roll out with image tokens rotated
    differently from the log-probs training computes (on the tiny Qwen3-VL: 1.4e-2 in log-probability)."""
    if getattr(cfg, "model_type", None) not in ("qwen3_vl", "qwen3_vl_moe"):
        return None
    rope = dict(getattr(cfg.text_config, "rope_parameters", None) or {})
    if "mrope_section" not in rope or rope.get("mrope_interleaved"):
        return None
    return {"text_config": {"rope_parameters": {**rope, "mrope_interleaved": True}}}


def engine_kwargs(model_path: str, s: VLLMSettings, *, dtype: str, seed: int, platform: str, world_size: int,
                  max_images: int, positions: int | None) -> dict:  # fmt: skip
    """`vllm.LLM(...)` keyword arguments for this platform and process layout."""
    tp = s.tensor_parallel_size
    if tp > 1 and world_size == 1:
        raise ValueError(
            f"rollout.vllm_tensor_parallel_size={tp} needs torchrun with a multiple of {tp} processes "
            "(the ranks of one tensor-parallel group drive one engine)"
        )
    if world_size % tp:
        raise ValueError(
            f"rollout.vllm_tensor_parallel_size={tp} must divide the number of ranks ({world_size})"
        )
    if world_size > 1 and not s.in_process:
        raise ValueError(
            "rollout.vllm_in_process=false is for single-process runs; under torchrun it must be true"
        )
    if s.max_model_len and positions and s.max_model_len > positions:
        raise ValueError(
            f"rollout.vllm_max_model_len={s.max_model_len} exceeds the model's {positions} positions"
        )
    kw = dict(model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tp, enforce_eager=s.enforce_eager,
              limit_mm_per_prompt={"image": max_images}, trust_remote_code=False)  # fmt: skip
    if s.max_model_len:
        kw["max_model_len"] = s.max_model_len
    if s.max_num_seqs:
        kw["max_num_seqs"] = s.max_num_seqs
    if platform == "cpu":
        kw["kv_cache_memory_bytes"] = int(s.cpu_kvcache_gb * 2**30)
    else:
        kw["gpu_memory_utilization"] = s.gpu_memory_utilization
    if s.sleep == "on" or (s.sleep == "auto" and platform == "cuda"):
        kw["enable_sleep_mode"] = True
    # the worker runs inside the engine core: each rank's own (torchrun), or the single engine's
    kw["distributed_executor_backend"] = "external_launcher" if world_size > 1 else "uni"
    if not s.in_process and platform == "cuda":
        kw["weight_transfer_config"] = {"backend": "ipc"}
    elif not s.in_process:
        kw["worker_extension_cls"] = "mmrlsd.rollout.vllm_worker.WeightsFromBytes"
    return kw


def rollouts_from_ids(
    seqs: list[list[int]], eos: list[int], pad: int, tokenizer, group_size: int
) -> Rollouts:
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


@contextlib.contextmanager
def keep_torch_threads():
    """vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process (and sets its own
    thread count); restore the real function and the count the caller had."""
    real, n = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = real
        torch.set_num_threads(n)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine:
    """Rollouts from a colocated `vllm.LLM`.

    Args:
        model_path: the checkpoint to start from (the policy's initial weights).
        settings: the engine's limits (`VLLMSettings.from_config(cfg.rollout)`).
        world_size: training processes (torchrun); > 1 runs the engine with vLLM's external launcher.
        llm_factory: builds the LLM (default `vllm.LLM`); tests pass a stand-in.
        platform: `cpu` / `cuda` (default: what vLLM detects).
        mm_processor_kwargs: image-processor settings matching the policy's (its pixel budget as `size`).
    """

    def __init__(self, model_path: str, *, processor, dtype: str = "bfloat16", seed: int = 0,
                 settings: VLLMSettings | None = None, max_images: int = 8, world_size: int = 1,
                 llm_factory: Callable | None = None, platform: str | None = None,
                 mm_processor_kwargs: dict | None = None):  # fmt: skip
        from mmrlsd.rollout.generate import vision_token_ids

        if llm_factory is None:
            from vllm import LLM as llm_factory  # noqa: N811
        self.settings = settings or VLLMSettings()
        self.platform = platform or current_platform()
        self.processor = processor
        self.banned = vision_token_ids(processor)
        checkpoint = checkpoint_config(model_path)  # read once: the limits and the overrides come from it
        self.kwargs = engine_kwargs(model_path, self.settings, dtype=dtype, seed=seed, platform=self.platform,
                                    world_size=world_size, max_images=max_images,
                                    positions=model_positions(checkpoint))  # fmt: skip
        if mm_processor_kwargs:  # the image budget the policy's processor uses (model.min/max_pixels)
            self.kwargs["mm_processor_kwargs"] = mm_processor_kwargs
        if overrides := hf_overrides(checkpoint):
            log.warning("vLLM: %s does not set mrope_interleaved; interleaving the rotary sections as transformers "
                        "does", model_path)  # fmt: skip
            self.kwargs["hf_overrides"] = overrides
        self.in_process = self.settings.in_process or world_size > 1
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.in_process else "1"}
        with keep_torch_threads(), _env(**env):
            self.llm = llm_factory(**self.kwargs)
        self.tp_group = None
        if self.settings.tensor_parallel_size > 1:  # the ranks of one engine must submit the same requests
            from vllm.distributed import get_tp_group

            self.tp_group = get_tp_group().cpu_group
        self.sleeps = bool(self.kwargs.get("enable_sleep_mode"))
        self.asleep = False
        self._ipc = None  # the trainer side of vLLM's IPC weight transfer (multi-process engine on CUDA)

    def sampling_params(self, *, n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                        seed: int | None, eos: list[int], logprobs: bool = False):  # fmt: skip
        """`logprobs`: also return each sampled token's log-probability (from the raw logits)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
            seed=seed, stop_token_ids=eos, logit_bias={t: BLOCK for t in self.banned}, skip_special_tokens=True,
            detokenize=False, logprobs=0 if logprobs else None,
        )  # fmt: skip

    def generate(
        self, texts: list[str], images: list[list], *, group_size: int, params, eos: list[int], pad: int
    ) -> Rollouts:
        """G samples for each of the B chat texts; rows ordered prompt-major like the HF engine."""
        seqs = self.generate_ids(texts, images, params)
        return rollouts_from_ids(seqs, eos, pad, self.processor.tokenizer, group_size)

    def generate_ids(self, texts: list[str], images: list[list], params) -> list[list[int]]:
        """The sampled token ids, `params.n` per chat text, prompt-major."""
        return [list(c.token_ids) for c in self.generate_outputs(texts, images, params)]

    def generate_outputs(self, texts: list[str], images: list[list], params) -> list:
        """vLLM's completion outputs (`token_ids`, `logprobs`), `params.n` per chat text, prompt-major. With tensor
        parallelism every rank of the group submits the group's requests together and keeps its own rows."""
        own = len(texts)
        if self.tp_group is not None:
            import torch.distributed as td

            parts: list = [None] * td.get_world_size(self.tp_group)
            td.all_gather_object(parts, (texts, images), group=self.tp_group)
            first = sum(len(t) for t, _ in parts[: td.get_rank(self.tp_group)])
            texts = [t for ts, _ in parts for t in ts]
            images = [i for _, ims in parts for i in ims]
        else:
            first = 0
        self.wake()
        requests = []
        for text, imgs in zip(texts, images):
            req = {"prompt": text}
            if imgs:
                req["multi_modal_data"] = {"image": imgs}
            requests.append(req)
        with keep_torch_threads():
            outs = self.llm.generate(requests, params, use_tqdm=False)
        self.sleep()
        return [c for o in outs[first : first + own] for c in o.outputs]

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

    def eval_sample(self, prompts: list[tuple[str, list]], *, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, eos: list[int]) -> list[str]:  # fmt: skip
        """One answer per `(chat text, images)`, decoded as the HF engine decodes (for `mmrlsd eval`)."""
        tok = self.processor.tokenizer
        params = self.sampling_params(n=1, temperature=temperature, top_p=top_p, top_k=0,
                                      max_new_tokens=max_new_tokens, seed=seed, eos=eos)  # fmt: skip
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        texts, images = [t for t, _ in prompts], [i for _, i in prompts]
        return self.generate(texts, images, group_size=1, params=params, eos=eos, pad=pad).texts

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the policy's current weights (checkpoint names, full tensors) into the engine's model, in memory.

        Every rank must call it with its full weights (`mmrlsd.train.fsdp.gathered_weights`)."""
        t0 = time.perf_counter()
        named_tensors = list(named_tensors)
        self.wake(tags=["weights"])
        with keep_torch_threads():
            if (
                self.in_process
            ):  # the worker is in this process: its reload_weights takes our tensors as they are
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_iterator": named_tensors, "is_checkpoint_format": True},
                )
            elif self.platform == "cuda":
                self._send_ipc(named_tensors)
            else:
                from mmrlsd.rollout.vllm_worker import tensor_to_wire

                items = [tensor_to_wire(n, t) for n, t in named_tensors]
                self.llm.collective_rpc("mmrlsd_load_weights", args=(items,))
            self._reset_caches()
        log.info("vLLM: %d weight tensors pushed in %.2f s", len(named_tensors), time.perf_counter() - t0)

    def _reset_caches(self) -> None:
        """Forget what the old weights computed: cached prompt KV blocks and vision-encoder outputs."""
        engine = self.llm.llm_engine
        engine.reset_prefix_cache()
        engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def _send_ipc(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """vLLM's RL weight transfer over CUDA IPC (engine core in its own process)."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.ipc_engine import (
            IPCTrainerInitInfo,
            IPCTrainerWeightTransferEngine,
        )

        device = torch.device("cuda", torch.cuda.current_device())
        weights = [(n, t.to(device)) for n, t in named_tensors]

        class Source(WeightSource):
            def metadata(self):
                return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in weights]

            def __iter__(self):
                return iter(weights)

        if self._ipc is None:
            self._ipc = IPCTrainerWeightTransferEngine.trainer_init(
                IPCTrainerInitInfo(rank=0), client=self.llm, source=Source()
            )
        self._ipc.source = Source()
        self._ipc.send_weights()

    def sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()
            self.asleep = tags is not None  # weights-only wake keeps the KV cache released
