"""The peer engines' plumbing on this machine: llama-bench built for a device's CPU (or a record
saying why it cannot be), and the machine-load sampling that flags a benchmark taken while the
machine was busy. Real llama-bench runs beside the .pte are in test_deploy and test_emulated."""

import subprocess
import sys
import time

from gemma_edge import device_bench, emulator, llamacpp_build, peer_bench
from gemma_edge.artifacts import read_json


def test_llama_bench_is_compiled_for_the_devices_own_instruction_set():
    pi5 = llamacpp_build.cpu_options("aarch64", list(emulator.PI5_FEATURES))
    assert pi5 == ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]  # Cortex-A76: dot product and FP16, no i8mm or SVE
    assert llamacpp_build.cpu_options("aarch64", ["fp", "asimd"]) == ["-DGGML_CPU_ARM_ARCH=armv8-a"]
    facts = device_bench.device_facts()
    if facts["machine"] == "x86_64":
        host = dict(option.removeprefix("-D").split("=") for option in llamacpp_build.cpu_options("x86_64", facts["cpu_features"]))
        assert host["GGML_AVX2"] == ("ON" if "avx2" in facts["cpu_features"] else "OFF")
        assert host["GGML_AVX512"] == ("ON" if "avx512f" in facts["cpu_features"] else "OFF")
    # One cache entry per source release, machine and flag set: a Pi 5 and this host never share one.
    assert llamacpp_build.cache_key("0.3.36", "aarch64", pi5) != llamacpp_build.cache_key("0.3.36", "aarch64", ["-DX=1"])


def test_a_device_llama_cpp_cannot_be_built_for_is_recorded_with_the_reason(tmp_path):
    sdist = tmp_path / "missing.tar.gz"
    record = llamacpp_build.build_for_device(sdist, "0.3.36", {"machine": "x86_64", "cpu_features": []},
                                             tmp_path / "bin", tmp_path / "llama-bench.json", cache=tmp_path / "cache")
    assert record == read_json(tmp_path / "llama-bench.json")
    assert record["available"] is False and "bench/setup-llamacpp.sh" in record["reason"]
    sdist.write_bytes(b"")
    record = llamacpp_build.build_for_device(sdist, "0.3.36", {"machine": "riscv64", "cpu_features": []},
                                             tmp_path / "bin", tmp_path / "llama-bench.json", cache=tmp_path / "cache")
    assert record["available"] is False and "riscv64" in record["reason"]
    assert not list((tmp_path / "bin").iterdir()) and not (tmp_path / "cache").exists()


def test_a_peer_reported_unavailable_is_carried_through_not_run():
    engine = peer_bench.bench_llamacpp({"gguf_type": "q4_0", "available": False, "reason": "no cross compiler"}, {}, 10)
    assert engine == {"engine": "llamacpp", "gguf_type": "q4_0", "available": False, "reason": "no cross compiler"}
    assert peer_bench.ratios([], {"llamacpp-q4_0": engine}) == []


def test_a_program_that_fails_on_the_device_becomes_a_reason(tmp_path):
    spec = {"prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "threads": 1}
    peer = {"gguf_type": "q4_0", "binary": str(tmp_path / "llama-bench"), "model": str(tmp_path / "model.gguf")}
    engine = peer_bench.bench_llamacpp(peer, spec, 10)
    assert engine["available"] is False and "could not be started" in engine["reason"]
    failing = tmp_path / "llama-bench"
    failing.write_text("#!/bin/sh\necho 'illegal instruction' >&2\nexit 132\n")
    failing.chmod(0o755)
    engine = peer_bench.bench_llamacpp(peer, spec, 10)
    assert engine["reason"] == "llama-bench exited with status 132: illegal instruction"


def test_machine_load_sees_another_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = peer_bench._process_cpu_ticks(set())
        load = peer_bench.machine_load(window_s=1.0)
        after = peer_bench._process_cpu_ticks(set())
    finally:
        busy.kill()
        busy.wait()
    cores = device_bench.device_facts()["cores"]
    # One spinning process holds up to one core; on a loaded machine it gets less than all of one.
    assert after[busy.pid][1] > before[busy.pid][1]
    assert 0.25 / cores < load["other_cpu_share"] <= 1.0
    assert load["busiest"] and load["busiest"][0]["cpu_share"] >= 0.25  # it, or something busier
    assert load["loadavg_1m"] >= 0
    _, sampled = peer_bench.timed_with_load(lambda: None)
    assert set(sampled) == {"before", "after", "busy"} and isinstance(sampled["busy"], bool)
