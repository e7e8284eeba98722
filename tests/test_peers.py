"""The peer engines' plumbing on this machine: llama-bench built for a device's CPU and LiteRT-LM's
runtime fetched for it (or a record saying why it cannot be), peers' text compared with FP32's
tokens, and the machine-load sampling that flags a benchmark taken while the machine was busy.
Real llama-bench and LiteRT-LM runs beside the .pte are in test_deploy, test_litert and test_emulated."""

import subprocess
import sys
import time

import pytest

from conftest import REPO
from gemma_edge.device import peer_bench
from gemma_edge.device.facts import device_facts
from gemma_edge.device.files import read_json
from gemma_edge.peers import litert, litert_runtime, llamacpp_build
from gemma_edge.reach.sysroot import PI5_FEATURES


def test_llama_bench_is_compiled_for_the_devices_own_instruction_set():
    pi5 = llamacpp_build.cpu_options("aarch64", list(PI5_FEATURES))
    assert pi5 == ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]  # Cortex-A76: dot product and FP16, no i8mm or SVE
    assert llamacpp_build.cpu_options("aarch64", ["fp", "asimd"]) == ["-DGGML_CPU_ARM_ARCH=armv8-a"]
    facts = device_facts()
    if facts["machine"] == "x86_64":
        host = dict(
            option.removeprefix("-D").split("=") for option in llamacpp_build.cpu_options("x86_64", facts["cpu_features"])
        )
        assert host["GGML_AVX2"] == ("ON" if "avx2" in facts["cpu_features"] else "OFF")
        assert host["GGML_AVX512"] == ("ON" if "avx512f" in facts["cpu_features"] else "OFF")
    # One cache entry per source release, machine and flag set: a Pi 5 and this host never share one.
    assert llamacpp_build.cache_key("0.3.36", "aarch64", pi5) != llamacpp_build.cache_key("0.3.36", "aarch64", ["-DX=1"])


def test_a_device_llama_cpp_cannot_be_built_for_is_recorded_with_the_reason(tmp_path):
    sdist = tmp_path / "missing.tar.gz"
    record = llamacpp_build.build_for_device(
        sdist,
        "0.3.36",
        {"machine": "x86_64", "cpu_features": []},
        tmp_path / "bin",
        tmp_path / "llama-bench.json",
        cache=tmp_path / "cache",
    )
    assert record == read_json(tmp_path / "llama-bench.json")
    assert record["available"] is False and "bench/setup-llamacpp.sh" in record["reason"]
    sdist.write_bytes(b"")
    record = llamacpp_build.build_for_device(
        sdist,
        "0.3.36",
        {"machine": "riscv64", "cpu_features": []},
        tmp_path / "bin",
        tmp_path / "llama-bench.json",
        cache=tmp_path / "cache",
    )
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


def test_litert_runtime_is_refused_where_its_wheel_cannot_run(tmp_path):
    assert litert_runtime.check_device({"machine": "aarch64", "libc": ["glibc", "2.36"]}) == "aarch64"
    for device, why in (
        ({"machine": "riscv64", "libc": ["glibc", "2.36"]}, "no wheel for a riscv64 CPU"),
        ({"machine": "aarch64", "libc": ["glibc", "2.24"]}, "glibc 2.24 is older than the 2.27"),
        ({"machine": "x86_64", "libc": ["musl", "1.2"]}, "needs glibc"),
    ):
        record = litert_runtime.runtime_for_device(
            REPO / "requirements-litert.txt", device, tmp_path / "wheel", tmp_path / "runtime.json", cache=tmp_path / "cache"
        )
        assert record == read_json(tmp_path / "runtime.json")
        assert record["available"] is False and why in record["reason"], record
    assert not list((tmp_path / "wheel").iterdir()) and not (tmp_path / "cache").exists()
    assert litert_runtime.pinned_version(REPO / "requirements-litert.txt") == "0.18.1"


def test_litert_recipes_and_a_missing_converter():
    assert litert.parse_recipe("int4-g64") == ("int4", 64)
    assert litert.parse_recipe("fp32") == ("fp32", None) and litert.parse_recipe("int8") == ("int8", None)
    for bad in ("int4", "fp32-g32", "int3-g32", "int4-gx"):
        with pytest.raises(ValueError, match="expected fp32, int8 or int4-g<group size>"):
            litert.parse_recipe(bad)
    with pytest.raises(litert.ConverterMissing, match="run bench/setup-litert.sh once"):
        litert.converter_python(REPO / "no-such-venv/bin/python")


def test_litert_unavailable_or_failing_on_the_device_becomes_a_reason(tmp_path):
    engine = peer_bench.bench_litert({"recipe": "int4-g128", "available": False, "reason": "no wheel"}, {}, 10)
    assert engine == {"engine": "litert", "recipe": "int4-g128", "available": False, "reason": "no wheel"}
    broken = tmp_path / "litert_lm_api.whl"
    broken.write_bytes(b"not a zip")
    spec = {"prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "warmup": 0, "threads": 1}
    peer = {"recipe": "int4-g128", "binary": str(broken), "model": str(tmp_path / "model.litertlm")}
    engine = peer_bench.bench_litert(peer, spec, 30)
    assert engine["available"] is False and "could not be unpacked" in engine["reason"]
    import zipfile

    with zipfile.ZipFile(broken, "w") as empty:  # a wheel without litert_lm: the child cannot import it
        empty.writestr("nothing.txt", "")
    engine = peer_bench.bench_litert(peer, spec, 30)
    assert engine["available"] is False and "exited with status 1" in engine["reason"] and "litert_lm" in engine["reason"]


def test_a_peers_text_is_matched_against_fp32s_tokens(demo_checkpoint):
    """LiteRT-LM returns text: a byte-fallback token and a vocabulary piece of the same text count
    as the same; a different word ends the match."""
    from tokenizers import Tokenizer

    from gemma_edge.measure.device_parity import tokens_matched_as_text

    tokenizer = Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    prompt = [2] + tokenizer.encode("Return a new list of", add_special_tokens=False).ids
    reference = tokenizer.encode(" the names of files", add_special_tokens=False).ids
    text = tokenizer.decode(prompt + reference)[len(tokenizer.decode(prompt)) :]
    assert text == " the names of files"
    assert tokens_matched_as_text(tokenizer, prompt, reference, text) == len(reference)
    assert tokens_matched_as_text(tokenizer, prompt, reference, text[:8]) < len(reference)
    assert tokens_matched_as_text(tokenizer, prompt, reference, " a different text") == 0
    space = tokenizer.token_to_id("<0x20>")
    assert space is not None and tokenizer.decode(prompt + [space])[len(tokenizer.decode(prompt)) :] == " "
    spelled_apart = [space] + tokenizer.encode("the names of files", add_special_tokens=False).ids
    assert spelled_apart[:2] != reference[:2]
    assert tokens_matched_as_text(tokenizer, prompt, spelled_apart, text) == len(spelled_apart)


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
    cores = device_facts()["cores"]
    # One spinning process holds up to one core; on a loaded machine it gets less than all of one.
    assert after[busy.pid][1] > before[busy.pid][1]
    assert 0.25 / cores < load["other_cpu_share"] <= 1.0
    assert load["busiest"] and load["busiest"][0]["cpu_share"] >= 0.25  # it, or something busier
    assert load["loadavg_1m"] >= 0
    _, sampled = peer_bench.timed_with_load(lambda: None)
    assert set(sampled) == {"before", "after", "busy"} and isinstance(sampled["busy"], bool)
