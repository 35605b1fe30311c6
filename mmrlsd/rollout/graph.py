"""The decode step at static shapes, replayed as a CUDA graph (`rollout.hf_decode: graph`) or compiled by
`torch.compile` (`rollout.hf_decode: compile`).

On a GPU the lean loop's decode step is bound by kernel launches and Python, not by the card: for the 3B shape,
32 rows, one forward launches ~1,000 kernels and takes 33-40 ms on an H200, where reading the weights takes
~1.6 ms. A CUDA graph records one forward's kernels once and replays them with one launch. That needs every
tensor the forward touches at a fixed address and shape, and no host synchronisation inside it:

- the KV cache has room for the whole response from the start (`StaticKV`): each layer writes the new key and
  value at a position held in a device tensor, and attention always runs over the full buffer;
- the attention mask is built inside the step from that position: a row attends to its prompt (the padding
  excluded) and to every position up to the one being written;
- the text position of the new token and the row's mRoPE offset are device tensors, advanced inside the step;
- attention reads the grouped key/value heads as stored (`decode_sdpa_forward`) instead of repeating them.

Everything else (the float32 copy of the logits, suppressed tokens, logits processors, the row-seeded sampler,
EOS bookkeeping) runs eagerly around the replay, as in the lean loop.

Attention over the full buffer (masked positions contribute exactly zero) sums in another order than attention
over the written positions, so the scores equal the lean loop's up to float rounding, and the sampled ids equal
them except where two noisy scores tie that closely. Without `capture` (any device but CUDA) the same step runs
eagerly, which is what the CPU tests check against the lean loop.

The same fixed shapes let inductor compile the step (`compile`): on a CPU it fuses the element-wise ops between
the matrix multiplies (norms, rotary embedding, residuals, the softmax of cascade attention) into C++ kernels and
drops Python's per-op overhead. The compiled step attends only to the positions written so far (the one length
that changes from step to step is compiled as a dynamic size), so it reads no unwritten key or value. On the CPU
perf config a decode step takes ~4.5 ms instead of ~7 ms eagerly; the first call of a process compiles for
seconds, and each new shape (rows; cache or prefix length, rounded up to `BUCKET` positions) compiles again.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager

import torch
from torch import cuda

from mmrlsd.model.packing import register_attention, route_attention
from mmrlsd.rollout.cascade import CASCADE_ATTENTION, cascade_attention_forward

DECODE_SDPA = "mmrlsd_decode_sdpa"


def decode_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kw):
    """transformers' sdpa attention for one query token per row against a grouped-query KV cache, without copying
    the cache: the query heads that share a key/value head become that head's `groups` queries,
    `(n, heads, 1, d)` -> `(n, kv_heads, groups, d)`, and sdpa reads the keys and values as stored. transformers'
    sdpa path (5.17) repeats them `groups` times whenever a mask is given: on an H200 that copy was 80 us per
    layer, key and value, per decode step of the 3B shape (a third of the rollout's GPU time). Anything else
    (several query tokens, no groups) goes to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)  # fmt: skip
    n, heads, _, d = query.shape
    if attention_mask is not None:  # the compiled step's mask covers the positions written so far (`GraphStep`)
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    # query head kv * groups + g reads key/value head kv, as transformers' repeat_kv lays them out
    q = query.reshape(n, heads // groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)  # fmt: skip
    return out.reshape(n, heads, 1, d).transpose(1, 2).contiguous(), None  # (n, 1, heads, d)


@functools.cache
def _static_kv():
    """A `DynamicLayer` over full-length key/value buffers, written at a shared device-side position."""
    from transformers.cache_utils import DynamicLayer

    class StaticKV(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            idx = self.pos + torch.arange(key_states.shape[-2], device=self.pos.device)  # (t,)
            # in the buffers' dtype: under autocast a new token's keys or values can come in another dtype than
            # the prompt's (transformers 5.17: bf16 values after float32 ones), and the lean loop's concatenation
            # promotes them the same way
            self.keys.index_copy_(2, idx, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, idx, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    return StaticKV


def decode_position_ids(text_pos: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """The position ids of one decoded token per row, `(4, n, 1)`: the text position `text_pos` `(n, 1)`, then the
    three mRoPE axes, each the text position plus the row's offset `deltas` `(n, 1)` (as `generate` continues)."""
    return torch.cat([text_pos[None], (text_pos + deltas)[None].expand(3, -1, -1)])


def _plain_layers(cache) -> bool:
    """Every layer of `cache` a filled plain `DynamicLayer` (not sliding window, quantised or offloaded)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def static_cache(cache, length: int, pos: torch.Tensor) -> None:
    """Replace every layer of the `DynamicCache` `cache` by a `StaticKV` with room for `length` positions, holding
    the layer's keys and values in its first positions and writing at `pos` (a one-element device tensor shared by
    all layers, advanced by the caller). Only plain `DynamicLayer`s can be converted (`unsupported` says so)."""
    if not _plain_layers(cache):
        raise ValueError("static_cache: the KV cache has layers other than filled DynamicLayers")
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values  # (n, heads, written, head_dim)
        new = _static_kv()()
        new.keys = k.new_zeros(k.shape[:-2] + (length, k.shape[-1]))
        new.values = v.new_zeros(v.shape[:-2] + (length, v.shape[-1]))
        new.keys[..., : k.shape[-2], :] = k
        new.values[..., : v.shape[-2], :] = v
        new.pos = pos
        new.device, new.dtype, new.is_initialized = k.device, k.dtype, True
        cache.layers[i] = new


def sharded(model) -> bool:
    """Whether FSDP shards `model` (or one of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def unsupported(model, cache, cascade: bool = False) -> str | None:
    """Why `GraphStep` cannot run `model` over `cache` (None: it can); with `cascade` the step's attention is cascade
    attention, whatever the model's own."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa" and not cascade:
        return f"attention implementation {impl!r} (the static step builds an sdpa mask)"
    if sharded(model):
        return "an FSDP-sharded model (its hooks gather and free the parameters around every forward)"
    if not _plain_layers(cache):
        return "a KV-cache layer other than DynamicLayer"
    return None


@contextmanager
def cached_casts(device: torch.device):
    """Inside the block, under autocast (float32 master weights with bf16 compute: the training default), each
    weight is cast to the compute dtype once and the copy reused, not cast at every forward; the cache is cleared
    on exit. For a rollout, whose weights do not change: a captured decode step otherwise records every weight's
    cast and replays it at every token (for the 3B shape ~22 GB of memory traffic per token, against 7.5 GB for
    the bf16 weights themselves); the copies take the compute dtype's size of the weights until the rollout
    ends. Training keeps the cache off (`mmrlsd.model.load.compute_autocast`), since weights change between its
    optimizer steps. A no-op without autocast. The same casts, so the same numbers."""
    kind = torch.device(device).type
    if not torch.is_autocast_enabled(kind):
        yield
        return
    try:
        with torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=True):
            yield
    finally:  # an inner autocast leaves the cache to the outer one's exit: clear it here
        torch.clear_autocast_cache()


BUCKET = 64  # `compile`: static lengths rounded up to a multiple of this, so few lengths compile
RECOMPILE_LIMIT = 64  # `compile`: shapes the step may compile for in one process (dynamo's default is 8)


@functools.cache
def _compiled_forward():
    """`GraphStep._forward` compiled by `torch.compile` (inductor), once per process; it recompiles for new shapes
    (rows, cache length), which `BUCKET` keeps few. As one graph (`fullgraph`): a step that cannot be compiled, or
    a new shape past the recompile limit, raises at its first call instead of running uncompiled, which the later
    calls, skipping guards, must know."""
    return torch.compile(GraphStep._forward, dynamic=False, fullgraph=True)


class GraphStep:
    """One decode forward of `model` for `n` rows at fixed shapes; called with the rows' new tokens `(n, 1)`, it
    returns the last position's logits `(n, V)` (overwritten by the next call when captured).

    `cache`: the `DynamicCache` after the prompt's forward (`written` positions per row), converted in place
    (`static_cache`) to hold `written + room` positions. `mask`: the rows' attention mask over those positions
    `(n, >= written + room)`, 1 where a prompt token is real and for every response position (left padding 0).
    `text_pos` / `deltas` `(n, 1)`: the text position of the next token and each row's mRoPE offset.
    `prefix` (cascade attention): the prompts' prefix held once (`cascade.SharedPrefix`); `cache` then holds the
    rows' own positions only.

    With `capture` (CUDA), the first call runs eagerly on a side stream (warming up the kernels and the caching
    allocator), the second records the step into a CUDA graph and replays it, later calls replay it; `captured`
    says whether that happened. A step that cannot be recorded warns, keeps the reason in `error` and runs
    eagerly from then on. With `compile` (and no `capture`), the step runs compiled by `torch.compile`
    (`rollout.hf_decode: compile`; on a CPU inductor fuses the element-wise ops between the matrix multiplies into
    C++ kernels and drops Python's per-op overhead): the cache (or with `prefix`, the prefix) holds a multiple of
    `BUCKET` positions, so prompts of similar length share one compilation; its first call runs dynamo's guards
    (which pick or compile the graph for these shapes), later calls only those that differ between the cached
    graphs (`skip_guard_eval_unsafe`: the step's shapes and tensors stay fixed between its calls). The compiled step
    attends only to the positions written so far: its mask is cut to them and marked a dynamic size, so one
    compilation serves every step and attention reads no unwritten key or value (on the CPU perf config ~half of
    the rows' own keys and values on average). A step that cannot be compiled (or a new shape past
    `RECOMPILE_LIMIT` compiled ones) warns, keeps the reason in `error` and runs eagerly. Otherwise every call
    runs the step eagerly over the whole cache.
    """

    def __init__(self, model, cache, cache_kwarg: str, *, written: int, room: int, mask: torch.Tensor,
                 text_pos: torch.Tensor, deltas: torch.Tensor, capture: bool, prefix=None,
                 compile: bool = False):  # fmt: skip
        length = written + room
        compile = compile and not capture
        if compile and prefix is not None:  # the prefix's length varies with the prompts: pad it (masked)
            prefix = prefix.padded(BUCKET)
        elif compile:  # the cache's length varies with the prompts: round it up (the positions past
            length = -(-length // BUCKET) * BUCKET  # written + room are never attended)
            if mask.shape[1] < length:
                mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=1)
        device = mask.device
        self.written = written  # positions in the cache before the first call
        self.pos = torch.full((1,), written, dtype=torch.long, device=device)
        static_cache(cache, length, self.pos)
        self.model, self.cache, self.cache_kwarg = model, cache, cache_kwarg
        self.valid = mask[:, :length].bool()  # (n, length)
        self.arange = torch.arange(length, device=device)
        self.cur = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=device)
        self.text_pos, self.deltas = text_pos.clone(), deltas.to(device).clone()
        self.capture, self.captured, self.calls = capture, False, 0
        self.compile = compile
        self.graph, self.logits, self.error = None, None, None
        if prefix is None:
            self.attention, self.extra = register_attention(DECODE_SDPA, decode_sdpa_forward), {}
        else:
            self.attention = register_attention(CASCADE_ATTENTION, cascade_attention_forward)
            self.extra = {"mmrlsd_prefix": prefix}

    def _forward(self, valid: torch.Tensor, arange: torch.Tensor) -> torch.Tensor:
        """`valid` / `arange`: `self.valid` / `self.arange` over the positions attention reads (all, or with
        `compile` those written so far)."""
        allowed = valid & (arange <= self.pos)  # (n, m): the prompt and the response so far
        position_ids = decode_position_ids(self.text_pos, self.deltas)
        with route_attention(self.model, self.attention):
            out = self.model(input_ids=self.cur, attention_mask=allowed[:, None, None, :],
                             position_ids=position_ids, use_cache=True, logits_to_keep=1,
                             **{self.cache_kwarg: self.cache}, **self.extra)  # fmt: skip
        self.pos.add_(1)
        self.text_pos.add_(1)
        return out.logits[:, -1, :]

    def __call__(self, cur: torch.Tensor) -> torch.Tensor:
        self.cur.copy_(cur)
        self.calls += 1
        if self.compile:
            seen = self.written + self.calls  # the positions written once this call has written its token
            valid, arange = self.valid[:, :seen], self.arange[:seen]
            torch._dynamo.mark_dynamic(valid, 1)  # one compilation for every length (the others stay static)
            torch._dynamo.mark_dynamic(arange, 0)
            try:
                if self.calls == 1:  # every guard runs: picks this step's compilation, or compiles one (past
                    # `RECOMPILE_LIMIT` shapes that fails, and the step runs eagerly: see `_compiled_forward`)
                    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                    with torch._dynamo.config.patch(recompile_limit=limit):
                        return _compiled_forward()(self, valid, arange)
                # later calls change no static shape, tensor or setting the guards check, so only the guards that
                # tell the cached compilations apart run: ~0.3 ms less per decode step on the CPU perf config
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return _compiled_forward()(self, valid, arange)
            except Exception as e:  # inductor failed (no C++ compiler, an op it cannot lower): decode eagerly
                if self.calls > 1:  # compiled before: a real error of the step, not of compiling it
                    raise
                self.compile, self.error = False, f"{type(e).__name__}: {e}"
                warnings.warn(f"hf_decode compile: compiling the decode step failed ({self.error}); decoding "
                              "eagerly over the static cache", stacklevel=3)  # fmt: skip
        if not self.capture:
            return self._forward(self.valid, self.arange)
        if self.calls == 1:  # warm-up: a real step, run eagerly off the default stream as capture requires
            side = cuda.Stream()
            side.wait_stream(cuda.current_stream())
            with cuda.stream(side):
                logits = self._forward(self.valid, self.arange)
            cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:  # recording runs nothing: the step's state is as the warm-up left it
            graph = cuda.CUDAGraph()
            try:
                # thread_local: CUDA calls of other threads (a data loader's) do not break the capture
                with cuda.graph(graph, capture_error_mode="thread_local"):
                    self.logits = self._forward(self.valid, self.arange)
            except RuntimeError as e:  # an op that cannot be captured: keep decoding, eagerly
                self.capture, self.error = False, f"{type(e).__name__}: {e}"
                warnings.warn(f"hf_decode graph: capturing the decode step failed ({self.error}); decoding "
                              "eagerly over the static cache", stacklevel=3)  # fmt: skip
                return self._forward(self.valid, self.arange)
            self.graph, self.captured = graph, True
        self.graph.replay()
        return self.logits
