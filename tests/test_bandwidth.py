"""The physical limit beside every figure: this machine's memory read bandwidth, measured for real,
and the weight bytes a decoded token reads, attributed from the demo model's own .pte and GGUF."""

from pathlib import Path

import pytest

from conftest import needs_llamacpp, snakemake
from gemma_edge.device import bandwidth
from gemma_edge.device.files import read_json
from gemma_edge.measure.gguf_weights import gguf_weight_bytes, read_gguf_tensors
from gemma_edge.measure.pte_weights import pte_weight_bytes
from gemma_edge.measure.weight_bytes import readable_weight_bytes, weight_bytes
from gemma_edge.model.checkpoint import read_text_config_dict


def test_read_bandwidth_streams_a_buffer_far_larger_than_the_last_level_cache():
    result = bandwidth.measure_read_bandwidth(threads=1, repetitions=3)
    llc = bandwidth.last_level_cache_bytes()
    assert result["buffer_bytes"] >= max(bandwidth.MIN_BUFFER_BYTES, bandwidth.LLC_MULTIPLE * (llc or 0))
    assert result["last_level_cache_bytes"] == llc and result["threads"] == 1
    speed = result["gb_per_s"]
    assert len(speed["samples"]) == 3 and all(s > 0 for s in speed["samples"])
    assert speed["min"] <= speed["median"] <= speed["max"]
    assert set(result["methods_tried_gb_per_s"]) == set(bandwidth.METHODS)
    best = max(result["methods_tried_gb_per_s"], key=result["methods_tried_gb_per_s"].get)
    assert best in result["method"]


def test_measured_in_a_child_the_buffer_never_counts_in_the_benchmarks_peak_rss():
    """The benchmarks report the peak RSS of the engine they run next in the same process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = bandwidth.measure_in_child(1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result["threads"] == 1 and result["gb_per_s"]["avg"] > 0
    assert after - before < result["buffer_bytes"] // 4


def test_an_emulated_device_gets_the_short_form_on_the_smallest_buffer_and_it_says_so():
    """Under QEMU user mode the guest reads the host's sysfs (its last-level cache) and emulated
    reductions crawl: the smallest buffer, a few passes, marked."""
    result = bandwidth.measure_in_child(1, emulated=True)
    assert result["emulated"] is True and result["buffer_bytes"] == bandwidth.MIN_BUFFER_BYTES
    assert len(result["gb_per_s"]["samples"]) == bandwidth.EMULATED_REPETITIONS
    assert "emulated" not in bandwidth.measure_in_child(1)


def test_buffer_is_eight_caches_at_least_256_mib_and_refused_beyond_a_quarter_of_free_memory():
    assert bandwidth.buffer_size(32 * 2**20, 24 * 2**30) == 256 * 2**20
    assert bandwidth.buffer_size(64 * 2**20, 24 * 2**30) == 512 * 2**20
    assert bandwidth.buffer_size(None, None) == 256 * 2**20
    with pytest.raises(ValueError, match="MiB available"):
        bandwidth.buffer_size(2 * 2**20, 512 * 2**20)
    assert bandwidth.size_bytes("32768K") == 32 * 2**20 and bandwidth.size_bytes("512 KB") == 2**19


def test_fraction_is_bytes_per_token_times_tokens_per_second_over_the_bandwidth():
    limit = {"gb_per_s": {"avg": 10.0}}
    runs = [{"decode_tps": {"avg": 5.0}}, {"decode_tps": {"avg": 4.0}}]
    bandwidth.annotate_runs(runs, {"bytes_per_token": 1_000_000_000}, limit)
    assert [r["bandwidth_fraction"] for r in runs] == [0.5, 0.4]
    assert runs[0]["achieved_gb_per_s"] == 5.0 and runs[0]["weight_bytes_per_token"] == 1_000_000_000
    bandwidth.annotate_runs(runs, None, limit)  # eager FP32: bytes not counted, no fraction claimed
    assert runs[0]["bandwidth_fraction"] is None


@pytest.fixture(scope="module")
def demo(workflow):
    workdir = workflow["workdir"]
    config = read_text_config_dict(Path(read_json(workdir / "results/tiny/checkpoint.json")["path"]))
    return {"workdir": workdir, "config": config, "workflow": workflow}


@pytest.mark.parametrize("variant", ["int4-g128", "fp32"])
def test_pte_bytes_are_attributed_from_its_own_tensors_and_add_up_to_the_file(demo, variant):
    pte = demo["workdir"] / f"results/tiny/{variant}/xnnpack-auto/model.pte"
    result = pte_weight_bytes(pte)
    config, parts, file = demo["config"], result["parts"], result["file"]
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    # Every byte of the file is accounted for exactly once.
    assert (
        file["weights_bytes"] + file["delegate_graphs_bytes"] + file["program_bytes"] + file["padding_bytes"]
        == file["size_bytes"]
    )
    assert 0 <= file["padding_bytes"] < 4096 and file["unattributed_named_data"] == 0
    assert result["vocab_size"] == vocab
    # The tied lm_head's own copy, read whole: INT4 values with a bf16 scale per group, or FP32.
    if variant == "fp32":
        assert parts["lm_head"] == vocab * hidden * 4
    else:
        assert parts["lm_head"] == vocab * hidden // 2 + vocab * (hidden // 128) * 2
    # One row of the token table and of the per-layer table: INT8 with its FP32 scale, or FP32.
    per_layer = config["num_hidden_layers"] * config["hidden_size_per_layer_input"]
    rows = (hidden + per_layer) * 4 if variant == "fp32" else (hidden + 4) + (per_layer + 4)
    assert parts["embedding_rows"] == rows
    assert parts["embedding_rows"] < 0.01 * result["bytes_per_token"]
    assert sum(t["bytes"] for t in result["embedding_tables"]) == file["embedding_tables_bytes"]
    assert result["bytes_per_token"] == sum(parts.values())
    assert result["bytes_per_token"] == file["weights_bytes"] - file["embedding_tables_bytes"] + parts["embedding_rows"]


@pytest.fixture(scope="module")
def demo_ggufs(demo):
    targets = [f"results/tiny/llamacpp/model-{t}.gguf" for t in ("q4_0", "q4_k_m")]
    snakemake(demo["workdir"], "--cores", "2", *targets, "--configfile", str(demo["workflow"]["config"]))
    return {t: demo["workdir"] / f"results/tiny/llamacpp/model-{t}.gguf" for t in ("q4_0", "q4_k_m")}


@needs_llamacpp
@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_k_m"])
def test_gguf_bytes_come_from_its_tensor_table_and_add_up_to_the_file(demo, demo_ggufs, gguf_type):
    path = demo_ggufs[gguf_type]
    result = gguf_weight_bytes(path)
    parts, file = result["parts"], result["file"]
    assert file["header_bytes"] + file["weights_bytes"] + file["padding_bytes"] == file["size_bytes"]
    assert 0 <= file["padding_bytes"] < 32 * 64  # at most one alignment's padding per tensor
    tensors = {t["name"]: t for t in read_gguf_tensors(path)[0]}
    assert {"q4_0": "Q4_0", "q4_k_m": "Q4_K"}[gguf_type] in result["types"]  # the linears' type, as asked
    # Tied output: the token table is the lm_head, read whole; one row of it and of the per-layer table.
    config = demo["config"]
    assert result["tied_output"] and parts["lm_head"] == tensors["token_embd.weight"]["bytes"]
    rows = {t["name"]: t for t in result["embedding_tables"]}
    assert rows["token_embd.weight"]["dims"] == [config["hidden_size"], config["vocab_size"]]
    per_layer = rows["per_layer_token_embd.weight"]
    assert per_layer["row_bytes"] * config["vocab_size"] == per_layer["bytes"]
    assert parts["embedding_rows"] == rows["token_embd.weight"]["row_bytes"] + per_layer["row_bytes"]
    assert parts["embedding_rows"] < 0.01 * result["bytes_per_token"]
    assert result["bytes_per_token"] == file["weights_bytes"] - per_layer["bytes"] + parts["embedding_rows"]


def test_a_file_weight_bytes_cannot_read_gets_no_bytes_and_no_fraction(tmp_path):
    """The deploy and the perf table go on without the fraction (LiteRT-LM's own attribution,
    from real .litertlm files, is in test_litert.py)."""
    broken = tmp_path / "model.litertlm"
    broken.write_bytes(b"NOTLITERT" + bytes(64))
    with pytest.raises(ValueError, match="not a .litertlm"):
        weight_bytes(broken)
    assert readable_weight_bytes(broken) is None
    assert weight_bytes(tmp_path / "model.onnx") is None


def test_a_gguf_is_read_from_its_tensor_table(tmp_path):
    """A GGUF written by llama.cpp's own writer: each tensor's bytes, row bytes and type, and every
    byte of the file accounted for as header, weights or alignment padding."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "gemma4")
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float16))  # 10 rows of 8
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(8, dtype=np.float32))
    q8 = np.zeros((4, 34), dtype=np.uint8)  # 4 rows of one Q8_0 block (32 values in 34 bytes)
    writer.add_tensor("output.weight", q8, raw_shape=(4, 34), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t["name"]: t for t in read_gguf_tensors(path)[0]}
    assert tensors["token_embd.weight"] | {"offset": 0} == {
        "name": "token_embd.weight",
        "dims": [8, 10],
        "type": "F16",
        "offset": 0,
        "bytes": 160,
        "row_bytes": 16,
    }
    assert tensors["output.weight"]["type"] == "Q8_0" and tensors["output.weight"]["row_bytes"] == 34
    result = gguf_weight_bytes(path)
    assert not result["tied_output"]
    assert result["parts"] == {"linear_weights": 256, "lm_head": 4 * 34, "embedding_rows": 16, "other_constants": 32}
    file = result["file"]
    assert file["header_bytes"] + file["weights_bytes"] + file["padding_bytes"] == file["size_bytes"] == path.stat().st_size
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"text, not a GGUF")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        gguf_weight_bytes(broken)
    assert readable_weight_bytes(broken) is None
