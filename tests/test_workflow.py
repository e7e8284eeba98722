"""The host pipeline end to end, offline, through the real snapshot_download, torch.export,
torchao, ExecuTorch lowering and runtime, on the demo Gemma 4."""

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import TEST_REPO_ID, snakemake, write_config
from gemma_edge.build.export import cache_buffers, context_length_of, kv_cache_bytes_of, load_program, tokens_per_call_of
from gemma_edge.build.parity import TIE_MARGIN
from gemma_edge.device.files import ArtifactError, read_json, sha256_file
from gemma_edge.device.runtime import DECODE_METHOD, PteDecoder
from gemma_edge.model.checkpoint import read_text_config_dict
from gemma_edge.model.demo_model import DEMO_VOCAB
from gemma_edge.workflow.manifest import verify_against_manifest

INT4 = "results/tiny/int4-g128/xnnpack-auto"
FP32 = "results/tiny/fp32/xnnpack-auto"


def jobs_of(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_download_went_through_the_seeded_hub_cache(workflow):
    manifest = read_json(workflow["workdir"] / "results/tiny/checkpoint.json")
    assert manifest["repo_id"] == TEST_REPO_ID
    assert manifest["commit"] == workflow["commit"]
    assert Path(manifest["path"]).is_relative_to(workflow["cache"])


def test_exported_program_holds_the_kv_cache_as_buffers(workflow):
    """128 positions of context over a 16-token sliding window: the one cached full-attention layer
    holds 128 positions, the two cached sliding layers a ring of 32 and a window of 16 (the last 16
    positions, which the one-token method reads), with one record of which position each ring slot
    holds."""
    program = load_program(workflow["workdir"] / "results/tiny/fp32/program.pt2")
    buffers = cache_buffers(program)
    # keys and values of the 3 of 6 layers that do not reuse another's, and the ring's positions
    assert sorted(buffers) == sorted(
        [
            "cache_ring_keys_0",
            "cache_ring_values_0",
            "cache_ring_keys_1",
            "cache_ring_values_1",
            "cache_window_keys_0",
            "cache_window_values_0",
            "cache_window_keys_1",
            "cache_window_values_1",
            "cache_keys_2",
            "cache_values_2",
            "cache_ring_positions",
        ]
    )
    assert not program.graph_signature.lifted_tensor_constants
    assert context_length_of(program) == 128 and tokens_per_call_of(program) == 16
    config = read_text_config_dict(Path(read_json(workflow["workdir"] / "results/tiny/checkpoint.json")["path"]))
    full_head_dim = config["per_layer_config"]["2"]["head_dim"]  # full-attention layers have their own width
    # 2 layers, keys + values, 32 ring slots and 16 window slots
    ring_bytes = 2 * 2 * (32 + 16) * config["num_key_value_heads"] * config["head_dim"] * 4
    full_bytes = 2 * 128 * config["num_key_value_heads"] * full_head_dim * 4
    assert kv_cache_bytes_of(program) == ring_bytes + full_bytes + 32 * 8
    targets = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    # ExecuTorch's cache and attention ops: 2 writes per cached layer (4 on a ring layer: its ring
    # and its window), one attention per layer (a sliding one's as our op, which each lowered method
    # reads its own way), and no per-step copies of the one-head cache to every query head; the
    # ring's slot record is the one index_copy, and its mask the one `where`, shared by every
    # sliding layer.
    sliding = config["layer_types"].count("sliding_attention")
    assert targets["llama.update_cache.default"] == 2
    assert targets["llama.update_cache_with_indices.default"] == 2 * 2 * 2
    assert targets["gemma_edge.sliding_attention.default"] == sliding > 0
    assert targets["llama.custom_sdpa.default"] == 6 - sliding
    assert targets["aten.index_copy_.default"] + targets["aten.index_copy.default"] == 1
    assert targets["aten.where.self"] == 1
    # One expand: the last cache-writing layer's last-token row, repeated over the call's tokens
    # for the layers after it (model/last_token.py); copying the cache to each query head would
    # add one a layer.
    assert targets["aten.expand.default"] == 1
    manifest = read_json(workflow["workdir"] / "results/tiny/fp32/program.pt2.manifest.json")
    assert manifest["eager_max_abs_diff"] < 1e-4


def test_fp32_pte_matches_eager_fp32_exactly(workflow):
    """Every token the same, except where eager FP32 itself had a numerical tie (top-2 logits
    closer than TIE_MARGIN), which XNNPACK's different summation order may break the other way."""
    parity = read_json(workflow["workdir"] / FP32 / "parity.json")
    summary = parity["summary"]
    assert summary["passed"]
    assert summary["decisive_flips"] == 0
    assert summary["logits_cosine"] > 0.9999
    for prompt in parity["prompts"]:
        ties = {flip["position"] for flip in prompt["teacher_forced_flips"]}
        assert all(flip["reference_top2_margin"] < TIE_MARGIN for flip in prompt["teacher_forced_flips"])
        if prompt["first_divergence"] is None:
            assert prompt["pte_tokens"] == prompt["reference_tokens"]
        else:
            assert prompt["first_divergence"] in ties


def test_the_runtime_flushes_subnormal_floats(workflow):
    """Attention's softmax tails fall below FP32's normal range at depth; the runtime wrapper has the
    CPU treat them as zero (they cost a slow path in ExecuTorch's custom ops otherwise)."""
    import torch

    decoder = PteDecoder(workflow["workdir"] / INT4 / "model.pte")
    assert decoder.denormals_flushed
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_decode_method_shares_forwards_cache_and_gives_its_logits(workflow):
    """The FP32 .pte's one-token method (the full-attention layers' query heads as rows) against its
    `forward`: after a 40-token prefill by forward (3 calls, wrapping the 32-slot rings), each step
    runs forward, then the one-token method, on the same token and position. Both write the same
    keys and values there; the method can only match forward if it reads the cache forward filled.
    FP32, because in the INT4 .pte the attention's different summation order (a few 1e-6) now and
    then moves an INT8 activation across a rounding step (once in 30 steps, 0.07 on the logits)."""
    import torch
    from executorch.runtime import Runtime

    PteDecoder(workflow["workdir"] / FP32 / "model.pte")  # registers the LLM ops, flushes subnormals
    program = Runtime.get().load_program(str(workflow["workdir"] / FP32 / "model.pte"))
    forward, decode = program.load_method("forward"), program.load_method(DECODE_METHOD)

    def call(method, tokens, start):
        return method.execute([torch.tensor([tokens]), torch.arange(start, start + len(tokens))])[0][0]

    prompt = [2] + list(range(40, 79))
    for first in range(0, len(prompt), 16):
        logits = call(forward, prompt[first : first + 16], first)
    for position in range(len(prompt), len(prompt) + 30):
        token = int(torch.argmax(logits))
        logits = call(forward, [token], position)
        torch.testing.assert_close(call(decode, [token], position), logits, atol=1e-4, rtol=1e-4)
    lowering = read_json(workflow["workdir"] / FP32 / "model.pte.manifest.json")["lowering"]
    assert lowering["methods"] == ["forward", DECODE_METHOD]
    assert lowering["decode_method_requested"] is True
    assert lowering[DECODE_METHOD]["xnnpack_delegate_calls"] > 0


def test_quantized_pte_passes_the_default_gates(workflow):
    parity = read_json(workflow["workdir"] / INT4 / "parity.json")
    gates = parity["gates"]
    summary = parity["summary"]
    assert summary["passed"] and not summary["failures"]
    assert summary["teacher_forced_top1"] >= gates["min_teacher_forced_top1"]
    assert summary["logits_cosine"] >= gates["min_logits_cosine"]
    first = parity["prompts"][0]
    assert first["prompt_ids"][0] == 2 and first["bos_included"]  # BOS recorded with the ids the device will get
    assert parity["pte"]["sha256"] == sha256_file(workflow["workdir"] / INT4 / "model.pte")
    assert "PASSED" in (workflow["workdir"] / INT4 / "parity.log").read_text()


def test_quantize_manifest_lists_layers_kept_in_fp32(workflow):
    manifest = read_json(workflow["workdir"] / "results/tiny/int4-g128/program.pt2.manifest.json")
    report = manifest["quantization"]
    kept = {item["weight"]: item["in_features"] for item in report["fp32_linears"]}
    assert kept and all(width % 128 for width in kept.values())
    assert any("per_layer_projection" in name for name in kept)
    assert len(report["quantized_linears"]) > len(kept)
    assert len(report["int8_embeddings"]) == 2  # token table and per-layer input table
    assert manifest["params"] == {"scheme": "8da4w", "group_size": 128, "embeddings": "int8"}
    assert manifest["versions"]["torchao"] == "0.18.0"


def test_pte_carries_the_llm_runner_metadata_and_its_lowering_record(workflow):
    decoder = PteDecoder(workflow["workdir"] / INT4 / "model.pte")
    assert decoder.metadata["get_max_seq_len"] == 16  # tokens per call: the runner prefills in chunks of it
    assert decoder.metadata["get_max_context_len"] == 128
    assert decoder.metadata["get_bos_id"] == 2
    assert decoder.metadata["get_vocab_size"] == DEMO_VOCAB
    assert decoder.metadata["use_kv_cache"] is True
    lowering = read_json(workflow["workdir"] / INT4 / "model.pte.manifest.json")["lowering"]
    assert lowering["per_op_mode_requested"] == "auto"
    assert isinstance(lowering["per_op_mode_used"], bool)
    assert 0 < lowering["xnnpack_delegate_calls"] < lowering["xnnpack_delegated_nodes"]
    assert "aten.slice_copy.Tensor_out" in lowering["portable_ops"] and "executorch_call_delegate" not in str(
        lowering["portable_ops"]
    )


def test_every_rule_left_a_log_and_a_benchmark(workflow):
    workdir = workflow["workdir"]
    for step in [
        "download",
        "fp32/export",
        "int4-g128/quantize",
        "int4-g128/xnnpack-auto/lower",
        "int4-g128/xnnpack-auto/verify",
    ]:
        assert (workdir / "logs/tiny" / f"{step}.log").stat().st_size > 0, step
        assert (workdir / "benchmarks/tiny" / f"{step}.tsv").exists(), step
    assert "finished in" in (workdir / "logs/tiny/fp32/export.log").read_text()


def test_no_temporary_files_are_left_behind(workflow):
    leftovers = [p for p in (workflow["workdir"] / "results").rglob(".*tmp-*")]
    assert not leftovers


def test_second_run_does_nothing(workflow):
    result = snakemake(
        workflow["workdir"],
        "-n",
        "results/tiny/int4-g128/xnnpack-auto/parity.json",
        "results/tiny/fp32/xnnpack-auto/parity.json",
        "--configfile",
        str(workflow["config"]),
    )
    assert "Nothing to be done" in result.stdout + result.stderr


def test_group_size_change_reruns_only_quantize_lower_verify(workflow, tmp_path):
    # 256: a group size no other test builds in the shared working directory.
    override = write_config(tmp_path / "g256.yaml", {"quantization": {"group_size": 256}})
    result = snakemake(workflow["workdir"], "-n", "--configfile", str(workflow["config"]), str(override))
    assert jobs_of(result.stdout) == {"quantize": 1, "lower": 1, "verify": 1, "all": 1}
    assert "results/tiny/int4-g256/program.pt2" in result.stdout


def test_gate_change_reruns_only_verify_because_params_changed(workflow, tmp_path):
    override = write_config(
        tmp_path / "gate.yaml", {"quantization": {"group_size": 128}, "verify": {"gates": {"min_logits_cosine": 0.97}}}
    )
    result = snakemake(workflow["workdir"], "-n", "--configfile", str(workflow["config"]), str(override))
    assert jobs_of(result.stdout) == {"verify": 1, "all": 1}
    assert "Params have changed since last execution" in result.stdout


def test_corrupted_pte_is_caught(workflow, tmp_path):
    pte = tmp_path / "model.pte"
    shutil.copy(workflow["workdir"] / INT4 / "model.pte", pte)
    shutil.copy(workflow["workdir"] / INT4 / "model.pte.manifest.json", tmp_path / "model.pte.manifest.json")
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pte is corrupt"):
        verify_against_manifest(pte)
    pte.write_bytes(bytes(data[:1000]))
    with pytest.raises(ArtifactError, match="could not be loaded by the ExecuTorch runtime"):
        PteDecoder(pte)


def test_truncated_program_is_caught(workflow, tmp_path):
    source = workflow["workdir"] / "results/tiny/fp32/program.pt2"
    truncated = tmp_path / "program.pt2"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="not a loadable exported program"):
        load_program(truncated)
