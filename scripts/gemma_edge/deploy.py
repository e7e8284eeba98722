"""Provision a device, put the .pte on it, benchmark decode there and bring the numbers back.

A target is either `ssh` (a Raspberry Pi 5, or any host reachable with paramiko) or `local` (this
machine, in a subprocess, no SSH). Both run the same `gemma_edge.device_bench` module.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import artifacts, ssh
from .artifacts import read_json, write_json

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
RUNNER_FILES = ("__init__.py", "artifacts.py", "runtime.py", "device_bench.py")
RUNTIME_PACKAGES = ("executorch", "torch")


class DeviceError(RuntimeError):
    """The device is not fit to run the benchmark; the message says why."""


def ssh_target(settings: dict) -> ssh.SshTarget:
    return ssh.SshTarget(
        host=settings["host"], port=settings.get("port"), user=settings.get("user"),
        key_file=settings.get("key_file"), known_hosts=settings.get("known_hosts"),
        ssh_config=settings.get("ssh_config", "~/.ssh/config"),
        trust_on_first_use=settings.get("trust_on_first_use", False),
        connect_timeout_s=settings.get("connect_timeout_s", 10),
    )


@contextmanager
def connection(settings: dict):
    client = ssh.connect(ssh_target(settings))
    try:
        yield client
    finally:
        client.close()


def remote_layout(settings: dict) -> dict:
    work = settings["workdir"].rstrip("/")
    python = f"{work}/venv/bin/python" if settings.get("create_venv", True) else settings["python"]
    return {"work": work, "runner": f"{work}/runner", "models": f"{work}/models", "python": python}


def public_version(version: str | None) -> str | None:
    """2.13.0+cpu -> 2.13.0: the x86 CPU wheel and the aarch64 wheel are the same release."""
    return version.split("+", 1)[0] if version else version


def check_versions(device_versions: dict, host_versions: dict) -> None:
    """The device must run the exact runtime release the .pte was built with (a torch mismatch
    once made XNNPACK reject the program at load time)."""
    wrong = [f"{name} {device_versions.get(name)} (host {host_versions[name]})"
             for name in RUNTIME_PACKAGES if public_version(device_versions.get(name)) != public_version(host_versions[name])]
    if wrong:
        raise DeviceError(f"the device's runtime does not match the host's: {', '.join(wrong)}; re-run provisioning")


def host_runtime_versions() -> dict:
    """executorch and torch releases on this host, without local tags such as +cpu."""
    versions = artifacts.package_versions(RUNTIME_PACKAGES)
    return {name: public_version(versions[name]) for name in RUNTIME_PACKAGES}


# ---- provision -------------------------------------------------------------------------------

def provision(name: str, settings: dict, out: Path) -> dict:
    host_versions = host_runtime_versions()
    if settings["kind"] == "local":
        facts = local_facts()
    else:
        facts = provision_ssh(settings, host_versions)
    check_versions(facts["versions"], host_versions)
    record = {"target": name, "kind": settings["kind"], **facts}
    write_json(out, record)
    log.info("%s: %s, %s cores, %.1f GB, %s; executorch %s, torch %s", name, facts["cpu_model"], facts["cores"],
             (facts["memory_bytes"] or 0) / 1e9, facts["os"], facts["versions"]["executorch"], facts["versions"]["torch"])
    return record


def local_facts() -> dict:
    result = subprocess.run([sys.executable, "-m", "gemma_edge.device_bench", "facts", "--out", "-"],
                            capture_output=True, text=True, env=_local_env(), timeout=120, check=True)
    return json.loads(result.stdout)


def _local_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}


def provision_ssh(settings: dict, host_versions: dict) -> dict:
    layout = remote_layout(settings)
    timeout = settings["command_timeout_s"]
    with connection(settings) as client:
        ssh.run(client, ["mkdir", "-p", f"{layout['runner']}/gemma_edge", layout["models"]], timeout)
        ssh.remove_stale_uploads(client, layout["models"], timeout)
        ssh.remove_stale_uploads(client, f"{layout['runner']}/gemma_edge", timeout)
        if settings.get("create_venv", True):
            ensure_venv(client, settings, layout, host_versions)
        for filename in RUNNER_FILES:
            ssh.upload_atomically(client, PACKAGE_DIR / filename, f"{layout['runner']}/gemma_edge/{filename}", timeout)
        return remote_facts(client, layout, timeout)


def remote_facts(client, layout: dict, timeout: float) -> dict:
    """The device's facts and runtime versions, as the uploaded runner reports them."""
    command = f"cd {shlex.quote(layout['runner'])} && {shlex.quote(layout['python'])} -m gemma_edge.device_bench facts --out -"
    status, out, err = ssh.run_shell(client, command, timeout, check=False)
    if status != 0:
        raise DeviceError(f"the device's Python ({layout['python']}) cannot run the benchmark runner: {err.strip()[-1500:]}")
    return json.loads(out)


def ensure_venv(client, settings: dict, layout: dict, host_versions: dict) -> None:
    """Create the device's virtualenv and install the host's exact runtime versions (idempotent)."""
    timeout = settings["command_timeout_s"]
    venv_python = layout["python"]
    status, _, _ = ssh.run(client, ["test", "-x", venv_python], timeout, check=False)
    if status != 0:
        log.info("creating %s/venv with %s", layout["work"], settings["python"])
        ssh.run(client, [settings["python"], "-m", "venv", f"{layout['work']}/venv"], timeout)
    pins = [f"{name}=={version}" for name, version in host_versions.items()]
    status, out, _ = ssh.run(client, [venv_python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", *pins], timeout, check=False)
    if status == 0 and not json.loads(out).get("install"):
        log.info("device virtualenv already has %s", ", ".join(pins))
        return
    log.info("installing %s on the device (this can take a while)", ", ".join(pins))
    ssh.run(client, [venv_python, "-m", "pip", "install", "--quiet", *pins], settings["install_timeout_s"])


# ---- deploy ----------------------------------------------------------------------------------

def deploy(name: str, settings: dict, pte: Path, tokenizer: Path, out: Path) -> dict:
    """Put the .pte and tokenizer on the device (atomically, skipped when already there)."""
    started = time.monotonic()
    pte_sha = artifacts.sha256_file(pte)
    if settings["kind"] == "local":
        files = {"pte": {"path": str(Path(pte).resolve()), "sha256": pte_sha, "uploaded": False, "seconds": 0.0},
                 "tokenizer": {"path": str(Path(tokenizer).resolve()), "uploaded": False, "seconds": 0.0}}
    else:
        layout = remote_layout(settings)
        timeout = settings["transfer_timeout_s"]
        folder = f"{layout['models']}/{pte_sha[:16]}"
        with connection(settings) as client:
            ssh.run(client, ["mkdir", "-p", folder], settings["command_timeout_s"])
            files = {
                "pte": ssh.upload_atomically(client, pte, f"{folder}/model.pte", timeout),
                "tokenizer": ssh.upload_atomically(client, tokenizer, f"{folder}/tokenizer.json", timeout),
            }
    record = {"target": name, "kind": settings["kind"], "files": files, "seconds": time.monotonic() - started}
    write_json(out, record)
    return record


# ---- bench -----------------------------------------------------------------------------------

def bench_spec(settings: dict, bench: dict, host_parity: dict) -> dict:
    return {
        "prompt_lengths": bench["prompt_lengths"],
        "new_tokens": bench["new_tokens"],
        "repetitions": bench["repetitions"],
        "warmup": bench["warmup"],
        "threads": settings.get("threads"),
        "parity_prompt_ids": [p["prompt_ids"] for p in host_parity["prompts"]],
        "max_new_tokens": host_parity["max_new_tokens"],
    }


def run_device_bench(name: str, settings: dict, deployed: dict, spec: dict) -> dict:
    if settings["kind"] == "local":
        return run_local_bench(deployed["files"]["pte"]["path"], spec, settings["bench_timeout_s"])
    layout = remote_layout(settings)
    folder = os.path.dirname(deployed["files"]["pte"]["path"])
    with connection(settings) as client, tempfile.TemporaryDirectory() as scratch:
        check_versions(remote_facts(client, layout, settings["command_timeout_s"])["versions"], host_runtime_versions())
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        remote_spec = f"{folder}/spec-{os.getpid()}.json"
        remote_out = f"{folder}/bench-{os.getpid()}.json"
        ssh.upload_atomically(client, spec_path, remote_spec, settings["command_timeout_s"])
        command = (f"cd {shlex.quote(layout['runner'])} && {shlex.quote(layout['python'])} -m gemma_edge.device_bench bench "
                   f"--pte {shlex.quote(deployed['files']['pte']['path'])} --spec {shlex.quote(remote_spec)} "
                   f"--out {shlex.quote(remote_out)}")
        try:
            _, stdout, _ = ssh.run_shell(client, command, settings["bench_timeout_s"])
            log.info("device output:\n%s", stdout.strip())
            local_out = Path(scratch) / "bench.json"
            ssh.download_file(client, remote_out, local_out, settings["command_timeout_s"])
            return json.loads(local_out.read_text())
        finally:
            if client.get_transport().is_active():
                ssh.run(client, ["rm", "-f", remote_spec, remote_out], settings["command_timeout_s"], check=False)


def run_local_bench(pte: str, spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, out = Path(scratch) / "spec.json", Path(scratch) / "bench.json"
        spec_path.write_text(json.dumps(spec))
        try:
            result = subprocess.run([sys.executable, "-m", "gemma_edge.device_bench", "bench", "--pte", pte, "--spec", str(spec_path),
                                     "--out", str(out)], capture_output=True, text=True, env=_local_env(), timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise DeviceError(f"the local benchmark timed out after {timeout_s:.0f} s") from error
        if result.returncode != 0:
            raise DeviceError(f"the local benchmark failed: {result.stderr.strip()[-2000:]}")
        log.info("benchmark output:\n%s", result.stdout.strip())
        return json.loads(out.read_text())


def compare_tokens(host_parity: dict, device_tokens: list[list[int]]) -> list[dict]:
    rows = []
    for prompt, produced in zip(host_parity["prompts"], device_tokens):
        rows.append({
            "prompt": prompt.get("prompt"),
            "prompt_ids": prompt["prompt_ids"],
            "device_tokens": produced,
            "host_pte_tokens": prompt["pte_tokens"],
            "host_fp32_tokens": prompt["reference_tokens"],
            "matches_host_pte": produced == prompt["pte_tokens"],
            "matched_host_fp32": sum(a == b for a, b in zip(produced, prompt["reference_tokens"])),
            "first_divergence_from_fp32": next((i for i, (a, b) in enumerate(zip(produced, prompt["reference_tokens"])) if a != b), None),
        })
    return rows


def render_parity_log(name: str, rows: list[dict]) -> str:
    lines = [f"device parity on target {name}: the device decoded the host's prompt ids greedily",
             f"{'prompt':<36} {'= host .pte':>11} {'vs FP32':>8} {'diverge':>7}"]
    for row in rows:
        n = len(row["host_fp32_tokens"])
        div = "-" if row["first_divergence_from_fp32"] is None else str(row["first_divergence_from_fp32"])
        lines.append(f"{(row['prompt'] or '')[:36]:<36} {'yes' if row['matches_host_pte'] else 'NO':>11} "
                     f"{row['matched_host_fp32']:>4}/{n:<3} {div:>7}")
        lines.append(f"  device: {row['device_tokens']}")
        if not row["matches_host_pte"]:
            lines.append(f"  host:   {row['host_pte_tokens']}")
    agree = sum(r["matches_host_pte"] for r in rows)
    lines.append(f"{agree}/{len(rows)} prompts identical to the host's run of the same .pte")
    return "\n".join(lines) + "\n"


def bench(name: str, settings: dict, bench_config: dict, deployed_path: Path, device_path: Path, pte_manifest_path: Path,
          host_parity_path: Path, checkpoint_path: Path, out_bench: Path, out_log: Path, out_parity: Path) -> dict:
    deployed, device = read_json(deployed_path), read_json(device_path)
    pte_manifest, host_parity, checkpoint = read_json(pte_manifest_path), read_json(host_parity_path), read_json(checkpoint_path)
    if deployed["files"]["pte"]["sha256"] != pte_manifest["sha256"]:
        raise DeviceError("the .pte on the device is not the one built for this configuration; re-run deploy")
    spec = bench_spec(settings, bench_config, host_parity)
    started = time.time()
    result = run_device_bench(name, settings, deployed, spec)
    finished = time.time()
    rows = compare_tokens(host_parity, result.pop("parity_tokens"))
    report = {
        "schema": "gemma-edge.bench/1",
        "target": name,
        "model": {"repo_id": checkpoint["repo_id"], "revision": checkpoint["revision"], "commit": checkpoint["commit"]},
        "quantization": pte_manifest["program_params"],
        "pte": {"sha256": pte_manifest["sha256"], "size_bytes": pte_manifest["size_bytes"],
                "per_op_mode_used": pte_manifest["lowering"]["per_op_mode_used"],
                "fused_rejection": pte_manifest["lowering"]["fused_rejection"]},
        "device": {k: v for k, v in device.items() if k not in ("target",)},
        "host_parity": {k: host_parity["summary"][k] for k in ("teacher_forced_top1", "logits_cosine", "greedy_prefix", "passed")},
        "versions": {"host": artifacts.package_versions(), "device": device["versions"]},
        **result,
        "wall_clock": {"started": started, "finished": finished},
        "parity": {"prompts": len(rows), "identical_to_host_pte": sum(r["matches_host_pte"] for r in rows),
                   "exact_vs_host_fp32": sum(r["first_divergence_from_fp32"] is None for r in rows)},
    }
    write_json(out_parity, {"target": name, "pte_sha256": pte_manifest["sha256"], "prompts": rows})
    with artifacts.atomic_output(out_log) as tmp:
        tmp.write_text(render_parity_log(name, rows))
    write_json(out_bench, report)
    first = report["runs"][0]
    log.info("%s: decode %.2f ± %.2f tok/s, prefill %.1f tok/s (prompt %d), load %.2f s, peak RSS %.0f MB",
             name, first["decode_tps"]["avg"], first["decode_tps"]["stddev"], first["prefill_tps"]["avg"],
             first["prompt_tokens"], report["load_s"], report["peak_rss_bytes"] / 1e6)
    return report
