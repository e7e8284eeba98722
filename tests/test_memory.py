"""An engine's resident memory split into anonymous and file-backed pages, as the benchmarks record
it (device/memory.py), checked against memory this test allocates and maps itself."""

import mmap
import subprocess
import sys
import time

from gemma_edge.device.memory import ResidentPeaks, highest, resident

MIB = 2**20
PAGE = mmap.PAGESIZE


def test_a_process_resident_memory_has_its_parts():
    now = resident()
    assert now["anon"] > 0 and now["file"] > 0  # the interpreter's heap; its own mapped binary
    assert now["rss"] >= now["anon"] + now["file"] - PAGE * 16  # the kernel's counters are per CPU, a few pages apart
    assert now["peak"] >= now["rss"]
    assert resident(2**22 + 7) is None  # no such process


def test_anonymous_and_file_backed_peaks_are_told_apart(tmp_path):
    size = 192 * MIB
    weights = tmp_path / "weights.bin"
    with open(weights, "wb") as handle:
        handle.truncate(size)
    before = resident()
    with ResidentPeaks(interval_s=0.01) as peaks:
        heap = bytearray(size)  # zero pages: touched one by one below, so they are resident
        for offset in range(0, size, PAGE):
            heap[offset] = 1
        time.sleep(0.1)
        del heap
        with open(weights, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            touched = sum(mapped[offset] for offset in range(0, size, PAGE))
            time.sleep(0.1)
    assert touched == 0
    summary = peaks.summary()
    assert summary["anon_peak_bytes"] >= before["anon"] + size * 0.95
    assert summary["file_peak_bytes"] >= before["file"] + size * 0.95
    # the heap was freed before the file was mapped: the whole's peak holds one of them, not both
    assert summary["peak_bytes"] < before["rss"] + 2 * size * 0.95
    assert summary["samples"] >= 10


def test_another_process_is_sampled_from_outside():
    touch = "import time; block = bytearray(160 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1)"
    child = subprocess.Popen([sys.executable, "-c", touch])
    with ResidentPeaks(child.pid, interval_s=0.02) as peaks:
        child.wait()
    summary = peaks.summary()
    assert summary["anon_peak_bytes"] >= 160 * MIB
    assert summary["peak_bytes"] >= summary["anon_peak_bytes"]


def test_a_short_engine_is_caught_by_the_first_quick_samples():
    """Samples come every millisecond at first: a child that allocates and ends within half a second
    is seen though the sampler's interval is 10 s; one that ends before any sample has no figures
    (None, not zero)."""
    touch = "import time; block = bytearray(96 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(0.5)"
    child = subprocess.Popen([sys.executable, "-c", touch])
    with ResidentPeaks(child.pid, interval_s=10) as peaks:
        child.wait()
    summary = peaks.summary()
    assert summary["samples"] >= 3 and summary["anon_peak_bytes"] >= 96 * MIB
    with ResidentPeaks(2**22 + 7) as gone:  # no such process
        pass
    assert gone.summary()["samples"] == 0
    assert {key: value for key, value in gone.summary().items() if key.endswith("_bytes")} == {
        "peak_bytes": None,
        "anon_peak_bytes": None,
        "file_peak_bytes": None,
        "shmem_peak_bytes": None,
        "locked_peak_bytes": None,
    }


def test_two_phases_keep_the_higher_peak_of_each_part():
    first = {"peak_bytes": 10, "anon_peak_bytes": 8, "file_peak_bytes": 1, "locked_peak_bytes": 0, "samples": 3}
    second = {"peak_bytes": 9, "anon_peak_bytes": 4, "file_peak_bytes": 5, "locked_peak_bytes": 2, "samples": 2}
    assert highest(first, second) == {
        "peak_bytes": 10,
        "anon_peak_bytes": 8,
        "file_peak_bytes": 5,
        "locked_peak_bytes": 2,
        "samples": 5,
    }
    unsampled = dict(second, anon_peak_bytes=None)
    assert highest(unsampled, unsampled)["anon_peak_bytes"] is None
    assert highest(unsampled, first)["anon_peak_bytes"] == 8
