"""Padding-free packing for the log-prob passes (teacher, old policy, update), and token-budget micro-batches.

The rows of a micro-batch are concatenated into one row of `L = Σ L_i` real tokens, with no padding:

    [prompt_1 response_1 | prompt_2 response_2 | ...]          input_ids (1, L)

Each sequence keeps its own position ids: Qwen-VL's 3-D mRoPE ids come from the model's own `get_rope_index`
on the padded batch (which skips the padding), so they equal the per-sequence ids exactly, and a fourth row of
text positions `0 .. L_i - 1` (transformers' packed-sequence convention for Qwen2/2.5/3-VL) marks where each
sequence starts. Attention is block-diagonal causal, by one of three kernels:

    varlen_sdpa        one `scaled_dot_product_attention(is_causal=True)` per sequence (CPU, or any GPU)
    flash_attention_2  flash-attn's varlen kernel through transformers (`cu_seq_lens_*`), when installed
    flex_attention     PyTorch flex attention; transformers builds the block mask from the text positions

`auto` picks flash_attention_2 when the model was loaded with it, flex_attention on CUDA, varlen_sdpa
otherwise. The padded layout (`pad_layout`) is kept for comparison and for `packing: false`; it drops the
columns that are padding in every row of the micro-batch.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as td
import torch.nn.functional as F

from mmrlsd import dist
from mmrlsd.types import SeqBatch

VARLEN_SDPA = "mmrlsd_varlen_sdpa"
ATTENTION_KERNELS = ("auto", "varlen_sdpa", "flex_attention", "flash_attention_2")


@dataclass(frozen=True)
class FastOptions:
    """How the log-prob passes run. All off: the plain padded Hugging Face forward."""

    packing: bool = False
    """Padding-free packing with block-diagonal attention."""
    token_budget: int = 0
    """Real tokens per micro-batch when packing (0: `micro_batch_size` rows per micro-batch)."""
    share_vision: bool = False
    """Vision features once per prompt, shared by its `group_size` rows (gradients too)."""
    share_prefix: bool = False
    """Packing only: a prompt's G rows in one segment, the prompt computed once (see `pack`)."""
    logprob_chunk: int = 0
    """Tokens per chunk of the lm_head projection + logsumexp (0: full `[tokens, vocab]` fp32 logits)."""
    attention: str = "auto"
    """Packed attention kernel: auto | varlen_sdpa | flex_attention | flash_attention_2."""
    group_size: int = 1
    """G: rows b*G .. b*G+G-1 share one prompt and its images."""

    @property
    def enabled(self) -> bool:
        return self.packing or self.share_vision or self.logprob_chunk > 0 or self.share_prefix


def fast_options(cfg, group_size: int) -> FastOptions:
    """`FastOptions` from a `Config` (keys `model.packing`, `model.share_vision`, `model.share_prefix`,
    `model.logprob_chunk`, `model.packed_attention`, `optim.token_budget`)."""
    m, o = cfg.model, cfg.optim
    if m.packed_attention not in ATTENTION_KERNELS:
        raise ValueError(
            f"unknown packed attention {m.packed_attention!r}; known: {', '.join(ATTENTION_KERNELS)}"
        )
    return FastOptions(
        packing=m.packing, token_budget=o.token_budget, share_vision=m.share_vision, logprob_chunk=m.logprob_chunk,
        share_prefix=m.share_prefix, attention=m.packed_attention, group_size=group_size,
    )  # fmt: skip


def rope_positions(model, seq: SeqBatch) -> torch.Tensor:
    """`(3, N, P+T)` position ids of every row (3-D mRoPE on image tokens; 0 on padding), from the model's own
    `get_rope_index` with the attention mask, i.e. exactly the ids each sequence gets when run alone."""
    mm = seq.mm_token_type_ids
    if mm is None:
        mm = torch.zeros_like(seq.input_ids)
    pos, _ = model.model.get_rope_index(
        input_ids=seq.input_ids, mm_token_type_ids=mm, image_grid_thw=seq.image_grid_thw,
        attention_mask=seq.attention_mask,
    )  # fmt: skip
    return pos


def micro_batches(
    units: list[list[int]], sizes: list[int], token_budget: int, max_rows: int
) -> list[list[int]]:
    """Group `units` (lists of rows that stay together: one row, or one prompt's rows when its prefix is shared)
    into micro-batches of rows.

    `token_budget > 0`: first-fit decreasing on the units' token counts `sizes`, so every micro-batch holds at
    most `token_budget` tokens (a larger unit gets one of its own) and the micro-batches are balanced; rows stay
    ascending inside each. Otherwise: consecutive runs of `max_rows` rows (the padded path's split).

    >>> micro_batches([[0], [1], [2], [3]], [5, 3, 4, 2], token_budget=7, max_rows=0)
    [[0, 3], [1, 2]]
    """
    if token_budget <= 0:
        rows = [r for u in units for r in u]
        return [rows[i : i + max_rows] for i in range(0, len(rows), max_rows)]
    bins: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(units)), key=lambda k: -sizes[k]):
        b = next((i for i, left in enumerate(room) if sizes[k] <= left), None)
        if b is None:
            bins.append([])
            room.append(token_budget)
            b = len(bins) - 1
        bins[b] += units[k]
        room[b] -= sizes[k]
    return [sorted(b) for b in bins]


def plan_units(
    seq: SeqBatch, rows: list[int], group_size: int, share_prefix: bool
) -> tuple[list[list[int]], list[int]]:
    """`(units, sizes)` for `micro_batches`: single rows with their real token counts, or with a shared prefix
    the rows of each prompt together, counting the prompt once."""
    lengths = seq.attention_mask.sum(dim=1).tolist()
    if not share_prefix:
        return [[r] for r in rows], [lengths[r] for r in rows]
    prompt = seq.attention_mask[:, : seq.prompt_len].sum(dim=1).tolist()
    units: dict[int, list[int]] = {}
    for r in rows:
        units.setdefault(r // group_size, []).append(r)
    out = list(units.values())
    return out, [prompt[u[0]] + sum(lengths[r] - prompt[r] for r in u) for u in out]


@dataclass
class Layout:
    """The inputs of one language-model call, and where each predicted response token goes."""

    input_ids: torch.Tensor  # (b, L): b = 1 when packed
    position_ids: torch.Tensor  # (4, 1, L) packed (text positions first) or (3, n, L) padded
    attention_mask: torch.Tensor | None  # (n, L) padded; None when packed
    pred_index: torch.Tensor  # (R,) flat index into the (b*L) hidden states that predict a response token
    targets: torch.Tensor  # (R,) the response tokens they predict
    out_row: torch.Tensor  # (R,) micro-batch row 0..n-1 of each prediction
    out_col: torch.Tensor  # (R,) response column 0..T-1 of each prediction
    prompt_rows: list[int] = field(default_factory=list)  # rows whose prompt (and images) the layout holds
    segments: list[tuple[int, int, list[int]]] = field(default_factory=list)
    """Packed: `(start, prefix_len, response_lens)` per segment; a plain sequence is `(start, L, [])`."""

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """`(segments+1,)` int32 segment starts (flash-attn varlen)."""
        ends = [s + p + sum(r) for s, p, r in self.segments]
        return torch.tensor([0] + ends, dtype=torch.int32)

    @property
    def max_len(self) -> int:
        return max(p + sum(r) for _, p, r in self.segments)


def pack(
    seq: SeqBatch, rows: list[int], positions: torch.Tensor, group_size: int = 1, share_prefix: bool = False
) -> Layout:
    """The rows' real tokens concatenated into one row; `positions` is `rope_positions(model, seq)`.

    `share_prefix`: the rows of one prompt (r // group_size equal, consecutive in `rows`) become one segment
    `[prompt | response_1 | response_2 | ...]` in which each response attends to the prompt and to itself
    (`segments` says where), so the prompt, images included, goes through the model once for all of them. Each
    response keeps the position ids it has after its prompt."""
    P = seq.prompt_len
    ids, pos, text_pos, pred, tgt, orow, ocol = [], [], [], [], [], [], []
    prompt_rows, segments = [], []
    offset, j = 0, 0
    while j < len(rows):
        run = [rows[j]]
        while (
            share_prefix
            and j + len(run) < len(rows)
            and rows[j + len(run)] // group_size == run[0] // group_size
        ):
            run.append(rows[j + len(run)])
        r0 = run[0]
        cols0 = seq.attention_mask[r0].nonzero().squeeze(1)
        head = cols0[cols0 < P] if share_prefix else cols0  # the shared prefix, or the whole sequence
        for r in run[1:]:
            if not torch.equal(seq.input_ids[r, :P], seq.input_ids[r0, :P]):
                raise ValueError(f"rows {r0} and {r} share a group but not a prompt")
        ids.append(seq.input_ids[r0, head])
        pos.append(positions[:, r0, head])
        text_pos.append(torch.arange(head.numel()))
        resp_lens, last = (
            [],
            offset + head.numel() - 1,
        )  # `last`: the packed index of the prompt's final token
        if not share_prefix:  # one plain sequence: each response token is predicted by the token before it
            k = (head >= P).nonzero().squeeze(1)
            pred.append(offset + k - 1)
            tgt.append(seq.input_ids[r0, head[k]])
            orow.append(torch.full_like(k, j))
            ocol.append(head[k] - P)
        a = offset + head.numel()
        for i, r in enumerate(run if share_prefix else []):
            cols = seq.attention_mask[r, P:].nonzero().squeeze(1) + P  # (t,) real response columns
            t = cols.numel()
            ids.append(seq.input_ids[r, cols])
            pos.append(positions[:, r, cols])
            text_pos.append(head.numel() + torch.arange(t))
            pred.append(
                torch.cat([torch.tensor([last]), a + torch.arange(t - 1)])
                if t
                else torch.zeros(0, dtype=torch.long)
            )
            tgt.append(seq.input_ids[r, cols])
            orow.append(torch.full((t,), j + i, dtype=torch.long))
            ocol.append(cols - P)
            resp_lens.append(t)
            a += t
        segments.append((offset, int(head.numel()), resp_lens))
        prompt_rows.append(r0)
        offset, j = a, j + len(run)
    position_ids = torch.cat([torch.cat(text_pos)[None], torch.cat(pos, dim=1)])[:, None]  # (4, 1, L)
    return Layout(
        input_ids=torch.cat(ids)[None], position_ids=position_ids, attention_mask=None, pred_index=torch.cat(pred),
        targets=torch.cat(tgt), out_row=torch.cat(orow), out_col=torch.cat(ocol), prompt_rows=prompt_rows,
        segments=segments,
    )  # fmt: skip


def pad_layout(seq: SeqBatch, rows: list[int], positions: torch.Tensor) -> Layout:
    """The rows in the padded `[prompt | response]` layout, without the columns that are padding in all rows."""
    P = seq.prompt_len
    attn = seq.attention_mask[rows]  # (n, P+T)
    used = attn.any(dim=0).nonzero().squeeze(1)
    lo, hi = int(used[0]), int(used[-1]) + 1
    attn = attn[:, lo:hi]
    n, W = attn.shape
    cols = torch.arange(lo, hi)
    is_pred = (cols >= P)[None] & attn.bool()  # (n, W): response tokens to predict
    r, c = is_pred.nonzero(as_tuple=True)
    return Layout(
        input_ids=seq.input_ids[rows, lo:hi], position_ids=positions[:, rows, lo:hi], attention_mask=attn,
        pred_index=r * W + c - 1, targets=seq.input_ids[rows, lo:hi][r, c], out_row=r, out_col=c + lo - P,
        prompt_rows=list(rows),
    )  # fmt: skip


def varlen_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention within the segments of one packed row (`mmrlsd_segments`): causal over a segment's prefix, and
    each response over the prefix plus itself (causal), by `scaled_dot_product_attention` per piece.

    `query` `(1, Hq, L, d)`, `key`/`value` `(1, Hkv, L, d)` -> `((1, L, Hq, d), None)` (transformers'
    attention-interface contract)."""
    # grouped-query attention: sdpa reads the shared key/value heads as stored (the same numbers as repeating
    # them, without the copy in the forward and the sum over the copies in the backward: -12% attention time)
    gqa = query.shape[1] != key.shape[1]
    sdpa = partial(F.scaled_dot_product_attention, scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    # the segments are contiguous and cover the row: each one's prefix, then its responses
    segments = kwargs["mmrlsd_segments"]
    sizes = [n for _, p, resp in segments for n in (p, *resp)]
    # one split per tensor (its backward is one concatenation), not a slice per piece (each slice's backward
    # zero-fills a row-sized gradient: 8% of the update on the CPU perf config)
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    out, i = [], 0
    for _, p, resp in segments:
        kp, vp = ks[i], vs[i]
        out.append(sdpa(qs[i], kp, vp, is_causal=True))
        for t in resp:
            i += 1
            allowed = torch.ones(t, p + t, dtype=torch.bool, device=query.device).tril(diagonal=p)  # (t, p+t)
            k, v = torch.cat([kp, ks[i]], dim=2), torch.cat([vp, vs[i]], dim=2)
            out.append(sdpa(qs[i], k, v, attn_mask=allowed))
        i += 1
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def segment_block_mask(layout: Layout, device):
    """Flex attention `BlockMask` of `layout.segments`: same segment, causal, and a response token sees the
    prefix and its own response only."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, resp = [], []
    for i, (_, p, rl) in enumerate(layout.segments):
        seg += [i] * (p + sum(rl))
        resp += [0] * p + [k + 1 for k, t in enumerate(rl) for _ in range(t)]
    seg_t, resp_t = torch.tensor(seg, device=device), torch.tensor(resp, device=device)

    def mask_mod(b, h, q, kv):
        return (seg_t[q] == seg_t[kv]) & (kv <= q) & ((resp_t[kv] == 0) | (resp_t[kv] == resp_t[q]))

    L = len(seg)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=device)


@functools.cache
def register_attention(name: str, forward) -> str:
    """`forward` registered under `name` in transformers' attention registry (once); returns `name`."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, forward)
    return name


def resolve_kernel(model, kind: str) -> str:
    """The attention implementation a packed call uses (see the module docstring)."""
    current = model.model.language_model.config._attn_implementation
    if kind == "auto":
        if current and current.startswith("flash_attention"):
            return current
        return "flex_attention" if next(model.parameters()).is_cuda else "varlen_sdpa"
    return kind


def prefix_shared(model, fast: FastOptions) -> bool:
    """Whether the packed layout shares each prompt's prefix (not with flash-attn: it has no such mask)."""
    return (
        fast.packing and fast.share_prefix and not resolve_kernel(model, fast.attention).startswith("flash")
    )


def plan(model, seq: SeqBatch, rows: list[int], fast: FastOptions, max_rows: int) -> list[list[int]]:
    """The micro-batches (lists of rows) the fast path runs `rows` in."""
    units, sizes = plan_units(seq, rows, fast.group_size, prefix_shared(model, fast))
    return micro_batches(units, sizes, fast.token_budget if fast.packing else 0, max_rows)


def plan_micro_batches(
    model, seq: SeqBatch, rows: list[int], fast: FastOptions, max_rows: int
) -> list[list[int]]:
    """`plan`, and under torch.distributed as many micro-batches on every rank (a token budget can give the ranks
    different numbers): the extra ones are empty lists, for a forward whose result is dropped (or a zero-weight
    backward) that keeps the ranks' FSDP collectives in step."""
    micro = plan(model, seq, rows, fast, max_rows)
    if dist.enabled():
        k = torch.tensor([len(micro)])
        td.all_reduce(k, op=td.ReduceOp.MAX)
        micro += [[] for _ in range(int(k) - len(micro))]
    return micro


def make_layout(model, seq: SeqBatch, rows: list[int], fast: FastOptions, positions: torch.Tensor) -> Layout:
    if not fast.packing:
        return pad_layout(seq, rows, positions)
    return pack(seq, rows, positions, fast.group_size, prefix_shared(model, fast))


@contextmanager
def route_attention(model, impl: str):
    """The language model's attention on the kernel `impl` (a registered name, or a `resolve_kernel` result:
    varlen_sdpa, ours, is registered on first use) inside the block, its own kernel again after."""
    if impl == "varlen_sdpa":
        impl = register_attention(VARLEN_SDPA, varlen_sdpa_forward)
    config = model.model.language_model.config
    old = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = old


def packed_kernel(model, fast: FastOptions):
    """Keep the language model's attention on the packed kernel from a packed forward through its backward.

    Gradient checkpointing re-runs each decoder layer's forward inside `backward()`, and the layer picks its
    attention function from `config._attn_implementation` at call time: a backward outside this context would
    recompute with the model's own kernel (sdpa) on the packed inputs (a `BlockMask` it cannot take, or no
    segments at all). A no-op when `fast.packing` is off."""
    return route_attention(model, resolve_kernel(model, fast.attention)) if fast.packing else nullcontext()


@contextmanager
def packed_attention(model, layout: Layout, kind: str):
    """Route the language model's attention to the packed kernel for one call; yields the extra forward kwargs
    (`attention_mask` replaces the layout's None when the kernel needs a mask object). A backward through a
    gradient-checkpointed model must run inside `packed_kernel`."""
    impl = resolve_kernel(model, kind)
    device = next(model.parameters()).device
    if impl == "varlen_sdpa":
        kwargs = {"mmrlsd_segments": layout.segments}
    elif impl == "flex_attention":
        kwargs = {"attention_mask": segment_block_mask(layout, device)}
    else:  # flash-attn varlen: plain segments only (see `pack`)
        if any(r for _, _, r in layout.segments):
            raise ValueError(f"{impl} cannot attend across a shared prefix; set model.share_prefix: false")
        cu = layout.cu_seqlens.to(device)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": layout.max_len,
                  "max_length_k": layout.max_len}  # fmt: skip
    with route_attention(model, impl):
        yield kwargs
