"""Gemma 4 as an exportable decoder: its KV cache lives in the graph as mutable module buffers.

`forward(tokens[1, T], input_pos[T]) -> logits[1, vocab]` computes only the new tokens against the
cache, so a decode step is one token and a prefill is one batched call of the whole prompt. This is
the signature ExecuTorch's LLM runner calls (it fills `input_pos` with the T cache positions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

def read_text_config_dict(folder: Path) -> dict:
    """The text part of a checkpoint's config.json (multimodal Gemma 4 nests it under text_config)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("text_config", config)


def load_text_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the text decoder of a Gemma 4 checkpoint (text-only or multimodal) in eval mode, no grads."""
    from transformers import AutoConfig, Gemma4ForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "text_config") and config.model_type != "gemma4_text":
        model = _load_text_from_multimodal(folder, config.text_config, dtype)
    else:
        model = Gemma4ForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval().requires_grad_(False)


def _load_text_from_multimodal(folder: Path, text_config, dtype: torch.dtype) -> nn.Module:
    """Take the language model and head out of a multimodal Gemma 4 checkpoint (E2B ships as one)."""
    from transformers import AutoModelForImageTextToText, Gemma4ForCausalLM

    full = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(text_config)
    model.model = full.model.language_model
    model.lm_head = full.lm_head
    del full  # the vision and audio towers are not exported
    return model


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
    import types

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
    constants that lowering refuses to mutate. Here each layer's keys, values and length counter
    are module buffers, and the cache layers are re-bound to them on every call so that the
    in-place cache writes land on the buffers the exported graph owns.
    """

    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        from transformers.cache_utils import StaticCache, StaticLayer
        from transformers.integrations.executorch import get_head_shapes

        window = sliding_window_of(model)
        if window is not None and max_seq_len > window:
            raise ValueError(
                f"export.max_seq_len ({max_seq_len}) exceeds the model's sliding window ({window}); "
                "generation past the window needs a ring-buffer cache this exporter does not build"
            )
        self.model = model
        self.max_seq_len = max_seq_len
        config = model.config
        self.cache = StaticCache(config=config, max_cache_len=max_seq_len)
        # Sliding layers become plain static layers: exact while the sequence fits in the window.
        self.cache.layers = [StaticLayer(max_seq_len) for _ in self.cache.layers]
        num_heads, head_dims = get_head_shapes(config)
        dtype = next(model.parameters()).dtype
        self.cache.early_initialization(1, num_heads, head_dims, dtype, torch.device("cpu"))
        for index, layer in enumerate(self.cache.layers):
            self.register_buffer(f"cache_keys_{index}", layer.keys, persistent=False)
            self.register_buffer(f"cache_values_{index}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{index}", layer.cumulative_length, persistent=False)

    def _bind_cache_to_buffers(self, input_pos: torch.Tensor) -> None:
        for index, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"cache_keys_{index}")
            layer.values = getattr(self, f"cache_values_{index}")
            layer.cumulative_length = getattr(self, f"cache_length_{index}")
            # A fresh read of input_pos[0] per layer: if several buffers were last written from one
            # node, the functionalised program would return that node twice and fail verification.
            layer.cumulative_length.copy_(input_pos[0])

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self._bind_cache_to_buffers(input_pos)
        output = self.model(
            input_ids=tokens,
            position_ids=input_pos.unsqueeze(0),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :]


def example_inputs(prompt_len: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((1, prompt_len), 2, dtype=torch.long), torch.arange(prompt_len, dtype=torch.long))


def dynamic_shapes(max_seq_len: int):
    """Tokens per call may be anything from 1 (decode) to max_seq_len - 1 (prefill)."""
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    return ({1: seq}, {0: seq})
