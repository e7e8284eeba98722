"""Probe and provision a device: what it is, its virtualenv from the host-built wheelhouse, offline,
and the check that it runs the runtime release the .pte was built with."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from packaging.utils import canonicalize_name

from gemma_edge.device.facts import DeviceCheckFailed, preflight, runner_preflight
from gemma_edge.device.files import read_json, write_json
from gemma_edge.reach import ssh
from gemma_edge.reach.device_platform import WheelhouseError, check_wheels_fit, device_platform
from gemma_edge.reach.runner import local_facts, remote_facts, upload_runner
from gemma_edge.reach.target import DeviceError, Target, connection, holding_device
from gemma_edge.workflow.manifest import package_versions

log = logging.getLogger(__name__)


RUNTIME_PACKAGES = ("executorch", "torch")


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
    versions = package_versions(RUNTIME_PACKAGES)
    return {name: public_version(versions[name]) for name in RUNTIME_PACKAGES}


def probe(target: Target, out: Path) -> dict:
    """What the device is, as its own system Python reports it before anything is installed: the
    host builds the device's wheelhouse for this platform."""
    timeout = target.timeouts.command_s
    with connection(target) as client, holding_device(client, target, "probe"):
        upload_runner(client, target.layout, timeout)
        facts = remote_facts(client, target.layout, timeout, python=target.python)
    record = {"target": target.name, "kind": target.kind, "emulated": target.is_emulated(facts), **facts}
    write_json(out, record)
    log.info(
        "%s: %s, %s, Python %s, %s %s, %d KiB pages%s",
        target.name,
        facts["machine"],
        facts["cpu_model"],
        facts["python"],
        *facts["libc"],
        facts["page_size"] // 1024,
        " (emulated)" if record["emulated"] else "",
    )
    return record


def provision(
    target: Target,
    out: Path,
    platform_path: Path | None = None,
    wheelhouse_path: Path | None = None,
    wheel_dir: Path | None = None,
) -> dict:
    host_versions = host_runtime_versions()
    if target.is_local:
        facts, wheels = local_facts(), None
    else:
        wheelhouse_record = read_json(wheelhouse_path) if wheelhouse_path else None
        probed = read_json(platform_path) if platform_path else {}
        facts, wheels = provision_ssh(target, host_versions, probed, wheelhouse_record, wheel_dir)
    check_versions(facts["versions"], host_versions)
    try:
        checked = preflight(facts)
    except DeviceCheckFailed as error:
        raise DeviceError(f"{target.name}: {error}") from error
    for line in checked:
        log.info("pre-flight: %s", line)
    runner_missing = runner_preflight(facts)
    if runner_missing:
        log.warning("pre-flight: %s; the benchmarks will go on without it", runner_missing)
    record = {"target": target.name, "kind": target.kind, "emulated": target.is_emulated(facts), **facts, "wheels": wheels}
    write_json(out, record)
    log.info(
        "%s: %s, %s cores, %.1f GB, %s; executorch %s, torch %s%s",
        target.name,
        facts["cpu_model"],
        facts["cores"],
        (facts["memory_bytes"] or 0) / 1e9,
        facts["os"],
        facts["versions"]["executorch"],
        facts["versions"]["torch"],
        " (emulated: a correctness check, not a performance figure)" if record["emulated"] else "",
    )
    return record


def provision_ssh(
    target: Target, host_versions: dict, probed: dict, wheelhouse_record: dict | None, wheel_dir: Path | None
) -> tuple[dict, dict | None]:
    layout, timeout = target.layout, target.timeouts.command_s
    wheels = None
    with connection(target) as client, holding_device(client, target, "provision"):
        ssh.run(client, ["mkdir", "-p", layout.models, layout.wheelhouse], timeout)
        ssh.remove_stale_uploads(client, layout.models, timeout)
        ssh.remove_stale_uploads(client, layout.wheelhouse, timeout)
        if target.create_venv:
            if wheelhouse_record is None:
                raise DeviceError("create_venv is on but no wheelhouse was built for this device")
            wheels = install_wheelhouse(client, target, host_versions, probed, wheelhouse_record, Path(wheel_dir))
            wheels["wheelhouse_kept"] = target.house.keep_wheelhouse
            if not target.house.keep_wheelhouse:
                # Installed and verified: the wheels would only hold the device's disk (2.8 GB for
                # E2B's runtime). A later install uploads just the wheels it then lacks.
                ssh.run(client, ["rm", "-rf", "--", layout.wheelhouse], timeout)
                log.info("removed the wheelhouse from the device after the verified install (keep_wheelhouse: false)")
        upload_runner(client, layout, timeout)
        return remote_facts(client, layout, timeout), wheels


def install_wheelhouse(client, target: Target, pins: dict, probed: dict, record: dict, wheel_dir: Path) -> dict:
    """Create the device's virtualenv and install the host-built wheelhouse into it, offline
    (`pip install --no-index`); idempotent: a venv that already has every wheel's version gets
    nothing uploaded and nothing installed."""

    try:
        check_wheels_fit([wheel["filename"] for wheel in record["wheels"]], device_platform(probed))
    except WheelhouseError as error:
        raise DeviceError(str(error)) from error
    layout, timeout = target.layout, target.timeouts.command_s
    venv_python = layout.python
    status, _, _ = ssh.run(client, ["test", "-x", venv_python], timeout, check=False)
    if status != 0:
        log.info("creating %s with %s", layout.venv, target.python)
        ssh.run(client, [target.python, "-m", "venv", layout.venv], target.timeouts.install_s)
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
    free = ssh.remote_free_bytes(client, layout.work, timeout)
    if free < needed:
        raise DeviceError(
            f"the device has {free / 1e6:.0f} MB free in {layout.work} but the {len(missing)} wheels to "
            f"install need {needed / 1e6:.0f} MB (download plus installed size): free space there first"
        )
    log.info(
        "uploading %d of %d wheels (%.0f MB) to %s",
        len(missing),
        len(record["wheels"]),
        sum(w["size_bytes"] for w in missing) / 1e6,
        layout.wheelhouse,
    )
    for wheel in missing:
        ssh.upload_atomically(
            client, wheel_dir / wheel["filename"], f"{layout.wheelhouse}/{wheel['filename']}", target.timeouts.transfer_s
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
            layout.wheelhouse,
            *pin_args,
        ],
        target.timeouts.install_s,
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
