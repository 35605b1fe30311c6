"""Cascade attention for the decode steps after a shared prefill (`rollout.cascade_attention`).

The G rows of a group decode from one prompt. The shared prefill (`generate.shared_prefill`) computes that
prompt's keys and values once; without cascade attention they are then copied to each of the G rows, and every
decode step of every row reads its own copy. With it the KV cache holds each prompt's prefix once (`SharedPrefix`,
P prompts) and each row only its own positions (the last prompt token and the response). A decode step then
attends in two parts that share one softmax:

- the prefix: the queries of a prompt's G rows (and of the query heads that share a key/value head) form one
  matrix against the prompt's keys, `(P, kv_heads, G * groups, d) @ (P, kv_heads, d, prefix)`: one matrix multiply
  per prompt instead of G matrix-vector products over G copies;
- the row's own positions, per row.

The scores of both parts are concatenated, softmaxed (in float32, as transformers' eager attention does) and
split again for the two value products. The prefix's keys and values are read once per group per step instead of
G times: on the CPU perf config (G = 8, 115-token prefix, up to 64 new tokens) the decode step reads ~3x fewer
key/value bytes, and the cache needs G times less memory for the prompts (for image prompts most of it).

The numbers are those of attention computed another way (a matrix multiply and an explicit softmax instead of
the fused sdpa kernel, the prefix's dot products in a larger batch): equal to the plain decode's up to float
rounding, so the sampled ids are equal except where two noisy scores tie that closely, as for the CUDA-graph
step. The `lean`, `graph` and `compile` decodes support it; `generate` and runs without the shared prefill do not.
"""

from __future__ import annotations

import copy

import torch

CASCADE_ATTENTION = "mmrlsd_cascade"


class SharedPrefix:
    """The prefix keys and values of P prompts, held once for their G rows each (rows `p * G .. p * G + G - 1`
    decode from prompt p).

    `cache`: the `DynamicCache` the shared prefill filled for the P prompts, each layer `(P, kv_heads, prefix, d)`.
    `mask`: the prompts' attention mask over the prefix `(P, prefix)`, 0 at left padding.

    `rows`: once finished rows have left the decode batch (`select`), the rows (of the P * G) still in it; the prefix
    products still run for all P * G query rows (those of the rows that left as zeros), so every row keeps the bits
    it had in the full batch."""

    def __init__(self, cache, mask: torch.Tensor, group_size: int):
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.group_size = group_size
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        self.bias = bias.masked_fill(mask == 0, -float("inf"))[:, None, None, :]  # (P, 1, 1, prefix)
        self.rows: torch.Tensor | None = None

    def padded(self, multiple: int) -> SharedPrefix:
        """This prefix with its length rounded up to a multiple of `multiple`: zero keys and values, not attended
        (so a compiled step sees few distinct shapes)."""
        extra = -self.keys[0].shape[2] % multiple
        if not extra:
            return self
        out = copy.copy(self)
        pad = (0, 0, 0, extra)  # (..., prefix, d): after the prefix positions
        out.keys = [torch.nn.functional.pad(k, pad) for k in self.keys]
        out.values = [torch.nn.functional.pad(v, pad) for v in self.values]
        out.bias = torch.nn.functional.pad(self.bias, (0, extra), value=-float("inf"))
        return out

    def select(self, keep: torch.Tensor) -> SharedPrefix:
        """The prefix of the batch's rows `keep` (positions in the current batch), sharing the keys and values."""
        out = copy.copy(self)
        out.rows = keep if self.rows is None else self.rows[keep]
        return out


def cascade_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                              mmrlsd_prefix: SharedPrefix | None = None, **kwargs):  # fmt: skip
    """transformers' attention-interface contract for one query token per row: `query` `(n, heads, 1, d)`, `key` /
    `value` the rows' own positions `(n, kv_heads, t, d)`, `attention_mask` None or boolean `(n, 1, 1, t)` over
    them (False: not attended; attention reads only the positions it covers), `mmrlsd_prefix` the prompts'
    prefix (`SharedPrefix`: n = P * G rows, or its `rows`). Returns `((n, 1, heads, d), None)`."""
    if mmrlsd_prefix is None or query.shape[2] != 1:
        raise ValueError("cascade attention: needs one query token per row and the `mmrlsd_prefix` argument")
    kp, vp = mmrlsd_prefix.keys[module.layer_idx], mmrlsd_prefix.values[module.layer_idx]  # (P, kv, Lp, d)
    P, kv, Lp, d = kp.shape
    n, heads = query.shape[:2]
    groups, G = heads // kv, mmrlsd_prefix.group_size
    rows = mmrlsd_prefix.rows
    if n != (P * G if rows is None else rows.shape[0]):
        raise ValueError(f"cascade attention: {n} rows for {P} prompts x {G}")
    scale = d**-0.5 if scaling is None else scaling
    q = query.reshape(n, kv, groups, d)  # query head h reads key/value head h // groups (transformers' repeat_kv)

    def per_prompt(x):  # (n, kv, groups, X) -> (P, kv, G * groups, X); the rows that left the batch zero
        if rows is not None:
            x = x.new_zeros((P * G,) + x.shape[1:]).index_copy_(0, rows, x)
        return x.reshape(P, G, kv, groups, -1).transpose(1, 2).reshape(P, kv, G * groups, x.shape[-1])

    def per_row(x):  # (P, kv, G * groups, X) -> (n, kv, groups, X)
        x = x.reshape(P, kv, G, groups, -1).transpose(1, 2).reshape(P * G, kv, groups, x.shape[-1])
        return x if rows is None else x.index_select(0, rows)

    if attention_mask is not None:  # the compiled step's mask covers the positions written so far (`GraphStep`)
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    # compiled, a row's own products are multiply-sums that inductor fuses into one loop each: 64 matrix
    # products of (groups x d) @ (d x t) cost more in MKL's batched multiply than the arithmetic
    fused = torch.compiler.is_compiling()
    # prefix: a prompt's G rows x groups query heads of one key/value head as one (G * groups, d) matrix
    s_pre = torch.matmul(per_prompt(q), kp.transpose(-1, -2)) * scale + mmrlsd_prefix.bias  # (P, kv, G*groups, Lp)
    s_pre = per_row(s_pre)  # (n, kv, groups, Lp)
    if fused:
        s_own = (q.unsqueeze(-2) * key.unsqueeze(2)).sum(-1) * scale  # (n, kv, groups, t)
    else:
        s_own = torch.matmul(q, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        s_own = s_own.masked_fill(~attention_mask, -float("inf"))
    probs = torch.cat([s_pre.float(), s_own.float()], dim=-1).softmax(dim=-1).to(value.dtype)
    p_pre, p_own = probs[..., :Lp], probs[..., Lp:]
    if fused:
        own = (p_own.unsqueeze(-1) * value.unsqueeze(2)).sum(-2)  # (n, kv, groups, d)
    else:
        own = torch.matmul(p_own, value)
    out = per_row(torch.matmul(per_prompt(p_pre), vp)) + own  # (n, kv, groups, d)
    return out.reshape(n, 1, heads, d), None
