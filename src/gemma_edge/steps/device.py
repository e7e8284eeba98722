"""A target's steps, one function per rule: probe, wheelhouse, provision, deploy, bench, clean, and
the copy of the configured variant's results to results/<target>/."""

from __future__ import annotations

import shutil
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json, write_json
from gemma_edge.reach import deploy as deploying
from gemma_edge.reach import device_storage, remote_bench
from gemma_edge.reach import provision as provisioning
from gemma_edge.reach import wheelhouse as wheels
from gemma_edge.reach.device_platform import device_platform
from gemma_edge.reach.target import Housekeeping
from gemma_edge.workflow import variant


def housekeeping(config: dict, target: str) -> Housekeeping:
    """The target's housekeeping settings, read from the config by the step itself: changing them
    re-runs nothing."""
    return Housekeeping.of(config["targets"][target])


def configured_variant(config: dict) -> str:
    """<model>/<quant>/xnnpack-<mode> of the variant the config names (the one a deploy keeps)."""
    return variant.variant_dir(config["model"], config["quantization"]["group_size"], config["lowering"]["per_op_mode"])


def probe(target: str, settings: dict, out: Path, house: Housekeeping) -> dict:
    return provisioning.probe(target, settings, out, house)


def wheelhouse(platform_record: Path, pins: dict, out_wheels: Path, torch_index: str | None, out_record: Path) -> dict:
    """The device's wheels, built on the host for the platform the probe found."""
    record = wheels.build_wheelhouse(dict(pins), device_platform(read_json(platform_record)), out_wheels, torch_index)
    write_json(out_record, record)
    return record


def provision(
    target: str,
    settings: dict,
    out: Path,
    platform: Path | None,
    wheelhouse: Path | None,
    wheel_dir: Path | None,
    house: Housekeeping,
) -> dict:
    return provisioning.provision(
        target, settings, out, platform_path=platform, wheelhouse_path=wheelhouse, wheel_dir=wheel_dir, house=house
    )


def deploy(
    target: str,
    settings: dict,
    pte: Path,
    checkpoint_manifest: Path,
    out: Path,
    peers: list[dict],
    configured: str,
    house: Housekeeping,
) -> dict:
    tokenizer = Path(read_json(checkpoint_manifest)["path"]) / "tokenizer.json"
    return deploying.deploy(target, settings, pte, tokenizer, out, peers, configured=configured, house=house)


def bench(
    target: str,
    settings: dict,
    spec: dict,
    *,
    deployed: Path,
    device: Path,
    pte_manifest: Path,
    host_parity: Path,
    checkpoint: Path,
    out_bench: Path,
    out_parity_log: Path,
    out_parity: Path,
    house: Housekeeping,
) -> dict:
    files = (deployed, device, pte_manifest, host_parity, checkpoint, out_bench, out_parity_log, out_parity)
    return remote_bench.bench(target, settings, spec, *files, house)


def clean(target: str, settings: dict, house: Housekeeping) -> dict:
    return device_storage.clean(target, settings, Path("results") / target, house)


def publish(copies: dict[Path, Path]) -> None:
    """Copy each file to its place, atomically."""
    for source, destination in copies.items():
        with atomic_output(destination) as tmp:
            shutil.copyfile(source, tmp)
