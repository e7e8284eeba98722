"""LiteRT-LM as a peer engine: the demo model converted with litert-torch (FP32 and our INT4 recipe)
and benchmarked on this host with litert-lm-api, for real.

The converter and runtime live in .venv-litert (bench/setup-litert.sh); these tests run them in
subprocesses there and compare with eager FP32 from this venv. Without .venv-litert they are
skipped with that message."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, LITERT_PYTHON, PINS, REPO, needs_litert
from gemma_edge.measure.litertlm_weights import is_lookup
from gemma_edge.measure.weight_bytes import weight_bytes
from gemma_edge.peers import litertlm_file
from gemma_edge.reach.qemu import EmulatorError, find_qemu
from gemma_edge.reach.sysroot import sysroot_of

BENCH_SCRIPT = REPO / "src/gemma_edge/device/litert_bench.py"

pytestmark = needs_litert

SPEC = {
    "threads": 2,
    "prompt_lengths": [16, 48],
    "new_tokens": 16,
    "repetitions": 3,
    "warmup": 1,
    "max_seq_len": 128,
    "max_new_tokens": DEFAULT_CONFIG["verify"]["max_new_tokens"],
}


def run_litert(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(LITERT_PYTHON), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


@pytest.fixture(scope="module")
def converted(demo_checkpoint, tmp_path_factory):
    """The demo checkpoint converted to .litertlm twice: FP32 and INT4 (blocks of 128)."""
    folder = tmp_path_factory.mktemp("litert")
    manifest = folder / "checkpoint.json"
    manifest.write_text(json.dumps({"path": str(demo_checkpoint), "commit": None}))
    from gemma_edge.peers.litert import convert_in

    models = {}
    for quantization, recipe in (("fp32", "fp32"), ("int4", "int4-g128")):
        out = folder / quantization / "model.litertlm"
        convert_in(str(LITERT_PYTHON), manifest, out, recipe, SPEC["max_seq_len"])
        models[quantization] = out
    return models


@pytest.fixture(scope="module")
def reference(demo_checkpoint):
    """The verify prompts as ids (BOS first) and eager FP32's greedy tokens for each."""
    from transformers import Gemma4ForCausalLM

    from gemma_edge.build.parity import eager_reference, encode_prompts
    from gemma_edge.model.demo_model import BOS_ID

    prompts = encode_prompts(demo_checkpoint / "tokenizer.json", DEFAULT_CONFIG["verify"]["prompts"], BOS_ID)
    model = Gemma4ForCausalLM.from_pretrained(demo_checkpoint, dtype="float32").eval()
    return prompts, [eager_reference(model, ids, SPEC["max_new_tokens"])[0] for ids in prompts]


def bench(model: Path, prompt_ids: list[list[int]], tmp_path: Path) -> dict:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "parity_prompt_ids": prompt_ids}))
    out = tmp_path / "bench.json"
    run_litert("-m", "gemma_edge.device.litert_bench", "--model", str(model), "--spec", str(spec), "--out", str(out))
    return json.loads(out.read_text())


def until_stop(tokens: list[int], stop_id: int) -> list[int]:
    """LiteRT-LM ends a generation at the stop token and does not return it; eager FP32 runs on."""
    return tokens[: tokens.index(stop_id)] if stop_id in tokens else tokens


def assert_same_text(demo_checkpoint, result: dict, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """Each prompt's streamed text is eager FP32's tokens, all of them up to the stop token (as
    text: LiteRT-LM's API returns no ids, see device_parity.tokens_matched_as_text)."""
    from tokenizers import Tokenizer

    from gemma_edge.measure.device_parity import tokens_matched_as_text

    tokenizer = Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    stop_id = result["stop_ids"][0][0]
    for greedy, ids, tokens in zip(result["greedy"], prompts, expected):
        wanted = until_stop(tokens, stop_id)
        assert len(greedy["pieces"]) == len(wanted), f"prompt {ids}: {greedy['pieces']}"
        assert tokens_matched_as_text(tokenizer, ids, wanted, "".join(greedy["pieces"])) == len(wanted), greedy["pieces"]


def assert_summary(summary: dict, repetitions: int) -> None:
    assert set(summary) == {"avg", "stddev", "median", "min", "max", "samples"}
    assert len(summary["samples"]) == repetitions
    assert all(sample > 0 for sample in summary["samples"])
    assert summary["min"] <= summary["median"] <= summary["max"] and summary["stddev"] >= 0


def test_manifests_say_how_each_model_was_made(converted):
    from gemma_edge.device.files import read_json, sha256_file

    fp32 = read_json(converted["fp32"].with_name("model.litertlm.manifest.json"))
    int4 = read_json(converted["int4"].with_name("model.litertlm.manifest.json"))
    for model, manifest in ((converted["fp32"], fp32), (converted["int4"], int4)):
        assert manifest["sha256"] == sha256_file(model) and manifest["size_bytes"] == model.stat().st_size
        assert manifest["litert_versions"]["litert-torch"] == "0.10.0"
        assert manifest["litert_versions"]["torch"].startswith(PINS["torch"])
        assert manifest["convert_s"] > 0 and manifest["peak_rss_mb"] > 0
        assert not list(model.parent.glob(".*tmp*")) and not list(model.parent.glob(".litert-*"))
    assert fp32["recipe_json"] is None and fp32["params"]["quantization"] == "fp32"
    assert "blocks of 128" in int4["recipe"] and int4["params"]["group_size"] == 128
    # The demo's per-layer input projection reads 32 channels: no block of 128 fits, so it stays
    # FP32, as in our own quantize step.
    assert int4["fp32_linears"] == ["per_layer_projection"]
    assert int4["size_bytes"] < fp32["size_bytes"]


def peek_sections(model: Path) -> list[dict]:
    """The sections as litert-lm-builder's own peek tool prints them."""
    printed = run_litert("-m", "litert_lm_builder.litertlm_peek_main", "--litertlm_file", str(model), timeout=120).stdout
    sections = []
    for block in re.split(r"^Section \d+:$", printed, flags=re.M)[1:]:
        fields = dict(re.findall(r"^  (Begin Offset|End Offset|Data Type): *(\S+)$", block, flags=re.M))
        model_type = re.search(r"^    Key: model_type, Value \(String\): (\S+)$", block, flags=re.M)
        sections.append(
            {
                "begin": int(fields["Begin Offset"]),
                "end": int(fields["End Offset"]),
                "data_type": fields["Data Type"],
                "model_type": model_type and model_type.group(1),
            }
        )
    return sections


def our_lookup_tables(model: dict) -> list[dict]:
    tables = []
    for index, subgraph in enumerate(model["subgraphs"]):
        for op in subgraph["operators"]:
            for position in (p for p, _ in enumerate(op["inputs"]) if is_lookup(op, p)):
                tensor = subgraph["tensors"][op["inputs"][position]]
                tables.append(
                    {"subgraph": index, "buffer": tensor["buffer"], "shape": tensor["shape"], "scales": tensor["scales"]}
                )
    return tables


@pytest.mark.parametrize("quantization", ["fp32", "int4"])
def test_our_litertlm_reader_reads_what_literts_own_tools_read(converted, quantization):
    """litertlm_file (the flatbuffers runtime alone, in the main venv) against litert-lm-builder's
    peek tool for the sections, and ai-edge-litert's generated schema for each TFLite section's
    buffers, signatures and lookup tables."""
    model = converted[quantization]
    with litertlm_file.mapped(model) as data:
        header = litertlm_file.read_header(data)
        ours = {
            s["index"]: litertlm_file.read_tflite(data[s["begin"] : s["end"]])
            for s in header["sections"]
            if s["data_type"] == "TFLiteModel"
        }
    assert [
        {"begin": s["begin"], "end": s["end"], "data_type": s["data_type"], "model_type": s["items"].get("model_type")}
        for s in header["sections"]
    ] == peek_sections(model)
    theirs = json.loads(run_litert(str(REPO / "tests/litert_reference.py"), str(model), timeout=120).stdout)
    assert sorted(int(index) for index in theirs) == sorted(ours) and len(ours) == 3
    for index, reference in theirs.items():
        mine = ours[int(index)]
        assert [b["bytes"] for b in mine["buffers"]] == reference["buffers"]
        assert mine["signatures"] == reference["signatures"] and len(mine["subgraphs"]) == reference["subgraphs"]
        assert mine["signature_outputs"] == reference["signature_outputs"]
        assert set(reference["metadata_buffers"]) <= set(mine["metadata_buffers"])
        assert our_lookup_tables(mine) == reference["tables"]
    # LiteRT-LM's prefill returns only the KV cache; its first token's logits come from `decode`
    # (the perf table says so beside the prefill figures, from this reader).
    outputs = litertlm_file.signature_outputs(model)
    prefills = [key for key in outputs if key.startswith("prefill_") and "embedder" not in key]
    assert prefills and all("logits" not in outputs[key] for key in prefills) and "logits" in outputs["decode"]


@pytest.mark.parametrize("quantization", ["fp32", "int4"])
def test_litertlm_bytes_per_token_read_the_embedders_as_rows_and_add_up_to_the_file(converted, demo_checkpoint, quantization):
    from gemma_edge.model.checkpoint import read_text_config_dict

    result = weight_bytes(converted[quantization])
    config = read_text_config_dict(demo_checkpoint)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    per_layer = config["num_hidden_layers"] * config["hidden_size_per_layer_input"]
    parts, file = result["parts"], result["file"]
    assert result["artifact"] == "litertlm" and result["vocab_size"] == vocab
    # Every byte of the file once: weights, TFLite graphs, other sections, header, the 16 KiB alignment.
    assert (
        file["weights_bytes"] + file["graph_bytes"] + file["other_sections_bytes"] + file["header_bytes"] + file["padding_bytes"]
        == file["size_bytes"]
        == converted[quantization].stat().st_size
    )
    assert 0 <= file["padding_bytes"] < 16384 * len(result["sections"])
    assert (
        result["bytes_per_token"]
        == sum(parts.values())
        == (file["weights_bytes"] - file["embedding_tables_bytes"] - file["outside_decode_bytes"] + parts["embedding_rows"])
    )
    # The externalized embedder and per-layer embedder: one row each (INT8 with its float32 scale, or FP32).
    tables = {t["model_type"]: t for t in result["embedding_tables"]}
    assert {name: t["shape"] for name, t in tables.items()} == {
        "tf_lite_embedder": [vocab, hidden],
        "tf_lite_per_layer_embedder": [vocab, per_layer],
    }
    element = 4 if quantization == "fp32" else 1
    scale = 0 if quantization == "fp32" else 4
    for name, width in (("tf_lite_embedder", hidden), ("tf_lite_per_layer_embedder", per_layer)):
        assert tables[name]["row_bytes"] == width * element + scale
        assert tables[name]["bytes"] == vocab * tables[name]["row_bytes"]
    assert parts["embedding_rows"] == (hidden + per_layer) * element + 2 * scale
    assert parts["embedding_rows"] < 0.01 * result["bytes_per_token"]
    sections = {s["model_type"]: s for s in result["sections"]}
    for name in tables:  # nothing else of an embedder's weights but a few shape constants
        assert sections[name]["read_per_token_bytes"] < tables[name]["row_bytes"] + 256
    # The tied lm_head's own copy in the decoder, read whole: INT4 with an FP16 scale per block, or FP32.
    if quantization == "fp32":
        assert parts["lm_head"] == vocab * hidden * 4 and result["lm_head_tensors"] == 1
    else:
        assert parts["lm_head"] == vocab * hidden // 2 + vocab * (hidden // 128) * 2 and result["lm_head_tensors"] == 2
    # Every weight of the decoder but a few constants only prefill's subgraph holds is read a token.
    decoder = sections["tf_lite_prefill_decode"]
    assert decoder["decode_signatures"] == ["decode"]
    assert 0 < decoder["outside_decode_bytes"] <= file["outside_decode_bytes"] < 1024
    assert (
        decoder["read_per_token_bytes"]
        == decoder["weights_bytes"] - decoder["outside_decode_bytes"]
        == (result["bytes_per_token"] - sum(sections[name]["read_per_token_bytes"] for name in tables))
    )
    if quantization == "int4":  # INT4 linears beside INT8 tables: well under half the file
        assert result["bytes_per_token"] < 0.45 * file["size_bytes"]


def test_fp32_litertlm_benchmarks_and_decodes_eager_fp32s_tokens(converted, reference, demo_checkpoint, tmp_path):
    prompts, expected = reference
    result = bench(converted["fp32"], prompts, tmp_path)
    assert result["load_s"] > 0 and result["peak_rss_bytes"] > 0
    assert [run["prompt_tokens"] for run in result["runs"]] == SPEC["prompt_lengths"]
    for run in result["runs"]:
        for name in ("prefill_tps", "decode_tps", "ttft_s", "init_s", "wall_s"):
            assert_summary(run[name], SPEC["repetitions"])
        assert run["prefill_tokens_counted"] == [run["prompt_tokens"]] * SPEC["repetitions"]
        assert run["decode_tokens_counted"] == [SPEC["new_tokens"]] * SPEC["repetitions"]
    assert result["bos_id"] == prompts[0][0]
    for greedy, ids in zip(result["greedy"], prompts):
        assert greedy["prompt_ids"] == ids and greedy["prompt_ids_exact"]
    assert_same_text(demo_checkpoint, result, prompts, expected)


def test_int4_litertlm_runs_with_our_recipe(converted, reference, tmp_path):
    prompts, expected = reference
    result = bench(converted["int4"], prompts[:2], tmp_path)
    for run in result["runs"]:
        assert_summary(run["prefill_tps"], SPEC["repetitions"])
        assert_summary(run["decode_tps"], SPEC["repetitions"])
    for greedy in result["greedy"]:
        assert greedy["pieces"] and all(isinstance(token, int) for token in greedy["tokens"])


def test_fp32_litertlm_runs_on_the_emulated_pi5_with_only_the_aarch64_wheel(converted, reference, demo_checkpoint, tmp_path):
    """Debian bookworm's arm64 CPython 3.11.2 under qemu-aarch64 -cpu cortex-a76, with nothing but
    the aarch64 litert-lm-api wheel the workflow fetches for a Pi (`litert_runtime`) and our runner
    files on its path: it loads the model and decodes eager FP32's tokens (emulated speed means
    nothing)."""
    import zipfile

    from gemma_edge.peers import litert_runtime
    from gemma_edge.reach import emulator

    root = emulator.default_root()
    try:
        emulator.check_emulator(root)
    except EmulatorError as error:
        pytest.skip(f"the emulated Pi 5 is not ready ({error})")
    version = litert_runtime.pinned_version(REPO / "requirements-litert.txt")
    wheel, _ = litert_runtime.fetch_cached(version, "aarch64", litert_runtime.default_cache())
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    device = tmp_path / "device"
    device.mkdir()
    model = device / "model.litertlm"
    model.write_bytes(converted["fp32"].read_bytes())
    prompts, expected = reference
    spec = device / "spec.json"
    spec.write_text(
        json.dumps({**SPEC, "prompt_lengths": [16], "new_tokens": 8, "repetitions": 1, "parity_prompt_ids": prompts[:2]})
    )
    python = sysroot_of(root) / "usr/bin/python3.11"
    env = {**os.environ, **emulator.device_environment(root), "PYTHONPATH": f"{site}:{REPO / 'src'}"}
    done = subprocess.run(
        [
            find_qemu(),
            str(python),
            "-m",
            "gemma_edge.device.litert_bench",
            "--model",
            str(model),
            "--spec",
            str(spec),
            "--out",
            str(device / "bench.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((device / "bench.json").read_text())
    assert result["device"]["machine"] == "aarch64" and result["device"]["qemu_cpu"] == "cortex-a76"
    assert result["runs"][0]["decode_tokens_counted"] == [8]
    assert_same_text(demo_checkpoint, result, prompts[:2], expected[:2])


def test_bench_script_needs_only_the_standard_library_litert_lm_and_two_stdlib_helpers():
    tree = ast.parse(BENCH_SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    froms = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    package = {module for module in froms if module.startswith("gemma_edge")}
    assert imported - set(sys.stdlib_module_names) == {"litert_lm", "gemma_edge"}
    # the statistics it shares with the other engines, and the resident-memory sampler, which
    # import only the standard library and each other: no torch is loaded beside LiteRT-LM
    assert package == {"gemma_edge.device.peer_bench", "gemma_edge.device.memory"}
    for module in package:
        source = ast.parse((REPO / "src" / (module.replace(".", "/") + ".py")).read_text())
        names = {alias.name for node in ast.walk(source) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(source) if isinstance(node, ast.ImportFrom) and node.module}
        outside = {name for name in names if name.split(".")[0] not in sys.stdlib_module_names}
        assert outside <= package | {"__future__"}, (module, outside)


def load_bench_module():
    from gemma_edge.device import litert_bench

    return litert_bench


def test_a_decode_the_runtime_did_not_run_is_refused():
    """Seen on e2b-4l: its all-zero pad row makes the tied lm_head's INT4 scale 0, XNNPACK refuses
    the tensor, and Benchmark.run() still returns, with 0 decode tokens at 0 tok/s."""
    module = load_bench_module()
    good = {"prefill_tokens": 64, "prefill_tps": 500.0, "decode_tokens": 32, "decode_tps": 20.0}
    assert module.check_sample(good, 64, 32) is good
    with pytest.raises(module.BenchFailed, match="decoded 0 of 32"):
        module.check_sample({**good, "decode_tokens": 0, "decode_tps": 0.0}, 64, 32)
