"""Loading Gemma 4 checkpoints and the KV-cache decoder, in eager mode."""

import json
from pathlib import Path

import pytest
import torch

from gemma_edge.model.attention import (
    one_token_custom_sdpa,
    query_heads_as_rows,
    register_executorch_llm_ops,
    rows_as_query_heads,
)
from gemma_edge.model.checkpoint import load_for_export, load_text_model, stored_dtypes
from gemma_edge.model.decoder import KVCacheDecoder
from gemma_edge.model.e2b_shape import build_synthetic_checkpoint
from gemma_edge.model.kv_cache import ring_mask

REPO = Path(__file__).resolve().parents[1]


def test_multimodal_checkpoint_loads_its_language_model(demo_checkpoint, tmp_path):
    """E2B ships as a multimodal checkpoint; the exporter takes its text decoder only."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = load_text_model(demo_checkpoint)
    config = Gemma4Config(text_config=text.config.to_dict(), vision_config=None, audio_config=None)
    full = Gemma4ForConditionalGeneration(config).eval()
    full.model.language_model.load_state_dict(text.model.state_dict())
    full.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma4"

    loaded = load_text_model(tmp_path)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, text(input_ids=ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("attention", ["executorch", "transformers"])
def test_cache_decoder_prefill_then_decode_matches_full_recompute(demo_checkpoint, attention):
    """Both attention paths (ExecuTorch's cache and SDPA ops, transformers' own) against a full
    recompute of the sequence by an untouched model."""
    model = load_text_model(demo_checkpoint)
    reference_model = load_text_model(demo_checkpoint)
    decoder = KVCacheDecoder(model, max_seq_len=16, attention=attention).eval()  # within the 16-token window
    prompt = torch.tensor([[2, 50, 51, 52, 53, 54]])
    with torch.no_grad():
        logits = decoder(prompt, torch.arange(6))
        # The prefill's last position too: Gemma 4 runs its KV-sharing layers on that token alone.
        torch.testing.assert_close(logits, reference_model(input_ids=prompt).logits[:, -1], atol=1e-4, rtol=1e-4)
        sequence = prompt
        for step in range(4):
            token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            logits = decoder(token, torch.tensor([6 + step]))
            reference = reference_model(input_ids=sequence).logits[:, -1]
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_ring_buffers_match_full_recompute_across_the_window_and_the_wrap(demo_checkpoint):
    """Past the sliding window: a 40-token prompt prefilled 16 tokens a call, then 30 decode steps,
    against transformers' own masks recomputing the whole sequence. The demo's window is 16, its
    rings 32 slots, so the prefill fills the ring and the decode wraps it twice more."""
    model = load_text_model(demo_checkpoint)
    reference_model = load_text_model(demo_checkpoint)
    decoder = KVCacheDecoder(model, max_seq_len=96).eval()
    assert decoder.window == 16 and decoder.tokens_per_call == 16
    sequence = torch.tensor([[2] + list(range(40, 79))])
    with torch.no_grad():
        for start in range(0, 40, 16):
            logits = decoder(sequence[:, start : start + 16], torch.arange(start, min(start + 16, 40)))
            reference = reference_model(input_ids=sequence[:, : start + 16]).logits[:, -1]
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        for position in range(40, 70):
            token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            logits = decoder(token, torch.tensor([position]))
            torch.testing.assert_close(logits, reference_model(input_ids=sequence).logits[:, -1], atol=1e-4, rtol=1e-4)
    # The ring holds the last 32 positions, each slot its own (position + 1 recorded).
    held = sorted(decoder.cache_ring_positions.tolist())
    assert held == list(range(70 - 32 + 1, 70 + 1))


def test_a_prompts_last_cache_writing_layer_runs_past_its_keys_on_the_last_token_only(demo_checkpoint):
    """Within a decoder call the last layer that writes keys and values projects them for every
    token, but its queries and MLP see the last token alone; the model called on its own is
    untouched and still runs that layer on every token."""
    from gemma_edge.model.last_token import last_cache_writing_layer

    model = load_text_model(demo_checkpoint)
    index = last_cache_writing_layer(model)
    modes = model.config.kv_sharing_modes
    assert index is not None and modes[index] == "store" and modes[index + 1 :] == ["reuse"] * (len(modes) - index - 1)
    layer = model.model.layers[index]
    rows = {}

    def count_rows(name):
        def hook(module, args, output):  # the first call's rows; returns None, so the output stands
            rows.setdefault(name, args[0].shape[1])

        return hook

    for name, module in (("k_proj", layer.self_attn.k_proj), ("q_proj", layer.self_attn.q_proj), ("mlp", layer.mlp)):
        module.register_forward_hook(count_rows(name))
    decoder = KVCacheDecoder(model, max_seq_len=16).eval()
    with torch.no_grad():
        decoder(torch.tensor([[2, 50, 51, 52, 53, 54]]), torch.arange(6))
        assert rows == {"k_proj": 6, "q_proj": 1, "mlp": 1}
        rows.clear()
        model(input_ids=torch.tensor([[2, 50, 51, 52]]))
    assert rows == {"k_proj": 4, "q_proj": 4, "mlp": 4}
    assert "forward" not in vars(layer) and not layer.self_attn.is_kv_shared_layer


def test_ring_mask_shows_each_query_exactly_its_window():
    slots = torch.tensor([9, 10, 3, 4, 5, 6, 7, 8]) + 1  # positions 3..10 held in a ring of 8, + 1
    slots[2] = 0  # one slot empty
    mask = ring_mask(slots, torch.tensor([9, 10]), window=4)[0, 0]
    visible = [[int(p) - 1 for p, m in zip(slots, row) if m == 0] for row in mask]
    assert visible == [[9, 6, 7, 8], [9, 10, 7, 8]]
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_query_heads_as_rows_attend_as_the_heads_do(kv_heads):
    """custom_sdpa given each KV head's query heads as rows, its mask repeated per row, gives what it
    gives with the heads as heads: for one token and for a call of several, with one KV head (Gemma 4
    E2B) and with two, whose groups must not mix."""
    register_executorch_llm_ops()
    generator = torch.Generator().manual_seed(0)
    heads, dim, slots = 8, 32, 24
    for length in (1, 5):
        query = torch.randn(1, heads, length, dim, generator=generator)
        keys, values = (torch.randn(1, slots, kv_heads, dim, generator=generator) for _ in range(2))
        mask = torch.where(torch.rand(length, slots, generator=generator) < 0.6, 0.0, float("-inf"))
        mask[:, 0] = 0.0  # every query sees at least one slot
        as_heads = torch.ops.llama.custom_sdpa(query.transpose(1, 2), keys, values, 0, mask, 0.0, False, None)
        rows = query_heads_as_rows(query, kv_heads)
        assert rows.shape == (1, length * heads // kv_heads, kv_heads, dim)
        as_rows = torch.ops.llama.custom_sdpa(
            rows, keys, values, 0, mask.repeat_interleave(heads // kv_heads, dim=0), 0.0, False, None
        )
        torch.testing.assert_close(rows_as_query_heads(as_rows, heads), as_heads, atol=1e-5, rtol=1e-5)


def test_one_query_token_as_rows_sees_exactly_the_positions_up_to_its_own():
    """A one-token call as rows is not causal: custom_sdpa attends to the first start_pos + rows
    positions, so start_pos is position + 1 - rows, below 0 at the first positions. Against the
    per-head causal call at position 0, within the first rows, and deep in the cache."""
    register_executorch_llm_ops()
    generator = torch.Generator().manual_seed(1)
    heads, dim, positions = 8, 32, 40
    keys, values = (torch.randn(1, positions, 1, dim, generator=generator) for _ in range(2))
    for position in (0, 3, 30):
        query = torch.randn(1, heads, 1, dim, generator=generator)
        causal = torch.ops.llama.custom_sdpa(query.transpose(1, 2), keys, values, position, None, 0.0, True, None)
        rows = query_heads_as_rows(query, 1)
        as_rows = torch.ops.llama.custom_sdpa(rows, keys, values, position + 1 - heads, None, 0.0, False, None)
        torch.testing.assert_close(rows_as_query_heads(as_rows, heads), causal, atol=1e-5, rtol=1e-5)


def test_one_token_custom_sdpa_keeps_custom_sdpas_results():
    """What the decode method calls in place of custom_sdpa: a causal one-token call taken as rows
    (2 KV heads of 4 query heads each, at the first position and deep in the cache) gives the causal
    call's result, and calls of more tokens, or masked ones, are custom_sdpa's own."""
    register_executorch_llm_ops()
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, positions = 8, 2, 16, 24
    keys, values = (torch.randn(1, positions, kv_heads, dim, generator=generator) for _ in range(2))
    for tokens, position in ((1, 0), (1, 20), (3, 5)):
        query = torch.randn(1, tokens, heads, dim, generator=generator)
        causal = torch.ops.llama.custom_sdpa(query, keys, values, position, None, 0.0, True, None)
        torch.testing.assert_close(
            one_token_custom_sdpa(query, keys, values, position, None, 0.0, True, None), causal, atol=1e-5, rtol=1e-5
        )
    mask = torch.zeros(1, positions)
    masked = torch.ops.llama.custom_sdpa(query[:, :1], keys, values, 0, mask, 0.0, False, None)
    assert torch.equal(one_token_custom_sdpa(query[:, :1], keys, values, 0, mask, 0.0, False, None), masked)


def test_cache_past_the_trained_positions_or_transformers_attention_past_the_window_is_refused(demo_checkpoint):
    model = load_text_model(demo_checkpoint)
    with pytest.raises(ValueError, match=r"export.max_seq_len \(2048\) exceeds .* \(max_position_embeddings 1024\)"):
        KVCacheDecoder(model, max_seq_len=2048)
    with pytest.raises(ValueError, match=r"sliding window \(16\).*export.attention must be executorch"):
        KVCacheDecoder(model, max_seq_len=64, attention="transformers")


def test_every_demo_token_but_high_bytes_decodes_to_valid_utf8_on_its_own(demo_checkpoint):
    """ExecuTorch's runner decodes piece by piece. As in Gemma's own tokenizer, the byte-fallback
    tokens <0x80>…<0xFF> are parts of multi-byte characters and decode to nothing valid alone;
    every other piece does, and the (ASCII) demo corpus never needs those bytes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    high_bytes = {tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(0x80, 0x100)}
    for token_id in set(range(tokenizer.get_vocab_size())) - high_bytes:
        piece = tokenizer.decode([token_id], skip_special_tokens=False)
        assert "\ufffd" not in piece, (token_id, piece)
        piece.encode("utf-8", errors="strict")
    corpus = (REPO / "resources/demo_corpus.txt").read_text(encoding="utf-8")
    assert not high_bytes & set(tokenizer.encode(corpus).ids)
    assert tokenizer.encode("Drop items").ids[0] == 2  # BOS first, as Gemma's tokenizer does


def test_rmsnorm_rewrite_keeps_the_logits_and_leaves_xnnpack_nothing_to_refuse(demo_checkpoint):
    """The rewritten norms compute the same logits (up to rounding), and the exported graph has no
    mean or power op left for portable kernels: only linears, mul, add and rsqrt."""
    from gemma_edge.build.export import export_decoder

    model = load_text_model(demo_checkpoint)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    program = export_decoder(model, 16)  # rewrites the norms of `model` itself
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.rsqrt.default" in targets
    assert not {"aten.mean.dim", "aten.pow.Tensor_Scalar"} & targets


def test_synthetic_checkpoint_has_no_all_zero_embedding_row(tmp_path):
    """transformers zeroes the pad token's rows at initialisation; a released checkpoint has none,
    and a zero row of the tied table is an INT4 channel of scale 0 that LiteRT-LM's XNNPACK refuses."""
    from safetensors import safe_open

    build_synthetic_checkpoint(REPO / "resources/demo_corpus.txt", tmp_path, "tiny", 4, seed=3)
    with safe_open(tmp_path / "model.safetensors", "pt") as reader:
        tables = [name for name in reader.keys() if "embed_tokens" in name]  # noqa: SIM118 - safe_open has keys() but no __iter__
        assert len(tables) == 2
        for name in tables:
            table = reader.get_tensor(name)
            assert table.abs().amax(dim=-1).min() > 0, f"{name} has an all-zero row"


def test_bf16_checkpoint_exports_with_bf16_tables_and_identical_logits(tmp_path):
    """A checkpoint stored in bf16 (as E2B is) keeps its embedding tables in bf16 for export, the
    per-layer table split by layer and the lm_head tied to the token table, everything else in
    FP32, and computes bit for bit what the all-FP32 model computes."""
    build_synthetic_checkpoint(REPO / "resources/demo_corpus.txt", tmp_path, "tiny", 4, seed=3)
    assert stored_dtypes(tmp_path) == {torch.bfloat16}
    model = load_for_export(tmp_path)
    reference = load_text_model(tmp_path, torch.float32)
    layers, packed = reference.config.num_hidden_layers, reference.model.embed_tokens_per_layer.weight
    tables = {"model.embed_tokens.weight"} | {f"model.embed_tokens_per_layer.tables.{i}" for i in range(layers)}
    names = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if tensor.is_floating_point():
            names.add(name)
            expected = torch.bfloat16 if name in tables or name == "lm_head.weight" else torch.float32
            assert tensor.dtype == expected, name
    assert tables <= names
    assert model.lm_head.weight is model.model.embed_tokens.weight
    split = model.model.embed_tokens_per_layer.tables
    assert torch.equal(torch.cat(list(split), dim=1).to(torch.float32), packed)
    ids = torch.tensor([[2, 40, 41, 42, 43, 900]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_split_per_layer_table_is_read_block_by_block(tmp_path):
    """Rows are read in blocks (here 7 rows, which divide nothing) and land where they belong."""
    from gemma_edge.model.checkpoint import PerLayerTables, StoredTensors

    build_synthetic_checkpoint(REPO / "resources/demo_corpus.txt", tmp_path, "tiny", 4, seed=3)
    reference = load_text_model(tmp_path, torch.bfloat16)
    packed = reference.model.embed_tokens_per_layer
    with StoredTensors(tmp_path) as stored:
        split = PerLayerTables.read(stored, "model.embed_tokens_per_layer", packed, 4, rows_per_read=7)
    assert torch.equal(torch.cat(list(split.tables), dim=1), packed.weight)
    ids = torch.tensor([[0, 5, 900, len(packed.weight) - 1]])
    assert torch.equal(split(ids), packed.weight[ids].to(torch.float32) * packed.scalar_embed_scale)


def test_truncated_checkpoint_is_refused_on_reading(tmp_path):
    from gemma_edge.model.checkpoint import StoredTensors

    build_synthetic_checkpoint(REPO / "resources/demo_corpus.txt", tmp_path, "tiny", 4, seed=3)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 1000)
    with StoredTensors(tmp_path) as stored, pytest.raises(ValueError, match="truncated"):
        last = max(stored.entries, key=lambda key: stored.entries[key][2]["data_offsets"][1])
        stored.read_rows(last, 0, stored.entries[last][2]["shape"][0])


def test_unreadable_safetensors_header_is_named(tmp_path):
    from gemma_edge.model.checkpoint import StoredTensors

    (tmp_path / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all...}")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        StoredTensors(tmp_path).__enter__()


def test_fp32_checkpoint_loads_wholly_in_fp32(demo_checkpoint):
    assert stored_dtypes(demo_checkpoint) == {torch.float32}
    model = load_for_export(demo_checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
