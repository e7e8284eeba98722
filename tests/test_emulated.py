"""The Pi 5 before the Pi: an emulated Cortex-A76 (QEMU user mode, Debian's arm64 CPython 3.11,
the real aarch64 wheels) behind a real OpenSSH server on loopback, provisioned with a virtualenv
from the wheelhouse the host downloads, then deployed to and benchmarked like a Pi.

The emulator's sysroot is built once per machine and cached (gemma_edge.reach.emulator); the device's
virtualenv is created and installed for real in every run, in a fresh device folder."""

import copy
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, PINS, REPO, needs_litert, needs_llamacpp, qemu_unavailable, require, snakemake, write_config
from gemma_edge.device import bandwidth
from gemma_edge.device.facts import runner_libraries, runner_preflight
from gemma_edge.device.files import read_json
from gemma_edge.device.xnnpack_ops import layout
from gemma_edge.reach import emulator, loopback_sshd, provision
from gemma_edge.reach.sysroot import sysroot_of
from gemma_edge.reach.target import DeviceError, Target
from gemma_edge.workflow.config import validate_config
from readme import emulator_commands, run_readme_line

TARGET = "pi5_emulated"
VARIANTS = {"int4": "tiny/int4-g128/xnnpack-auto", "fp32": "tiny/fp32/xnnpack-auto"}
SCHEMA = REPO / "schemas/config.schema.yaml"
PI5_FEATURES = "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp".split()


@pytest.fixture(scope="session")
def pi5_emulator():
    """The emulated Pi set up with the README's own commands, as written: `setup` (cached per
    machine: a second call checks the stamp and the guest and builds nothing), `serve` (its
    loopback sshd and ssh_config) and, unless it was already serving, `stop` at the end."""
    require(qemu_unavailable())
    require(loopback_sshd.unavailable())
    root = emulator.default_root()
    commands = emulator_commands()
    run_readme_line(commands["setup"])
    already_serving = emulator.running_port(root)
    run_readme_line(commands["serve"])
    yield root
    if not already_serving:
        run_readme_line(commands["stop"])


@pytest.fixture(scope="session")
def emulated(workflow, pi5_emulator, tmp_path_factory):
    """The config's pi5_emulated target (reached through the ssh_config alias `serve` wrote):
    provision (virtualenv from the wheelhouse), deploy and benchmark the INT4 and FP32 .pte, on a
    fresh device folder."""
    remote = tmp_path_factory.mktemp("pi5-device") / "gemma-edge"
    overrides = {"workdir": str(remote), "ssh_config": str(pi5_emulator / "ssh/ssh_config"), "command_timeout_s": 600}
    config = write_config(
        workflow["workdir"] / "pi5-emulated.yaml",
        {
            "targets": {TARGET: overrides},
            "bench": {"prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "warmup": 1},
        },
    )
    configs = [str(workflow["config"]), str(config)]
    outputs = [f"results/{TARGET}/{variant}/bench.json" for variant in VARIANTS.values()]
    run = snakemake(workflow["workdir"], "--cores", "2", *outputs, "--configfile", *configs)
    merged = copy.deepcopy(DEFAULT_CONFIG)
    merged["targets"][TARGET].update(overrides)
    settings = validate_config(merged, SCHEMA)["targets"][TARGET]
    yield {"workdir": workflow["workdir"], "remote": remote, "configs": configs, "settings": settings, "run": run}
    # About 8 GB: the wheelhouse on the host and the installed virtualenv.
    for folder in (workflow["workdir"] / f"results/{TARGET}/wheelhouse", remote):
        shutil.rmtree(folder, ignore_errors=True)


def test_the_device_is_an_emulated_cortex_a76_with_debian_python(emulated):
    device = read_json(emulated["workdir"] / f"results/{TARGET}/device.json")
    assert device["machine"] == "aarch64" and device["emulated"] is True
    assert device["emulator"] == {"qemu_cpu": "cortex-a76"}
    assert set(PI5_FEATURES) <= set(device["cpu_features"])
    assert device["xnnpack_features"] == {"neon": True, "dotprod": True, "fp16": True, "i8mm": False, "sve": False}
    assert device["python"] == "3.11.2" and device["libc"] == ["glibc", "2.36"]
    assert (
        provision.public_version(device["versions"]["torch"]) == PINS["torch"]
        and device["versions"]["executorch"] == PINS["executorch"]
    )
    assert device["library_alignment"]["bytes"] >= device["page_size"]


def test_the_emulated_bandwidth_figure_is_the_short_form_and_says_so(emulated):
    """The probe found the device emulated; the benchmark measured the bandwidth on the smallest
    buffer, not on eight of the host's caches (a minute a benchmark under QEMU)."""
    for variant in VARIANTS.values():
        limit = read_json(emulated["workdir"] / f"results/{TARGET}/{variant}/bench.json")["bandwidth"]
        assert limit["emulated"] is True and limit["buffer_bytes"] == bandwidth.MIN_BUFFER_BYTES
        assert len(limit["gb_per_s"]["samples"]) == bandwidth.EMULATED_REPETITIONS and limit["gb_per_s"]["avg"] > 0


def test_the_virtualenv_was_installed_offline_from_the_host_built_wheelhouse(emulated):
    workdir, remote = emulated["workdir"], emulated["remote"]
    wheelhouse = read_json(workdir / f"results/{TARGET}/wheelhouse.json")
    assert wheelhouse["platform"]["machine"] == "aarch64"
    names = {wheel["name"].lower() for wheel in wheelhouse["wheels"]}
    assert {"executorch", "torch", "numpy"} <= names and "coremltools" not in names  # x86-only dependency left out
    device = read_json(workdir / f"results/{TARGET}/device.json")
    assert device["wheels"]["files"] == [
        {k: w[k] for k in ("filename", "name", "version", "sha256")} for w in wheelhouse["wheels"]
    ]
    assert sorted(device["wheels"]["installed_now"]) == sorted(w["filename"] for w in wheelhouse["wheels"])
    assert (remote / "venv/bin/python").exists()
    # Installed and verified, the wheels left the device (keep_wheelhouse: false by default).
    assert device["wheels"]["wheelhouse_kept"] is False and not (remote / "wheelhouse").exists()
    assert "removed the wheelhouse from the device" in (workdir / f"logs/targets/{TARGET}/provision.log").read_text()


def test_provisioning_again_installs_nothing(emulated):
    device_json = f"results/{TARGET}/device.json"
    snakemake(emulated["workdir"], "--cores", "1", device_json, "--configfile", *emulated["configs"], "--forcerun", "provision")
    device = read_json(emulated["workdir"] / device_json)
    assert device["wheels"]["installed_now"] == []
    log = (emulated["workdir"] / f"logs/targets/{TARGET}/provision.log").read_text()
    assert "nothing to install" in log


# The A76's int8 GEMMs (NEON dot product) and the host's (AVX2) round the INT4 program's dynamically
# quantized activations differently, so where two logits are this close the device may pick the
# other one. Seen on the demo model's unseen prompt: host margin 0.025 at its 11th token.
NEAR_TIE = 0.1


def host_margin_at_divergence(pte, prompt_ids: list[int], host_tokens: list[int], device_tokens: list[int]) -> float:
    """How far the host's .pte preferred its token over the device's where the two first differ."""
    from gemma_edge.device.runtime import PteDecoder

    index = next(i for i, (a, b) in enumerate(zip(host_tokens, device_tokens)) if a != b)
    logits = PteDecoder(pte).step(prompt_ids + host_tokens[:index], 0)
    return float(logits[host_tokens[index]] - logits[device_tokens[index]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_emulated_pi_decodes_the_hosts_tokens_exactly_but_at_near_ties(emulated, variant):
    """FP32: every token equal. INT4: the trained prompts equal; a divergence only where the host's
    own .pte had a near-tie (its top two logits within NEAR_TIE), checked on the host's logits."""
    workdir = emulated["workdir"]
    bench = read_json(workdir / f"results/{TARGET}/{VARIANTS[variant]}/bench.json")
    host = read_json(workdir / f"results/{VARIANTS[variant]}/parity.json")
    parity = read_json(workdir / f"results/{TARGET}/{VARIANTS[variant]}/parity.json")
    assert bench["emulated"] is True and bench["device"]["machine"] == "aarch64"
    different = [(row, p) for row, p in zip(parity["prompts"], host["prompts"]) if row["device_tokens"] != p["pte_tokens"]]
    assert bench["parity"]["identical_to_host_pte"] == len(host["prompts"]) - len(different)
    if variant == "fp32":
        assert not different
    trained = DEFAULT_CONFIG["verify"]["prompts"][:-1]  # the last default prompt is the unseen one
    for row, reference in different:
        assert row["prompt"] not in trained
        margin = host_margin_at_divergence(
            workdir / f"results/{VARIANTS[variant]}/model.pte",
            reference["prompt_ids"],
            reference["pte_tokens"],
            row["device_tokens"],
        )
        assert 0 <= margin < NEAR_TIE, (row["prompt"], margin)
    # The .pte was lowered with fused XNNPACK subgraphs on the host; the A76 loaded and ran it.
    assert bench["pte"]["per_op_mode_used"] is False and bench["pte"]["fused_accepted_on_device"] is True


def test_every_int4_linear_takes_kleidiais_kernel_on_the_emulated_a76(emulated):
    """XNNPACK picks a fully-connected kernel per linear at load, from the CPU's features: on the
    A76 (dot product, no i8mm), the aarch64 wheel's KleidiAI kernels (QP8 x QB4W) for every INT4
    linear the quantize step made; the FP32 program has none to give them."""
    workdir = emulated["workdir"]
    for variant, expected in (("int4", True), ("fp32", False)):
        kernels = read_json(workdir / f"results/{TARGET}/{VARIANTS[variant]}/bench.json")["xnnpack_kernels"]
        assert kernels["traced"] and kernels["kleidiai"] is expected, kernels
        kleidiai = sum(count for kind, count in kernels["fully_connected"].items() if layout(kind)[1:2] == ["QP8"])
        manifest = read_json(workdir / f"results/{VARIANTS[variant]}/model.pte.manifest.json")
        assert kleidiai == len(manifest["quantization"]["quantized_linears"] if variant == "int4" else [])
    log = (workdir / f"logs/targets/{TARGET}/{VARIANTS['int4']}/bench.log").read_text()
    assert "XNNPACK fully-connected kernels in one decode call:" in log and "(NC, QP8, F32, QB4W)" in log


def test_a_wheel_for_another_platform_is_refused_before_anything_is_sent(emulated, tmp_path):
    workdir = emulated["workdir"]
    record = read_json(workdir / f"results/{TARGET}/wheelhouse.json")
    numpy = next(w for w in record["wheels"] if w["name"].lower() == "numpy")
    numpy["filename"] = f"numpy-{numpy['version']}-cp311-cp311-manylinux_2_28_x86_64.whl"
    wrong = tmp_path / "wheelhouse.json"
    wrong.write_text(json.dumps(record))
    settings = {**emulated["settings"], "workdir": str(tmp_path / "fresh-device")}
    with pytest.raises(
        DeviceError,
        match=rf"{numpy['filename']}, built for manylinux_2_28_x86_64, which this device "
        r"\(aarch64, CPython 3.11, glibc 2.36\) cannot install",
    ):
        provision.provision(
            Target.of(TARGET, settings),
            tmp_path / "device.json",
            workdir / f"results/{TARGET}/platform.json",
            wrong,
            workdir / f"results/{TARGET}/wheelhouse",
        )
    assert not (tmp_path / "device.json").exists()
    assert not list(Path(settings["workdir"]).rglob("*.whl"))


@needs_llamacpp
def test_llama_cpp_cross_built_for_the_cortex_a76_runs_on_the_emulated_pi(emulated):
    record = read_json(emulated["workdir"] / f"results/{TARGET}/llamacpp/llama-bench.json")
    assert record["available"] and record["machine"] == "aarch64" and record["static"]
    assert record["cpu_options"] == ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
    header = (emulated["workdir"] / record["binary"]).read_bytes()[:20]
    assert header[:5] == b"\x7fELF\x02" and header[18:20] == b"\xb7\x00"  # 64-bit ELF for aarch64 (EM_AARCH64)
    bench = read_json(emulated["workdir"] / f"results/{TARGET}/{VARIANTS['int4']}/bench.json")
    for name in ("llamacpp-q4_0", "llamacpp-q4_k_m"):
        engine = bench["engines"][name]
        assert engine["available"], engine.get("reason")
        assert engine["runs"][0]["prompt_tokens"] == 8 and engine["runs"][0]["decode_tps"]["avg"] > 0
    assert {row["engine"] for row in bench["ratios"]} >= {"llamacpp-q4_0", "llamacpp-q4_k_m"}


@needs_litert
def test_litert_lm_runs_on_the_emulated_pi_from_the_aarch64_wheel(emulated):
    """The litert-lm-api wheel fetched for the device's CPU, pushed, unpacked in a scratch folder and
    run: LiteRT-LM's INT4 model benchmarks and decodes the parity prompts on the emulated Cortex-A76."""
    runtime = read_json(emulated["workdir"] / f"results/{TARGET}/litert/runtime.json")
    assert runtime["available"] and runtime["machine"] == "aarch64"
    assert runtime["binary"].endswith("manylinux_2_27_aarch64.whl")
    bench = read_json(emulated["workdir"] / f"results/{TARGET}/{VARIANTS['int4']}/bench.json")
    engine = bench["engines"]["litert-int4-g128"]
    assert engine["available"], engine.get("reason")
    assert engine["device"]["machine"] == "aarch64" and engine["device"]["qemu_cpu"] == "cortex-a76"
    assert engine["runs"][0]["decode_tokens_counted"] == [4] and engine["runs"][0]["decode_tps"]["avg"] > 0
    parity = read_json(emulated["workdir"] / f"results/{TARGET}/{VARIANTS['int4']}/parity.json")
    host = read_json(emulated["workdir"] / f"results/{VARIANTS['int4']}/parity.json")
    assert len(parity["peers"]["litert-int4-g128"]) == len(host["prompts"])


RUNNER_EXTENSION = "executorch/extension/llm/runner/_llm_runner.cpython-311-aarch64-linux-gnu.so"


@pytest.mark.parametrize("variant", VARIANTS)
def test_executorch_runner_on_the_emulated_pi_generates_exactly_its_loops_tokens(emulated, variant):
    """The aarch64 executorch wheel ships the LLM runner's binding, whose extension links
    libatomic.so.1 (the emulator's sysroot has Debian's libatomic1, as Raspberry Pi OS has): the
    runner loads our .pte on the Cortex-A76, tokenises the prompt texts to the host's ids and
    generates exactly the device loop's tokens."""
    workdir = emulated["workdir"]
    device = read_json(workdir / f"results/{TARGET}/device.json")
    assert device["llm_runner_libraries"] == {
        "extension": Path(RUNNER_EXTENSION).name,
        "needs": {"libatomic.so.1": "/usr/lib/aarch64-linux-gnu/libatomic.so.1"},
    }
    bench = read_json(workdir / f"results/{TARGET}/{VARIANTS[variant]}/bench.json")
    runner = bench["executorch_runner"]
    assert runner["available"], runner.get("reason")
    assert runner["prompt_ids_equal_loop"] and runner["tokens_equal_loop"]
    assert runner["loop_same_prompts"]["tokens_equal_runner"]
    assert runner["stats"]["decode_tps"]["avg"] > 0 and runner["stats"]["load_s"] > 0
    log = (workdir / f"results/{TARGET}/{VARIANTS[variant]}/parity.log").read_text()
    assert "ExecuTorch's LLM runner: " in log and "its tokens equal the device loop's" in log


def test_a_pi_without_libatomic_gets_the_runner_left_out_with_the_fix(emulated, pi5_emulator, tmp_path):
    """The real aarch64 runner extension against the emulator's own sysroot, and against a copy of
    its library folder without libatomic1's files (a Pi without that package): the pre-flight
    finds the library in the first and names the fix for the second."""
    workdir = emulated["workdir"]
    wheelhouse = read_json(workdir / f"results/{TARGET}/wheelhouse.json")
    wheel = next(w for w in wheelhouse["wheels"] if w["name"].lower() == "executorch")
    with zipfile.ZipFile(workdir / f"results/{TARGET}/wheelhouse" / wheel["filename"]) as archive:
        extension = Path(archive.extract(RUNNER_EXTENSION, tmp_path / "wheel"))
    sysroot = sysroot_of(pi5_emulator)
    found = runner_libraries(extension, "aarch64", sysroot)
    assert found["needs"] == {"libatomic.so.1": "/usr/lib/aarch64-linux-gnu/libatomic.so.1"}
    assert runner_preflight({"llm_runner_libraries": found}) is None
    without = tmp_path / "sysroot-without-libatomic1"
    shutil.copytree(sysroot / "usr/lib/aarch64-linux-gnu", without / "usr/lib/aarch64-linux-gnu", symlinks=True)
    for library in (without / "usr/lib/aarch64-linux-gnu").glob("libatomic.so*"):
        library.unlink()
    missing = runner_libraries(extension, "aarch64", without)
    assert missing["needs"] == {"libatomic.so.1": None}
    assert runner_preflight({"llm_runner_libraries": missing}).endswith("`sudo apt install libatomic1`")
