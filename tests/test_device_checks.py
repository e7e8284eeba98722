"""The device's pre-flight facts and checks: CPU features for XNNPACK, library alignment against
the kernel's page size, memory against the .pte and its KV cache, free disk."""

import sys
from pathlib import Path

import pytest

from gemma_edge import deploy, device_bench
from gemma_edge.device_bench import DeviceCheckFailed, elf_load_alignment, preflight


@pytest.fixture(scope="module")
def facts():
    return device_bench.device_facts()


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
    assert elf_load_alignment(library) in (4096, 16384, 65536, 2 ** 21)
    text = tmp_path / "not-elf.so"
    text.write_text("not a library")
    assert elf_load_alignment(text) is None


def test_this_host_passes_its_own_checks(facts):
    checked = preflight(facts, {"memory_bytes": 10_000_000, "disk_bytes": 1_000_000})
    assert any(line.startswith("memory:") for line in checked) and any(line.startswith("disk:") for line in checked)


def test_library_aligned_below_the_page_size_is_refused(facts):
    pi5_kernel = {**facts, "page_size": 16384, "library_alignment": {"bytes": 4096, "library": "torch/lib/libc10.so"}}
    with pytest.raises(DeviceCheckFailed, match=r"torch/lib/libc10.so is aligned to 4 KiB but the device's kernel uses 16 KiB pages"):
        preflight(pi5_kernel)


def test_memory_and_disk_shortfalls_name_the_numbers(facts):
    small = {**facts, "memory_available_bytes": 512 * 2**20, "disk_free_bytes": 100_000_000}
    with pytest.raises(DeviceCheckFailed, match=r"512 MiB of memory available but the .pte and its KV cache and activations need 4096 MiB"):
        preflight(small, {"memory_bytes": 4 * 2**30})
    with pytest.raises(DeviceCheckFailed, match=r"100 MB of free disk but needs 3500 MB"):
        preflight(small, {"disk_bytes": 3_500_000_000})


def test_aarch64_without_neon_is_refused():
    features = "fp aes pmull sha1 sha2 crc32".split()
    facts = {"machine": "aarch64", "cpu_features": features, "xnnpack_features": device_bench.xnnpack_features("aarch64", features)}
    with pytest.raises(DeviceCheckFailed, match="aarch64 CPU lacks neon, which XNNPACK's kernels need"):
        preflight(facts)


def test_a_pi5s_features_select_dot_product_and_fp16():
    pi5 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp".split()
    assert device_bench.xnnpack_features("aarch64", pi5) == {"neon": True, "dotprod": True, "fp16": True, "i8mm": False, "sve": False}


def test_a_device_short_of_memory_stops_the_bench_with_the_numbers(tmp_path):
    """The device runner checks before it loads anything, and the host reports its sentence alone."""
    spec = {"memory_bytes": 2 ** 50, "prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "warmup": 0,
            "threads": 1, "parity_prompt_ids": [], "max_new_tokens": 4}
    with pytest.raises(deploy.DeviceError, match=r"^local: the device has \d+ MiB of memory available but the .pte and its KV "
                                                 r"cache and activations need 1073741824 MiB$"):
        deploy.run_local_bench(str(tmp_path / "never-loaded.pte"), spec, 120)
