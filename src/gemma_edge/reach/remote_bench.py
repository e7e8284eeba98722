"""Benchmark decode on a device and bring the numbers back.

A target is either `ssh` (a Raspberry Pi 5, or any host reachable with paramiko) or `local` (this
machine, in a subprocess, no SSH). Both run the same `gemma_edge.device.device_bench` module.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from gemma_edge.device import bandwidth, device_bench, peer_bench
from gemma_edge.device.files import atomic_output, read_json, write_json
from gemma_edge.measure.device_parity import compare_peer_tokens, compare_tokens, render_parity_log
from gemma_edge.measure.summary import kernel_columns
from gemma_edge.reach import device_lock, ssh
from gemma_edge.reach.deploy import restore_removed_files
from gemma_edge.reach.provision import check_versions, host_runtime_versions
from gemma_edge.reach.runner import local_env, remote_facts, runner_argv
from gemma_edge.reach.target import DeviceError, Target, connection, holding_device, local_lock_file
from gemma_edge.workflow.manifest import package_versions

log = logging.getLogger(__name__)


def bench_spec(
    target: Target,
    bench: dict,
    host_parity: dict,
    pte_manifest: dict,
    peers: list[dict] | None = None,
    tokenizer: str | None = None,
    emulated: bool = False,
) -> dict:
    """What the device's benchmark runs. `tokenizer` (tokenizer.json where deploy put it) and the
    parity prompts' texts are for ExecuTorch's LLM runner, which tokenises text itself; `emulated`
    (the probe's finding) shortens the bandwidth measurement."""
    planned = pte_manifest["lowering"].get("planned_memory_bytes") or 0
    return {
        "memory_bytes": pte_manifest["size_bytes"] + planned,  # the mapped .pte plus its KV cache and activations
        "kv_cache_bytes": pte_manifest.get("kv_cache_bytes"),
        "max_context_len": pte_manifest["runner_metadata"].get("get_max_context_len"),
        "prompt_lengths": bench["prompt_lengths"],
        "new_tokens": bench["new_tokens"],
        "repetitions": bench["repetitions"],
        "warmup": bench["warmup"],
        "threads": target.threads,
        "parity_prompt_ids": [p["prompt_ids"] for p in host_parity["prompts"]],
        "parity_prompts": [p.get("prompt") for p in host_parity["prompts"]],
        "tokenizer": tokenizer,
        "max_new_tokens": host_parity["max_new_tokens"],
        "peers": peers or [],
        "peer_timeout_s": target.timeouts.bench_s,
        "emulated": emulated,
    }


def run_device_bench(target: Target, deployed: dict, spec: dict) -> dict:
    """The device's benchmark result, with `wall_clock`: when it held the device (lock taken, released)."""
    step = f"bench {deployed.get('variant', '')}".strip()
    if target.is_local:
        lock = device_lock.held_here(target.name, local_lock_file(), step, target.house.lock_timeout_s)
    else:
        lock = nullcontext()
    with lock:
        started = time.time()
        if target.is_local:
            result = run_local_bench(deployed["files"]["pte"]["path"], spec, target.timeouts.bench_s)
        else:
            result = run_ssh_bench(target, deployed, spec)
        held_from = result.pop("locked_at", started)
        return {**result, "wall_clock": {"started": held_from, "finished": time.time()}}


def run_ssh_bench(target: Target, deployed: dict, spec: dict) -> dict:
    step = f"bench {deployed.get('variant', '')}".strip()
    layout, short = target.layout, target.timeouts.command_s
    folder = os.path.dirname(deployed["files"]["pte"]["path"])
    with (
        connection(target) as client,
        holding_device(client, target, step),
        tempfile.TemporaryDirectory() as scratch,
    ):
        locked_at = time.time()
        restore_removed_files(client, target, deployed)
        check_versions(remote_facts(client, layout, short)["versions"], host_runtime_versions())
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        remote_spec = f"{folder}/spec-{os.getpid()}.json"
        remote_out = f"{folder}/bench-{os.getpid()}.json"
        ssh.upload_atomically(client, spec_path, remote_spec, short)
        argv = runner_argv(
            layout,
            layout.python,
            "bench",
            "--pte",
            deployed["files"]["pte"]["path"],
            "--spec",
            remote_spec,
            "--out",
            remote_out,
        )
        try:
            status, _, stderr = ssh.run(
                client, argv, target.timeouts.bench_s, check=False, on_line=lambda line: log.info("%s: %s", target.name, line)
            )
            if status != 0:
                raise DeviceError(bench_failure(target.name, status, stderr))
            local_out = Path(scratch) / "bench.json"
            ssh.download_file(client, remote_out, local_out, short)
            return {**json.loads(local_out.read_text()), "locked_at": locked_at}
        finally:
            if client.get_transport().is_active():
                ssh.run(client, ["rm", "-f", remote_spec, remote_out], short, check=False)


def run_local_bench(pte: str, spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, out = Path(scratch) / "spec.json", Path(scratch) / "bench.json"
        spec_path.write_text(json.dumps(spec))
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gemma_edge.device.device_bench",
                    "bench",
                    "--pte",
                    pte,
                    "--spec",
                    str(spec_path),
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
                env=local_env(),
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as error:
            raise DeviceError(f"the local benchmark timed out after {timeout_s:.0f} s") from error
        if result.returncode != 0:
            raise DeviceError(bench_failure("local", result.returncode, result.stderr))
        log.info("benchmark output:\n%s", result.stdout.strip())
        return json.loads(out.read_text())


def bench_failure(name: str, status: int, stderr: str) -> str:
    """One sentence for a failed device benchmark: a pre-flight check's own sentence, a runtime
    that rejects the program (fused XNNPACK subgraphs were rejected on aarch64 once), or the tail
    of the device's stderr."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if status == device_bench.CHECK_FAILED and lines:
        return f"{name}: {lines[-1].removeprefix('device check failed: ')}"
    rejected = next(
        (line for line in lines if "could not be loaded by the ExecuTorch runtime" in line or "xnn_status" in line), None
    )
    if rejected:
        return (
            f"{name}: the device's ExecuTorch runtime rejected the .pte ({rejected.strip()[-400:]}); if XNNPACK rejects "
            "fused subgraphs there, lower with lowering.per_op_mode: true"
        )
    # Killed by a signal: a subprocess's negative status, or a shell's 128 + the signal's number.
    signum = -status if status < 0 else status - 128 if 128 < status < 160 else None
    if signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        cause = " (often the out-of-memory killer)" if signum == signal.SIGKILL else ""
        return f"the benchmark on {name} was killed by {signal.Signals(signum).name}{cause}; re-run the same command"
    return f"the benchmark failed on {name} (exit {status}): {stderr.strip()[-2000:]}"


def add_bandwidth_fractions(result: dict, weights: dict) -> None:
    """The .pte's and each engine's weight bytes per token, and per run the share of the device's
    measured memory bandwidth its decode reads (bandwidth.annotate_runs)."""
    limit = result.get("bandwidth")
    result["weight_bytes"] = weights.get("pte")
    bandwidth.annotate_runs(result["runs"], weights.get("pte"), limit)
    for name, engine in result.get("engines", {}).items():
        if engine.get("available", True):
            engine["weight_bytes"] = weights.get(name)
            bandwidth.annotate_runs(engine["runs"], weights.get(name), limit)


@dataclass(frozen=True)
class BenchInputs:
    """What the device benchmark reads: deploy's and provision's records, the .pte's manifest, the
    host's parity record and the checkpoint's manifest."""

    deployed: Path
    device: Path
    pte_manifest: Path
    host_parity: Path
    checkpoint: Path


@dataclass(frozen=True)
class BenchOutputs:
    bench: Path
    parity_log: Path
    parity: Path


def bench(target: Target, bench_config: dict, inputs: BenchInputs, outputs: BenchOutputs) -> dict:
    name = target.name
    deployed, device = read_json(inputs.deployed), read_json(inputs.device)
    pte_manifest, host_parity = read_json(inputs.pte_manifest), read_json(inputs.host_parity)
    checkpoint = read_json(inputs.checkpoint)
    if deployed["files"]["pte"]["sha256"] != pte_manifest["sha256"]:
        raise DeviceError("the .pte on the device is not the one built for this configuration; re-run deploy")
    spec = bench_spec(
        target,
        bench_config,
        host_parity,
        pte_manifest,
        deployed.get("peers", []),
        deployed["files"]["tokenizer"]["path"],
        bool(device.get("emulated")),
    )
    result = run_device_bench(target, deployed, spec)
    runner = result.get("executorch_runner")
    rows = compare_tokens(host_parity, result.pop("parity_tokens"), runner)
    add_bandwidth_fractions(result, deployed.get("weight_bytes") or {})
    report = {
        "schema": "gemma-edge.bench/1",
        "target": name,
        "model": {"repo_id": checkpoint["repo_id"], "revision": checkpoint["revision"], "commit": checkpoint["commit"]},
        "quantization": pte_manifest["program_params"],
        "emulated": bool(device.get("emulated")),
        "pte": {
            "sha256": pte_manifest["sha256"],
            "size_bytes": pte_manifest["size_bytes"],
            "per_op_mode_used": pte_manifest["lowering"]["per_op_mode_used"],
            "fused_rejection": pte_manifest["lowering"]["fused_rejection"],
            # The device loaded and ran the program: a fused one had its XNNPACK subgraphs accepted
            # there (None: lowered per-op, so the fused path was not tried on the device).
            "fused_accepted_on_device": None if pte_manifest["lowering"]["per_op_mode_used"] else True,
        },
        "device": {k: v for k, v in device.items() if k not in ("target", "wheels")},
        "host_parity": {
            k: host_parity["summary"][k] for k in ("teacher_forced_top1", "logits_cosine", "greedy_prefix", "passed")
        },
        "versions": {"host": package_versions(), "device": device["versions"]},
        **result,
        "parity": {
            "prompts": len(rows),
            "identical_to_host_pte": sum(r["matches_host_pte"] for r in rows),
            "exact_vs_host_fp32": sum(r["first_divergence_from_fp32"] is None for r in rows),
            "runner_identical_to_host_pte": sum(r["runner_matches_host_pte"] for r in rows)
            if runner and runner.get("available")
            else None,
        },
    }
    runner_summary = (
        None
        if runner is None
        else {k: runner[k] for k in ("available", "reason", "tokens_equal_loop", "prompt_ids_equal_loop") if k in runner}
    )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(checkpoint["path"]) / "tokenizer.json"))
    peers = compare_peer_tokens(host_parity, report["engines"], tokenizer)
    write_json(
        outputs.parity,
        {
            "target": name,
            "pte_sha256": pte_manifest["sha256"],
            "prompts": rows,
            "executorch_runner": runner_summary,
            "peers": peers,
        },
    )
    with atomic_output(outputs.parity_log) as tmp:
        tmp.write_text(render_parity_log(name, rows, runner, peers))
    write_json(outputs.bench, report)
    first = report["runs"][0]
    log.info(
        "%s: decode %.2f ± %.2f tok/s, prefill %.1f tok/s (prompt %d), load %.2f s (again %.2f s), "
        "peak RSS %.0f MB (anonymous %.0f MB, file-backed %.0f MB)%s",
        name,
        first["decode_tps"]["avg"],
        first["decode_tps"]["stddev"],
        first["prefill_tps"]["avg"],
        first["prompt_tokens"],
        report["load_s"],
        report["warm_load_s"],
        report["peak_rss_bytes"] / 1e6,
        report["resident"]["anon_peak_bytes"] / 1e6,
        report["resident"]["file_peak_bytes"] / 1e6,
        " (emulated: these speeds say nothing about a Pi)" if report["emulated"] else "",
    )
    kernels = report["xnnpack_kernels"]
    if kernels["traced"]:
        kinds = kernel_columns(kernels)["fully_connected_kernels"]
        log.info("%s: XNNPACK fully-connected kernels in one decode call: %s", name, kinds)
    else:
        log.warning("%s: XNNPACK's kernels were not traced: %s", name, kernels["reason"])
    if first.get("bandwidth_fraction") is not None:
        log.info(
            "%s: memory read bandwidth %.1f GB/s at %d threads; the .pte reads %.2f MB of weights a token, so its decode "
            "reads %.2f of that bandwidth (prompt %d)",
            name,
            report["bandwidth"]["gb_per_s"]["avg"],
            report["bandwidth"]["threads"],
            first["weight_bytes_per_token"] / 1e6,
            first["bandwidth_fraction"],
            first["prompt_tokens"],
        )
    log.info(
        "%s: %d/%d prompts identical to the host's run of the same .pte",
        name,
        report["parity"]["identical_to_host_pte"],
        report["parity"]["prompts"],
    )
    if runner is not None:
        log_runner(name, runner, report["parity"])
    for engine_name, engine in report["engines"].items():
        if not engine["available"]:
            log.warning("%s: %s not available: %s", name, engine_name, engine["reason"])
            continue
        ratio = next(r for r in report["ratios"] if r["engine"] == engine_name)
        log.info(
            "%s: %s decode %.2f tok/s at prompt %d; .pte/%s decode %.2f, prefill %.2f",
            name,
            engine_name,
            engine["runs"][0]["decode_tps"]["avg"],
            ratio["prompt_tokens"],
            engine_name,
            ratio["decode"],
            ratio["prefill"],
        )
    if report["busy"]:
        log.warning(
            "%s: other processes used more than %.0f %% of the CPU around a run (bench.json `load`): these speeds "
            "are not clean figures; re-run on a quiet machine",
            name,
            100 * peer_bench.BUSY_SHARE,
        )
    return report


def log_runner(name: str, runner: dict, parity: dict) -> None:
    """One line on ExecuTorch's LLM runner: its own rates beside our loop's on the same prompts, and its tokens."""
    if not runner["available"]:
        log.warning("%s: ExecuTorch's LLM runner not available: %s", name, runner["reason"])
        return

    def rate(stats: dict, figure: str) -> str:
        return f"{stats[figure]['avg']:.1f}" if stats[figure] else "n/a"

    stats, ours = runner["stats"], runner["loop_same_prompts"]
    log.info(
        "%s: ExecuTorch's LLM runner decode %s tok/s, prefill %s tok/s (our loop on the same prompts: %s, %s); "
        "tokens %s our loop's, %d/%d identical to the host's .pte",
        name,
        rate(stats, "decode_tps"),
        rate(stats, "prefill_tps"),
        rate(ours, "decode_tps"),
        rate(ours, "prefill_tps"),
        "equal to" if runner["tokens_equal_loop"] else "DIFFERENT from",
        parity["runner_identical_to_host_pte"],
        parity["prompts"],
    )
