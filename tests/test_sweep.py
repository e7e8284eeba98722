"""A sweep over two group sizes and two targets (local and the loopback SSH server): summary,
plots, HTML report, and one benchmark per device at a time."""

import csv
import itertools
import struct

import pytest
import yaml

from conftest import needs_litert, needs_llamacpp, snakemake, write_config


@pytest.fixture(scope="module")
def sweep(deployed):
    targets = yaml.safe_load(deployed["targets_config"].read_text())
    config = write_config(deployed["workdir"] / "sweep.yaml", {
        **targets, "sweep": {"group_sizes": [64, 128], "per_op_modes": ["auto"], "targets": ["local", "loopback"]},
    })
    configs = [deployed["configs"][0], str(config)]
    workdir = deployed["workdir"]
    snakemake(workdir, "--cores", "2", "results/summary.csv", "--configfile", *configs)
    # All four benchmarks again, ready at once: only the device resources keep them apart.
    snakemake(workdir, "--cores", "4", "results/summary.csv", "--configfile", *configs, "--forcerun", "bench_local", "bench_loopback")
    snakemake(workdir, "--report", str(workdir / "report.html"), "results/summary.csv", "--configfile", *configs)
    return {"workdir": workdir, "configs": configs}


def bench_paths(workdir):
    return [workdir / f"results/{t}/tiny/int4-g{g}/xnnpack-auto/bench.json" for t in ("local", "loopback") for g in (64, 128)]


def test_summary_has_every_target_variant_and_prompt_length(sweep):
    rows = list(csv.DictReader((sweep["workdir"] / "results/summary.csv").open()))
    pte = [r for r in rows if r["engine"] == "pte"]
    assert {(r["target"], r["group_size"], r["prompt_tokens"]) for r in pte} == set(
        itertools.product(["local", "loopback"], ["64", "128"], ["8", "32"]))
    for row in pte:
        assert float(row["decode_tps"]) > 0 and float(row["prefill_tps"]) > 0
        assert row["device_identical_to_host_pte"] == "5/5"
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
    assert {(r["target"], r["engine"], r["measured_beside"], r["prompt_tokens"]) for r in peers} == set(itertools.product(
        ["local", "loopback"], ["llamacpp-q4_0", "llamacpp-q4_k_m"], ["int4-g64 fused", "int4-g128 fused"], ["8", "32"]))
    for row in peers:
        assert row["available"] == "True" and float(row["decode_tps"]) > 0
        assert float(row["pte_decode_ratio"]) > 0 and float(row["pte_prefill_ratio"]) > 0


@needs_litert
def test_summary_sets_litert_lm_with_the_same_group_size_beside_each_pte(sweep):
    rows = list(csv.DictReader((sweep["workdir"] / "results/summary.csv").open()))
    peers = [r for r in rows if r["engine"].startswith("litert")]
    assert {(r["target"], r["engine"], r["variant"], r["measured_beside"], r["prompt_tokens"]) for r in peers} == {
        (target, f"litert-int4-g{g}", f"LiteRT-LM int4-g{g}", f"int4-g{g} fused", length)
        for target in ("local", "loopback") for g in (64, 128) for length in ("8", "32")}
    for row in peers:
        assert row["available"] == "True" and float(row["decode_tps"]) > 0 and float(row["pte_decode_ratio"]) > 0
        assert int(row["weight_bytes_per_token"]) > 0 and float(row["bandwidth_fraction"]) > 0


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("plot", ["decode", "prefill", "size", "parity"])
def test_plots_are_real_images(sweep, plot):
    path = sweep["workdir"] / f"results/plots/{plot}.png"
    width, height = png_size(path)
    assert width >= 300 and height >= 200
    assert path.stat().st_size > 8000


def test_html_report_holds_the_plots_and_table(sweep):
    html = (sweep["workdir"] / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in ("summary.csv", "decode.png", "prefill.png", "size.png", "parity.png", "Sweep"):
        assert name in html, name


def test_one_benchmark_per_device_at_a_time_but_devices_in_parallel(sweep):
    import json

    clocks = {}
    for path in bench_paths(sweep["workdir"]):
        bench = json.loads(path.read_text())
        clocks[path] = (bench["target"], bench["wall_clock"]["started"], bench["wall_clock"]["finished"])

    def overlap(a, b):
        return a[1] < b[2] and b[1] < a[2]

    pairs = list(itertools.combinations(clocks.values(), 2))
    same_device = [(a, b) for a, b in pairs if a[0] == b[0]]
    cross_device = [(a, b) for a, b in pairs if a[0] != b[0]]
    assert same_device and not any(overlap(a, b) for a, b in same_device)
    assert any(overlap(a, b) for a, b in cross_device)


def test_emulated_targets_are_tabulated_as_such_and_never_plotted_as_speed():
    from gemma_edge.summary import rows_for_plot, rows_of

    bench = {"target": "pi5_emulated", "emulated": True, "model": {"repo_id": "tests/gemma4-tiny"},
             "quantization": {"group_size": 128}, "pte": {"per_op_mode_used": False, "size_bytes": 2_000_000},
             "runs": [{"prompt_tokens": 8, "new_tokens": 4, **{k: {"avg": 1.0, "stddev": 0.1} for k in ("prefill_tps", "decode_tps", "ttft_s")}}],
             "load_s": 30.0, "peak_rss_bytes": 5e8, "parity": {"identical_to_host_pte": 5, "prompts": 5},
             "device": {"cpu_model": "Raspberry Pi 5 (emulated)"}, "versions": {"device": {"executorch": "1.5.1"}}}
    emulated = rows_of(bench)
    real = rows_of({**bench, "target": "pi5", "emulated": False})
    assert [row["emulated"] for row in emulated + real] == [True, False]
    assert rows_for_plot("decode", emulated + real) == real and rows_for_plot("prefill", emulated + real) == real
    assert rows_for_plot("size", emulated + real) == emulated + real


def test_peer_rows_carry_the_ratio_and_an_unavailable_peer_is_a_row_not_a_gap():
    from gemma_edge.summary import rows_for_plot, rows_of

    speeds = {k: {"avg": 2.0, "stddev": 0.1} for k in ("prefill_tps", "decode_tps", "ttft_s")}
    bench = {"target": "pi5", "emulated": False, "model": {"repo_id": "tests/gemma4-tiny"},
             "quantization": {"group_size": 64}, "pte": {"per_op_mode_used": False, "size_bytes": 2_000_000},
             "runs": [{"prompt_tokens": 8, "new_tokens": 4, **speeds}], "load": {"busy": False},
             "load_s": 3.0, "peak_rss_bytes": 5e8, "parity": {"identical_to_host_pte": 5, "prompts": 5},
             "device": {"cpu_model": "Cortex-A76"}, "versions": {"device": {"executorch": "1.5.1"}},
             "engines": {"llamacpp-q4_0": {"engine": "llamacpp", "gguf_type": "q4_0", "available": True, "load": {"busy": True},
                                           "runs": [{"prompt_tokens": 8, "new_tokens": 4, **speeds}]},
                         "llamacpp-q4_k_m": {"engine": "llamacpp", "gguf_type": "q4_k_m", "available": False,
                                             "reason": "llama-bench exited with status 132: Illegal instruction"}},
             "ratios": [{"engine": "llamacpp-q4_0", "prompt_tokens": 8, "decode": 1.25, "prefill": 2.5}]}
    pte, q4_0, q4_k_m = rows_of(bench)
    assert (pte["engine"], pte["busy"], pte.get("pte_decode_ratio")) == ("pte", False, None)
    assert (q4_0["variant"], q4_0["measured_beside"], q4_0["busy"]) == ("llama.cpp q4_0", "int4-g64 fused", True)
    assert (q4_0["pte_decode_ratio"], q4_0["pte_prefill_ratio"]) == (1.25, 2.5)
    assert q4_k_m["available"] is False and "decode_tps" not in q4_k_m
    # Beside a second .pte the same peer is measured again: the plots show it once per device.
    again = rows_of({**bench, "quantization": {"group_size": 128}})
    shown = rows_for_plot("decode", [pte, q4_0, q4_k_m, *again])
    assert [row["variant"] for row in shown] == ["int4-g64 fused", "llama.cpp q4_0", "int4-g128 fused"]
    assert rows_for_plot("size", [pte, q4_0, q4_k_m]) == [pte]
