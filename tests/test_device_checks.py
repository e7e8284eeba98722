"""The device's pre-flight facts and checks: CPU features for XNNPACK, library alignment against
the kernel's page size, memory against the .pte and its KV cache, free disk, and the system
libraries ExecuTorch's LLM runner links (a missing one leaves the runner out, not the benchmark)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_edge.device import elf, runner_bench
from gemma_edge.device.facts import (
    DeviceCheckFailed,
    device_facts,
    preflight,
    runner_extension,
    runner_libraries,
    runner_preflight,
    xnnpack_features,
)
from gemma_edge.reach import remote_bench
from gemma_edge.reach.target import DeviceError


@pytest.fixture(scope="module")
def facts():
    return device_facts()


def test_facts_describe_this_machine(facts):
    assert facts["page_size"] >= 4096 and facts["page_size"] & (facts["page_size"] - 1) == 0
    assert facts["libc"][0] == "glibc" and facts["libc"][1].startswith("2.")
    assert 0 < facts["memory_available_bytes"] <= facts["memory_bytes"]
    assert facts["disk_free_bytes"] > 0
    assert facts["emulator"] is None
    assert facts["xnnpack_features"], "this host's CPU features should be known to the XNNPACK table"
    alignment = facts["library_alignment"]
    assert alignment["library"].startswith(("executorch/", "torch/")) and alignment["bytes"] >= 4096
    assert alignment["loads_with_16k_pages"] == (alignment["bytes"] >= 16384)


def test_elf_alignment_is_read_from_the_program_headers(tmp_path):
    library = Path(sys.executable).resolve()  # an ELF executable: its PT_LOAD segments are page aligned
    assert elf.load_alignment(library) in (4096, 16384, 65536, 2**21)
    text = tmp_path / "not-elf.so"
    text.write_text("not a library")
    assert elf.load_alignment(text) is None and elf.machine(text) is None and elf.needed(text) == []


def test_this_host_passes_its_own_checks(facts):
    checked = preflight(facts, {"memory_bytes": 10_000_000, "disk_bytes": 1_000_000})
    assert any(line.startswith("memory:") for line in checked) and any(line.startswith("disk:") for line in checked)


def test_library_aligned_below_the_page_size_is_refused(facts):
    pi5_kernel = {**facts, "page_size": 16384, "library_alignment": {"bytes": 4096, "library": "torch/lib/libc10.so"}}
    with pytest.raises(
        DeviceCheckFailed, match=r"torch/lib/libc10.so is aligned to 4 KiB but the device's kernel uses 16 KiB pages"
    ):
        preflight(pi5_kernel)


def test_memory_and_disk_shortfalls_name_the_numbers(facts):
    small = {**facts, "memory_available_bytes": 512 * 2**20, "disk_free_bytes": 100_000_000}
    with pytest.raises(
        DeviceCheckFailed, match=r"512 MiB of memory available but the .pte and its KV cache and activations need 4096 MiB"
    ):
        preflight(small, {"memory_bytes": 4 * 2**30})
    with pytest.raises(DeviceCheckFailed, match=r"need 4096 MiB \(the KV cache 76.5 MiB of it, at 4096 positions\)$"):
        preflight(small, {"memory_bytes": 4 * 2**30, "kv_cache_bytes": 76.5 * 2**20, "max_context_len": 4096})
    with pytest.raises(DeviceCheckFailed, match=r"100 MB of free disk but needs 3500 MB"):
        preflight(small, {"disk_bytes": 3_500_000_000})


def test_aarch64_without_neon_is_refused():
    features = "fp aes pmull sha1 sha2 crc32".split()
    facts = {
        "machine": "aarch64",
        "cpu_features": features,
        "xnnpack_features": xnnpack_features("aarch64", features),
    }
    with pytest.raises(DeviceCheckFailed, match="aarch64 CPU lacks neon, which XNNPACK's kernels need"):
        preflight(facts)


def test_a_pi5s_features_select_dot_product_and_fp16():
    pi5 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp".split()
    assert xnnpack_features("aarch64", pi5) == {
        "neon": True,
        "dotprod": True,
        "fp16": True,
        "i8mm": False,
        "sve": False,
    }


def test_a_device_short_of_memory_stops_the_bench_with_the_numbers(tmp_path):
    """The device runner checks before it loads anything, and the host reports its sentence alone."""
    spec = {
        "memory_bytes": 2**50,
        "prompt_lengths": [8],
        "new_tokens": 4,
        "repetitions": 1,
        "warmup": 0,
        "threads": 1,
        "parity_prompt_ids": [],
        "max_new_tokens": 4,
    }
    with pytest.raises(
        DeviceError,
        match=r"^local: the device has \d+ MiB of memory available but the .pte and its KV "
        r"cache and activations need 1073741824 MiB$",
    ):
        remote_bench.run_local_bench(str(tmp_path / "never-loaded.pte"), spec, 120)


# ---- the LLM runner's system libraries ---------------------------------------------------------


def test_the_runner_extensions_links_are_read_as_the_loader_reads_them():
    """This host's executorch: its runner extension links the runtime and the C/C++ libraries, and
    (the x86-64 build) not libatomic, so there is nothing for the device to provide."""
    extension = runner_extension()
    assert extension is not None and extension.name.startswith("_llm_runner.")
    linked = elf.needed(extension)
    assert {"libexecutorch.so", "libtorch.so", "libstdc++.so.6", "libc.so.6"} <= set(linked)
    if elf.machine(extension) == elf.MACHINES["x86_64"]:
        assert "libatomic.so.1" not in linked
        assert runner_libraries(extension, "x86_64") == {"extension": extension.name, "needs": {}}


def host_libatomic() -> Path:
    """This host's own libatomic.so.1 (g++ brings it), a real library to lay out device roots with."""
    found = elf.find_library("libatomic.so.1", "x86_64")
    assert found, "libatomic.so.1 is not installed on this host (apt-get install libatomic1)"
    return Path(found).resolve()


def test_a_library_is_found_only_where_the_loader_looks_and_only_if_built_for_the_device(tmp_path):
    library = host_libatomic()
    device = tmp_path / "device"
    (device / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    assert elf.find_library("libatomic.so.1", "x86_64", device, environ={}) is None
    shutil.copy(library, device / "usr/lib/x86_64-linux-gnu/libatomic.so.1")
    assert elf.find_library("libatomic.so.1", "x86_64", device, environ={}) == "/usr/lib/x86_64-linux-gnu/libatomic.so.1"
    # The same file where an aarch64 device's loader looks: built for another machine, it does not count.
    (device / "usr/lib/aarch64-linux-gnu").mkdir(parents=True)
    shutil.copy(library, device / "usr/lib/aarch64-linux-gnu/libatomic.so.1")
    assert elf.find_library("libatomic.so.1", "aarch64", device, environ={}) is None
    # A folder only /etc/ld.so.conf names (through an include), and one only LD_LIBRARY_PATH names.
    vendor = tmp_path / "vendor-device"
    (vendor / "etc/ld.so.conf.d").mkdir(parents=True)
    (vendor / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (vendor / "etc/ld.so.conf.d/vendor.conf").write_text("# a vendor's libraries\n/opt/vendor/lib\n")
    (vendor / "opt/vendor/lib").mkdir(parents=True)
    shutil.copy(library, vendor / "opt/vendor/lib/libatomic.so.1")
    assert elf.find_library("libatomic.so.1", "x86_64", vendor, environ={}) == "/opt/vendor/lib/libatomic.so.1"
    assert elf.library_folders("x86_64", vendor, {"LD_LIBRARY_PATH": "/srv/lib::/opt/vendor/lib"})[:2] == [
        "/srv/lib",
        "/opt/vendor/lib",
    ]


@pytest.fixture(scope="module")
def extension_linking_libatomic(tmp_path_factory) -> Path:
    """A real shared library that links libatomic.so.1, as the aarch64 wheel's runner extension does,
    built for this host by its own C compiler (g++ brings it)."""
    out = tmp_path_factory.mktemp("extension") / "_llm_runner.cpython-311-x86_64-linux-gnu.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(out), "-Wl,--no-as-needed", "-latomic"],
        input="int runner(void) { return 0; }\n",
        text=True,
        check=True,
    )
    return out


def test_a_device_without_libatomic_gets_the_runner_left_out_with_the_fix(extension_linking_libatomic, tmp_path):
    """A device root without libatomic.so.1: the pre-flight says, in one sentence, that the runner
    cannot load and how to fix it; the bench records the runner as not available without starting
    it, and goes on."""
    assert "libatomic.so.1" in elf.needed(extension_linking_libatomic)
    without = tmp_path / "sysroot-without"
    (without / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    facts = {"llm_runner_libraries": runner_libraries(extension_linking_libatomic, "x86_64", without)}
    assert facts["llm_runner_libraries"] == {"extension": extension_linking_libatomic.name, "needs": {"libatomic.so.1": None}}
    reason = runner_preflight(facts)
    assert reason == (
        "ExecuTorch's LLM runner links libatomic.so.1, which this device does not have (our loop does not "
        "need it): install it with `sudo apt install libatomic1`"
    )
    block = runner_bench.bench_llm_runner(tmp_path / "never-loaded.pte", {"tokenizer": None}, [], set(), unavailable=reason)
    assert block["available"] is False and block["reason"] == reason and set(block) == {"available", "reason", "load"}
    # With the library in place the same extension passes.
    with_it = tmp_path / "sysroot-with"
    (with_it / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    shutil.copy(host_libatomic(), with_it / "usr/lib/x86_64-linux-gnu/libatomic.so.1")
    facts = {"llm_runner_libraries": runner_libraries(extension_linking_libatomic, "x86_64", with_it)}
    assert runner_preflight(facts) is None
    assert runner_preflight({"llm_runner_libraries": None}) is None  # no executorch yet (probe)


def test_this_host_records_the_runners_libraries_in_its_facts(facts):
    libraries = facts["llm_runner_libraries"]
    assert libraries["extension"].startswith("_llm_runner.") and all(libraries["needs"].values())
    assert runner_preflight(facts) is None
