"""Decode benchmark and parity run of a .pte, executed where the .pte will run (the device).

Self-contained besides the ExecuTorch runtime and torch: deploy uploads this package's runtime
files to the device and runs `python -m gemma_edge.device_bench`. The `local` target runs the
very same module in a subprocess.

    python -m gemma_edge.device_bench facts --out facts.json
    python -m gemma_edge.device_bench bench --pte model.pte --spec spec.json --out bench.json

Figures follow llama-bench's shape (avg_ts, stddev_ts, samples_ts) so they compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def device_facts() -> dict:
    """CPU, memory, kernel, OS, governor and runtime versions of this machine."""
    facts = {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "os": _os_release(),
        "cores": os.cpu_count(),
        "cpu_model": None,
        "cpu_features": None,
        "memory_bytes": None,
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    cpuinfo = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        cpuinfo.setdefault(key.strip().lower(), value.strip())
    # x86 names the CPU in "model name" ("model" is a number there); a Pi names the board in "Model".
    names = [cpuinfo.get("model name"), cpuinfo.get("model"), cpuinfo.get("hardware")]
    facts["cpu_model"] = next((n for n in names if n and not n.isdigit()), None)
    features = cpuinfo.get("flags") or cpuinfo.get("features")
    facts["cpu_features"] = features.split() if features else None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            facts["memory_bytes"] = int(line.split()[1]) * 1024
    return facts


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _os_release() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("executorch", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def summarise(samples: list[float]) -> dict:
    return {
        "avg": statistics.fmean(samples),
        "stddev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def synthetic_prompt(length: int, bos_id: int, vocab_size: int) -> list[int]:
    """A deterministic prompt of `length` ids starting with BOS, avoiding the special ids 0..3."""
    return [bos_id] + [4 + (i * 7919) % (vocab_size - 4) for i in range(length - 1)]


def time_generation(decoder, prompt: list[int], new_tokens: int) -> dict:
    """Prefill `prompt` in one call, then decode `new_tokens` - 1 further tokens one call each."""
    import torch

    started = time.perf_counter()
    logits = decoder.step(prompt, 0)
    token = int(torch.argmax(logits))
    first_token = time.perf_counter()
    position = len(prompt)
    for _ in range(new_tokens - 1):
        logits = decoder.step([token], position)
        token = int(torch.argmax(logits))
        position += 1
    finished = time.perf_counter()
    decoded = max(new_tokens - 1, 1)
    return {
        "prefill_s": first_token - started,
        "decode_s": finished - first_token,
        "prefill_tps": len(prompt) / (first_token - started),
        "decode_tps": decoded / max(finished - first_token, 1e-9),
        "ttft_s": first_token - started,
    }


def timed_runs(decoder, prompt: list[int], spec: dict, on_sample=None) -> dict:
    """`warmup` untimed generations, then `repetitions` timed ones of `prompt`, summarised;
    `on_sample(index, sample)` sees each timed one as it ends (progress logging)."""
    for _ in range(spec["warmup"]):
        time_generation(decoder, prompt, spec["new_tokens"])
    samples = []
    for index in range(spec["repetitions"]):
        samples.append(time_generation(decoder, prompt, spec["new_tokens"]))
        if on_sample:
            on_sample(index, samples[-1])
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": spec["new_tokens"],
        "repetitions": spec["repetitions"],
        "prefill_tps": summarise([s["prefill_tps"] for s in samples]),
        "decode_tps": summarise([s["decode_tps"] for s in samples]),
        "ttft_s": summarise([s["ttft_s"] for s in samples]),
    }


def run_bench(pte: Path, spec: dict) -> dict:
    """Warm-up, then repeated timed generations per prompt length, then the parity prompts."""
    from gemma_edge.artifacts import peak_rss_bytes
    from gemma_edge.runtime import PteDecoder, greedy_decode

    threads = spec.get("threads")
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
    started = time.perf_counter()
    decoder = PteDecoder(pte)
    load_s = time.perf_counter() - started
    meta = decoder.metadata
    max_seq_len = int(meta["get_max_seq_len"])
    runs = []
    for length in spec["prompt_lengths"]:
        if length + spec["new_tokens"] > max_seq_len:
            raise ValueError(f"prompt length {length} + {spec['new_tokens']} new tokens exceeds the .pte's max_seq_len {max_seq_len}")
        prompt = synthetic_prompt(length, int(meta["get_bos_id"]), int(meta["get_vocab_size"]))
        runs.append(timed_runs(decoder, prompt, spec))
        print(f"prompt {length}: prefill {runs[-1]['prefill_tps']['avg']:.1f} tok/s, decode {runs[-1]['decode_tps']['avg']:.1f} tok/s", flush=True)
    parity = [greedy_decode(decoder.step, ids, spec["max_new_tokens"]) for ids in spec["parity_prompt_ids"]]
    return {
        "load_s": load_s,
        "threads": threads or None,
        "runs": runs,
        "parity_tokens": parity,
        "peak_rss_bytes": peak_rss_bytes(),
        "runtime": "executorch.runtime (Python bindings), timed around Method.execute",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma_edge.device_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    facts = sub.add_parser("facts")
    facts.add_argument("--out", required=True, type=Path, help="a file, or - for standard output")
    bench = sub.add_parser("bench")
    bench.add_argument("--pte", required=True, type=Path)
    bench.add_argument("--spec", required=True, type=Path)
    bench.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    from gemma_edge.artifacts import write_json

    if args.command == "facts":
        if str(args.out) == "-":
            print(json.dumps(device_facts()))
        else:
            write_json(args.out, device_facts())
    else:
        write_json(args.out, run_bench(args.pte, json.loads(args.spec.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
