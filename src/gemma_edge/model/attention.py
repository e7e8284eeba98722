"""Attention as ExecuTorch runs it: ExecuTorch's LLM custom ops (custom_sdpa, update_cache)
registered for transformers, the sliding layers' own op (gemma_edge::sliding_attention), and
the one-token forms the lowering swaps in for decode."""

from __future__ import annotations

import torch

ATTENTION_KERNELS = ("executorch", "transformers")
EXECUTORCH_ATTENTION = "executorch_custom_sdpa"


def register_executorch_llm_ops() -> None:
    """Define `llama::update_cache` and `llama::custom_sdpa`, for torch and for the ExecuTorch runtime.

    Exporting, loading an exported program and running a `.pte` that calls them all need this first."""
    import warnings

    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

    # Their shape checks call torch._check_is_size, deprecated in torch 2.13: one warning per
    # traced layer would bury each step's log.
    warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)


def custom_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    start_pos=None,
    new_tokens=None,
    ring_windows=None,
    window_filled=None,
    ring_filled=None,
    ring_reads=None,
    **kwargs,
):
    """transformers' attention interface over `llama::custom_sdpa`: query [1, heads, q, dim] and the
    [1, positions, kv_heads, dim] caches in, [1, q, heads, dim] out, as transformers expects.

    The queries are the last q of the call's `new_tokens`: Gemma 4 runs the layers that reuse
    another layer's keys and values on the last token only (all that `logits_to_keep=1` needs, and
    transformers slices their masks to match). Without a mask, custom_sdpa masks causally from the
    position of the first query it is given; a ring buffer's mask says which slots each query sees."""
    group = query.shape[1] // key.shape[2]
    if attention_mask is not None:
        mask = attention_mask[0, 0, -query.shape[2] :, :].repeat_interleave(group, dim=0)
        window_keys, window_values = ring_windows[id(key)]
        if id(key) not in ring_reads:
            ring_reads[id(key)] = (key[:, :ring_filled], value[:, :ring_filled])
        ring_keys, ring_values = ring_reads[id(key)]
        rows = torch.ops.gemma_edge.sliding_attention(
            query_heads_as_rows(query, key.shape[2]),
            ring_keys,
            ring_values,
            window_keys,
            window_values,
            mask,
            window_filled,
            scaling,
        )
        return rows_as_query_heads(rows, query.shape[1]), None
    first_query = start_pos + new_tokens - query.shape[2]
    if isinstance(query.shape[2], int) and query.shape[2] == 1:  # a decode step, or a KV-sharing layer's last token
        return attend_one_query_as_rows(query, key, value, first_query, scaling), None
    output = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, first_query, None, 0.0, True, scaling)
    return output, None


def one_token_custom_sdpa(query, key, value, start_pos, mask, dropout_p, is_causal, scale) -> torch.Tensor:
    """`llama::custom_sdpa` with its own arguments ([1, q, heads, dim] queries), taking the rows form
    for a causal call of a single query token and passing any other call through.

    The cached full-attention layers' causal call serves prefill and decode alike in a program whose
    token count is dynamic, so it stays per head there. The lower step puts this function in place
    of every `custom_sdpa` of a program re-exported for one token a call (`lower.decode_program`),
    where the token count is the constant 1, so the check below is decided while tracing."""
    if is_causal and mask is None and isinstance(query.shape[1], int) and query.shape[1] == 1:
        return attend_one_query_as_rows(query.transpose(1, 2), key, value, start_pos, scale)
    return torch.ops.llama.custom_sdpa(query, key, value, start_pos, mask, dropout_p, is_causal, scale)


@torch.library.custom_op("gemma_edge::sliding_attention", mutates_args=())
def sliding_attention(
    rows: torch.Tensor,
    ring_keys: torch.Tensor,
    ring_values: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    mask: torch.Tensor,
    window_filled: int,
    scale: float | None,
) -> torch.Tensor:
    """A sliding layer's attention over its ring, `query_heads_as_rows` in and out: the ring's
    written slots and their mask, repeated per row. `window_filled` is min(p + 1, W) for the call's
    last position p.

    One op in the exported program so that each lowered method can choose how to read it: the
    program for 1 to W tokens reads the ring with its mask (this body, `as_masked_ring_calls`); the
    one-token method only the window's filled slots (`one_token_sliding_attention`)."""
    return torch.ops.llama.custom_sdpa(rows, ring_keys, ring_values, 0, mask, 0.0, False, scale)


@sliding_attention.register_fake
def _sliding_attention_shape(rows, ring_keys, ring_values, window_keys, window_values, mask, window_filled, scale):
    return torch.empty_like(rows)


def one_token_sliding_attention(rows, ring_keys, ring_values, window_keys, window_values, mask, window_filled, scale):
    """`sliding_attention` for a single query token at position p: its window holds the last W
    positions written, this one's included, which are exactly the ones it sees, in its first
    `window_filled` = min(p + 1, W) slots. custom_sdpa unmasked reads the first start_pos + rows
    positions, so it reads only those: 17 positions at p = 16, where the masked ring call reads 2W."""
    return torch.ops.llama.custom_sdpa(rows, window_keys, window_values, window_filled - rows.shape[1], None, 0.0, False, scale)


def attend_one_query_as_rows(query, key, value, position, scaling) -> torch.Tensor:
    """The causal attention of a single query token at `position` ([1, heads, 1, dim] in,
    [1, 1, heads, dim] out): its head rows all see positions 0..position, so the call needs no
    causal order. custom_sdpa attends to the first start_pos + rows positions; a start_pos below 0
    (the first positions) is taken as it is."""
    group = query.shape[1] // key.shape[2]
    return attend_as_rows(query, key, value, position + 1 - group, scaling)


def attend_as_rows(query, key, value, start_pos, scaling) -> torch.Tensor:
    """custom_sdpa, not causal, over [1, heads, q, dim] queries passed as rows of their KV heads;
    [1, q, heads, dim] out."""
    rows = torch.ops.llama.custom_sdpa(query_heads_as_rows(query, key.shape[2]), key, value, start_pos, None, 0.0, False, scaling)
    return rows_as_query_heads(rows, query.shape[1])


def query_heads_as_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[1, heads, q, dim] queries as [1, q * group, kv_heads, dim], a group being the query heads that
    share one KV head (transformers numbers them kv_head * group + g): query t's head g becomes row
    t * group + g of its KV head. custom_sdpa handles each query head on its own, so given the heads
    it reads a shared KV head once per head in a step of small products; given them as rows, once in
    one larger product, 3-4 times faster for E2B's one KV head (docs/design.md, "Query heads as rows"). Rows have no
    causal order of their own, so this serves the calls that need none: masked ones (the mask
    repeated per row) and those with a single query token."""
    batch, heads, length, dim = query.shape
    group = heads // kv_heads
    rows = query.view(batch, kv_heads, group, length, dim).permute(0, 3, 2, 1, 4)
    return rows.reshape(batch, length * group, kv_heads, dim)


def rows_as_query_heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """custom_sdpa's [1, q * group, kv_heads, dim] output of `query_heads_as_rows` back as [1, q, heads, dim]."""
    batch, _, kv_heads, dim = rows.shape
    group = heads // kv_heads
    per_head = rows.view(batch, -1, group, kv_heads, dim).permute(0, 1, 3, 2, 4)
    return per_head.reshape(batch, per_head.shape[1], heads, dim)


def register_custom_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EXECUTORCH_ATTENTION, custom_sdpa_attention)
