"""Gemma 4 as an exportable decoder: its KV cache lives in the graph as mutable module buffers.

`forward(tokens[1, T], input_pos[T]) -> logits[1, vocab]` computes only the new tokens against the
cache, so a decode step is one token and a prefill is one batched call of the whole prompt. This is
the signature ExecuTorch's LLM runner calls (it fills `input_pos` with the T cache positions).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.cache_utils import StaticLayer


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the decoder computes in (its embedding tables may be stored narrower)."""
    return model.model.norm.weight.dtype


def sliding_window_of(model: nn.Module) -> int | None:
    config = model.config
    if "sliding_attention" in (config.layer_types or []):
        return int(config.sliding_window)
    return None


def xnnpack_friendly_rmsnorm(model: nn.Module) -> int:
    """Rewrite every Gemma 4 RMSNorm as ops XNNPACK delegates, so norms stop splitting its subgraphs.

    transformers computes `x * pow(mean(x², -1) + eps, -0.5)`; XNNPACK takes neither a mean over
    the last dimension of a 3-D tensor nor a power of -0.5, so each of a layer's seven or eight
    norms ran on portable kernels between two delegate calls. Here the mean is a linear layer with
    one output (weights 1/n, kept FP32 by the quantize step) and the power an rsqrt: the same
    arithmetic up to rounding. Returns how many norms were rewritten.
    """
    norms = [m for m in model.modules() if type(m).__name__ == "Gemma4RMSNorm"]
    for module in norms:
        module._norm = types.MethodType(_rmsnorm_as_linear, module)
    # Each norm learns its width (v_norm has no weight to tell it) on one eager call without a cache,
    # and keeps its 1/n weights as a buffer, so the export finds them as constants.
    with torch.no_grad():
        model.model(input_ids=torch.tensor([[2, 3]]), use_cache=False)
    return len(norms)


def _rmsnorm_as_linear(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not hasattr(self, "rms_mean"):
        width = hidden_states.shape[-1]
        self.register_buffer("rms_mean", torch.full((1, width), 1.0 / width, dtype=hidden_states.dtype), persistent=False)
    mean_squared = nn.functional.linear(hidden_states * hidden_states, self.rms_mean)
    return hidden_states * torch.rsqrt(mean_squared + self.eps)


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


class KVCacheDecoder(nn.Module):
    """Gemma 4 with a static KV cache held as registered buffers, exportable with torch.export.

    transformers' StaticCache keeps its tensors as plain attributes, which torch.export lifts as
    constants that lowering refuses to mutate. Here each layer's keys and values are module
    buffers, and the cache layers are re-bound to them on every call so that the in-place cache
    writes land on the buffers the exported graph owns.

    `attention="executorch"` (what the export uses) writes new keys and values with ExecuTorch's
    `llama::update_cache` and attends with `llama::custom_sdpa`: the cache is laid out
    [1, positions, kv_heads, head_dim] and attention reads the single KV head for all query heads
    instead of copying it to each one (what transformers' attention does by `repeat_kv`, on every
    layer and step). Full-attention layers keep `max_seq_len` positions and attend causally to the
    first start_pos + T. When `max_seq_len` exceeds the sliding window W, sliding layers keep a
    ring buffer of 2W positions instead (`RingCacheLayer`): constant memory and constant attention
    cost at any depth, with at most W new tokens per call, so W - 1 earlier positions and the call's
    own always fit. Beside it each keeps a window of W positions, the last W written, which is all a
    single query token sees: the one-token method reads only its filled slots, unmasked
    (`one_token_sliding_attention`). `"transformers"` keeps transformers' own cache update, masks
    and attention (the eager benchmark's baseline), up to the window.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, attention: str = "executorch"):
        super().__init__()
        from transformers.cache_utils import StaticCache
        from transformers.integrations.executorch import get_head_shapes

        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, not {attention!r}")
        config = model.config
        trained = getattr(config, "max_position_embeddings", None)
        if trained is not None and max_seq_len > trained:
            raise ValueError(
                f"export.max_seq_len ({max_seq_len}) exceeds the positions the model was trained for "
                f"(max_position_embeddings {trained})"
            )
        window = sliding_window_of(model)
        self.window = window if window is not None and max_seq_len > window else None
        if self.window is not None and attention != "executorch":
            raise ValueError(
                f"export.max_seq_len ({max_seq_len}) exceeds the model's sliding window ({window}), which "
                "needs ring-buffer caches: export.attention must be executorch"
            )
        self.model = model
        self.max_seq_len = max_seq_len
        self.attention = attention
        self.tokens_per_call = self.window if self.window is not None else max_seq_len - 1
        self.cache = StaticCache(config=config, max_cache_len=max_seq_len)
        # Sliding layers within the window are plain static layers: exact while the sequence fits in it.
        ring = [self.window is not None and kind == "sliding_attention" for kind in config.layer_types]
        if attention == "transformers":
            self.cache.layers = [StaticLayer(max_seq_len) for _ in self.cache.layers]
        else:
            self.cache.layers = [
                RingCacheLayer(2 * self.window) if is_ring else CustomOpCacheLayer(max_seq_len) for is_ring in ring
            ]
        num_heads, head_dims = get_head_shapes(config)
        dtype = compute_dtype(model)
        self.cache.early_initialization(1, num_heads, head_dims, dtype, torch.device("cpu"))
        self.cached_layers = [i for i, mode in enumerate(_kv_sharing_modes(config)) if mode != "reuse"]
        for index in self.cached_layers:  # layers that reuse another layer's keys and values keep none
            layer = self.cache.layers[index]
            if attention == "executorch":
                # Fresh tensors: a transposed view with one KV head passes as contiguous in torch but
                # carries strides the runtime reads as a non-default dim order, which update_cache refuses.
                layer.keys = torch.zeros(layer.keys.transpose(1, 2).shape, dtype=dtype)
                layer.values = torch.zeros(layer.values.transpose(1, 2).shape, dtype=dtype)
            self.register_buffer(cache_buffer_name("keys", index, ring[index]), layer.keys, persistent=False)
            self.register_buffer(cache_buffer_name("values", index, ring[index]), layer.values, persistent=False)
            if ring[index]:
                window_shape = (1, self.window, *layer.keys.shape[2:])
                for kind in ("keys", "values"):
                    self.register_buffer(
                        window_buffer_name(kind, index), torch.zeros(window_shape, dtype=dtype), persistent=False
                    )
            if attention == "transformers":
                self.register_buffer(f"cache_length_{index}", layer.cumulative_length, persistent=False)
        if self.window is not None:
            # Which position each ring slot holds, plus one (0: empty). Every sliding layer writes the
            # same positions to the same slots, so one record serves them all. Zero, not -1, for
            # empty: the ExecuTorch runtime starts a mutable buffer zeroed, whatever it held at export.
            self.register_buffer("cache_ring_positions", torch.zeros(2 * self.window, dtype=torch.long), persistent=False)
        if attention == "executorch":
            register_executorch_llm_ops()
            _register_custom_sdpa()

    def cache_buffer_names(self) -> list[str]:
        return [name for name, _ in self.named_buffers() if name.startswith("cache_")]

    def _bind_cache_to_buffers(self, input_pos: torch.Tensor) -> None:
        for index in self.cached_layers:
            layer = self.cache.layers[index]
            is_ring = isinstance(layer, RingCacheLayer)
            layer.keys = getattr(self, cache_buffer_name("keys", index, is_ring))
            layer.values = getattr(self, cache_buffer_name("values", index, is_ring))
            if is_ring:
                layer.window_keys = getattr(self, window_buffer_name("keys", index))
                layer.window_values = getattr(self, window_buffer_name("values", index))
            if self.attention == "transformers":
                layer.cumulative_length = getattr(self, f"cache_length_{index}")
                # A fresh read of input_pos[0] per layer: if several buffers were last written from
                # one node, the functionalised program would return that node twice and fail verification.
                layer.cumulative_length.copy_(input_pos[0])

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self._bind_cache_to_buffers(input_pos)
        if self.attention == "transformers":
            return self._logits(tokens, input_pos)
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        # custom_sdpa masks full-attention layers causally from start_pos itself: no mask tensor for them.
        masks = {"full_attention": None, "sliding_attention": None}
        extra = {}
        if self.window is not None:
            ring_size = self.cache_ring_positions.shape[0]
            slots = input_pos % ring_size
            self.cache_ring_positions.index_copy_(0, slots, input_pos + 1)
            # The masked call reads (and computes over) every slot it is given: it gets the written ones.
            ring_filled = filled_slots(input_pos, ring_size)
            torch._check(ring_filled >= 1)
            torch._check(ring_filled <= ring_size)
            extra["ring_filled"] = ring_filled
            masks["sliding_attention"] = ring_mask(self.cache_ring_positions[:ring_filled], input_pos, self.window)
            extra["ring_slots"] = slots.unsqueeze(0)
            extra["window_slots"] = (input_pos % self.window).unsqueeze(0)
            # Slots of the window the call's last query sees.
            extra["window_filled"] = filled_slots(input_pos, self.window)
            # Attention gets a ring's keys from its own layer or, in a KV-sharing layer, from the
            # layer it reuses: the ring tensor itself names the window that goes with it.
            rings = [self.cache.layers[index] for index in self.cached_layers]
            extra["ring_windows"] = {
                id(layer.keys): (layer.window_keys, layer.window_values) for layer in rings if isinstance(layer, RingCacheLayer)
            }
            # Each ring's written slots, taken by the first layer that attends to it (its own, after
            # writing this call's keys) and reused by the layers sharing it: the runtime's slice
            # copies, once per ring instead of once per layer.
            extra["ring_reads"] = {}
        # Only this call attends through the custom ops: the model itself keeps its attention.
        config = self.model.config
        own_attention, config._attn_implementation = config._attn_implementation, EXECUTORCH_ATTENTION
        try:
            return self._logits(tokens, input_pos, start_pos=start_pos, new_tokens=tokens.shape[1], attention_mask=masks, **extra)
        finally:
            config._attn_implementation = own_attention

    def _logits(self, tokens: torch.Tensor, input_pos: torch.Tensor, **extra) -> torch.Tensor:
        output = self.model(
            input_ids=tokens,
            position_ids=input_pos.unsqueeze(0),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return output.logits[:, -1, :]


def cache_buffer_name(kind: str, layer: int, ring: bool) -> str:
    """`cache_keys_3` holds max_seq_len positions, `cache_ring_keys_3` a sliding layer's ring."""
    return f"cache_{'ring_' if ring else ''}{kind}_{layer}"


def window_buffer_name(kind: str, layer: int) -> str:
    """`cache_window_keys_3`: the last `window` positions of a ring layer, for the one-token method."""
    return f"cache_window_{kind}_{layer}"


def filled_slots(input_pos: torch.Tensor, size: int):
    """How many slots of a buffer of `size` (slot = position mod size, written from position 0 on)
    hold a position once the call's last position p is written: min(p + 1, size), slots 0 .. p
    until it wraps. A tensor clamp, not torch.sym_min, which ExecuTorch 1.5.1's edge verifier
    refuses as a graph node (a plain Python function)."""
    return torch.clamp(input_pos[-1] + 1, max=size).item()


def ring_mask(slots_held: torch.Tensor, input_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[1, 1, T, slots] additive mask: query position p sees the slots holding positions p - window + 1 .. p.

    `slots_held` is each slot's position plus one, 0 for an empty slot, which is never seen. The
    window is transformers' (a query and the window - 1 positions before it)."""
    distance = input_pos.unsqueeze(1) + 1 - slots_held.unsqueeze(0)
    visible = (slots_held.unsqueeze(0) > 0) & (distance >= 0) & (distance < window)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(visible, zero, torch.full((), float("-inf"))).unsqueeze(0).unsqueeze(0)


def _kv_sharing_modes(config) -> list[str]:
    return list(getattr(config, "kv_sharing_modes", None) or ["own"] * config.num_hidden_layers)


class CustomOpCacheLayer(StaticLayer):
    """A static cache layer whose keys and values are written by `llama::update_cache`."""

    def update(self, key_states, value_states, *args, kwargs=None, **more):
        """Write the new [1, heads, T, dim] keys and values at start_pos, in place; return the caches."""
        start_pos = (kwargs or more)["start_pos"]
        torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys, start_pos)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values, start_pos)
        return self.keys, self.values


class RingCacheLayer(StaticLayer):
    """A sliding layer's ring buffer and its window, both written by `llama::update_cache_with_indices`
    at the call's slots (position modulo each one's length, computed once per call by KVCacheDecoder).
    `window_keys` and `window_values` are bound beside `keys` and `values`."""

    def update(self, key_states, value_states, *args, kwargs=None, **more):
        extra = kwargs or more
        start_pos = extra["start_pos"]
        keys, values = key_states.transpose(1, 2), value_states.transpose(1, 2)
        for cache, slots in ((self.keys, extra["ring_slots"]), (self.window_keys, extra["window_slots"])):
            torch.ops.llama.update_cache_with_indices(keys, cache, start_pos, slots)
        for cache, slots in ((self.values, extra["ring_slots"]), (self.window_values, extra["window_slots"])):
            torch.ops.llama.update_cache_with_indices(values, cache, start_pos, slots)
        return self.keys, self.values


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


def _register_custom_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EXECUTORCH_ATTENTION, custom_sdpa_attention)


def example_inputs(prompt_len: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((1, prompt_len), 2, dtype=torch.long), torch.arange(prompt_len, dtype=torch.long))


def dynamic_shapes(tokens_per_call: int):
    """Tokens per call may be anything from 1 (decode) to `tokens_per_call` (a prefill or its chunk)."""
    seq = torch.export.Dim("seq", min=1, max=tokens_per_call)
    return ({1: seq}, {0: seq})
