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
from gemma_edge.reach.remote_bench import BenchInputs, BenchOutputs
from gemma_edge.reach.target import Housekeeping, Target
from gemma_edge.workflow import variant


def target_of(config: dict, name: str, settings: dict) -> Target:
    """The target a device step works on: its settings as the rule's params (changing them re-runs
    the step), its housekeeping read from the config by the step itself (changing it re-runs nothing)."""
    return Target.of(name, settings, Housekeeping.of(config["targets"][name]))


def configured_variant(config: dict) -> str:
    """<model>/<quant>/xnnpack-<mode> of the variant the config names (the one a deploy keeps)."""
    return variant.variant_dir(config["model"], config["quantization"]["group_size"], config["lowering"]["per_op_mode"])


def probe(target: Target, out: Path) -> dict:
    return provisioning.probe(target, out)


def wheelhouse(platform_record: Path, pins: dict, out_wheels: Path, torch_index: str | None, out_record: Path) -> dict:
    """The device's wheels, built on the host for the platform the probe found."""
    record = wheels.build_wheelhouse(dict(pins), device_platform(read_json(platform_record)), out_wheels, torch_index)
    write_json(out_record, record)
    return record


def provision(target: Target, out: Path, platform: Path | None, wheelhouse: Path | None, wheel_dir: Path | None) -> dict:
    return provisioning.provision(target, out, platform_path=platform, wheelhouse_path=wheelhouse, wheel_dir=wheel_dir)


def deploy(target: Target, pte: Path, checkpoint_manifest: Path, out: Path, peers: list[dict], configured: str) -> dict:
    tokenizer = Path(read_json(checkpoint_manifest)["path"]) / "tokenizer.json"
    return deploying.deploy(target, pte, tokenizer, out, peers, configured=configured)


def bench(target: Target, spec: dict, inputs: BenchInputs, outputs: BenchOutputs) -> dict:
    return remote_bench.bench(target, spec, inputs, outputs)


def clean(target: Target) -> dict:
    return device_storage.clean(target, Path("results") / target.name)


def publish(copies: dict[Path, Path]) -> None:
    """Copy each file to its place, atomically."""
    for source, destination in copies.items():
        with atomic_output(destination) as tmp:
            shutil.copyfile(source, tmp)
