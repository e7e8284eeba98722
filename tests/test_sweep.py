"""A sweep over two group sizes and two targets (local and the loopback SSH server): summary,
plots, HTML report, and one benchmark per device at a time."""

import copy
import csv
import itertools
import json
import re
import struct

import pytest
import yaml

from conftest import DEFAULT_CONFIG, QUALITY_TOKENS, REPO, needs_litert, needs_llamacpp, snakemake, write_config
from gemma_edge.device.files import read_json
from test_workflow import jobs_of

PROMPTS = len(DEFAULT_CONFIG["verify"]["prompts"])  # the sweep runs the default verify prompts


@pytest.fixture(scope="module")
def sweep(deployed):
    targets = yaml.safe_load(deployed["targets_config"].read_text())
    config = write_config(
        deployed["workdir"] / "sweep.yaml",
        {
            **targets,
            "sweep": {"group_sizes": [64, 128], "per_op_modes": ["auto"], "targets": ["local", "loopback"]},
        },
    )
    configs = [deployed["configs"][0], str(config)]
    workdir = deployed["workdir"]
    snakemake(workdir, "--cores", "2", "results/summary.csv", "--configfile", *configs)
    # All four benchmarks again, ready at once: only the device resources keep them apart.
    again = snakemake(
        workdir, "--cores", "4", "results/summary.csv", "--configfile", *configs, "--forcerun", "bench_local", "bench_loopback"
    )
    snakemake(workdir, "--report", str(workdir / "report.html"), "results/summary.csv", "--configfile", *configs)
    return {"workdir": workdir, "configs": configs, "rerun_log": again.stderr}


def bench_paths(workdir):
    return [workdir / f"results/{t}/tiny/int4-g{g}/xnnpack-auto/bench.json" for t in ("local", "loopback") for g in (64, 128)]


def test_summary_has_every_target_variant_and_prompt_length(sweep):
    rows = list(csv.DictReader((sweep["workdir"] / "results/summary.csv").open()))
    pte = [r for r in rows if r["engine"] == "pte"]
    assert {(r["target"], r["group_size"], r["prompt_tokens"]) for r in pte} == set(
        itertools.product(["local", "loopback"], ["64", "128"], ["8", "32"])
    )
    for row in pte:
        assert float(row["decode_tps"]) > 0 and float(row["prefill_tps"]) > 0
        assert row["device_identical_to_host_pte"] == f"{PROMPTS}/{PROMPTS}"
        assert row["busy"] in ("True", "False")
        assert int(row["weight_bytes_per_token"]) > 0 and float(row["bandwidth_gb_per_s"]) > 0
        assert float(row["bandwidth_fraction"]) > 0
    sizes = {r["group_size"]: float(r["pte_mb"]) for r in pte}
    assert sizes["64"] != sizes["128"]  # different programs, really built


@needs_llamacpp
def test_summary_sets_llama_cpp_beside_each_pte_with_the_ratio(sweep):
    rows = list(csv.DictReader((sweep["workdir"] / "results/summary.csv").open()))
    peers = [r for r in rows if r["engine"].startswith("llamacpp")]
    # Measured again in every .pte's run: per target, both GGUF types beside both group sizes.
    assert {(r["target"], r["engine"], r["measured_beside"], r["prompt_tokens"]) for r in peers} == set(
        itertools.product(
            ["local", "loopback"], ["llamacpp-q4_0", "llamacpp-q4_k_m"], ["int4-g64 fused", "int4-g128 fused"], ["8", "32"]
        )
    )
    for row in peers:
        assert row["available"] == "True" and float(row["decode_tps"]) > 0
        assert float(row["pte_decode_ratio"]) > 0 and float(row["pte_prefill_ratio"]) > 0


@needs_litert
def test_summary_sets_litert_lm_with_the_same_group_size_beside_each_pte(sweep):
    rows = list(csv.DictReader((sweep["workdir"] / "results/summary.csv").open()))
    peers = [r for r in rows if r["engine"].startswith("litert")]
    assert {(r["target"], r["engine"], r["variant"], r["measured_beside"], r["prompt_tokens"]) for r in peers} == {
        (target, f"litert-int4-g{g}", f"LiteRT-LM int4-g{g}", f"int4-g{g} fused", length)
        for target in ("local", "loopback")
        for g in (64, 128)
        for length in ("8", "32")
    }
    for row in peers:
        assert row["available"] == "True" and float(row["decode_tps"]) > 0 and float(row["pte_decode_ratio"]) > 0
        assert int(row["weight_bytes_per_token"]) > 0 and float(row["bandwidth_fraction"]) > 0


def test_summary_sets_each_pte_s_quality_beside_its_speed(sweep):
    workdir = sweep["workdir"]
    rows = list(csv.DictReader((workdir / "results/summary.csv").open()))
    pte = [r for r in rows if r["engine"] == "pte"]
    for row in pte:
        quality = read_json(workdir / f"results/tiny/int4-g{row['group_size']}/xnnpack-auto/quality.json")["summary"]
        assert float(row["kl_mean"]) == pytest.approx(quality["kl"]["mean"], abs=1e-6) and quality["kl"]["mean"] > 0
        assert 0 < float(row["top1_agreement"]) < 1 and float(row["kl_p99"]) > float(row["kl_median"]) > 0
        assert row["quality_tokens"] == str(QUALITY_TOKENS) and float(row["perplexity"]) > 0
    assert len({r["fp32_perplexity"] for r in rows if r["fp32_perplexity"]}) == 1  # one reference, the same ids
    assert len({r["kl_mean"] for r in pte}) == 2  # two programs, two figures
    table = read_json(workdir / "results/summary.json")["quality"]
    assert table[0]["variant"] == "eager FP32 (reference)" and table[0]["kl_mean"] == 0
    assert {"int4-g64 fused", "int4-g128 fused"} <= {e["variant"] for e in table}
    assert all(e["same_ids_as_first"] for e in table[1:])
    assert "quality against eager FP32" in (workdir / "logs/summary.log").read_text()


@needs_llamacpp
def test_llama_cpp_s_ggufs_are_scored_on_our_ids_and_its_own_tokenizer_is_checked(sweep):
    from llama_cpp import Llama

    from gemma_edge.measure.quality import text_ids

    workdir = sweep["workdir"]
    rows = list(csv.DictReader((workdir / "results/summary.csv").open()))
    pte_reference = {r["fp32_perplexity"] for r in rows if r["engine"] == "pte"}
    for gguf_type in ("q4_0", "q4_k_m"):
        quality = read_json(workdir / f"results/tiny/llamacpp/quality-{gguf_type}.json")
        peers = [r for r in rows if r["engine"] == f"llamacpp-{gguf_type}"]
        assert peers and {r["kl_mean"] for r in peers} == {str(round(quality["summary"]["kl"]["mean"], 6))}
        assert {r["fp32_perplexity"] for r in peers} == pte_reference and quality["summary"]["kl"]["mean"] > 0
        assert quality["variant"] == f"llama.cpp {gguf_type}" and quality["gates"] is None
        # The record says what llama.cpp's own tokenizer makes of the text, against ours.
        text = (REPO / "resources/quality/demo_heldout.txt").read_text(encoding="utf-8")
        checkpoint = read_json(workdir / "results/tiny/checkpoint.json")
        ours = text_ids(workdir / checkpoint["path"] / "tokenizer.json", text)
        vocab = Llama(model_path=str(workdir / f"results/tiny/llamacpp/model-{gguf_type}.gguf"), vocab_only=True, verbose=False)
        theirs = vocab.tokenize(text.encode(), add_bos=False, special=False)
        check = quality["llamacpp_tokenizer"]
        assert (check["identical"], check["ours"], check["theirs"]) == (ours == theirs, len(ours), len(theirs))
        assert check["used"].startswith("ours")


def test_a_group_size_change_rescores_only_the_new_pte(sweep, tmp_path):
    override = write_config(tmp_path / "g256.yaml", {"sweep": {"group_sizes": [64, 128, 256]}})
    dry = snakemake(sweep["workdir"], "-n", "results/summary.csv", "--configfile", *sweep["configs"], str(override))
    assert "results/tiny/int4-g256/xnnpack-auto/quality.json" in dry.stdout
    jobs = jobs_of(dry.stdout)
    # The new .pte is built, verified, benchmarked and scored; the GGUFs' scores stand.
    assert jobs["quality"] == 1 and jobs["summary"] == 1 and not {"gguf", "quality_gguf", "export"} & set(jobs)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("plot", ["decode", "prefill", "size", "parity", "quality"])
def test_plots_are_real_images(sweep, plot):
    path = sweep["workdir"] / f"results/plots/{plot}.png"
    width, height = png_size(path)
    assert width >= 300 and height >= 200
    assert path.stat().st_size > 8000


def test_html_report_holds_the_plots_and_table(sweep):
    html = (sweep["workdir"] / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in ("summary.csv", "decode.png", "prefill.png", "size.png", "parity.png", "quality.png", "Sweep", "Quality"):
        assert name in html, name


def test_one_benchmark_per_device_at_a_time_but_devices_in_parallel(sweep):
    """Snakemake's own order of job starts and ends when all four benchmarks were ready at once:
    the device resources (rules/common.smk) let one benchmark per device run, and the two devices
    start together. The wall clocks in bench.json then agree: a device's benchmarks never overlap."""
    pattern = r"^Job \d+: Benchmarking decode on (\w+):|^Finished jobid: \d+ \(Rule: bench_(\w+)\)$"
    events = [
        (match[1] or match[2], "start" if match[1] else "end") for match in re.finditer(pattern, sweep["rerun_log"], re.MULTILINE)
    ]
    assert len(events) == 8, events
    assert {device for device, kind in events[:2] if kind == "start"} == {"local", "loopback"}
    running = set()
    for device, kind in events:
        assert (device in running) == (kind == "end"), events
        (running.add if kind == "start" else running.remove)(device)

    clocks = [
        (bench["target"], bench["wall_clock"]["started"], bench["wall_clock"]["finished"])
        for bench in (json.loads(path.read_text()) for path in bench_paths(sweep["workdir"]))
    ]
    for a, b in itertools.combinations(clocks, 2):
        if a[0] == b[0]:
            assert a[2] <= b[1] or b[2] <= a[1], (a, b)


def test_emulated_targets_are_tabulated_as_such_and_never_plotted_as_speed():
    from gemma_edge.measure.plots import rows_for_plot
    from gemma_edge.measure.summary import rows_of

    bench = {
        "target": "pi5_emulated",
        "emulated": True,
        "model": {"repo_id": "tests/gemma4-tiny"},
        "quantization": {"group_size": 128},
        "pte": {"per_op_mode_used": False, "size_bytes": 2_000_000},
        "runs": [
            {
                "prompt_tokens": 8,
                "new_tokens": 4,
                **{k: {"avg": 1.0, "stddev": 0.1} for k in ("prefill_tps", "decode_tps", "ttft_s")},
            }
        ],
        "load_s": 30.0,
        "peak_rss_bytes": 5e8,
        "parity": {"identical_to_host_pte": 5, "prompts": 5},
        "device": {"cpu_model": "Raspberry Pi 5 (emulated)"},
        "versions": {"device": {"executorch": "1.5.1"}},
    }
    emulated = rows_of(bench)
    real = rows_of({**bench, "target": "pi5", "emulated": False})
    assert [row["emulated"] for row in emulated + real] == [True, False]
    assert rows_for_plot("decode", emulated + real) == real and rows_for_plot("prefill", emulated + real) == real
    assert rows_for_plot("size", emulated + real) == emulated + real


def test_peer_rows_carry_the_ratio_and_an_unavailable_peer_is_a_row_not_a_gap():
    from gemma_edge.measure.plots import rows_for_plot
    from gemma_edge.measure.summary import rows_of

    speeds = {k: {"avg": 2.0, "stddev": 0.1} for k in ("prefill_tps", "decode_tps", "ttft_s")}
    bench = {
        "target": "pi5",
        "emulated": False,
        "model": {"repo_id": "tests/gemma4-tiny"},
        "quantization": {"group_size": 64},
        "pte": {"per_op_mode_used": False, "size_bytes": 2_000_000},
        "runs": [{"prompt_tokens": 8, "new_tokens": 4, **speeds}],
        "load": {"busy": False},
        "load_s": 3.0,
        "peak_rss_bytes": 5e8,
        "parity": {"identical_to_host_pte": 5, "prompts": 5},
        "device": {"cpu_model": "Cortex-A76"},
        "versions": {"device": {"executorch": "1.5.1"}},
        "engines": {
            "llamacpp-q4_0": {
                "engine": "llamacpp",
                "gguf_type": "q4_0",
                "available": True,
                "load": {"busy": True},
                "runs": [{"prompt_tokens": 8, "new_tokens": 4, **speeds}],
            },
            "llamacpp-q4_k_m": {
                "engine": "llamacpp",
                "gguf_type": "q4_k_m",
                "available": False,
                "reason": "llama-bench exited with status 132: Illegal instruction",
            },
        },
        "ratios": [{"engine": "llamacpp-q4_0", "prompt_tokens": 8, "decode": 1.25, "prefill": 2.5}],
    }
    pte, q4_0, q4_k_m = rows_of(bench)
    assert (pte["engine"], pte["busy"], pte.get("pte_decode_ratio")) == ("pte", False, None)
    assert (q4_0["variant"], q4_0["measured_beside"], q4_0["busy"]) == ("llama.cpp q4_0", "int4-g64 fused", True)
    assert (q4_0["pte_decode_ratio"], q4_0["pte_prefill_ratio"], q4_0["pte_first_token_ratio"]) == (1.25, 2.5, None)
    assert q4_k_m["available"] is False and "decode_tps" not in q4_k_m
    assert "anon_peak_mb" not in pte and "fully_connected_kernels" not in pte  # a bench.json from before they were recorded
    # What stayed resident, split, and the kernels XNNPACK picked, as the device recorded them.
    kernels = {"Fully Connected (NC, F32) GEMM": 6, "Fully Connected (NC, QP8, F32, QB4W) GEMM": 44}
    recorded = {
        **copy.deepcopy(bench),
        "resident": {"anon_peak_bytes": 1_468_000_000, "file_peak_bytes": 297_000_000},
        "xnnpack_kernels": {"traced": True, "method": "forward", "fully_connected": kernels, "kleidiai": True},
    }
    recorded["engines"]["llamacpp-q4_0"]["resident"] = {"anon_peak_bytes": 9e8, "file_peak_bytes": 1.5e9}
    pte_row, q4_0_row, _ = rows_of(recorded)
    assert (pte_row["anon_peak_mb"], pte_row["file_peak_mb"], pte_row["kleidiai"]) == (1468.0, 297.0, True)
    assert pte_row["fully_connected_kernels"] == "6× (NC, F32) GEMM; 44× (NC, QP8, F32, QB4W) GEMM"
    assert (q4_0_row["anon_peak_mb"], q4_0_row["file_peak_mb"]) == (900.0, 1500.0)
    untraced = {**bench, "xnnpack_kernels": {"traced": False, "reason": "FileNotFoundError: flatc"}}
    assert rows_of(untraced)[0]["fully_connected_kernels"] == "not traced: FileNotFoundError: flatc"
    # Beside a second .pte the same peer is measured again: the plots show it once per device.
    again = rows_of({**bench, "quantization": {"group_size": 128}})
    shown = rows_for_plot("decode", [pte, q4_0, q4_k_m, *again])
    assert [row["variant"] for row in shown] == ["int4-g64 fused", "llama.cpp q4_0", "int4-g128 fused"]
    assert rows_for_plot("size", [pte, q4_0, q4_k_m]) == [pte]
