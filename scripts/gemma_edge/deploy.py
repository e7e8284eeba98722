"""Provision a device, put the .pte on it, benchmark decode there and bring the numbers back.

A target is either `ssh` (a Raspberry Pi 5, or any host reachable with paramiko) or `local` (this
machine, in a subprocess, no SSH). Both run the same `gemma_edge.device_bench` module.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from . import artifacts, bandwidth, device_bench, device_lock, device_storage, peer_bench, ssh
from .artifacts import read_json, write_json
from .config import HOUSEKEEPING_KEYS

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
RUNNER_FILES = (
    "__init__.py",
    "artifacts.py",
    "runtime.py",
    "device_bench.py",
    "peer_bench.py",
    "litert_bench.py",
    "bandwidth.py",
    "llm_runner.py",
    "elf.py",
)
RUNTIME_PACKAGES = ("executorch", "torch")


class DeviceError(RuntimeError):
    """The device is not fit to run the benchmark; the message says why."""


@dataclass(frozen=True)
class Housekeeping:
    keep_models: int = 1  # earlier deployments kept beside the one deployed and the configured variant's
    keep_wheelhouse: bool = False  # leave the wheels on the device after a verified install
    lock_timeout_s: float = 3600.0  # how long a step waits for another run's hold on the device

    @classmethod
    def of(cls, target: dict) -> Housekeeping:
        return cls(**{key: target[key] for key in HOUSEKEEPING_KEYS if key in target})


def local_lock_file() -> Path:
    """The `local` target's lock: this machine, whichever working directory times it."""
    cache = Path(os.environ.get("GEMMA_EDGE_CACHE", Path.home() / ".cache/gemma-edge"))
    return cache / "locks" / "local.lock"


@contextmanager
def holding_device(client, name: str, settings: dict, step: str, house: Housekeeping, remove: bool = False):
    """This device to this step alone, across working directories (gemma_edge.device_lock)."""
    layout = remote_layout(settings)
    try:
        with device_lock.held_over_ssh(client, name, settings["python"], layout["work"], step, house.lock_timeout_s, remove):
            yield
    except device_lock.HolderFailed as err:  # raised on entry only: the device's Python cannot run
        raise DeviceError(str(err)) from None


def ssh_target(settings: dict) -> ssh.SshTarget:
    return ssh.SshTarget(
        host=settings["host"],
        port=settings.get("port"),
        user=settings.get("user"),
        key_file=settings.get("key_file"),
        known_hosts=settings.get("known_hosts"),
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
    return {
        "work": work,
        "runner": f"{work}/runner",
        "models": f"{work}/models",
        "peers": f"{work}/peers",
        "wheelhouse": f"{work}/wheelhouse",
        "python": python,
    }


def public_version(version: str | None) -> str | None:
    """2.13.0+cpu -> 2.13.0: the x86 CPU wheel and the aarch64 wheel are the same release."""
    return version.split("+", 1)[0] if version else version


def check_versions(device_versions: dict, host_versions: dict) -> None:
    """The device must run the exact runtime release the .pte was built with (a torch mismatch
    once made XNNPACK reject the program at load time)."""
    wrong = [
        f"{name} {device_versions.get(name)} (host {host_versions[name]})"
        for name in RUNTIME_PACKAGES
        if public_version(device_versions.get(name)) != public_version(host_versions[name])
    ]
    if wrong:
        raise DeviceError(f"the device's runtime does not match the host's: {', '.join(wrong)}; re-run provisioning")


def host_runtime_versions() -> dict:
    """executorch and torch releases on this host, without local tags such as +cpu."""
    versions = artifacts.package_versions(RUNTIME_PACKAGES)
    return {name: public_version(versions[name]) for name in RUNTIME_PACKAGES}


# ---- probe and provision ---------------------------------------------------------------------


def is_emulated(settings: dict, facts: dict) -> bool:
    """An emulated device (QEMU user mode) is a correctness check, never a performance figure."""
    return bool(settings.get("emulated") or facts.get("emulator"))


def probe(name: str, settings: dict, out: Path, house: Housekeeping = Housekeeping()) -> dict:
    """What the device is, as its own system Python reports it before anything is installed: the
    host builds the device's wheelhouse for this platform."""
    layout = remote_layout(settings)
    timeout = settings["command_timeout_s"]
    with connection(settings) as client, holding_device(client, name, settings, "probe", house):
        upload_runner(client, layout, timeout)
        facts = remote_facts(client, layout, timeout, python=settings["python"])
    record = {"target": name, "kind": settings["kind"], "emulated": is_emulated(settings, facts), **facts}
    write_json(out, record)
    log.info(
        "%s: %s, %s, Python %s, %s %s, %d KiB pages%s",
        name,
        facts["machine"],
        facts["cpu_model"],
        facts["python"],
        *facts["libc"],
        facts["page_size"] // 1024,
        " (emulated)" if record["emulated"] else "",
    )
    return record


def provision(
    name: str,
    settings: dict,
    out: Path,
    platform_path: Path | None = None,
    wheelhouse_path: Path | None = None,
    wheel_dir: Path | None = None,
    house: Housekeeping = Housekeeping(),
) -> dict:
    host_versions = host_runtime_versions()
    if settings["kind"] == "local":
        facts, wheels = local_facts(), None
    else:
        wheelhouse_record = read_json(wheelhouse_path) if wheelhouse_path else None
        probed = read_json(platform_path) if platform_path else {}
        facts, wheels = provision_ssh(name, settings, host_versions, probed, wheelhouse_record, wheel_dir, house)
    check_versions(facts["versions"], host_versions)
    try:
        checked = device_bench.preflight(facts)
    except device_bench.DeviceCheckFailed as error:
        raise DeviceError(f"{name}: {error}") from error
    for line in checked:
        log.info("pre-flight: %s", line)
    runner_missing = device_bench.runner_preflight(facts)
    if runner_missing:
        log.warning("pre-flight: %s; the benchmarks will go on without it", runner_missing)
    record = {"target": name, "kind": settings["kind"], "emulated": is_emulated(settings, facts), **facts, "wheels": wheels}
    write_json(out, record)
    log.info(
        "%s: %s, %s cores, %.1f GB, %s; executorch %s, torch %s%s",
        name,
        facts["cpu_model"],
        facts["cores"],
        (facts["memory_bytes"] or 0) / 1e9,
        facts["os"],
        facts["versions"]["executorch"],
        facts["versions"]["torch"],
        " (emulated: a correctness check, not a performance figure)" if record["emulated"] else "",
    )
    return record


def clean(name: str, settings: dict, results: Path, house: Housekeeping = Housekeeping()) -> dict:
    """Remove everything the workflow put on an SSH device but its virtualenv: deployed programs,
    peers, the wheelhouse and the benchmark runner. This host's records of what the device held
    (`results/<target>/device.json` and every `deployed.json`) go too, so the next run provisions
    (installing nothing) and deploys again."""
    removed = []
    if settings["kind"] == "ssh":
        layout = remote_layout(settings)
        short = settings["command_timeout_s"]
        paths = [layout["models"], layout["peers"], layout["wheelhouse"], layout["runner"]]
        with connection(settings) as client, holding_device(client, name, settings, "clean", house, remove=True):
            _, out, _ = ssh.run_shell(
                client, "du -sk -- " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null", short, check=False
            )
            removed = [
                {"path": path, "bytes": int(kb) * 1024}
                for kb, path in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
            ]
            ssh.run(client, ["rm", "-rf", "--", *paths], short)
        log.info(
            "%s: removed %s (%.1f MB); the virtualenv stays",
            name,
            ", ".join(r["path"] for r in removed) or "nothing (the device held none of it)",
            sum(r["bytes"] for r in removed) / 1e6,
        )
    records = [Path(results) / "device.json", *sorted(Path(results).rglob("deployed.json"))]
    for record in records:
        if record.exists():
            record.unlink()
    return {"target": name, "removed": removed, "records_removed": [str(r) for r in records]}


def local_facts() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "gemma_edge.device_bench", "facts", "--out", "-"],
        capture_output=True,
        text=True,
        env=_local_env(),
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def _local_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}


def provision_ssh(
    name: str,
    settings: dict,
    host_versions: dict,
    probed: dict,
    wheelhouse_record: dict | None,
    wheel_dir: Path | None,
    house: Housekeeping = Housekeeping(),
) -> tuple[dict, dict | None]:
    layout = remote_layout(settings)
    timeout = settings["command_timeout_s"]
    wheels = None
    with connection(settings) as client, holding_device(client, name, settings, "provision", house):
        ssh.run(client, ["mkdir", "-p", layout["models"], layout["wheelhouse"]], timeout)
        ssh.remove_stale_uploads(client, layout["models"], timeout)
        ssh.remove_stale_uploads(client, layout["wheelhouse"], timeout)
        if settings.get("create_venv", True):
            if wheelhouse_record is None:
                raise DeviceError("create_venv is on but no wheelhouse was built for this device")
            wheels = install_wheelhouse(client, settings, layout, host_versions, probed, wheelhouse_record, Path(wheel_dir))
            wheels["wheelhouse_kept"] = house.keep_wheelhouse
            if not house.keep_wheelhouse:
                # Installed and verified: the wheels would only hold the device's disk (2.8 GB for
                # E2B's runtime). A later install uploads just the wheels it then lacks.
                ssh.run(client, ["rm", "-rf", "--", layout["wheelhouse"]], timeout)
                log.info("removed the wheelhouse from the device after the verified install (keep_wheelhouse: false)")
        upload_runner(client, layout, timeout)
        return remote_facts(client, layout, timeout), wheels


def upload_runner(client, layout: dict, timeout: float) -> None:
    """The benchmark runner (standard library plus the runtime) goes to <workdir>/runner."""
    ssh.run(client, ["mkdir", "-p", f"{layout['runner']}/gemma_edge"], timeout)
    ssh.remove_stale_uploads(client, f"{layout['runner']}/gemma_edge", timeout)
    for filename in RUNNER_FILES:
        ssh.upload_atomically(client, PACKAGE_DIR / filename, f"{layout['runner']}/gemma_edge/{filename}", timeout)


def runner_argv(layout: dict, python: str, *args: str) -> list[str]:
    """`python -m gemma_edge.device_bench ARGS` with the uploaded runner importable, run from the
    remote home: relative workdir, venv and .pte paths all stay relative to it."""
    return ["env", f"PYTHONPATH={layout['runner']}", python, "-m", "gemma_edge.device_bench", *args]


def remote_facts(client, layout: dict, timeout: float, python: str | None = None) -> dict:
    """The device's facts and runtime versions, as the uploaded runner reports them."""
    python = python or layout["python"]
    status, out, err = ssh.run(client, runner_argv(layout, python, "facts", "--out", "-"), timeout, check=False)
    if status != 0:
        raise DeviceError(f"the device's Python ({python}) cannot run the benchmark runner: {err.strip()[-1500:]}")
    return json.loads(out)


def install_wheelhouse(client, settings: dict, layout: dict, pins: dict, probed: dict, record: dict, wheel_dir: Path) -> dict:
    """Create the device's virtualenv and install the host-built wheelhouse into it, offline
    (`pip install --no-index`); idempotent: a venv that already has every wheel's version gets
    nothing uploaded and nothing installed."""
    from . import wheelhouse

    try:
        wheelhouse.check_wheels_fit([wheel["filename"] for wheel in record["wheels"]], wheelhouse.device_platform(probed))
    except wheelhouse.WheelhouseError as error:
        raise DeviceError(str(error)) from error
    timeout = settings["command_timeout_s"]
    venv_python = layout["python"]
    status, _, _ = ssh.run(client, ["test", "-x", venv_python], timeout, check=False)
    if status != 0:
        log.info("creating %s/venv with %s", layout["work"], settings["python"])
        ssh.run(client, [settings["python"], "-m", "venv", f"{layout['work']}/venv"], settings["install_timeout_s"])
    missing = wheels_not_installed(client, venv_python, record["wheels"], timeout)
    summary = {
        "wheels": len(record["wheels"]),
        "download_bytes": record["download_bytes"],
        "installed_bytes": record["installed_bytes"],
        "torch": record["torch"],
    }
    if not missing:
        log.info("the device's virtualenv already has all %d wheels of the wheelhouse; nothing to install", len(record["wheels"]))
        return {**summary, "installed_now": [], "files": _wheel_rows(record)}
    needed = sum(w["size_bytes"] for w in missing) + sum(w["installed_bytes"] for w in missing)
    free = ssh.remote_free_bytes(client, layout["work"], timeout)
    if free < needed:
        raise DeviceError(
            f"the device has {free / 1e6:.0f} MB free in {layout['work']} but the {len(missing)} wheels to "
            f"install need {needed / 1e6:.0f} MB (download plus installed size): free space there first"
        )
    log.info(
        "uploading %d of %d wheels (%.0f MB) to %s",
        len(missing),
        len(record["wheels"]),
        sum(w["size_bytes"] for w in missing) / 1e6,
        layout["wheelhouse"],
    )
    for wheel in missing:
        ssh.upload_atomically(
            client, wheel_dir / wheel["filename"], f"{layout['wheelhouse']}/{wheel['filename']}", settings["transfer_timeout_s"]
        )
    pin_args = [f"{name}=={version}" for name, version in pins.items()]
    log.info("installing %s from the wheelhouse, offline (this can take a while)", ", ".join(pin_args))
    started = time.monotonic()
    ssh.run(
        client,
        [
            venv_python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-compile",
            "--disable-pip-version-check",
            "--find-links",
            layout["wheelhouse"],
            *pin_args,
        ],
        settings["install_timeout_s"],
    )
    log.info("installed in %.0f s", time.monotonic() - started)
    still = wheels_not_installed(client, venv_python, record["wheels"], timeout)
    if still:
        raise DeviceError(f"after installing, the device's virtualenv lacks {', '.join(w['filename'] for w in still[:5])}")
    return {**summary, "installed_now": [w["filename"] for w in missing], "files": _wheel_rows(record)}


def _wheel_rows(record: dict) -> list[dict]:
    return [{k: wheel[k] for k in ("filename", "name", "version", "sha256")} for wheel in record["wheels"]]


def wheels_not_installed(client, venv_python: str, wheels: list[dict], timeout: float) -> list[dict]:
    """The wheels whose name and version the device's virtualenv does not have."""
    status, out, _ = ssh.run(
        client, [venv_python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"], timeout, check=False
    )
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(out)} if status == 0 else {}
    return [w for w in wheels if installed.get(canonicalize_name(w["name"])) != w["version"]]


# ---- deploy ----------------------------------------------------------------------------------


def deploy(
    name: str,
    settings: dict,
    pte: Path,
    tokenizer: Path,
    out: Path,
    peers: list[dict] | None = None,
    configured: str | None = None,
    house: Housekeeping = Housekeeping(),
) -> dict:
    """Put the .pte and tokenizer on the device, and each peer engine's program and model (see
    `place_peers`), atomically, skipped when already there. On a device reached over SSH, first
    remove the earlier deployments it no longer keeps (gemma_edge.device_storage), so the disk
    check before each upload counts the space they held; `configured` is the configured variant
    (<model>/<quant>/xnnpack-<mode>), whose newest deployment stays."""
    started = time.monotonic()
    pte_sha = artifacts.sha256_file(pte)
    variant = "/".join(Path(pte).parts[-4:-1])  # results/<model>/<quant>/xnnpack-<mode>/model.pte
    removed, uploads = [], []
    if settings["kind"] == "local":
        # Relative to the working directory (where the local benchmark runs) when inside it.
        files = {
            "pte": {"path": artifacts.portable_path(pte), "sha256": pte_sha, "uploaded": False, "seconds": 0.0},
            "tokenizer": {"path": artifacts.portable_path(tokenizer), "uploaded": False, "seconds": 0.0},
        }
        placed = place_peers(
            peers or [],
            lambda local, kind: {
                "path": artifacts.portable_path(local),
                "uploaded": False,
                "sha256": artifacts.sha256_file(local),
            },
        )
    else:
        layout = remote_layout(settings)
        timeout, short = settings["transfer_timeout_s"], settings["command_timeout_s"]
        folder = f"{layout['models']}/{pte_sha[:16]}"
        peer_folders = {artifacts.sha256_file(local)[:16] for local, _ in peer_files_to_place(peers or [])}
        with connection(settings) as client, holding_device(client, name, settings, f"deploy {variant}", house):
            # Uploads an earlier run lost with its connection live in the models' folders.
            ssh.remove_stale_uploads(client, layout["models"], short)
            listing = device_storage.list_device(client, settings["python"], layout["work"], short)
            old_models, old_peers = device_storage.plan_removal(
                listing, pte_sha[:16], configured, house.keep_models, peer_folders
            )
            removed = device_storage.remove_folders(client, layout["work"], old_models, old_peers, short)
            ssh.run(client, ["mkdir", "-p", folder], short)

            def put(local: Path, remote: str, kind: str) -> dict:
                placed_file = ssh.upload_atomically(client, local, remote, timeout)
                if kind == "program":
                    ssh.run(client, ["chmod", "+x", remote], short)
                uploads.append({"host": artifacts.portable_path(local), "device": remote, "kind": kind})
                return placed_file

            files = {
                "pte": put(pte, f"{folder}/model.pte", "pte"),
                "tokenizer": put(tokenizer, f"{folder}/tokenizer.json", "tokenizer"),
            }
            placed = place_peers(peers or [], lambda local, kind: upload_peer_file(client, settings, layout, local, kind, put))
            device_storage.write_marker(client, folder, variant, sorted(peer_folders), short)
    record = {
        "target": name,
        "kind": settings["kind"],
        "variant": variant,
        "files": files,
        "peers": placed,
        "uploads": uploads,
        "removed": removed,
        "peer_folders": sorted(peer_folders) if settings["kind"] != "local" else [],
        "weight_bytes": weights_of(pte, peers or []),
        "seconds": time.monotonic() - started,
    }
    write_json(out, record)
    return record


def weights_of(pte: Path, peers: list[dict]) -> dict:
    """Weight bytes a decoded token reads (weight_bytes), from the host's copies of the .pte and of
    each peer's model: the device benchmark sets its tok/s against them."""
    from .weight_bytes import readable_weight_bytes

    weights = {"pte": readable_weight_bytes(Path(pte))}
    for peer in peers:  # a model weight_bytes cannot read gets None: no fraction claimed
        if "model" in peer and Path(peer["model"]).exists():
            weights[peer["name"]] = readable_weight_bytes(Path(peer["model"]))
    return weights


def place_peers(peers: list[dict], put) -> list[dict]:
    """Each peer with its program and model where the device runs them (`put(local, kind)` returns
    {"path", "sha256"}), or, when its program could not be built for the device, the reason."""
    placed = []
    for peer in peers:
        entry = {key: value for key, value in peer.items() if key not in ("program", "model", "reason")}
        program = read_json(peer["program"]) if "program" in peer else {"available": False, "reason": peer["reason"]}
        if not program["available"]:
            placed.append({**entry, "available": False, "reason": program["reason"]})
            continue
        binary = put(Path(program["binary"]), program.get("kind", "program"))
        model = put(Path(peer["model"]), "model")
        placed.append(
            {
                **entry,
                "available": True,
                "binary": binary["path"],
                "model": model["path"],
                "model_sha256": model["sha256"],
                "binary_sha256": program["sha256"],
            }
        )
    return placed


def peer_files_to_place(peers: list[dict]) -> list[tuple[Path, str]]:
    """(host file, kind) of each file `place_peers` puts on the device: each available peer's
    program and model."""
    files = []
    for peer in peers:
        program = read_json(peer["program"]) if "program" in peer else {"available": False}
        if program["available"]:
            files += [(Path(program["binary"]), program.get("kind", "program")), (Path(peer["model"]), "model")]
    return files


def upload_peer_file(client, settings: dict, layout: dict, local: Path, kind: str, put) -> dict:
    """A peer's program (made executable), runtime wheel or model under <workdir>/peers/<sha256
    prefix>/, placed with `put(local, remote, kind)`."""
    digest = artifacts.sha256_file(local)
    folder = f"{layout['peers']}/{digest[:16]}"
    ssh.run(client, ["mkdir", "-p", folder], settings["command_timeout_s"])
    ssh.remove_stale_uploads(client, folder, settings["command_timeout_s"])
    return put(local, f"{folder}/{local.name}", kind)


# ---- bench -----------------------------------------------------------------------------------


def bench_spec(
    settings: dict,
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
        "threads": settings.get("threads"),
        "parity_prompt_ids": [p["prompt_ids"] for p in host_parity["prompts"]],
        "parity_prompts": [p.get("prompt") for p in host_parity["prompts"]],
        "tokenizer": tokenizer,
        "max_new_tokens": host_parity["max_new_tokens"],
        "peers": peers or [],
        "peer_timeout_s": settings["bench_timeout_s"],
        "emulated": emulated,
    }


def restore_removed_files(client, settings: dict, deployed: dict) -> None:
    """Upload again what this deployment placed on the device and a later deploy removed (it
    keeps only `keep_models` earlier deployments), and mark the deployment as just used."""
    short = settings["command_timeout_s"]
    uploads = deployed.get("uploads", [])
    missing = set(device_storage.missing_on_device(client, [u["device"] for u in uploads], short))
    for upload in (u for u in uploads if u["device"] in missing):
        log.info("%s was removed from the device since its deploy (keep_models); uploading it again", upload["device"])
        ssh.run(client, ["mkdir", "-p", os.path.dirname(upload["device"])], short)
        ssh.upload_atomically(client, Path(upload["host"]), upload["device"], settings["transfer_timeout_s"])
        if upload["kind"] == "program":
            ssh.run(client, ["chmod", "+x", upload["device"]], short)
    if "variant" in deployed:
        folder = os.path.dirname(deployed["files"]["pte"]["path"])
        device_storage.write_marker(client, folder, deployed["variant"], deployed.get("peer_folders", []), short)


def run_device_bench(name: str, settings: dict, deployed: dict, spec: dict, house: Housekeeping = Housekeeping()) -> dict:
    """The device's benchmark result, with `wall_clock`: when it held the device (lock taken, released)."""
    step = f"bench {deployed.get('variant', '')}".strip()
    if settings["kind"] == "local":
        lock = device_lock.held_here(name, local_lock_file(), step, house.lock_timeout_s)
    else:
        lock = nullcontext()
    with lock:
        started = time.time()
        if settings["kind"] == "local":
            result = run_local_bench(deployed["files"]["pte"]["path"], spec, settings["bench_timeout_s"])
        else:
            result = run_ssh_bench(name, settings, deployed, spec, house)
        held_from = result.pop("locked_at", started)
        return {**result, "wall_clock": {"started": held_from, "finished": time.time()}}


def run_ssh_bench(name: str, settings: dict, deployed: dict, spec: dict, house: Housekeeping) -> dict:
    step = f"bench {deployed.get('variant', '')}".strip()
    layout = remote_layout(settings)
    folder = os.path.dirname(deployed["files"]["pte"]["path"])
    with (
        connection(settings) as client,
        holding_device(client, name, settings, step, house),
        tempfile.TemporaryDirectory() as scratch,
    ):
        locked_at = time.time()
        restore_removed_files(client, settings, deployed)
        check_versions(remote_facts(client, layout, settings["command_timeout_s"])["versions"], host_runtime_versions())
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        remote_spec = f"{folder}/spec-{os.getpid()}.json"
        remote_out = f"{folder}/bench-{os.getpid()}.json"
        ssh.upload_atomically(client, spec_path, remote_spec, settings["command_timeout_s"])
        argv = runner_argv(
            layout,
            layout["python"],
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
                client, argv, settings["bench_timeout_s"], check=False, on_line=lambda line: log.info("%s: %s", name, line)
            )
            if status != 0:
                raise DeviceError(bench_failure(name, status, stderr))
            local_out = Path(scratch) / "bench.json"
            ssh.download_file(client, remote_out, local_out, settings["command_timeout_s"])
            return {**json.loads(local_out.read_text()), "locked_at": locked_at}
        finally:
            if client.get_transport().is_active():
                ssh.run(client, ["rm", "-f", remote_spec, remote_out], settings["command_timeout_s"], check=False)


def run_local_bench(pte: str, spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, out = Path(scratch) / "spec.json", Path(scratch) / "bench.json"
        spec_path.write_text(json.dumps(spec))
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gemma_edge.device_bench",
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
                env=_local_env(),
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


def compare_tokens(host_parity: dict, device_tokens: list[list[int]], runner: dict | None = None) -> list[dict]:
    """Per parity prompt, the device's tokens against the host's run of the same .pte and eager FP32;
    with an available `runner` block (ExecuTorch's LLM runner on the device), its tokens against the
    host's .pte too, up to the first EOS (where the runner stops)."""
    rows = []
    available = bool(runner and runner.get("available"))
    for index, (prompt, produced) in enumerate(zip(host_parity["prompts"], device_tokens)):
        extra = {}
        if available:
            expected = device_bench.until_eos(prompt["pte_tokens"], set(runner["eos_ids"]))
            extra = {"runner_tokens": runner["tokens"][index], "runner_matches_host_pte": runner["tokens"][index] == expected}
        rows.append(
            {
                "prompt": prompt.get("prompt"),
                "prompt_ids": prompt["prompt_ids"],
                "device_tokens": produced,
                "host_pte_tokens": prompt["pte_tokens"],
                "host_fp32_tokens": prompt["reference_tokens"],
                "matches_host_pte": produced == prompt["pte_tokens"],
                "matched_host_fp32": sum(a == b for a, b in zip(produced, prompt["reference_tokens"])),
                "first_divergence_from_fp32": next(
                    (i for i, (a, b) in enumerate(zip(produced, prompt["reference_tokens"])) if a != b), None
                ),
                **extra,
            }
        )
    return rows


def tokens_matched_as_text(tokenizer, prompt_ids: list[int], reference: list[int], text: str) -> int:
    """How many of `reference`'s first tokens a peer's generated `text` reproduces: the largest k
    whose decoded continuation of the prompt is a prefix of `text`. A peer that returns text, not
    ids (LiteRT-LM), cannot be told apart from one that chose another token of the same text (a
    byte-fallback space and '▁'); a k that ends inside a UTF-8 character is skipped."""
    base = tokenizer.decode(prompt_ids)
    matched = 0
    for k in range(1, len(reference) + 1):
        continuation = tokenizer.decode(prompt_ids + reference[:k])
        if continuation.endswith("\ufffd"):
            continue
        if not continuation.startswith(base) or not text.startswith(continuation[len(base) :]):
            break
        matched = k
    return matched


def compare_peer_tokens(host_parity: dict, engines: dict, tokenizer) -> dict:
    """Per peer that decoded the parity prompts greedily (LiteRT-LM), its text against eager
    FP32's tokens (`tokens_matched_as_text`). LiteRT-LM ends at its stop token, FP32 runs on."""
    compared = {}
    for name, engine in engines.items():
        if not engine.get("available") or "greedy" not in engine:
            continue
        rows = []
        for prompt, greedy in zip(host_parity["prompts"], engine["greedy"]):
            text = "".join(greedy["pieces"])
            rows.append(
                {
                    "prompt": prompt.get("prompt"),
                    "text": text,
                    "generated": len(greedy["pieces"]),
                    "matched_host_fp32": tokens_matched_as_text(
                        tokenizer, prompt["prompt_ids"], prompt["reference_tokens"], text
                    ),
                }
            )
        compared[name] = rows
    return compared


def render_peer_parity(compared: dict) -> list[str]:
    lines = []
    for name, rows in compared.items():
        lines.append(f"{name}: greedy text of the same prompts against eager FP32's tokens (matched / generated)")
        for row in rows:
            lines.append(
                f"  {(row['prompt'] or '')[:34]:<34} {row['matched_host_fp32']:>4}/{row['generated']:<3} {row['text']!r}"
            )
    return lines


def render_parity_log(name: str, rows: list[dict], runner: dict | None = None, peers: dict | None = None) -> str:
    lines = [
        f"device parity on target {name}: the device decoded the host's prompt ids greedily",
        f"{'prompt':<36} {'= host .pte':>11} {'vs FP32':>8} {'diverge':>7}",
    ]
    for row in rows:
        n = len(row["host_fp32_tokens"])
        div = "-" if row["first_divergence_from_fp32"] is None else str(row["first_divergence_from_fp32"])
        lines.append(
            f"{(row['prompt'] or '')[:36]:<36} {'yes' if row['matches_host_pte'] else 'NO':>11} "
            f"{row['matched_host_fp32']:>4}/{n:<3} {div:>7}"
        )
        lines.append(f"  device: {row['device_tokens']}")
        if not row["matches_host_pte"]:
            lines.append(f"  host:   {row['host_pte_tokens']}")
        if "runner_tokens" in row and row["runner_tokens"] != row["device_tokens"]:
            lines.append(f"  runner: {row['runner_tokens']}")
    agree = sum(r["matches_host_pte"] for r in rows)
    lines.append(f"{agree}/{len(rows)} prompts identical to the host's run of the same .pte")
    if runner is not None:
        lines.append(runner_parity_line(rows, runner))
    lines += render_peer_parity(peers or {})
    return "\n".join(lines) + "\n"


def runner_parity_line(rows: list[dict], runner: dict) -> str:
    """One line on ExecuTorch's LLM runner's tokens, for the parity log."""
    if not runner.get("available"):
        return f"ExecuTorch's LLM runner: not available: {runner['reason']}"
    agree = sum(r["runner_matches_host_pte"] for r in rows)
    return (
        f"ExecuTorch's LLM runner: {agree}/{len(rows)} prompts identical to the host's run of the same .pte; "
        f"its tokens {'equal' if runner['tokens_equal_loop'] else 'DIFFER from'} the device loop's, its prompt ids "
        f"{'equal' if runner['prompt_ids_equal_loop'] else 'DIFFER from'} the host's"
    )


def bench(
    name: str,
    settings: dict,
    bench_config: dict,
    deployed_path: Path,
    device_path: Path,
    pte_manifest_path: Path,
    host_parity_path: Path,
    checkpoint_path: Path,
    out_bench: Path,
    out_log: Path,
    out_parity: Path,
    house: Housekeeping = Housekeeping(),
) -> dict:
    deployed, device = read_json(deployed_path), read_json(device_path)
    pte_manifest, host_parity, checkpoint = read_json(pte_manifest_path), read_json(host_parity_path), read_json(checkpoint_path)
    if deployed["files"]["pte"]["sha256"] != pte_manifest["sha256"]:
        raise DeviceError("the .pte on the device is not the one built for this configuration; re-run deploy")
    spec = bench_spec(
        settings,
        bench_config,
        host_parity,
        pte_manifest,
        deployed.get("peers", []),
        deployed["files"]["tokenizer"]["path"],
        bool(device.get("emulated")),
    )
    result = run_device_bench(name, settings, deployed, spec, house)
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
        "versions": {"host": artifacts.package_versions(), "device": device["versions"]},
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
        out_parity,
        {
            "target": name,
            "pte_sha256": pte_manifest["sha256"],
            "prompts": rows,
            "executorch_runner": runner_summary,
            "peers": peers,
        },
    )
    with artifacts.atomic_output(out_log) as tmp:
        tmp.write_text(render_parity_log(name, rows, runner, peers))
    write_json(out_bench, report)
    first = report["runs"][0]
    log.info(
        "%s: decode %.2f ± %.2f tok/s, prefill %.1f tok/s (prompt %d), load %.2f s, peak RSS %.0f MB%s",
        name,
        first["decode_tps"]["avg"],
        first["decode_tps"]["stddev"],
        first["prefill_tps"]["avg"],
        first["prompt_tokens"],
        report["load_s"],
        report["peak_rss_bytes"] / 1e6,
        " (emulated: these speeds say nothing about a Pi)" if report["emulated"] else "",
    )
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
