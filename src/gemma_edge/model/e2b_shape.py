"""A randomly initialised Gemma 4 with E2B's real widths, heads, vocabulary and per-layer
embeddings, cut to fewer layers: the model the performance benchmark runs on.

Weights are random (seeded, so the checkpoint is the same on every machine) because the real E2B
cannot be downloaded here; speed and memory depend on shapes, not on values. They are stored in
bf16, as E2B's are, so loading costs what it would for the real checkpoint. The tokenizer is a
Gemma-style byte-fallback BPE padded to E2B's 262,144 entries, so llama.cpp's own converter
accepts the checkpoint as it would the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gemma_edge.model.demo_model import BOS_ID, EOS_ID, PAD_ID, _single_thread, build_tokenizer, write_tokenizer

log = logging.getLogger(__name__)

TINY_VOCAB = 1024  # the tiny shape's vocabulary: 4 specials, 256 byte tokens, merges, padding

# Gemma 4 E2B's text decoder (google/gemma-4-E2B config.json, text_config).
E2B = {
    "vocab_size": 262144,
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 35,
    "num_kv_shared_layers": 20,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "global_head_dim": 512,
    "hidden_size_per_layer_input": 256,
    "sliding_window": 512,
    "full_attention_every": 5,
    "final_logit_softcapping": 30.0,
}


def e2b_layer_types(num_layers: int, num_shared: int) -> list[str]:
    """E2B's pattern (every fifth layer full attention) with the last unshared layer and the last
    layer full, so shared layers find a donor of their type; for 35 layers this is E2B's own list."""
    every = E2B["full_attention_every"]
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]
    for index in (num_layers - num_shared - 1, num_layers - 1):
        types[index] = "full_attention"
    return types


def shared_layers_for(num_layers: int) -> int:
    """E2B shares the KV of its last 20 of 35 layers; a cut model shares the same fraction (rounded down)."""
    return min(num_layers - 1, num_layers * E2B["num_kv_shared_layers"] // E2B["num_hidden_layers"])


def e2b_shape_config(num_layers: int):
    from transformers import Gemma4TextConfig

    if num_layers < 3:
        # Fewer layers leave no sliding layer beside the full ones (llama.cpp asserts on that).
        raise ValueError(f"an E2B-shaped model needs at least 3 layers, not {num_layers}")
    shared = shared_layers_for(num_layers)
    return Gemma4TextConfig(
        vocab_size=E2B["vocab_size"],
        vocab_size_per_layer_input=E2B["vocab_size"],
        hidden_size=E2B["hidden_size"],
        intermediate_size=E2B["intermediate_size"],
        use_double_wide_mlp=True,
        num_hidden_layers=num_layers,
        num_attention_heads=E2B["num_attention_heads"],
        num_key_value_heads=E2B["num_key_value_heads"],
        head_dim=E2B["head_dim"],
        global_head_dim=E2B["global_head_dim"],
        layer_types=e2b_layer_types(num_layers, shared),
        sliding_window=E2B["sliding_window"],
        num_kv_shared_layers=shared,
        hidden_size_per_layer_input=E2B["hidden_size_per_layer_input"],
        final_logit_softcapping=E2B["final_logit_softcapping"],
        max_position_embeddings=131072,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fill_padding_rows(model: torch.nn.Module, config) -> list[str]:
    """Draw the pad token's rows of the embedding tables like every other row.

    transformers' initialisation zeroes the `padding_idx` row; a released checkpoint, trained
    elsewhere, has no all-zero row. A zero row is not harmless here: through the tied lm_head it
    is a zero output channel, whose INT4 scale is 0, which LiteRT-LM's XNNPACK delegate refuses
    ("unsupported scale value (0.000000) in channel 0 for INT4 tensor")."""
    filled = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            row = module.weight.data[module.padding_idx]
            if not row.any():
                std = module.weight.data.float().std().item()
                row.copy_(torch.randn(row.shape, dtype=torch.float32).mul_(std).to(row.dtype))
                filled.append(name)
    return filled


def build_synthetic_checkpoint(corpus_path: Path, out_dir: Path, shape: str, layers: int, seed: int) -> dict:
    """Write config, safetensors (bf16, random, seeded) and a byte-fallback tokenizer of a Gemma 4."""
    from transformers import Gemma4ForCausalLM, GenerationConfig

    config = synthetic_config(shape, layers)
    tokenizer = build_tokenizer(
        Path(corpus_path).read_text(encoding="utf-8"), config.vocab_size, merges_from=min(4096, config.vocab_size)
    )
    torch.manual_seed(seed)
    with _single_thread():  # initialisation draws the same numbers whatever the core count
        model = Gemma4ForCausalLM(config).eval()
        fill_padding_rows(model, config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.to(torch.bfloat16)  # stored as Gemma 4's own checkpoints are: loading upcasts, as it would E2B's
    params = parameter_count(model)
    log.info(
        "synthetic %s Gemma 4: %d layers (%d KV-shared), %.1f M parameters, layer types %s",
        shape,
        config.num_hidden_layers,
        config.num_kv_shared_layers,
        params / 1e6,
        config.layer_types,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(tokenizer, out_dir)
    return {"shape": shape, "num_hidden_layers": config.num_hidden_layers, "parameters": params, "seed": seed}


def synthetic_config(shape: str, layers: int):
    """`e2b`: E2B's widths at `layers` layers; `tiny`: the demo model's widths. Both lay out their
    layers as E2B does (llama.cpp, like E2B, has the shared layers reuse the last two unshared ones)."""
    if shape == "e2b":
        return e2b_shape_config(layers)
    if shape == "tiny":
        from gemma_edge.model.demo_model import demo_text_config

        shared = shared_layers_for(layers)
        return demo_text_config(TINY_VOCAB, e2b_layer_types(layers, shared), shared)
    raise ValueError(f"unknown synthetic shape {shape!r}; expected e2b or tiny")
