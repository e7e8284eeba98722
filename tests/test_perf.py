"""The performance benchmark: the E2B-shaped model's architecture, its tokenizer as llama.cpp's own
converter sees it, and `snakemake perf` end to end (the .pte, eager FP32 and llama.cpp on one
checkpoint) on a tiny random Gemma 4 with the same tokenizer design."""

import json

import pytest
import torch

from conftest import REPO, compact, needs_litert, needs_llamacpp, snakemake, write_config
from gemma_edge.device.files import read_json, sha256_file
from gemma_edge.device.runtime import DECODE_METHOD
from gemma_edge.measure.perf_projection import fit_line, parameter_count_of, project_steps, render_projection
from gemma_edge.measure.perf_table import decode_ratio, render_table, same_greedy_tokens
from gemma_edge.model.e2b_shape import (
    E2B,
    TINY_VOCAB,
    e2b_layer_types,
    e2b_shape_config,
    parameter_count,
    shared_layers_for,
)
from test_workflow import jobs_of


def meta_model(config):
    from transformers import Gemma4ForCausalLM

    with torch.device("meta"):
        return Gemma4ForCausalLM(config)


def test_full_depth_e2b_shape_is_gemma_4_e2b():
    """At 35 layers the shape is E2B's: its layer pattern, 20 shared-KV layers and 2.35 B
    per-layer-embedding parameters; the text decoder holds about 4.6 B of E2B's 5.1 B (the rest
    are its vision and audio encoders)."""
    config = e2b_shape_config(35)
    assert config.num_kv_shared_layers == 20
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [4, 9, 14, 19, 24, 29, 34]
    model = meta_model(config)
    per_layer_table = model.model.embed_tokens_per_layer.weight.numel()
    assert per_layer_table == 262144 * 35 * 256  # 2.35 B
    assert 4.55e9 < parameter_count(model) < 4.7e9
    assert parameter_count_of(config.to_dict()) == parameter_count(model)  # what the projection aims at


@pytest.mark.parametrize("layers", [3, 4, 8])
def test_cut_shapes_keep_both_attention_kinds_and_a_donor_for_every_shared_layer(layers):
    shared = shared_layers_for(layers)
    types = e2b_layer_types(layers, shared)
    own, borrowed = types[: layers - shared], types[layers - shared :]
    assert {"sliding_attention", "full_attention"} <= set(types)
    assert set(borrowed) <= set(own)
    config = e2b_shape_config(layers)
    assert (config.hidden_size, config.vocab_size, config.hidden_size_per_layer_input) == (1536, 262144, 256)


def test_too_shallow_an_e2b_shape_is_refused():
    with pytest.raises(ValueError, match="at least 3 layers"):
        e2b_shape_config(2)


def test_byte_fallback_tokenizer_covers_any_text_at_the_full_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from gemma_edge.model.demo_model import build_tokenizer, write_tokenizer

    tokenizer = build_tokenizer((REPO / "resources/demo_corpus.txt").read_text(), E2B["vocab_size"], merges_from=4096)
    assert tokenizer.get_vocab_size() == E2B["vocab_size"]
    write_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Return a new list of naïve ünïcode — 東京"
    ids = loaded(text)["input_ids"]
    assert ids[0] == 2 and max(ids) < E2B["vocab_size"]
    assert any(piece.startswith("<0x") for piece in loaded.convert_ids_to_tokens(ids))  # bytes, not <unk>
    assert loaded.decode(ids, skip_special_tokens=True) == text


def fake_engine(engine, prefill, decode):
    stats = lambda v: {"avg": v, "stddev": v / 10, "median": v, "min": v, "max": v, "samples": [v]}  # noqa: E731
    return {
        "engine": engine,
        "load_s": 1.0,
        "peak_rss_bytes": 2e9,
        "greedy_tokens": [5, 6],
        "runs": [{"prompt_tokens": 64, "prefill_tps": stats(prefill), "decode_tps": stats(decode)}],
    }


def test_ratios_divide_the_pte_by_each_other_engine():
    results = {
        "pte": fake_engine("pte", 300.0, 12.0),
        "eager": fake_engine("eager", 100.0, 4.0),
        "llamacpp": fake_engine("llamacpp", 150.0, 16.0),
    }
    [row] = decode_ratio(results)
    assert row["decode_vs_llamacpp"] == pytest.approx(0.75)
    assert row["prefill_vs_llamacpp"] == pytest.approx(2.0)
    assert row["decode_vs_eager"] == pytest.approx(3.0)
    report = {
        "steps": {"export": {"wall_s": 80.0, "peak_rss_mb": 6700.0, "peak_rss_source": "recorded"}},
        "pte": {"size_bytes": 7e8},
        "gguf": {"gguf_type": "q4_0", "size_bytes": 5e8},
        "engines": results,
        "ratios": [row],
        "same_greedy_tokens": {"pte": True, "eager": True, "llamacpp": False},
    }
    table = compact(render_table(report))
    assert "| export | 80.0 | 6700 |" in table
    assert "| llamacpp | 64 | 150.0 ± 15.0 | 16.00 ± 1.60 |" in table
    assert "| 64 | 0.75 | 2.00 | 3.00 | 3.00 |" in table


def test_time_to_first_token_is_compared_as_the_peer_s_over_the_pte_s():
    results = {"pte": fake_engine("pte", 300.0, 12.0), "litert": fake_engine("litert", 600.0, 12.0)}
    stats = lambda v: {"avg": v, "stddev": 0.0}  # noqa: E731
    results["pte"]["runs"][0]["ttft_s"], results["litert"]["runs"][0]["ttft_s"] = stats(0.2), stats(0.25)
    [row] = decode_ratio(results)
    assert row == {
        "prompt_tokens": 64,
        "decode_vs_litert": pytest.approx(1.0),
        "prefill_vs_litert": pytest.approx(0.5),
        "first_token_vs_litert": pytest.approx(1.25),
    }
    report = {
        "steps": {},
        "pte": {"size_bytes": 7e8},
        "gguf": {"gguf_type": "q4_0", "size_bytes": 5e8},
        "litert": {"recipe": "int4-g128", "size_bytes": 6e8, "prefill_logits": False},
        "engines": results,
        "ratios": [row],
        "same_greedy_tokens": {"pte": None, "litert": None},
    }
    table = compact(render_table(report))
    assert "| pte | 64 | 300.0 ± 30.0 | 12.00 ± 1.20 | 200.00 |" in table
    assert "| prompt | decode .pte/llama.cpp | prefill .pte/llama.cpp | first token .pte/llama.cpp |" in table
    assert "| 64 | — | — | — | — | — | — | 1.00 | 0.50 | 1.25 |" in table
    assert "LiteRT-LM's prefill signatures return no logits" in table


def test_without_eager_the_table_compares_the_pte_with_llamacpp_only():
    """perf.eager: false (full depth on a 24 GiB host): no eager row, no eager ratios, and no claim
    about matching eager's tokens."""
    results = {"pte": fake_engine("pte", 300.0, 12.0), "llamacpp": fake_engine("llamacpp", 150.0, 16.0)}
    results["pte"]["resident"] = {"anon_peak_bytes": 1200 * 2**20, "file_peak_bytes": 700 * 2**20}
    [row] = decode_ratio(results)
    assert set(row) == {"prompt_tokens", "decode_vs_llamacpp", "prefill_vs_llamacpp"}
    report = {
        "steps": {},
        "pte": {"size_bytes": 7e8},
        "gguf": {"gguf_type": "q4_0", "size_bytes": 5e8},
        "engines": results,
        "ratios": [row],
        "same_greedy_tokens": same_greedy_tokens(results),
    }
    assert report["same_greedy_tokens"] == {"pte": None, "llamacpp": None}
    table = compact(render_table(report))
    assert "| eager |" not in table
    assert "| pte | 64 | 300.0 ± 30.0 | 12.00 ± 1.20 | — | 1.0 | 1907 | 1200 / 700 | — |" in table
    assert "| llamacpp | 64 | 150.0 ± 15.0 | 16.00 ± 1.60 | — | 1.0 | 1907 | — | — |" in table  # not sampled
    assert "| 64 | 0.75 | 2.00 | — | — |" in table


@pytest.fixture(scope="module")
def perf_run(tmp_path_factory):
    """`snakemake perf` on a tiny random Gemma 4 (demo widths, byte-fallback tokenizer)."""
    workdir = tmp_path_factory.mktemp("perf")
    config = write_config(
        workdir / "perf.yaml",
        {
            "model": "tiny-random",
            "models": {"tiny-random": {"repo_id": "tests/gemma4-tiny-random", "demo": True, "synthetic": {"shape": "tiny"}}},
            "perf": {"prompt_lengths": [8, 32], "new_tokens": 8, "repetitions": 2, "warmup": 1},
        },
    )
    snakemake(workdir, "--cores", "2", "perf", "--configfile", str(config))
    return {
        "workdir": workdir,
        "config": config,
        "perf": read_json(workdir / "results/perf/tiny-random/int4-g128/xnnpack-auto/perf.json"),
    }


@needs_llamacpp
def test_perf_times_all_three_engines_on_the_same_checkpoint(perf_run):
    perf, workdir = perf_run["perf"], perf_run["workdir"]
    assert {"pte", "eager", "llamacpp"} <= set(perf["engines"])
    for engine, result in ((name, perf["engines"][name]) for name in ("pte", "eager", "llamacpp")):
        assert [run["prompt_tokens"] for run in result["runs"]] == [8, 32], engine
        for run in result["runs"]:
            assert run["decode_tps"]["avg"] > 0 and len(run["decode_tps"]["samples"]) == 2
            assert run["prefill_tps"]["avg"] > 0
        assert len(result["greedy_tokens"]) == 8 and max(result["greedy_tokens"]) < TINY_VOCAB
        assert result["threads"] == 2
        assert set(result["load"]) == {"before", "after", "busy"}
        # from the engine's load to its last token: torch's heap is anonymous, its libraries mapped files
        resident = result["resident"]
        assert resident["anon_peak_bytes"] > 50 * 2**20 and resident["file_peak_bytes"] > 10 * 2**20, engine
        assert resident["peak_bytes"] <= result["peak_rss_bytes"]
        # This host's bandwidth at the same threads, measured in the engine's job; eager's bytes are not counted.
        assert result["bandwidth"]["threads"] == 2 and result["bandwidth"]["gb_per_s"]["avg"] > 0
        assert (result["weight_bytes"] is None) == (engine == "eager")
        for run in result["runs"]:
            assert (run["bandwidth_fraction"] is None) == (engine == "eager")
            assert engine == "eager" or run["bandwidth_fraction"] > 0
    assert perf["gguf"]["gguf_type"] == "q4_0"
    gguf = workdir / "results/tiny-random/llamacpp/model-q4_0.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF" and sha256_file(gguf) == perf["gguf"]["sha256"]
    checkpoint = read_json(workdir / "results/tiny-random/checkpoint.json")
    gguf_manifest = read_json(workdir / "results/tiny-random/llamacpp/model-q4_0.gguf.manifest.json")
    assert gguf_manifest["inputs"]["checkpoint"]["sha256"] == sha256_file(workdir / "results/tiny-random/checkpoint.json")
    assert perf["model"]["commit"] == checkpoint["commit"]
    for row in perf["ratios"]:
        pte = {r["prompt_tokens"]: r for r in perf["engines"]["pte"]["runs"]}[row["prompt_tokens"]]
        llama = {r["prompt_tokens"]: r for r in perf["engines"]["llamacpp"]["runs"]}[row["prompt_tokens"]]
        assert row["decode_vs_llamacpp"] == pytest.approx(pte["decode_tps"]["avg"] / llama["decode_tps"]["avg"])


def test_a_128_token_program_is_lowered_without_the_one_token_method_by_default(perf_run):
    """`lowering.decode_method: auto` at the default 128-token context: forward alone (it would
    save under 2 % a token there and cost a third more lowering), and the .pte decodes with it."""
    manifest = perf_run["workdir"] / "results/tiny-random/int4-g128/xnnpack-auto/model.pte.manifest.json"
    lowering = read_json(manifest)["lowering"]
    assert lowering["decode_method_requested"] == "auto"
    assert lowering["methods"] == ["forward"] and DECODE_METHOD not in lowering
    assert perf_run["perf"]["engines"]["pte"]["decodes_with"] == "forward"


@needs_litert
def test_perf_times_litert_lm_with_the_pte_s_group_size_by_its_own_benchmark(perf_run):
    perf, workdir = perf_run["perf"], perf_run["workdir"]
    litert = perf["engines"]["litert"]
    assert litert["available"], litert.get("reason")
    assert litert["recipe"] == "int4-g128" and perf["litert"]["recipe"] == "int4-g128"
    assert perf["litert"]["size_bytes"] == (workdir / "results/tiny-random/litert/model-int4-g128.litertlm").stat().st_size
    assert [run["prompt_tokens"] for run in litert["runs"]] == [8, 32]
    for run in litert["runs"]:
        assert run["decode_tokens_counted"] == [8, 8] and len(run["decode_tps"]["samples"]) == 2
    assert perf["same_greedy_tokens"]["litert"] is None  # its benchmark decodes no prompt of ours
    weights, limit = litert["weight_bytes"], litert["bandwidth"]["gb_per_s"]["avg"]
    assert weights["artifact"] == "litertlm" and weights["file"]["size_bytes"] == perf["litert"]["size_bytes"]
    for run in litert["runs"]:
        assert run["weight_bytes_per_token"] == weights["bytes_per_token"] > 0
        assert run["bandwidth_fraction"] == pytest.approx(weights["bytes_per_token"] * run["decode_tps"]["avg"] / 1e9 / limit)
    assert litert["threads"] == 2 and set(litert["load"]) == {"before", "after", "busy"}
    assert litert["resident"]["anon_peak_bytes"] > 0 and litert["first_load_s"] > 0
    for row in perf["ratios"]:
        pte = {r["prompt_tokens"]: r for r in perf["engines"]["pte"]["runs"]}[row["prompt_tokens"]]
        theirs = {r["prompt_tokens"]: r for r in litert["runs"]}[row["prompt_tokens"]]
        assert row["decode_vs_litert"] == pytest.approx(pte["decode_tps"]["avg"] / theirs["decode_tps"]["avg"])
        assert row["first_token_vs_litert"] == pytest.approx(theirs["ttft_s"]["avg"] / pte["ttft_s"]["avg"])
    assert perf["litert"]["prefill_logits"] is False  # read from the .litertlm's prefill signature
    table = compact((workdir / "results/perf/tiny-random/int4-g128/xnnpack-auto/perf.md").read_text())
    assert "| litert | 8 |" in table and "decode .pte/LiteRT-LM" in table and "| litert (int4-g128) |" in table
    assert "first token .pte/LiteRT-LM" in table and "LiteRT-LM's prefill signatures return no logits" in table


@needs_llamacpp
def test_perf_table_lists_every_step_with_its_cost(perf_run):
    steps = perf_run["perf"]["steps"]
    for name in (
        "build checkpoint",
        "download",
        "export",
        "quantize",
        "lower",
        "gguf (q4_0)",
        "bench .pte",
        "bench eager",
        "bench llama.cpp",
    ):
        assert name in steps, name
        assert steps[name]["wall_s"] > 0
    assert steps["export"]["peak_rss_mb"] > 100  # torch alone is more than that
    table = compact((perf_run["workdir"] / "results/perf/tiny-random/int4-g128/xnnpack-auto/perf.md").read_text())
    assert "| export |" in table and "decode .pte/llama.cpp" in table


@needs_llamacpp
def test_group_size_change_reruns_only_the_pte_side_of_the_benchmark(perf_run):
    override = write_config(perf_run["workdir"] / "g64.yaml", {"quantization": {"group_size": 64}})
    dry = snakemake(perf_run["workdir"], "-n", "perf", "--configfile", str(perf_run["config"]), str(override))
    # LiteRT-LM's INT4 blocks follow the group size too (when it is set up): its model and timing.
    litert = {"litert_model": 1, "perf_litert": 1} if "litert" in perf_run["perf"]["engines"] else {}
    assert jobs_of(dry.stdout) == {"quantize": 1, "lower": 1, "perf_engine": 1, "perf_table": 1, "perf": 1, **litert}
    assert "results/perf/tiny-random/int4-g64/xnnpack-auto/pte.json" in dry.stdout


@needs_llamacpp
def test_leaving_eager_out_times_nothing_again_and_drops_its_row(perf_run):
    override = write_config(perf_run["workdir"] / "no-eager.yaml", {"perf": {"eager": False}})
    dry = snakemake(perf_run["workdir"], "-n", "perf", "--configfile", str(perf_run["config"]), str(override))
    assert jobs_of(dry.stdout) == {"perf_table": 1, "perf": 1}


def test_missing_converter_is_explained(tmp_path):
    from gemma_edge.peers.gguf_convert import convert_to_gguf

    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(json.dumps({"path": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="bench/setup-llamacpp.sh"):
        convert_to_gguf(tmp_path / "missing.py", checkpoint, "q4_0", 1, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_projection_extends_each_steps_growth_per_parameter_to_the_full_model():
    def report(parameters, export_mb, lower_mb):
        return {
            "model": {"parameters": parameters},
            "steps": {
                "export": {"wall_s": parameters / 1e8, "peak_rss_mb": export_mb},
                "lower": {"wall_s": 50.0, "peak_rss_mb": lower_mb},
                "download": {"wall_s": 1.0, "peak_rss_mb": None},
            },
        }

    rows = project_steps([report(10**9, 6000.0, 2400.0), report(2 * 10**9, 9000.0, 3200.0)], 5 * 10**9)
    export, lower = rows  # download has no RSS figure, so it is left out
    assert export["peak_rss_mb_per_billion_parameters"] == pytest.approx(3000.0)
    assert export["peak_rss_mb_projected"] == pytest.approx(18000.0)
    assert export["wall_s_projected"] == pytest.approx(50.0)
    assert lower["peak_rss_mb_projected"] == pytest.approx(5600.0)
    assert "| export | 6000 | 9000 | 3000 | 18000 | 50 |" in compact(render_projection(rows, 5 * 10**9, 35))
    with pytest.raises(ValueError, match="two or more depths"):
        fit_line([(4, 1.0), (4, 2.0)])
