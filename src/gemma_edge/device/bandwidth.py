"""The physical limit of decode: how fast this machine streams memory into its cores, at the
benchmark's thread count, and which fraction of that an engine's decode achieves.

Decoding one token reads every weight the token passes through once (the linears, the lm_head, one
row of each embedding table), so `weight bytes per token x tok/s` cannot exceed the memory read
bandwidth. `measure_read_bandwidth` measures that bandwidth with torch (the one library every
target already has): a reduction over one buffer far larger than the last-level cache, after a
warm-up pass, repeated.

Which reduction: every candidate in `METHODS` reads the same bytes; the better of two timed passes
of each picks the fastest, and only that one is repeated. On this project's x86 build host (a
2-vCPU AMD EPYC VM, AVX2, 256 MiB buffer), quiet, at two threads: `int8 amax` 16.4 GB/s, `float32
amax` 15.7, `float32 sum` 15.2 — within noise of each other, and the winner changed between runs.
Two other reductions were tried and left out because they measure arithmetic, not memory: an
`int8 sum` into int32 (0.2 GB/s: it widens element by element) and a `bfloat16 amax` (2-5 GB/s:
it converts every element). Which of the three wins may differ by CPU (NEON on a Pi has no reason
to agree with AVX2), so it is measured, not assumed, and the chosen `method` is recorded with the
result, with every candidate's figure. The result is a floor on the hardware's peak, not the peak:
a decode can read its weights a little faster than a torch reduction streams.

Standard library and torch only: the file runs on the device, beside `device_bench`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gemma_edge.device.peer_bench import summarise

MIN_BUFFER_BYTES = 256 * 2**20
# An emulated device (QEMU user mode) reads the host's sysfs, so its "last-level cache" is the
# host's (260 MiB on the AVX-512 build host: a 2 GiB buffer), and emulated float32 reductions
# crawl (0.28 GB/s): a minute per benchmark for a figure that says nothing about a Pi. There the
# measurement runs on the smallest buffer, this many passes: the code path checked, nothing more.
EMULATED_REPETITIONS = 3
LLC_MULTIPLE = 8  # the buffer is at least this many last-level caches, so no pass is served by the cache
MEMORY_SHARE = 0.25  # and never more than this share of the memory the kernel says is available

# name: (dtype the bytes are read as, the reduction); all read every byte of the buffer once.
METHODS = {
    "float32 sum": ("float32", lambda t: t.sum()),
    "float32 amax": ("float32", lambda t: t.amax()),
    "int8 amax": ("int8", lambda t: t.amax()),
}


def size_bytes(text: str) -> int:
    """'32768K' / '2048 KB' / '8M' (sysfs and /proc/cpuinfo spellings) in bytes."""
    text = text.strip().upper().replace(" ", "").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def last_level_cache_bytes() -> int | None:
    """The largest cache sysfs lists for cpu0 (the last level), else /proc/cpuinfo's `cache size`
    (x86 only, and often the L2), else None."""
    sizes = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                sizes.append(size_bytes((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    if sizes:
        return max(sizes)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cache size":
                return size_bytes(value)
    except (OSError, ValueError):
        pass
    return None


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def buffer_size(llc_bytes: int | None, available_bytes: int | None) -> int:
    """At least LLC_MULTIPLE last-level caches and MIN_BUFFER_BYTES, at most MEMORY_SHARE of the
    available memory; a multiple of 64 bytes. ValueError if memory is too short for that."""
    wanted = max(MIN_BUFFER_BYTES, LLC_MULTIPLE * (llc_bytes or 0))
    if available_bytes is not None and wanted > MEMORY_SHARE * available_bytes:
        raise ValueError(
            f"a {wanted / 2**20:.0f} MiB buffer ({LLC_MULTIPLE}x the {(llc_bytes or 0) / 2**20:.0f} MiB "
            f"last-level cache, at least {MIN_BUFFER_BYTES / 2**20:.0f} MiB) is more than "
            f"{MEMORY_SHARE:.0%} of the {available_bytes / 2**20:.0f} MiB available"
        )
    return wanted // 64 * 64


def timed_pass(buffer, method: str) -> float:
    """GB/s (1e9 bytes per second) of one reduction over `buffer` read as METHODS[method]'s dtype."""
    import torch

    dtype, reduce = METHODS[method]
    view = buffer.view(getattr(torch, dtype))
    started = time.perf_counter()
    reduce(view)
    return buffer.numel() / (time.perf_counter() - started) / 1e9


def measure_read_bandwidth(threads: int, repetitions: int = 10, buffer_bytes: int | None = None) -> dict:
    """Memory read bandwidth at `threads` torch threads: one warm-up pass per method (pages touched,
    threads started), the better of two timed passes each to pick the fastest method, then `repetitions` timed
    passes of that one. The buffer holds the int8 value 1 (as float32, a tiny normal number)."""
    import torch

    llc = last_level_cache_bytes()
    size = buffer_bytes or buffer_size(llc, available_memory_bytes())
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        buffer = torch.ones(size, dtype=torch.int8)
        for method in METHODS:
            timed_pass(buffer, method)
        tried = {method: max(timed_pass(buffer, method) for _ in range(2)) for method in METHODS}
        best = max(tried, key=tried.get)
        samples = [timed_pass(buffer, best) for _ in range(repetitions)]
    finally:
        torch.set_num_threads(previous)
    del buffer
    return {
        "gb_per_s": summarise(samples),
        "buffer_bytes": size,
        "last_level_cache_bytes": llc,
        "threads": int(threads),
        "method": f"torch {best} over the buffer (torch {torch.__version__})",
        "methods_tried_gb_per_s": tried,
        "cores": os.cpu_count(),
    }


def bandwidth_fraction(weight_bytes_per_token: int | None, decode_tps: float | None, bandwidth: dict | None) -> dict | None:
    """Bytes the decode reads per second (`weight bytes per token x tok/s`) and that over the
    measured bandwidth's mean: 1.0 would be a decode that does nothing but stream its weights."""
    if not weight_bytes_per_token or not decode_tps or not bandwidth:
        return None
    achieved = weight_bytes_per_token * decode_tps / 1e9
    return {"achieved_gb_per_s": achieved, "fraction": achieved / bandwidth["gb_per_s"]["avg"]}


def annotate_runs(runs: list[dict], weights: dict | None, bandwidth: dict | None) -> list[dict]:
    """Each run (one per prompt length) gains `weight_bytes_per_token`, and from its mean decode
    tok/s `achieved_gb_per_s` and `bandwidth_fraction` (None where either figure is missing)."""
    per_token = weights["bytes_per_token"] if weights else None
    for run in runs:
        limit = bandwidth_fraction(per_token, run["decode_tps"]["avg"], bandwidth) or {}
        run.update(
            {
                "weight_bytes_per_token": per_token,
                "achieved_gb_per_s": limit.get("achieved_gb_per_s"),
                "bandwidth_fraction": limit.get("fraction"),
            }
        )
    return runs


def measure_in_child(threads: int, timeout_s: float = 600, emulated: bool = False) -> dict:
    """`measure_read_bandwidth` in a process of its own, so that its buffer never counts in the
    caller's peak RSS (which the benchmarks report for the engine they run next). `emulated`: the
    short form (EMULATED_REPETITIONS), recorded as such."""
    import json

    from gemma_edge.device.peer_bench import run_module

    argv = ["--threads", str(threads)] + (["--emulated"] if emulated else [])
    output = run_module("bandwidth", argv, timeout_s, "the bandwidth measurement")
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="gemma_edge.device.bandwidth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument(
        "--emulated", action="store_true", help=f"an emulated device: the smallest buffer, {EMULATED_REPETITIONS} passes"
    )
    args = parser.parse_args(argv)
    for threads in args.threads:
        if args.emulated:
            result = {**measure_read_bandwidth(threads, EMULATED_REPETITIONS, MIN_BUFFER_BYTES), "emulated": True}
        else:
            result = measure_read_bandwidth(threads, args.repetitions)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
