"""Rollouts on a Hugging Face model: G samples per prompt, batched, vision special tokens suppressed.

Decoding (`rollout.hf_decode`): `lean` (default, `lean_decode`) runs the forwards itself over a KV cache with room
for the whole response, applying the same logits processors and sampler as `generate`, so the samples are
identical; on a CPU with one thread it also drops finished rows from the batch where the matrix-multiply kernels
give every row the same bits in the smaller batch (probed at run time). `graph` and `compile` run the same loop
with its decode step at static shapes, replayed as a CUDA graph or compiled (`mmrlsd.rollout.graph`); with the
shared prefill, cascade attention keeps each prompt's keys and values once (`mmrlsd.rollout.cascade`); those three
sample the same ids up to float near-ties. `generate` calls Hugging Face `generate`.

Sampled responses could otherwise contain the image placeholder token, which breaks the next forward pass (the
processor counts placeholders against the image grid), so every vision special token is suppressed.

Shared prefill (`rollout.share_prefill`): the G rows of a prompt are identical, so the prompt's prefix (every token
but the last, images through the vision tower included) runs once per prompt into a KV cache, which is then copied
to the prompt's G rows; `generate` runs only the last prompt token and the decode steps per row. The sampled
tokens are those of the full prefill up to float rounding (a different batch shape can move a logit by ~1e-6).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from mmrlsd import dist
from mmrlsd.data.encoding import chat_text, encode, groups_repeat, select_rows, slice_encoding
from mmrlsd.model.packing import register_attention, route_attention
from mmrlsd.model.vision import dummy_vision, tower_is_collective, tower_on_every_rank
from mmrlsd.rollout import graph as graph_step
from mmrlsd.rollout.cascade import CASCADE_ATTENTION, SharedPrefix, cascade_attention_forward
from mmrlsd.types import Rollouts

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(processor) -> list[int]:
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return sorted({i for i in ids if i is not None and i != tok.unk_token_id})


def eos_token_ids(model, processor) -> list[int]:
    tok = processor.tokenizer
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id:
            ids.append(i)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return sorted(set(ids))


class RowSeededSampler:
    """Sampling with one random stream per sequence, seeded by (seed, global row index).

    A logits processor for `generate(do_sample=False)`: after temperature/top-k/top-p warping it adds Gumbel noise
    drawn from the row's own generator, and greedy argmax then samples exactly from the warped softmax
    (Gumbel-max trick). The samples of a row therefore do not depend on how rows are batched or split across
    ranks, which makes a 2-rank run reproduce a single-process run and `gen_batch_size` change nothing.

    The generators live on the device of the scores (made at the first call): on a GPU the noise is drawn there
    (CPU noise for 32 rows x a 152k vocabulary cost ~0.1 s per token on an H200 host, 3x the whole decode step),
    so a CUDA run samples other (equally distributed) tokens than a CPU run of the same seed; on the CPU the
    streams are the ones they always were.
    """

    def __init__(self, seed: int, rows: list[int]):
        self.seed, self.rows = seed, list(rows)
        self.gens: list[torch.Generator] | None = None
        self.noise: torch.Tensor | None = None  # (n, V) float64, reused from call to call
        self.noise_rows: list[torch.Tensor] = []  # its rows, each filled from its row's generator

    def select(self, keep: list[int]) -> RowSeededSampler:
        """The sampler of rows `keep` (positions in this one's rows), sharing their generators."""
        out = RowSeededSampler(self.seed, [self.rows[i] for i in keep])
        out.gens = None if self.gens is None else [self.gens[i] for i in keep]
        return out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        device = scores.device
        if self.gens is None:
            self.gens = [
                torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + r) for r in self.rows
            ]
        n, V = scores.shape
        if self.noise is None or self.noise.shape != (n, V) or self.noise.device != device:
            self.noise = torch.empty(n, V, dtype=torch.float64, device=device)
            self.noise_rows = list(self.noise.unbind(0))
        for row, g in zip(self.noise_rows, self.gens):  # `uniform_` draws what `torch.rand` draws (~40% less
            row.uniform_(generator=g)  # per-call overhead than `rand(out=)` on views made at every call)
        gumbel = -torch.log(-torch.log(self.noise.clamp_min(1e-300)))  # (n, V)
        return scores.float() + gumbel.float()


class PresencePenalty:
    """vLLM's presence penalty as a logits processor: every token that already occurs in the response generated so
    far (the first `prompt_len` columns, the prompt, do not count) has its logit lowered by `penalty`, once however
    often it occurred. Runs before temperature, top-k and top-p, as in vLLM."""

    def __init__(self, penalty: float, prompt_len: int):
        self.penalty, self.prompt_len = penalty, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]  # (n, t)
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (n, V)
        seen.scatter_(1, generated.to(scores.device), True)
        return scores - self.penalty * seen.to(scores.dtype)


def _warpers(temperature: float, top_p: float, top_k: int) -> list:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def _can_share(enc, group_size: int) -> bool:
    """Groups repeat one prompt, and each prompt ends in a text token after at least one other token."""
    ids = enc["input_ids"]
    last_is_text = "mm_token_type_ids" not in enc or not bool(enc["mm_token_type_ids"][:, -1].any())
    return ids.shape[1] >= 2 and last_is_text and groups_repeat(enc, group_size)


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values` (5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def _eval_mode(model):
    """Eval mode for the rollout: transformers 5.17 drops the KV cache of gradient-checkpointed layers in training
    mode even without gradients (5.24 does not), which would leave the shared prefill's cache empty."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def prompt_positions(
    model, ids: torch.Tensor, mask: torch.Tensor, extra: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The position ids `generate` gives a left-padded prompt, `(4, n, L)`: text positions from the attention mask
    stacked on the three mRoPE axes (`get_rope_index` when images are present, else the text positions), and the
    mRoPE offset of each row `(n, 1)`, which decoding adds to the text position of every new token."""
    text_pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (n, L)
    if "pixel_values" in extra:
        mrope, deltas = model.model.get_rope_index(ids, mm_token_type_ids=extra["mm_token_type_ids"],
                                                   image_grid_thw=extra["image_grid_thw"], attention_mask=mask)  # fmt: skip
    else:
        mrope, deltas = text_pos.expand(3, -1, -1), torch.zeros(ids.shape[0], 1, dtype=torch.long)
    return torch.cat([text_pos[None], mrope.to(text_pos.device)]), deltas.to(ids.device)


def shared_prefill(model, prompts: dict, prompt_of_row: list[int], cascade: bool = False) -> dict:
    """Run every token but the last of each distinct prompt (images included) once, and copy the KV cache to the
    rows: the `generate` kwargs under which it computes only the last prompt token and the decode steps.

    `prompts`: the encoding of the P distinct prompts (their images' pixel rows once each); `prompt_of_row[i]`
    (0..P-1, non-decreasing) is the prompt row i repeats. Positions are the ones `generate` gives the full prompt
    (text positions from the attention mask, mRoPE from `get_rope_index`); the mRoPE offset of each row
    (`model.model.rope_deltas`, which `generate` reads when it continues from a cache) is repeated to the N rows.

    With `cascade`, where every prompt is repeated by as many consecutive rows, the keys and values are not copied:
    the result holds them once as `mmrlsd_prefix` (`cascade.SharedPrefix`) and an empty KV cache for the rows' own
    positions, for `lean_decode` with cascade attention."""
    from transformers import DynamicCache

    pre, P = prompts, prompt_of_row[-1] + 1
    if pre["input_ids"].shape[0] != P:
        raise ValueError(f"shared prefill: {pre['input_ids'].shape[0]} prompts for rows of {P}")
    ids, mask = pre["input_ids"][:, :-1], pre["attention_mask"][:, :-1]  # (P, L-1)
    extra = {}
    if "mm_token_type_ids" in pre:
        extra["mm_token_type_ids"] = pre["mm_token_type_ids"][:, :-1]
    if "pixel_values" in pre:
        extra.update(pixel_values=pre["pixel_values"], image_grid_thw=pre["image_grid_thw"])
    position_ids, deltas = prompt_positions(model, ids, mask, extra)  # (4, P, L-1), (P, 1)
    cache, name = DynamicCache(config=model.config), _cache_kwarg(model)
    with tower_on_every_rank(model, "pixel_values" in pre):  # the other ranks' prefill may run the tower
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
              **{name: cache}, **extra)  # fmt: skip
    if cache.get_seq_length() != ids.shape[1]:  # a layer that dropped the cache (see `_eval_mode`)
        raise RuntimeError(
            f"shared prefill: the KV cache holds {cache.get_seq_length()} of {ids.shape[1]} tokens"
        )
    rows = torch.tensor(prompt_of_row, device=ids.device)  # (N,)
    model.model.rope_deltas = deltas.to(ids.device)[rows]  # (N, 1)
    G = len(prompt_of_row) // P
    if cascade and prompt_of_row == [r // G for r in range(len(prompt_of_row))]:
        return {name: DynamicCache(config=model.config), "mmrlsd_prefix": SharedPrefix(cache, mask, G)}
    # (P, ...) -> (N, ...): row i gets the keys and values of prompt prompt_of_row[i]
    cache.batch_select_indices(rows)
    return {name: cache}


DECODES = ("auto", "lean", "graph", "compile", "generate")

# Generation-config settings under which `generate` adds logits processors of its own. A rollout samples from the
# policy under mmrlsd's own sampling settings only, as vLLM does with explicit sampling parameters (and verl and
# EasyR1 with it): a checkpoint's setting (Qwen2-VL's and Qwen2.5-VL's released generation configs set
# `repetition_penalty: 1.05`) would make the samples follow another distribution than the log-probs training
# computes, so `generate` runs with each of them off and the lean loop never applies them. Each entry: the
# attribute and the values that leave it off (the last one is passed to `generate`).
_GENERATE_ONLY = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0), "bad_words_ids": (None,), "sequence_bias": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
    "begin_suppress_tokens": (None,), "guidance_scale": (None, 1.0), "renormalize_logits": (None, False),
    "watermarking_config": (None,),
}  # fmt: skip


def checkpoint_processors(model) -> dict[str, object]:
    """The settings of `model`'s generation config that would add logits processors to `generate` (`_GENERATE_ONLY`),
    each with the value that turns it off: the rollout passes those to `generate` (empty: nothing to turn off)."""
    gc = model.generation_config
    return {k: off[-1] for k, off in _GENERATE_ONLY.items() if getattr(gc, k, None) not in off}


@functools.cache
def _reserved_layer():
    """A `DynamicLayer` whose keys and values are views into buffers with room for the rest of the response."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.buf_k.shape[-2]:  # out of room: grow as DynamicLayer does
                self.buf_k = torch.cat([self.buf_k[..., : self.length, :], key_states], dim=-2)
                self.buf_v = torch.cat([self.buf_v[..., : self.length, :], value_states], dim=-2)
            else:
                self.buf_k[..., self.length : end, :] = key_states
                self.buf_v[..., self.length : end, :] = value_states
            self.length = end
            self.keys, self.values = self.buf_k[..., :end, :], self.buf_v[..., :end, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.buf_k, self.buf_v = self.buf_k.index_select(0, indices), self.buf_v.index_select(0, indices)
            self.keys, self.values = self.buf_k[..., : self.length, :], self.buf_v[..., : self.length, :]

    return ReservedLayer


def _reserve(cache, extra_tokens: int) -> None:
    """Give every layer of a `DynamicCache` room for `extra_tokens` more tokens, so that decoding writes each new key
    and value into place instead of concatenating the whole cache at every step (a copy that grows with the
    sequence). The layers then hold views of the first `length` positions of their buffers: the same tensors as
    the concatenation, so attention computes the same numbers."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            continue  # sliding-window or other layers keep their own update
        new = _reserved_layer()()
        k, v = layer.keys, layer.values  # (n, heads, length, head_dim)
        new.length = k.shape[-2]
        new.buf_k = k.new_empty(k.shape[:-2] + (k.shape[-2] + extra_tokens, k.shape[-1]))
        new.buf_v = v.new_empty(v.shape[:-2] + (v.shape[-2] + extra_tokens, v.shape[-1]))
        new.buf_k[..., : new.length, :] = k
        new.buf_v[..., : new.length, :] = v
        new.keys, new.values = new.buf_k[..., : new.length, :], new.buf_v[..., : new.length, :]
        new.device, new.dtype, new.is_initialized = k.device, k.dtype, True
        cache.layers[i] = new


_INVARIANT: dict[tuple, bool] = {}  # (dtype, autocast, threads, linear shapes, n, k) -> probe result


def _decode_linears(model) -> list[tuple[int, int, bool]]:
    """The `(out, in, bias)` shapes of the linear layers the decode steps run: the language model's and the LM head
    (full shapes also when the weights are sharded)."""
    shapes = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "visual" not in name:
            shapes.add((mod.out_features, mod.in_features, mod.bias is not None))
    return sorted(shapes)


def _linear_rows_invariant(lin: list, n: int, k: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a linear layer of every shape in `lin` (`_decode_linears`) gives any `k` of `n` rows the same bits in
    a batch of those `k` rows as in the batch of all `n`: the matrix-multiply kernel can depend on the number of
    rows and on a row's place among them (measured on a CPU with one thread: for 1-3 rows it does, for 4-128 it
    does not; with two threads it does for most sizes). Probed on the CPU in `dtype` (under the caller's autocast)
    with random weights and inputs (the kernel choice depends on shapes, not values), for the first `k` rows and
    for random subsets; memoised."""
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    key = (dtype, autocast, torch.get_num_threads(), tuple(lin), n, k)
    if key not in _INVARIANT:
        gen = torch.Generator().manual_seed(n * 1009 + k)
        subsets = [torch.arange(k)] + [torch.randperm(n, generator=gen)[:k].sort().values for _ in range(3)]
        ok = True
        for out_f, in_f, bias in lin:
            w = torch.randn(out_f, in_f, generator=gen).to(dtype) / in_f**0.5
            b = torch.randn(out_f, generator=gen).to(dtype) if bias else None
            x = torch.randn(n, 1, in_f, generator=gen).to(dtype)
            full = torch.nn.functional.linear(x, w, b)
            ok = ok and all(torch.equal(full[s], torch.nn.functional.linear(x[s], w, b)) for s in subsets)
        _INVARIANT[key] = ok
    return _INVARIANT[key]


def _compact_size(lin: list, n: int, current: int, active: int, dtype: torch.dtype = torch.float32) -> int:
    """The batch size to shrink a decode batch of `current` rows (`active` of them unfinished) to, or `current`:
    shrink once at most 3/4 of the rows are active, to the smallest size >= `active` at which the linear layers are
    row-for-row exact (`_linear_rows_invariant`) against the original `n` rows."""
    if 4 * active > 3 * current:
        return current
    for k in range(max(active, 1), current):
        if _linear_rows_invariant(lin, n, k, dtype):
            return k
    return current


def lean_decode(
    model, inputs: dict, *, cache, deltas: torch.Tensor | None, procs: list, suppress: list[int], eos: list[int],
    pad: int, max_new_tokens: int, synced: bool = False, compact: bool = True, graph: bool = False,
    prefix: SharedPrefix | None = None, compile: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Greedy decoding over processed scores, as `generate(do_sample=False)` runs it, without its per-step overhead.

    `inputs`: left-padded prompts `input_ids` / `attention_mask` `(n, L)` (plus pixels and `mm_token_type_ids`
    when `cache` is None). With `cache` (the shared prefill: every prompt token but the last, `deltas` the rows'
    mRoPE offsets `(n, 1)`) the first forward runs the last prompt token; without, the whole prompt into a new
    `DynamicCache`. Every step: the last position's logits in float32, the vision tokens set to -inf, then `procs`
    in order (each called with the ids so far `(rows, L + t)` and the scores `(rows, V)`), argmax; finished rows
    get `pad`, a row finishes at its first token in `eos`, and decoding stops when every row has finished (with
    `synced`, on every rank: a rank that finished keeps running forwards without appending, as `synced_gpus`
    does). Positions follow `generate`: text position + 1 per token, the mRoPE axes the text position plus the
    row's offset. Returns the new tokens `(n, steps)`.

    `compact` (on a CPU running one thread): once at most 3/4 of the rows in the batch are unfinished, the finished
    ones leave it (KV cache, mask, positions and the sampler's streams are indexed down), keeping the batch at a
    size where every linear layer gives each row the same bits as in the full batch (`_linear_rows_invariant`);
    attention, norms and element-wise ops compute each row on its own, so the scores stay bit-identical.
    `generate` keeps computing the finished rows and discards their tokens. Elsewhere (GPU kernels, or several
    threads that split a batch by its size) the batch keeps all `n` rows.

    `graph` (one process, so not with `synced`): the forwards after the first run as a `GraphStep` over a static KV cache, replayed
    as a CUDA graph on a GPU (eagerly elsewhere); the scores then equal the lean loop's up to float rounding. Where
    the step cannot run (`graph.unsupported`: an attention other than sdpa, a cache layer other than
    `DynamicLayer`) it warns and the loop decodes as without. With `compile` the step runs compiled by
    `torch.compile` instead (`GraphStep`), on any device.

    `prefix` (cascade attention, `mmrlsd.rollout.cascade`): the prompts' prefix keys and values held once
    (`shared_prefill(cascade=True)`), `cache` then the empty cache of the rows' own positions; every forward
    attends to both. `compact` then also selects the prefix's rows (`SharedPrefix.select`).
    """
    from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if graph and synced:
        raise ValueError("lean_decode: graph=True needs one process (a graph cannot hold FSDP's collectives)")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, L = ids.shape
    device = ids.device
    seq = ids.new_full((n, L + max_new_tokens), pad)  # prompt, then the tokens as they are sampled
    seq[:, :L] = ids
    full_mask = mask.new_ones((n, L + max_new_tokens))
    full_mask[:, :L] = mask
    name = _cache_kwarg(model)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    text_pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -1:]  # (n, 1) the last prompt token
    own = None  # cascade attention: the mask over the rows' own positions (all attended)
    if prefix is not None:
        if cache is None:
            raise ValueError("lean_decode: a shared prefix needs the rows' (empty) KV cache")
        own = torch.ones((n, 1, 1, 1 + max_new_tokens), dtype=torch.bool, device=device)
    if cache is None:
        cache = DynamicCache(config=model.config)
        position_ids, deltas = prompt_positions(model, ids, mask, extra)  # (4, n, L)
        cur = ids
    else:
        position_ids = graph_step.decode_position_ids(text_pos, deltas)  # (4, n, 1)
        cur, extra = ids[:, -1:], {}
    deltas = deltas.to(device)
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    unfinished = torch.ones(n, dtype=torch.bool, device=device)
    rowwise = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, PresencePenalty, RowSeededSampler)
    compact = compact and device.type == "cpu" and torch.get_num_threads() == 1
    compact = compact and all(isinstance(p, rowwise) for p in procs)
    lin = _decode_linears(model) if compact else []
    rows = None  # the rows (of n) in the batch, once finished rows have left it
    step = None  # the GraphStep that runs the forwards after the first
    steps, forwards, done_here = 0, 0, False  # tokens appended; forwards run (more on a finished synced rank)
    while forwards < max_new_tokens:  # every rank runs the same number of forwards and any_rank calls
        if synced:
            if not dist.any_rank(not done_here):
                break
        elif done_here:
            break
        if step is None:
            if own is None:  # the model's own attention over the mask so far
                attend, routed = {"attention_mask": full_mask[:, : L + forwards]}, nullcontext()
            else:  # cascade attention: the prefix, and the rows' own positions so far
                attend = {"attention_mask": own[..., : forwards + 1], "mmrlsd_prefix": prefix}
                routed = route_attention(model, register_attention(CASCADE_ATTENTION, cascade_attention_forward))
            with routed:
                if forwards:  # a decode step: the new tokens' positions (`GraphStep` advances its own)
                    position_ids = graph_step.decode_position_ids(text_pos, deltas)  # (4, m, 1)
                logits = model(input_ids=cur, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                               **attend, **{name: cache}, **extra).logits[:, -1, :]  # fmt: skip
        else:
            logits = step(cur)
        forwards += 1
        extra = {}
        text_pos = text_pos + 1
        if forwards == 1:
            why = graph_step.unsupported(model, cache, cascade=prefix is not None) if graph else None
            if why:
                warnings.warn(f"hf_decode graph: {why}; decoding with the lean loop", stacklevel=2)
            if graph and not why:
                step = graph_step.GraphStep(model, cache, name, written=cache.get_seq_length(), room=max_new_tokens,
                                            mask=full_mask if own is None else own[:, 0, 0], text_pos=text_pos,
                                            deltas=deltas, capture=device.type == "cuda" and not compile,
                                            prefix=prefix, compile=compile)  # fmt: skip
                compact = False
            else:
                _reserve(cache, max_new_tokens)
                compact = compact and all(isinstance(x, _reserved_layer()) for x in cache.layers)
        if not done_here:  # synced: a rank that has finished runs forwards while the others still decode
            scores = logits.to(dtype=torch.float32, copy=True)  # (m, V)
            scores[:, suppress_t] = -float("inf")
            for proc in procs:
                scores = proc(seq[:, : L + steps] if rows is None else seq[rows, : L + steps], scores)
            nxt = torch.where(unfinished, scores.argmax(-1), pad)  # (m,)
            if rows is None:
                seq[:, L + steps] = nxt
            else:
                seq[rows, L + steps] = nxt
            steps += 1
            unfinished &= ~torch.isin(nxt, eos_t)
            done_here = not bool(unfinished.any())
            cur = nxt[:, None]
        if compact and (synced or not done_here):  # (a synced rank that has finished decodes a smaller batch)
            m = cur.shape[0]
            k = _compact_size(lin, n, m, int(unfinished.sum()), logits.dtype)  # the matmuls' dtype
            if k < m:  # keep the unfinished rows and the first finished ones, in order
                order = torch.cat([unfinished.nonzero()[:, 0], (~unfinished).nonzero()[:, 0]])  # (m,)
                keep = order[:k].sort().values
                rows = keep if rows is None else rows[keep]
                cache.batch_select_indices(keep)
                full_mask, text_pos, deltas = full_mask[keep], text_pos[keep], deltas[keep]
                unfinished, cur = unfinished[keep], cur[keep]
                if prefix is not None:
                    prefix, own = prefix.select(keep), own[keep]
                procs = [p.select(keep.tolist()) if isinstance(p, RowSeededSampler) else p for p in procs]
    return seq[:, L : L + steps]


@torch.no_grad()
def generate(
    model, processor, enc, *, group_size: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
    top_k: int = 0, gen_batch_size: int = 0, seed: int | None = None, progress: bool = False,
    row_offset: int | None = None, share_prefill: bool = True, presence_penalty: float = 0.0,
    decode: str = "lean", compact: bool = True, cascade: bool = False,
) -> Rollouts:  # fmt: skip
    """Sample responses for the N prompt rows of `enc` (already repeated G times per prompt).

    `temperature == 0` means greedy decoding. `presence_penalty` (`PresencePenalty`, 0: off) applies to sampling
    and greedy decoding alike. Sampling is seeded per row (`RowSeededSampler`): row i of this
    call uses the stream (seed, row_offset + i), `row_offset` defaulting to rank * N. Returns right-padded response ids with a mask that covers the
    tokens up to and including the first EOS.

    `share_prefill` (with G > 1): each prompt's prefix is computed once for its G rows (`shared_prefill`), and
    `gen_batch_size` is rounded down to whole groups (when it is at least G). Used only where rows b*G .. b*G+G-1
    are checked to be one prompt (on every rank); otherwise, with a warning, every row runs its full prefill.

    `decode`: `lean` (`lean_decode`: a plain loop of forwards over the KV cache, the same ids as `generate`),
    `graph` (the lean loop with its decode step replayed as a CUDA graph on a GPU, `mmrlsd.rollout.graph`: the same
    ids up to near-ties; single process only, under FSDP it decodes as `lean`), `generate` (Hugging Face
    `generate`), `compile` (the graph loop's static step compiled by `torch.compile` instead of captured: on a CPU
    the fast setting, after seconds of compiling per process and cache length) or `auto` (graph on a GPU, lean
    elsewhere). Settings of the model's generation config that add logits processors of their own (e.g. a
    released checkpoint's `repetition_penalty`, `checkpoint_processors`) are not applied by any of them, with a
    warning: the samples follow the policy under the arguments given here, as with vLLM.

    `cascade`: with the shared prefill and the lean or graph loop, the prompts' keys and values stay once per prompt
    and the decode steps use cascade attention (`mmrlsd.rollout.cascade`: the same ids up to near-ties); ignored
    elsewhere.

    Under FSDP every rank must pass as many rows (so as many `generate` calls): the decode steps are kept in
    step by `synced_gpus`, and a call without images runs the vision tower on a dummy image (in the shared
    prefill's forward, or before `generate`).
    """
    from transformers import LogitsProcessorList

    tok = processor.tokenizer
    n, G = enc["input_ids"].shape[0], group_size
    eos = eos_token_ids(model, processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    sample = temperature > 0
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=vision_token_ids(processor),
        eos_token_id=eos, pad_token_id=pad, use_cache=True, temperature=None, top_p=None, top_k=None,
        synced_gpus=dist.enabled(),  # under FSDP every rank must run the same number of forwards
    )  # fmt: skip
    if row_offset is None:
        row_offset = dist.rank() * n  # every rank holds the same number of rows
    share = share_prefill and G > 1
    if share:
        # every rank takes the same path, so that their collectives pair up
        share = not dist.any_rank(not _can_share(enc, G))
        if not share:
            warnings.warn("share_prefill: the rows of a group are not one prompt (or the prompt ends in an image "
                          "token); running the full prefill for every row", stacklevel=2)  # fmt: skip
    if decode not in DECODES:
        raise ValueError(f"decode is {decode!r}; valid: {', '.join(DECODES)}")
    device = next(model.parameters()).device
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "lean"
    # Under FSDP without the shared prefill, `generate` encodes a rank's images before its first forward, outside
    # the root's hooks, where the text-only ranks run `dummy_vision`; the lean loop would encode them inside its
    # first forward, after the root's all-gather, and the ranks' collectives would no longer pair up.
    lean = decode in ("lean", "graph", "compile") and (share or not dist.enabled())
    if off := checkpoint_processors(model):  # what `generate` would add from the checkpoint: off, as in vLLM
        gc = model.generation_config
        warnings.warn("rollout: the model's generation config sets "
                      f"{', '.join(f'{k}={getattr(gc, k)!r}' for k in off)}; sampling without it, as vLLM does, so "
                      "that the samples follow the policy whose log-probs training computes", stacklevel=2)  # fmt: skip
        kwargs.update(off)
    # a CUDA graph cannot hold FSDP's collectives: under FSDP the graph setting decodes with the lean loop
    graph = lean and decode in ("graph", "compile") and not dist.enabled()
    chunk = gen_batch_size or n
    if share and chunk >= G:
        chunk -= chunk % G  # whole groups: each prompt's prefix is computed once
    pieces = []
    with _eval_mode(model):
        for start in tqdm(range(0, n, chunk), desc="generate", disable=not progress, leave=False):
            stop = min(n, start + chunk)
            # sharing the prefill, only each prompt's first row needs its images (not G copies of the pixel rows)
            inputs = {k: v.to(device) for k, v in slice_encoding(enc, start, stop, images=not share).items()}
            if share:
                prompt_of_row = [r // G - start // G for r in range(start, stop)]
                firsts = [start + prompt_of_row.index(p) for p in range(prompt_of_row[-1] + 1)]
                prompts = {k: v.to(device) for k, v in select_rows(enc, firsts).items()}
                prefill = shared_prefill(model, prompts, prompt_of_row, cascade=cascade and lean)
                inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")} | prefill  # no pixels
            elif "pixel_values" not in inputs and tower_is_collective(model):
                # the other ranks' `generate` may encode images now, before its prefill
                dummy_vision(model)
            procs = LogitsProcessorList()
            if presence_penalty:
                procs.append(PresencePenalty(presence_penalty, inputs["input_ids"].shape[1]))
            if sample:
                base = 0 if seed is None else seed
                rows = list(range(row_offset + start, row_offset + stop))
                procs.extend(_warpers(temperature, top_p, top_k) + [RowSeededSampler(base, rows)])
            if lean:
                cache = prefill.pop(_cache_kwarg(model)) if share else None
                deltas = model.model.rope_deltas if share else None
                prefix = prefill.pop("mmrlsd_prefix", None) if share else None
                # the graph step's weights cast once per rollout under autocast (not under FSDP: its gathered
                # parameters would all be kept)
                cast_once = graph and not graph_step.sharded(model)
                casts = graph_step.cached_casts(device) if cast_once else nullcontext()
                with casts:
                    new = lean_decode(model, inputs, cache=cache, deltas=deltas, procs=list(procs),
                                      suppress=kwargs["suppress_tokens"], eos=eos, pad=pad,
                                      max_new_tokens=max_new_tokens, synced=kwargs["synced_gpus"], compact=compact,
                                      graph=graph, prefix=prefix, compile=decode == "compile")  # fmt: skip
                pieces.append(new.cpu())
            else:
                out = model.generate(**inputs, logits_processor=procs, **kwargs)
                pieces.append(out[:, inputs["input_ids"].shape[1] :].cpu())
    width = max(p.shape[1] for p in pieces)
    ids = torch.full((n, max(width, 1)), pad, dtype=torch.long)
    row = 0
    for p in pieces:
        ids[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    is_eos = torch.isin(ids, torch.tensor(eos))  # (N, T)
    # mask: positions up to and including the first EOS; everything after is padding
    after_eos = (is_eos.cumsum(dim=1) - is_eos.int()) > 0  # (N, T)
    mask = (~after_eos).long()
    if width == 0:
        mask.zero_()
    ids = ids.masked_fill(mask == 0, pad)
    texts = tok.batch_decode([r[m.bool()] for r, m in zip(ids, mask)], skip_special_tokens=True)
    return Rollouts(response_ids=ids, response_mask=mask, texts=texts, group_size=group_size)


def generate_texts(
    model, processor, prompts: list[tuple[str, list]], *, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, batch_size: int = 8, progress: bool = True, seed: int = 0,
) -> list[str]:  # fmt: skip
    """Answers for `(user_text, images)` prompts (images before the text in one user turn), for evaluation."""
    texts: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chats = [chat_text(processor, text, len(images)) for text, images in chunk]
        enc = encode(processor, chats, [images for _, images in chunk])
        r = generate(model, processor, enc, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed + start)  # fmt: skip
        texts.extend(r.texts)
        bar.update(len(chunk))
    bar.close()
    return texts
