"""Deploy and benchmark through a real OpenSSH server on loopback, and on the local target."""

import getpass

import pytest

from conftest import PINS, needs_litert, needs_llamacpp, snakemake, write_config
from gemma_edge.device.files import read_json, sha256_file
from gemma_edge.device.runtime import DECODE_METHOD
from gemma_edge.device.timing import until_eos
from gemma_edge.device.xnnpack_ops import layout
from gemma_edge.measure import summary

VARIANT = "tiny/int4-g128/xnnpack-auto"
INT4 = f"results/{VARIANT}"


@pytest.mark.parametrize("target", ["loopback", "local"])
def test_bench_json_holds_real_figures(deployed, target):
    bench = read_json(deployed["workdir"] / f"results/{target}/bench.json")
    assert bench["schema"] == "gemma-edge.bench/1" and bench["target"] == target
    assert bench["pte"]["sha256"] == sha256_file(deployed["workdir"] / INT4 / "model.pte")
    assert bench["quantization"]["group_size"] == 128
    assert bench["model"]["commit"]
    assert [run["prompt_tokens"] for run in bench["runs"]] == [8, 32]
    for run in bench["runs"]:
        for figure in ("prefill_tps", "decode_tps", "ttft_s"):
            stats = run[figure]
            assert len(stats["samples"]) == 2 and all(s > 0 for s in stats["samples"])
            assert stats["min"] <= stats["median"] <= stats["max"]
    assert bench["load_s"] > 0 and bench["peak_rss_bytes"] > 10_000_000
    assert bench["warm_load_s"] > 0
    # what stayed resident, split: the runtime's heap and buffers, and the mapped .pte and libraries
    resident = bench["resident"]
    assert resident["anon_peak_bytes"] > 10_000_000 and resident["file_peak_bytes"] > 1_000_000
    assert resident["peak_bytes"] <= bench["peak_rss_bytes"] and resident["samples"] >= 2
    assert resident["locked_peak_bytes"] == 0 and bench["page_locks"]["memlock_limit"] == 0  # nothing pinned
    assert bench["denormals_flushed"] is True  # x86 FTZ/DAZ, set by the runtime wrapper
    assert bench["decodes_with"] == DECODE_METHOD  # the .pte's one-token method
    assert bench["versions"]["device"]["executorch"] == PINS["executorch"]
    assert bench["device"]["cores"] >= 1 and bench["device"]["memory_bytes"] > 0
    # The KV cache the .pte holds, as its manifest says: 128 positions of context, 16 tokens a call.
    manifest = read_json(deployed["workdir"] / INT4 / "model.pte.manifest.json")
    assert bench["kv_cache"] == {"bytes": manifest["kv_cache_bytes"], "max_context_len": 128, "tokens_per_call": 16}
    # Every INT4 linear the quantize step made runs as one of XNNPACK's 4-bit blockwise operators in
    # a decode call; on x86, the generic dynamically quantized kernels (KleidiAI is Arm's).
    kernels = bench["xnnpack_kernels"]
    assert kernels["traced"] and kernels["method"] == DECODE_METHOD and kernels["kleidiai"] is False
    int4 = {kind: count for kind, count in kernels["fully_connected"].items() if "QB4W" in layout(kind)}
    assert sum(int4.values()) == len(manifest["quantization"]["quantized_linears"])
    # The device's memory read bandwidth, measured once before the engines, over more than its caches.
    limit = bench["bandwidth"]
    assert limit["buffer_bytes"] >= 256 * 2**20 and limit["gb_per_s"]["avg"] > 0 and len(limit["gb_per_s"]["samples"]) == 10
    assert "emulated" not in limit


@pytest.mark.parametrize("target", ["loopback", "local"])
def test_device_reproduces_the_host_tokens(deployed, target):
    parity = read_json(deployed["workdir"] / f"results/{target}/parity.json")
    host = read_json(deployed["workdir"] / INT4 / "parity.json")
    assert len(parity["prompts"]) == len(host["prompts"])
    for row, reference in zip(parity["prompts"], host["prompts"]):
        assert row["prompt_ids"] == reference["prompt_ids"]
        assert row["device_tokens"] == reference["pte_tokens"]
    log = (deployed["workdir"] / f"results/{target}/parity.log").read_text()
    assert f"{len(host['prompts'])}/{len(host['prompts'])} prompts identical to the host's run" in log


def test_upload_landed_on_the_device_with_its_hash(deployed):
    record = read_json(deployed["workdir"] / "results/loopback" / VARIANT / "deployed.json")
    pte = record["files"]["pte"]
    assert pte["uploaded"]
    assert sha256_file(pte["path"]) == pte["sha256"]
    assert (deployed["remote"] / "runner/gemma_edge/device/device_bench.py").exists()
    assert not list(deployed["remote"].rglob("*.tmp-*"))


def test_second_run_does_not_upload_again(deployed):
    result = snakemake(deployed["workdir"], "-n", "results/loopback/bench.json", "--configfile", *deployed["configs"])
    assert "Nothing to be done" in result.stdout + result.stderr
    deployed_json = f"results/loopback/{VARIANT}/deployed.json"
    snakemake(
        deployed["workdir"], "--cores", "1", deployed_json, "--configfile", *deployed["configs"], "--forcerun", "deploy_loopback"
    )
    record = read_json(deployed["workdir"] / deployed_json)
    assert not record["files"]["pte"]["uploaded"] and not record["files"]["tokenizer"]["uploaded"]


def test_unreachable_device_fails_with_one_sentence_and_no_output(workflow, tmp_path):
    config = write_config(
        tmp_path / "dead.yaml",
        {"targets": {"dead": {"kind": "ssh", "host": "127.0.0.1", "port": 9, "ssh_config": None, "connect_timeout_s": 3}}},
    )
    result = snakemake(
        workflow["workdir"],
        "--cores",
        "1",
        "results/dead/bench.json",
        "--configfile",
        str(workflow["config"]),
        str(config),
        check=False,
    )
    assert result.returncode != 0
    assert f"probe failed: {getpass.getuser()}@127.0.0.1:9 is unreachable" in result.stdout + result.stderr
    assert not (workflow["workdir"] / "results/dead").exists()


PEERS = {"llamacpp-q4_0": "Q4_0", "llamacpp-q4_k_m": "Q4_K - Medium"}


@needs_llamacpp
@pytest.mark.parametrize("target", ["loopback", "local"])
def test_llama_cpp_runs_beside_the_pte_in_the_same_bench(deployed, target):
    bench = read_json(deployed["workdir"] / f"results/{target}/bench.json")
    assert set(PEERS) <= set(bench["engines"])
    for name, model_type in PEERS.items():
        engine = bench["engines"][name]
        assert engine["available"], engine.get("reason")
        assert model_type in engine["llama_bench"]["model_type"]
        assert [run["prompt_tokens"] for run in engine["runs"]] == [8, 32]
        for run in engine["runs"]:
            for figure in ("prefill_tps", "decode_tps"):
                assert len(run[figure]["samples"]) == 2 and all(s > 0 for s in run[figure]["samples"])
        assert set(engine["load"]) == {"before", "after", "busy"}
        # llama-bench's resident memory, sampled from outside its process (test_memory checks the
        # sampler): the tiny model's runs last milliseconds, so what is asked here is only that
        # what was seen is recorded, and nothing when nothing was
        resident = engine["resident"]
        assert (resident["peak_bytes"] > 0) if resident["samples"] else (resident["peak_bytes"] is None)
    assert {(r["engine"], r["prompt_tokens"]) for r in bench["ratios"]} >= {(n, p) for n in PEERS for p in (8, 32)}
    for row in bench["ratios"]:
        pte = next(run for run in bench["runs"] if run["prompt_tokens"] == row["prompt_tokens"])
        peer = next(run for run in bench["engines"][row["engine"]]["runs"] if run["prompt_tokens"] == row["prompt_tokens"])
        assert row["decode"] == pytest.approx(pte["decode_tps"]["avg"] / peer["decode_tps"]["avg"])
    assert bench["busy"] == (bench["load"]["busy"] or any(e["load"]["busy"] for e in bench["engines"].values()))
    # Each engine's weight bytes per token (from the host's copy of its file) and its share of the bandwidth.
    limit = bench["bandwidth"]["gb_per_s"]["avg"]
    engines = [bench["engines"][name] for name in PEERS]
    for runs, weights in [(bench["runs"], bench["weight_bytes"])] + [(e["runs"], e["weight_bytes"]) for e in engines]:
        assert 0 < weights["bytes_per_token"] < weights["file"]["size_bytes"]
        for run in runs:
            assert run["weight_bytes_per_token"] == weights["bytes_per_token"]
            assert run["bandwidth_fraction"] == pytest.approx(weights["bytes_per_token"] * run["decode_tps"]["avg"] / 1e9 / limit)
    deployed_record = read_json(deployed["workdir"] / f"results/{target}" / VARIANT / "deployed.json")
    for peer in (p for p in deployed_record["peers"] if p["engine"] == "llamacpp"):  # the GGUF the host wrote, byte for byte
        gguf = deployed["workdir"] / f"results/tiny/llamacpp/model-{peer['gguf_type']}.gguf"
        assert peer["model_sha256"] == sha256_file(gguf)
        if target == "loopback":
            assert sha256_file(peer["model"]) == peer["model_sha256"] and sha256_file(peer["binary"]) == peer["binary_sha256"]


@needs_litert
@pytest.mark.parametrize("target", ["loopback", "local"])
def test_litert_lm_runs_beside_the_pte_with_our_recipe(deployed, target):
    """LiteRT-LM's .litertlm (INT4 in blocks of the .pte's group size) under the litert-lm-api wheel
    fetched for the device: its runs, ratios, and its greedy text against FP32 in the parity log."""
    bench = read_json(deployed["workdir"] / f"results/{target}/bench.json")
    engine = bench["engines"]["litert-int4-g128"]
    assert engine["available"], engine.get("reason")
    assert engine["engine"] == "litert" and engine["recipe"] == "int4-g128" and engine["versions"]["litert-lm-api"] == "0.18.1"
    assert [run["prompt_tokens"] for run in engine["runs"]] == [8, 32]
    for run in engine["runs"]:
        assert run["prefill_tokens_counted"] == [run["prompt_tokens"]] * 2 and run["decode_tokens_counted"] == [8, 8]
        for figure in ("prefill_tps", "decode_tps", "ttft_s"):
            assert len(run[figure]["samples"]) == 2 and all(s > 0 for s in run[figure]["samples"])
    assert set(engine["load"]) == {"before", "after", "busy"}
    assert engine["first_load_s"] > 0 and engine["load_s"] > 0  # first: its XNNPACK weight cache written
    assert engine["resident"]["anon_peak_bytes"] > 0 and engine["resident"]["peak_bytes"] <= engine["peak_rss_bytes"]
    assert {r["prompt_tokens"] for r in bench["ratios"] if r["engine"] == "litert-int4-g128"} == {8, 32}
    for row in (r for r in bench["ratios"] if r["engine"] == "litert-int4-g128"):  # its TTFT over the .pte's
        ours = next(run for run in bench["runs"] if run["prompt_tokens"] == row["prompt_tokens"])
        theirs = next(run for run in engine["runs"] if run["prompt_tokens"] == row["prompt_tokens"])
        assert row["first_token"] == pytest.approx(theirs["ttft_s"]["avg"] / ours["ttft_s"]["avg"])
    # The bytes a decoded token reads, from the host's copy of the .litertlm, and its share of the bandwidth.
    weights = engine["weight_bytes"]
    assert weights["artifact"] == "litertlm" and 0 < weights["bytes_per_token"] < weights["file"]["size_bytes"]
    for run in engine["runs"]:
        assert run["weight_bytes_per_token"] == weights["bytes_per_token"]
        assert run["bandwidth_fraction"] == pytest.approx(
            weights["bytes_per_token"] * run["decode_tps"]["avg"] / 1e9 / bench["bandwidth"]["gb_per_s"]["avg"]
        )
    manifest = read_json(deployed["workdir"] / "results/tiny/litert/model-int4-g128.litertlm.manifest.json")
    assert manifest["params"] == {"quantization": "int4", "group_size": 128, "max_seq_len": 128, "prefill_length": 64}
    parity = read_json(deployed["workdir"] / f"results/{target}/parity.json")
    rows = parity["peers"]["litert-int4-g128"]
    assert len(rows) == len(parity["prompts"]) and all(0 <= row["matched_host_fp32"] <= row["generated"] for row in rows)
    assert (
        "litert-int4-g128: greedy text of the same prompts" in (deployed["workdir"] / f"results/{target}/parity.log").read_text()
    )
    deployed_record = read_json(deployed["workdir"] / f"results/{target}" / VARIANT / "deployed.json")
    peer = next(p for p in deployed_record["peers"] if p["engine"] == "litert")
    wheel = read_json(deployed["workdir"] / f"results/{target}/litert/runtime.json")
    assert peer["binary_sha256"] == wheel["sha256"] and wheel["machine"] == bench["device"]["machine"]
    assert peer["model_sha256"] == manifest["sha256"]
    if target == "loopback":  # pushed, checked, and not installed: nothing but the files on the device
        assert sha256_file(peer["binary"]) == peer["binary_sha256"] and sha256_file(peer["model"]) == peer["model_sha256"]


def test_an_engine_that_cannot_run_is_reported_with_its_reason_not_a_failed_run(deployed):
    """Without llama.cpp's or LiteRT-LM's set-up on the host the bench still runs, and says why
    each engine is missing."""
    config = write_config(
        deployed["workdir"] / "bare.yaml",
        {
            "targets": {"bare": {"kind": "local", "threads": 1}},
            "bench": {"peers": {"llamacpp": ["q4_0"], "litert": ["int4"]}},
            "perf": {"llamacpp_converter": "missing/convert_hf_to_gguf.py", "litert_python": "missing/bin/python"},
        },
    )
    snakemake(deployed["workdir"], "--cores", "1", "results/bare/bench.json", "--configfile", *deployed["configs"], str(config))
    bench = read_json(deployed["workdir"] / "results/bare/bench.json")
    assert bench["engines"] == {
        "llamacpp-q4_0": {
            "engine": "llamacpp",
            "gguf_type": "q4_0",
            "available": False,
            "reason": "llama.cpp is not set up on this host: run bench/setup-llamacpp.sh once",
        },
        "litert-int4-g128": {
            "engine": "litert",
            "recipe": "int4-g128",
            "available": False,
            "reason": "LiteRT-LM is not set up on this host: run bench/setup-litert.sh once",
        },
    }
    assert bench["ratios"] == [] and bench["runs"]
    log = (deployed["workdir"] / f"logs/targets/bare/{VARIANT}/bench.log").read_text()
    assert "llamacpp-q4_0 not available: llama.cpp is not set up" in log
    assert "litert-int4-g128 not available: LiteRT-LM is not set up" in log


@pytest.mark.parametrize("target", ["loopback", "local"])
def test_executorch_runner_reproduces_the_loop_tokens_in_the_same_bench(deployed, target):
    """ExecuTorch's own LLM runner ran our .pte and the uploaded tokenizer on the device, after our
    loop: it tokenised the prompt texts to the host's ids and generated the device loop's tokens."""
    bench = read_json(deployed["workdir"] / f"results/{target}/bench.json")
    parity = read_json(deployed["workdir"] / f"results/{target}/parity.json")
    host = read_json(deployed["workdir"] / INT4 / "parity.json")
    runner = bench["executorch_runner"]
    assert runner["available"], runner.get("reason")
    assert runner["prompts"] == [p["prompt"] for p in host["prompts"]]
    assert runner["prompt_ids"] == [p["prompt_ids"] for p in host["prompts"]] and runner["prompt_ids_equal_loop"]
    eos = set(runner["eos_ids"])
    assert runner["tokens"] == [until_eos(row["device_tokens"], eos) for row in parity["prompts"]]
    assert runner["tokens_equal_loop"] and runner["loop_same_prompts"]["tokens_equal_runner"]
    for stats in (runner["stats"], runner["loop_same_prompts"]):
        for figure in ("prefill_tps", "decode_tps"):  # a rate whose span rounded to 0 ms is left out
            assert stats[figure] and all(s > 0 for s in stats[figure]["samples"]), (figure, stats[figure])
            assert stats[figure]["min"] <= stats[figure]["median"] <= stats[figure]["max"]
        # The runner's clock counts whole milliseconds: the demo's prefill can take "0 ms".
        assert len(stats["ttft_s"]["samples"]) == len(host["prompts"]) and stats["ttft_s"]["max"] > 0
        assert all(s >= 0 for s in stats["ttft_s"]["samples"])
        assert stats["load_s"] > 0
    assert len(runner["stats"]["decode_tps"]["samples"]) == len(host["prompts"])
    assert [s["prompt_tokens"] for s in runner["stats_per_prompt"]] == [len(ids) for ids in runner["prompt_ids"]]
    assert [s["generated_tokens"] for s in runner["stats_per_prompt"]] == [len(t) - 1 for t in runner["tokens"]]
    assert set(runner["load"]) == {"before", "after", "busy"}
    assert bench["busy"] == (
        bench["load"]["busy"]
        or runner["load"]["busy"]
        or any(e["load"]["busy"] for e in bench["engines"].values() if "load" in e)
    )
    assert all(row["runner_matches_host_pte"] for row in parity["prompts"])
    assert bench["parity"]["runner_identical_to_host_pte"] == len(host["prompts"])
    assert parity["executorch_runner"] == {"available": True, "tokens_equal_loop": True, "prompt_ids_equal_loop": True}
    n = len(host["prompts"])
    log = (deployed["workdir"] / f"results/{target}/parity.log").read_text()
    assert f"ExecuTorch's LLM runner: {n}/{n} prompts identical to the host's run of the same .pte" in log
    bench_log = (deployed["workdir"] / f"logs/targets/{target}/{VARIANT}/bench.log").read_text()
    assert f"{target}: ExecuTorch's LLM runner decode" in bench_log and "tokens equal to our loop's" in bench_log


def test_executorch_runner_columns_in_the_summary(deployed):
    row = next(r for r in summary.rows_of(read_json(deployed["workdir"] / "results/local/bench.json")) if r["engine"] == "pte")
    runner = read_json(deployed["workdir"] / "results/local/bench.json")["executorch_runner"]
    assert row["runner_decode_tps"] == round(runner["stats"]["decode_tps"]["avg"], 2) > 0
    assert row["runner_tokens_equal"] is True
