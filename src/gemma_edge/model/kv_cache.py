"""The decoder's KV cache as module buffers: full layers written at their positions by
`llama::update_cache`, sliding layers as a ring and a window written at their slots, and the
mask that says which slots a query sees."""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer


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
