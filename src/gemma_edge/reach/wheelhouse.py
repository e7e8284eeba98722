"""Build a wheelhouse on the host for a device of another platform (a Raspberry Pi 5: aarch64,
CPython 3.11, glibc 2.36), so a device without internet installs from it with

    pip install --no-index --find-links <wheelhouse> executorch==1.5.1 torch==2.13.0

and every device gets the same bytes. The closure is resolved for the device's platform
(wheel_resolver, with uv), each wheel checked against it (device_platform), and the whole recorded
in wheelhouse.json beside a requirements.lock.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from packaging.utils import canonicalize_name

from gemma_edge.device.files import sha256_file, write_json
from gemma_edge.reach.device_platform import (
    WheelhouseError,
    check_wheels_fit,
    describe,
    device_platform,
    wheel_record,
)
from gemma_edge.reach.provision import host_runtime_versions
from gemma_edge.reach.wheel_resolver import (
    DEFAULT_TORCH_INDEX,
    gpu_closure,
    probe_index,
    resolve_and_download,
    unmet_requirements,
)

log = logging.getLogger(__name__)


SCHEMA = "gemma-edge.wheelhouse/1"
MANIFEST_NAME = "wheelhouse.json"
LOCK_NAME = "requirements.lock"


def build_wheelhouse(
    roots: dict[str, str],
    platform: dict,
    out_dir: Path,
    torch_index: str | None = DEFAULT_TORCH_INDEX,
    python: str = sys.executable,
) -> dict:
    """Resolve and download the device's closure of `roots` into a temporary sibling of `out_dir`,
    check every wheel fits the device, write its manifest (wheelhouse.json) and a hash-pinned
    requirements.lock inside, then put it in place of `out_dir`. Returns the manifest record."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch_info = {"index": torch_index, "index_reachable": None, "build": None, "note": None}
    index_for_torch = None
    if torch_index:
        reachable, reason = probe_index(torch_index)
        torch_info["index_reachable"] = reachable
        if reachable:
            index_for_torch = torch_index
            torch_info["note"] = f"torch from {torch_index}"
        else:
            log.warning(
                "torch index %s is not usable (%s), so torch comes from PyPI, whose aarch64 build may bring CUDA wheels",
                torch_index,
                reason,
            )
            torch_info["note"] = f"{reason}; torch taken from PyPI"
    else:
        torch_info["note"] = "no torch index configured; torch taken from PyPI"

    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        graph = resolve_and_download(roots, platform, staging, index_for_torch, python)
        check_wheels_fit([node["path"].name for node in graph.values()], platform)
        unmet = unmet_requirements([node["path"] for node in graph.values()], roots, platform)
        if unmet:
            raise WheelhouseError(f"the wheelhouse for {describe(platform)} would not install: {unmet}")
        wheels = []
        for _name, node in sorted(graph.items()):
            wheels.append(
                {
                    **wheel_record(node["path"]),
                    "required_by": node["required_by"],
                    "source": node["source"],
                }
            )
        by_name = {canonicalize_name(wheel["name"]): wheel for wheel in wheels}
        if "torch" not in graph:
            torch_info["note"] = "torch is not in the closure"
        else:
            gpu = gpu_closure(graph)
            torch_info["build"] = "cuda" if gpu else "cpu"
            torch_info["version"] = by_name["torch"]["version"]
            if gpu:
                torch_info["cuda_wheels"] = sorted(by_name[name]["filename"] for name in gpu)
                torch_info["cuda_download_bytes"] = sum(by_name[name]["size_bytes"] for name in gpu)
                torch_info["cuda_installed_bytes"] = sum(by_name[name]["installed_bytes"] for name in gpu)
                log.warning(
                    "torch %s is a CUDA build for %s: it brings %d more wheels, %.2f GB to download and %.2f GB installed",
                    torch_info["version"],
                    platform["machine"],
                    len(gpu),
                    torch_info["cuda_download_bytes"] / 1e9,
                    torch_info["cuda_installed_bytes"] / 1e9,
                )
        record = {
            "schema": SCHEMA,
            "platform": dict(platform),
            "roots": dict(roots),
            "torch": torch_info,
            "wheels": wheels,
            "download_bytes": sum(wheel["size_bytes"] for wheel in wheels),
            "installed_bytes": sum(wheel["installed_bytes"] for wheel in wheels),
            "seconds": round(time.monotonic() - started, 1),
        }
        write_json(staging / MANIFEST_NAME, record)
        (staging / LOCK_NAME).write_text("".join(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in wheels))
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` in place of `target`. The old folder is renamed aside first, so `target` is the
    old or the new complete wheelhouse, never a mix (between the two renames it is briefly absent:
    a non-empty directory cannot be replaced in one rename)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def read_wheelhouse(folder: Path, platform: dict | None = None) -> dict:
    """The manifest of a built wheelhouse, its files checked against it (and the device)."""
    from gemma_edge.device.files import read_json

    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        raise WheelhouseError(f"{folder} has no {MANIFEST_NAME}: build it with python -m gemma_edge.reach.wheelhouse")
    record = read_json(manifest)
    for wheel in record["wheels"]:
        path = folder / wheel["filename"]
        if not path.exists() or path.stat().st_size != wheel["size_bytes"] or sha256_file(path) != wheel["sha256"]:
            raise WheelhouseError(f"{path} is missing or differs from {manifest}: rebuild the wheelhouse")
    if platform is not None:
        check_wheels_fit([wheel["filename"] for wheel in record["wheels"]], platform)
    unmet = unmet_requirements(
        [folder / wheel["filename"] for wheel in record["wheels"]], record["roots"], platform or record["platform"]
    )
    if unmet:
        raise WheelhouseError(f"{folder} would not install: {unmet}: rebuild the wheelhouse")
    return record


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_edge.reach.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--machine", required=True, help="device platform.machine(), e.g. aarch64")
    parser.add_argument("--python", required=True, help="device Python version, e.g. 3.11.2")
    parser.add_argument("--glibc", required=True, help="device glibc version, e.g. 2.36")
    parser.add_argument("--out", required=True, type=Path, help="wheelhouse folder (replaced)")
    parser.add_argument("--torch-index", default=DEFAULT_TORCH_INDEX, help="index with CPU torch wheels; '' for PyPI")
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="a root requirement (repeatable); default: executorch and torch at this host's versions",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    roots = {}
    for root in args.root:
        name, sep, version = root.partition("==")
        if not sep or not name or not version:
            parser.error(f"--root {root!r} is not NAME==VERSION")
        roots[name.strip()] = version.strip()
    try:
        platform = device_platform({"machine": args.machine, "python": args.python, "libc": ["glibc", args.glibc]})
        record = build_wheelhouse(roots or host_runtime_versions(), platform, args.out, args.torch_index or None)
    except WheelhouseError as error:
        log.error("%s", error)
        return 1
    print(
        f"{args.out}: {len(record['wheels'])} wheels for {describe(platform)}, {_size(record['download_bytes'])} download, "
        f"{_size(record['installed_bytes'])} installed, torch {record['torch'].get('build') or '-'} build, "
        f"{record['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
