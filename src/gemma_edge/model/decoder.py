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

from gemma_edge.model.attention import (
    ATTENTION_KERNELS,
    EXECUTORCH_ATTENTION,
    register_custom_sdpa,
    register_executorch_llm_ops,
)
from gemma_edge.model.kv_cache import (
    CustomOpCacheLayer,
    RingCacheLayer,
    cache_buffer_name,
    filled_slots,
    ring_mask,
    window_buffer_name,
)
from gemma_edge.model.last_token import last_layer_on_last_token


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
            register_custom_sdpa()

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
            with last_layer_on_last_token(self.model):
                new_tokens = tokens.shape[1]
                return self._logits(tokens, input_pos, start_pos=start_pos, new_tokens=new_tokens, attention_mask=masks, **extra)
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


def _kv_sharing_modes(config) -> list[str]:
    return list(getattr(config, "kv_sharing_modes", None) or ["own"] * config.num_hidden_layers)


def example_inputs(prompt_len: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((1, prompt_len), 2, dtype=torch.long), torch.arange(prompt_len, dtype=torch.long))


def dynamic_shapes(tokens_per_call: int):
    """Tokens per call may be anything from 1 (decode) to `tokens_per_call` (a prefill or its chunk)."""
    seq = torch.export.Dim("seq", min=1, max=tokens_per_call)
    return ({1: seq}, {0: seq})
