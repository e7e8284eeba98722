"""Decode benchmark and parity run of a .pte, executed where the .pte will run (the device).

Self-contained besides the ExecuTorch runtime and torch: deploy uploads this package's runtime
files to the device and runs `python -m gemma_edge.device.device_bench`. The `local` target runs the
very same module in a subprocess.

    python -m gemma_edge.device.device_bench facts --out facts.json
    python -m gemma_edge.device.device_bench bench --pte model.pte --spec spec.json --out bench.json

`facts` needs only the standard library, so it also runs on the device's bare system Python before
anything is installed (the host builds the device's wheelhouse from what it reports).

Figures follow llama-bench's shape (avg_ts, stddev_ts, samples_ts) so they compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gemma_edge.device.bandwidth import measure_in_child
from gemma_edge.device.facts import DeviceCheckFailed, device_facts, preflight, runner_preflight
from gemma_edge.device.peer_bench import (
    bench_litert,
    bench_llamacpp,
    ratios,
    timed_with_load,
)
from gemma_edge.device.runner_bench import bench_llm_runner
from gemma_edge.device.timing import eos_id_set, synthetic_prompt, timed_runs


def run_bench(pte: Path, spec: dict) -> dict:
    """Pre-flight checks; warm-up and repeated timed generations per prompt length and the parity
    prompts on the .pte; then, the .pte's memory released first, the parity prompts under
    ExecuTorch's own LLM runner and each peer engine in turn (spec["peers"]). The machine's load is
    sampled before and after every engine's run."""
    facts = device_facts()
    needs = {key: spec.get(key) for key in ("memory_bytes", "kv_cache_bytes", "max_context_len")}
    for line in preflight(facts, needs):
        print(f"pre-flight: {line}", flush=True)
    runner_missing = runner_preflight(facts)
    if runner_missing:
        print(f"pre-flight: {runner_missing}; the benchmark goes on without the runner", flush=True)
    from gemma_edge.device.files import peak_rss_bytes
    from gemma_edge.device.memory import ResidentPeaks
    from gemma_edge.device.runtime import PteDecoder, greedy_decode

    threads = spec.get("threads")
    # The limit every engine's decode shares, measured once before any of them holds memory.
    bandwidth = measure_in_child(int(threads or os.cpu_count()), emulated=bool(spec.get("emulated")))
    print(
        f"memory read bandwidth at {bandwidth['threads']} threads: {bandwidth['gb_per_s']['avg']:.1f} GB/s"
        + (" (emulated: short form, says nothing about a Pi)" if spec.get("emulated") else ""),
        flush=True,
    )
    if threads:
        from gemma_edge.device.bindings import set_threads

        set_threads(int(threads))
    resident = ResidentPeaks().start()  # stopped (and the .pte's memory released) before the peers run
    started = time.perf_counter()
    decoder = PteDecoder(pte)
    load_s = time.perf_counter() - started
    denormals_flushed, decodes_with = decoder.denormals_flushed, decoder.decodes_with  # freed before the peers run
    page_locks = decoder.page_locks
    meta = decoder.metadata
    context = decoder.context
    for length in spec["prompt_lengths"]:
        if length + spec["new_tokens"] > context:
            raise ValueError(
                f"prompt length {length} + {spec['new_tokens']} new tokens exceeds the .pte's context (max_seq_len {context})"
            )

    def pte_runs():
        runs = []
        for length in spec["prompt_lengths"]:
            prompt = synthetic_prompt(length, int(meta["get_bos_id"]), int(meta["get_vocab_size"]))
            runs.append(timed_runs(decoder, prompt, spec))  # noqa: F821 - pte_runs is called before `del decoder` below
            print(
                f"prompt {length}: prefill {runs[-1]['prefill_tps']['avg']:.1f} tok/s, "
                f"decode {runs[-1]['decode_tps']['avg']:.1f} tok/s",
                flush=True,
            )
        return runs

    runs, load = timed_with_load(pte_runs)
    parity = [greedy_decode(decoder.step, ids, spec["max_new_tokens"]) for ids in spec["parity_prompt_ids"]]
    peak_rss = peak_rss_bytes()
    resident.stop()
    kv_cache = {"bytes": spec.get("kv_cache_bytes"), "max_context_len": context, "tokens_per_call": decoder.tokens_per_call}
    del decoder
    kernels = traced_kernels(pte)
    # A second load in this process, the first one's memory released and the file in the page
    # cache: what re-opening the model costs once the device has read it.
    started = time.perf_counter()
    PteDecoder(pte)
    warm_load_s = time.perf_counter() - started
    runner = bench_llm_runner(pte, spec, parity, eos_id_set(meta), runner_missing)
    engines = {}
    for peer in spec.get("peers", []):
        run_engine = bench_litert if peer["engine"] == "litert" else bench_llamacpp
        engines[peer["name"]] = run_engine(peer, spec, spec.get("peer_timeout_s", 3600))
        engine = engines[peer["name"]]
        if engine["available"]:
            first = engine["runs"][0]
            print(
                f"{peer['name']}: prompt {first['prompt_tokens']}: prefill {first['prefill_tps']['avg']:.1f} tok/s, "
                f"decode {first['decode_tps']['avg']:.1f} tok/s",
                flush=True,
            )
        else:
            print(f"{peer['name']}: not available: {engine['reason']}", flush=True)
    return {
        "load_s": load_s,
        "warm_load_s": warm_load_s,
        "denormals_flushed": denormals_flushed,
        "page_locks": page_locks,
        "decodes_with": decodes_with,
        "threads": threads or None,
        "bandwidth": bandwidth,
        "runs": runs,
        "load": load,
        "parity_tokens": parity,
        "peak_rss_bytes": peak_rss,
        "resident": resident.summary(),
        "kv_cache": kv_cache,
        "xnnpack_kernels": kernels,
        "runtime": "ExecuTorch's Python bindings (device/bindings.py), timed around each method call",
        "engines": engines,
        "ratios": ratios(runs, engines),
        "executorch_runner": runner,
        "busy": load["busy"] or runner["load"]["busy"] or any(e.get("load", {}).get("busy") for e in engines.values()),
    }


def traced_kernels(pte: Path) -> dict:
    """Which fully-connected kernels XNNPACK picked on this CPU (xnnpack_ops), printed and returned;
    a trace that cannot be taken or read here is recorded with its reason, not fatal: the timings
    stand without it."""
    from gemma_edge.device.xnnpack_ops import fully_connected_paths

    try:
        kernels = fully_connected_paths(pte)
    except Exception as error:  # noqa: BLE001 - the tracer and its reader raise what they raise
        return {"traced": False, "reason": f"{type(error).__name__}: {error}"}
    if kernels["traced"]:
        paths = ", ".join(f"{count} {kind}" for kind, count in kernels["fully_connected"].items())
        print(f"XNNPACK fully-connected kernels in one {kernels['method']} call: {paths}", flush=True)
    return kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma_edge.device.device_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    facts = sub.add_parser("facts")
    facts.add_argument("--out", required=True, type=Path, help="a file, or - for standard output")
    bench = sub.add_parser("bench")
    bench.add_argument("--pte", required=True, type=Path)
    bench.add_argument("--spec", required=True, type=Path)
    bench.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    from gemma_edge.device.files import write_json

    if args.command == "facts":
        if str(args.out) == "-":
            print(json.dumps(device_facts()))
        else:
            write_json(args.out, device_facts())
        return 0
    try:
        write_json(args.out, run_bench(args.pte, json.loads(args.spec.read_text())))
    except DeviceCheckFailed as error:
        print(f"device check failed: {error}", file=sys.stderr)
        return CHECK_FAILED
    return 0


CHECK_FAILED = 3  # exit status of a failed pre-flight check (the host reports its sentence alone)


if __name__ == "__main__":
    sys.exit(main())
