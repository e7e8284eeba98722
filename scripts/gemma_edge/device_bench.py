"""Decode benchmark and parity run of a .pte, executed where the .pte will run (the device).

Self-contained besides the ExecuTorch runtime and torch: deploy uploads this package's runtime
files to the device and runs `python -m gemma_edge.device_bench`. The `local` target runs the
very same module in a subprocess.

    python -m gemma_edge.device_bench facts --out facts.json
    python -m gemma_edge.device_bench bench --pte model.pte --spec spec.json --out bench.json

`facts` needs only the standard library, so it also runs on the device's bare system Python before
anything is installed (the host builds the device's wheelhouse from what it reports).

Figures follow llama-bench's shape (avg_ts, stddev_ts, samples_ts) so they compare directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import elf
from .bandwidth import measure_in_child
from .peer_bench import ModuleFailed, bench_litert, bench_llamacpp, ratios, run_module, summarise, timed_with_load


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
    meminfo = _meminfo()
    facts["memory_bytes"] = meminfo.get("MemTotal")
    facts["memory_available_bytes"] = meminfo.get("MemAvailable")
    facts["libc"] = list(platform.libc_ver())
    facts["page_size"] = os.sysconf("SC_PAGESIZE")
    facts["disk_free_bytes"] = shutil.disk_usage(".").free
    facts["xnnpack_features"] = xnnpack_features(facts["machine"], facts["cpu_features"] or [])
    facts["emulator"] = {"qemu_cpu": os.environ["QEMU_CPU"]} if os.environ.get("QEMU_CPU") else None
    facts["library_alignment"] = runtime_library_alignment()
    facts["llm_runner_libraries"] = runner_libraries(runner_extension(), facts["machine"])
    return facts


def _meminfo() -> dict:
    values = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# CPU features XNNPACK's kernels use, by the names /proc/cpuinfo gives them. On aarch64 NEON is
# required; dot-product (the int8 GEMMs of 8da4w), FP16 arithmetic and i8mm select faster kernels.
XNNPACK_FEATURES = {
    "aarch64": {"neon": "asimd", "dotprod": "asimddp", "fp16": "asimdhp", "i8mm": "i8mm", "sve": "sve"},
    "x86_64": {"sse4_1": "sse4_1", "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512vnni": "avx512_vnni"},
}
REQUIRED_FEATURES = {"aarch64": ("neon",), "x86_64": ("sse4_1",)}


def xnnpack_features(machine: str, cpu_features: list[str]) -> dict:
    """Which of the features XNNPACK's kernels select on this CPU has (empty for other machines)."""
    present = set(cpu_features)
    return {name: flag in present for name, flag in XNNPACK_FEATURES.get(machine, {}).items()}


def runtime_library_alignment() -> dict | None:
    """Smallest segment alignment over the shared libraries of the installed executorch and torch
    (None when neither is installed), and which library has it."""
    from importlib import util

    smallest = None
    for package in ("executorch", "torch"):
        spec = util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for library in sorted(Path(root).rglob("*.so*")):
                align = elf.load_alignment(library) if library.is_file() else None
                if align and (smallest is None or align < smallest["bytes"]):
                    smallest = {"bytes": align, "library": str(library.relative_to(Path(root).parent))}
    if smallest:
        smallest["loads_with_16k_pages"] = smallest["bytes"] >= 16384  # Raspberry Pi OS's Pi 5 kernel
    return smallest


# System libraries ExecuTorch's LLM runner extension links on some platforms and our .pte loop does
# not need, with the Debian (Raspberry Pi OS) package that provides each: the aarch64 executorch
# wheel's _llm_runner links libatomic.so.1, the x86-64 one does not.
RUNNER_SYSTEM_LIBRARIES = {"libatomic.so.1": "libatomic1"}


def runner_extension() -> Path | None:
    """The installed executorch's LLM runner extension (`_llm_runner*.so`), or None."""
    from importlib import util

    spec = util.find_spec("executorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root, "extension/llm/runner").glob("_llm_runner*.so"))
        if found:
            return found[0]
    return None


def runner_libraries(extension: Path | None, machine: str, root: Path = Path("/")) -> dict | None:
    """Which of RUNNER_SYSTEM_LIBRARIES the runner `extension` links, each with where this device's
    loader finds it (None: nowhere); `root` is where the device's files are (a sysroot stands for
    one). None without an extension."""
    if extension is None:
        return None
    linked = elf.needed(extension)
    return {
        "extension": Path(extension).name,
        "needs": {soname: elf.find_library(soname, machine, root) for soname in RUNNER_SYSTEM_LIBRARIES if soname in linked},
    }


def runner_preflight(facts: dict) -> str | None:
    """Why ExecuTorch's LLM runner cannot load on this device, in one sentence naming the fix, or
    None. Not a failed check: our loop does not need these libraries, so the benchmark goes on."""
    needs = (facts.get("llm_runner_libraries") or {}).get("needs") or {}
    missing = [soname for soname, found in needs.items() if found is None]
    if not missing:
        return None
    packages = " ".join(RUNNER_SYSTEM_LIBRARIES[soname] for soname in missing)
    return (
        f"ExecuTorch's LLM runner links {', '.join(missing)}, which this device does not have (our loop does "
        f"not need it): install it with `sudo apt install {packages}`"
    )


class DeviceCheckFailed(RuntimeError):
    """The device cannot run the benchmark; the message names the number that fails."""


def preflight(facts: dict, needs: dict | None = None) -> list[str]:
    """Check the device against what the runtime and the benchmark need; raise DeviceCheckFailed
    with one sentence naming the number, else return what was checked.

    `needs` may give `memory_bytes` (the .pte plus its planned KV cache and activations), of which
    `kv_cache_bytes` at `max_context_len` positions, and `disk_bytes` (what is about to be written)."""
    needs = needs or {}
    checked = []
    machine = facts.get("machine")
    missing = [name for name in REQUIRED_FEATURES.get(machine, ()) if not (facts.get("xnnpack_features") or {}).get(name)]
    if missing:
        raise DeviceCheckFailed(
            f"the device's {machine} CPU lacks {', '.join(missing)}, which XNNPACK's kernels need "
            f"(its features: {' '.join(facts.get('cpu_features') or []) or 'none reported'})"
        )
    enabled = ", ".join(n for n, on in (facts.get("xnnpack_features") or {}).items() if on)
    checked.append(f"CPU features for XNNPACK: {enabled or 'none known'}")
    alignment = facts.get("library_alignment")
    if alignment:
        if alignment["bytes"] < facts["page_size"]:
            raise DeviceCheckFailed(
                f"{alignment['library']} is aligned to {alignment['bytes'] // 1024} KiB but the device's kernel uses "
                f"{facts['page_size'] // 1024} KiB pages, so it cannot be loaded: install a build aligned to at least "
                f"{facts['page_size'] // 1024} KiB"
            )
        checked.append(f"libraries aligned to >= {alignment['bytes'] // 1024} KiB, kernel pages {facts['page_size'] // 1024} KiB")
    available = facts.get("memory_available_bytes")
    if needs.get("memory_bytes") and available is not None:
        cache = (
            f" (the KV cache {needs['kv_cache_bytes'] / 2**20:.1f} MiB of it, at {needs['max_context_len']} positions)"
            if needs.get("kv_cache_bytes")
            else ""
        )
        if available < needs["memory_bytes"]:
            raise DeviceCheckFailed(
                f"the device has {available / 2**20:.0f} MiB of memory available but the .pte and its KV "
                f"cache and activations need {needs['memory_bytes'] / 2**20:.0f} MiB{cache}"
            )
        checked.append(f"memory: {needs['memory_bytes'] / 2**20:.0f} MiB needed{cache}, {available / 2**20:.0f} MiB available")
    free = facts.get("disk_free_bytes")
    if needs.get("disk_bytes") and free is not None:
        if free < needs["disk_bytes"]:
            raise DeviceCheckFailed(
                f"the device has {free / 1e6:.0f} MB of free disk but needs {needs['disk_bytes'] / 1e6:.0f} MB"
            )
        checked.append(f"disk: {needs['disk_bytes'] / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")
    return checked


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


def eos_id_set(meta: dict) -> set[int]:
    """The .pte's `get_eos_ids` (one id or a list) as a set."""
    eos = meta.get("get_eos_ids", [])
    return {int(i) for i in (eos if isinstance(eos, list) else [eos])}


def until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS id: ExecuTorch's runner stops there, our parity loop does not."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return list(tokens)


RUNNER_FIGURES = ("prefill_tps", "decode_tps", "ttft_s")
BINDING_NOT_IMPORTABLE = "executorch.extension.llm.runner is not importable"  # llm_runner.binding_missing's sentence


def runner_block(report: dict, spec: dict, loop_tokens: list[list[int]], eos_ids: set[int]) -> dict:
    """bench.json's `executorch_runner` block from `gemma_edge.llm_runner --compare`'s report: the
    runner's tokens and prompt ids against our loop's (the parity prompts, on this device), its own
    Stats summarised over the prompts, and our loop's on the same prompts with the same definitions."""
    runner, ours = report["runner"], report["our_loop"]

    def summary(results: list[dict]) -> dict:
        figures = {
            name: summarise(values) if (values := [r["stats"][name] for r in results if r["stats"][name] is not None]) else None
            for name in RUNNER_FIGURES
        }
        return {**figures, "load_s": results[0]["stats"]["load_s"] if results else None}

    tokens = [r["tokens"] for r in runner]
    return {
        "available": True,
        "runner": "ExecuTorch's C++ TextLLMRunner (executorch.extension.llm.runner), greedy, tokenising the prompt text itself",
        "prompts": [r["prompt"] for r in runner],
        "prompt_ids": [r["prompt_ids"] for r in runner],
        "prompt_ids_equal_loop": [r["prompt_ids"] for r in runner] == spec["parity_prompt_ids"],
        "tokens": tokens,
        "eos_ids": sorted(eos_ids),
        "tokens_equal_loop": tokens == [until_eos(t, eos_ids) for t in loop_tokens],
        "stats": {
            **summary(runner),
            "construct_s": runner[0]["stats"]["construct_s"] if runner else None,
            "clock": "the runner's own Stats, in whole milliseconds",
        },
        "stats_per_prompt": [r["stats"] for r in runner],
        "loop_same_prompts": {
            **summary(ours),
            "clock": "time.perf_counter around our loop's calls",
            "tokens_equal_runner": [o["tokens"] for o in ours] == tokens,
        },
    }


def bench_llm_runner(
    pte: Path, spec: dict, loop_tokens: list[list[int]], eos_ids: set[int], unavailable: str | None = None
) -> dict:
    """The parity prompts under ExecuTorch's own LLM runner (`python -m gemma_edge.llm_runner
    --compare`, a process of its own, so that the runner's aborts, its memory and its printing stay
    out of this one), with the machine's load around it. The runner failing, missing or rejecting the
    program, or a pre-flight reason (`unavailable`, from `runner_preflight`: then it is not started),
    gives `available: false` and the reason, never a failed benchmark."""

    def run() -> dict:
        if unavailable:
            return {"available": False, "reason": unavailable}
        if not spec.get("tokenizer") or not spec.get("parity_prompts") or None in spec["parity_prompts"]:
            return {"available": False, "reason": "the host sent no tokenizer or no prompt texts for the runner"}
        with tempfile.TemporaryDirectory(prefix="llm-runner-bench-") as scratch:
            prompts, out = Path(scratch) / "prompts.json", Path(scratch) / "runner.json"
            prompts.write_text(json.dumps(spec["parity_prompts"]))
            args = [
                "--pte",
                str(pte),
                "--tokenizer",
                spec["tokenizer"],
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                str(spec["max_new_tokens"]),
                "--compare",
                "--out",
                str(out),
            ]
            if spec.get("threads"):
                args += ["--threads", str(spec["threads"])]
            try:
                run_module("llm_runner", args, spec.get("peer_timeout_s", 3600), "the runner")
            except ModuleFailed as error:
                # executorch's own message hides why its binding did not import; llm_runner prints the cause.
                missing = [line for line in error.stderr.splitlines() if line.startswith(BINDING_NOT_IMPORTABLE)]
                return {"available": False, "reason": missing[-1] if missing else str(error)}
            return runner_block(json.loads(out.read_text()), spec, loop_tokens, eos_ids)

    block, load = timed_with_load(run)
    block["load"] = load
    if block["available"]:
        prefill, decode = (block["stats"][figure] for figure in ("prefill_tps", "decode_tps"))
        print(
            f"executorch runner: prefill {prefill['avg'] if prefill else float('nan'):.1f} tok/s, "
            f"decode {decode['avg'] if decode else float('nan'):.1f} tok/s, "
            f"tokens {'equal to' if block['tokens_equal_loop'] else 'DIFFERENT from'} our loop's",
            flush=True,
        )
    else:
        print(f"executorch runner: not available: {block['reason']}", flush=True)
    return block


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
    from gemma_edge.artifacts import peak_rss_bytes
    from gemma_edge.runtime import PteDecoder, greedy_decode

    threads = spec.get("threads")
    # The limit every engine's decode shares, measured once before any of them holds memory.
    bandwidth = measure_in_child(int(threads or os.cpu_count()), emulated=bool(spec.get("emulated")))
    print(
        f"memory read bandwidth at {bandwidth['threads']} threads: {bandwidth['gb_per_s']['avg']:.1f} GB/s"
        + (" (emulated: short form, says nothing about a Pi)" if spec.get("emulated") else ""),
        flush=True,
    )
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
    started = time.perf_counter()
    decoder = PteDecoder(pte)
    load_s = time.perf_counter() - started
    denormals_flushed, decodes_with = decoder.denormals_flushed, decoder.decodes_with  # freed before the peers run
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
    kv_cache = {"bytes": spec.get("kv_cache_bytes"), "max_context_len": context, "tokens_per_call": decoder.tokens_per_call}
    del decoder
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
        "denormals_flushed": denormals_flushed,
        "decodes_with": decodes_with,
        "threads": threads or None,
        "bandwidth": bandwidth,
        "runs": runs,
        "load": load,
        "parity_tokens": parity,
        "peak_rss_bytes": peak_rss,
        "kv_cache": kv_cache,
        "runtime": "executorch.runtime (Python bindings), timed around Method.execute",
        "engines": engines,
        "ratios": ratios(runs, engines),
        "executorch_runner": runner,
        "busy": load["busy"] or runner["load"]["busy"] or any(e.get("load", {}).get("busy") for e in engines.values()),
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
