"""A prompt's call runs the last cache-writing layer past its keys and values on the last token only.

The decoder returns the last token's logits, so of every other token a call needs only what the
cache keeps: each cache-writing layer's keys and values. transformers already runs the layers that
reuse another layer's keys and values on the last token alone (`_maybe_slice_kv_shared_inputs`).
The last layer that writes the cache still ran its queries, attention, output projection and MLP
on every token, though nothing after it reads them for any token but the last: at E2B's widths
that is 96 % of the layer's weights, and at 4 layers more than half of a prefill's matrix work.

Within `last_layer_on_last_token(model)` that layer writes the keys and values of every token of
the call, then runs the layer itself on the last token, its attention reading those keys and
values as a KV-sharing layer does. Its output is that row repeated over
the call's tokens: the layers after it, and the logits, take the last row alone, so the repeats
are never read; they keep the shapes transformers expects there (it slices the inputs of the
KV-sharing layers by the hidden states' length). LiteRT-LM's prefill signatures skip the same
work: they return only the KV cache, so its converter drops everything else as dead code.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

from torch import nn


def last_cache_writing_layer(model: nn.Module) -> int | None:
    """The index of the last layer that writes keys and values, if it keeps them for the layers that
    reuse them (`store`, which the rebinding needs; Gemma 4 marks its last writer so even when no
    layer reuses them), else None: a config without Gemma 4's KV-sharing modes."""
    config = model.config
    modes = list(getattr(config, "kv_sharing_modes", None) or [])
    writers = [index for index, mode in enumerate(modes) if mode != "reuse"]
    if not writers or modes[writers[-1]] != "store":
        return None
    return writers[-1]


@contextlib.contextmanager
def last_layer_on_last_token(model: nn.Module) -> Iterator[int | None]:
    """Within this block the last cache-writing layer of a Gemma 4 (a `Gemma4ForCausalLM`) runs as
    this module describes; yields its index, or None when the model has no such layer. Outside it
    the model is as it came: called on its own, it still computes every position's logits."""
    index = last_cache_writing_layer(model)
    if index is None:
        yield None
        return
    layer = model.model.layers[index]
    attention = layer.self_attn
    shared = attention.is_kv_shared_layer
    layer.forward = types.MethodType(_forward_on_last_token, layer)
    attention.is_kv_shared_layer = True  # its attention reads the keys and values written first
    try:
        yield index
    finally:
        del layer.forward  # the class's own again
        attention.is_kv_shared_layer = shared


def _forward_on_last_token(
    self,
    hidden_states,
    per_layer_input=None,
    shared_kv_states=None,
    position_embeddings=None,
    attention_mask=None,
    position_ids=None,
    cache=None,
    **kwargs,
):
    write_keys_and_values(self, hidden_states, position_embeddings, shared_kv_states, cache, kwargs)
    last = slice(-1, None)
    cos, sin = position_embeddings
    output = type(self).forward(
        self,
        hidden_states[:, last],
        per_layer_input[:, last] if per_layer_input is not None else None,
        shared_kv_states=shared_kv_states,
        position_embeddings=(cos[:, last], sin[:, last]),
        attention_mask=attention_mask[:, :, last] if attention_mask is not None else None,
        position_ids=position_ids[:, last] if position_ids is not None else None,
        cache=cache,
        **kwargs,
    )
    return output.expand(-1, hidden_states.shape[1], -1)


def write_keys_and_values(layer, hidden_states, position_embeddings, shared_kv_states, cache, kwargs) -> None:
    """The keys and values of a Gemma 4 decoder layer for every token of the call, as its attention
    computes them (the layer's input norm, the projections, their norms, rotary on the keys), written
    to the cache and kept in `shared_kv_states` for the layer's own attention and those that reuse it."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    attention = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    heads_shape = (*normed.shape[:-1], -1, attention.head_dim)
    keys = attention.k_proj(normed).view(heads_shape)
    values = attention.v_proj(normed).view(heads_shape) if attention.v_proj is not None else keys
    keys = apply_rotary_pos_emb(attention.k_norm(keys), *position_embeddings, unsqueeze_dim=2).transpose(1, 2)
    values = attention.v_norm(values).transpose(1, 2)
    if cache is not None:
        keys, values = cache.update(keys, values, attention.layer_idx, kwargs=kwargs)
    shared_kv_states[attention.layer_type] = keys, values
