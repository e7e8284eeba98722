"""LiteRT-LM's runtime for a device: the pinned `litert-lm-api` wheel built for the device's CPU,
fetched on this host and pushed like any other peer file (the device needs no index access).

The wheel is pure Python tags on a native library (`py3-none-manylinux_2_27_<machine>`): it has
no dependencies, and on the device it is unpacked into a scratch folder put on `PYTHONPATH` of
the benchmark's own process (`peer_bench.bench_litert`), so nothing is installed there. Wheels
are cached per release and machine under ~/.cache/gemma-edge/litert-lm-api.

A device it cannot run on (another CPU, a C library older than the wheel's manylinux tag, no
index to fetch from) gets a record that says why (`available: false`), never a failed run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gemma_edge.device.files import atomic_output, sha256_file, write_json

log = logging.getLogger(__name__)

PACKAGE = "litert-lm-api"
GLIBC = (2, 27)  # the wheels' manylinux_2_27 tag
MACHINES = ("x86_64", "aarch64")
FETCH_TIMEOUT_S = 900


class RuntimeUnavailable(RuntimeError):
    """LiteRT-LM cannot run on this device; the message says why."""


def pinned_version(requirements: Path) -> str:
    """The litert-lm-api release requirements-litert.txt pins."""
    from gemma_edge.workflow.config import requirement_pins

    version = requirement_pins(requirements).get(PACKAGE)
    if version is None:
        raise ValueError(f"{requirements} pins no {PACKAGE}")
    return version


def wheel_name(version: str, machine: str) -> str:
    return f"{PACKAGE.replace('-', '_')}-{version}-py3-none-manylinux_{GLIBC[0]}_{GLIBC[1]}_{machine}.whl"


def check_device(device: dict) -> str:
    """The device's machine, if the wheel can run there."""
    machine = device.get("machine")
    if machine not in MACHINES:
        raise RuntimeUnavailable(f"{PACKAGE} ships no wheel for a {machine} CPU (it has {' and '.join(MACHINES)})")
    libc = device.get("libc") or []
    if len(libc) == 2 and libc[0] == "glibc":
        found = tuple(int(part) for part in libc[1].split(".")[:2])
        if found < GLIBC:
            raise RuntimeUnavailable(
                f"the device's glibc {libc[1]} is older than the {GLIBC[0]}.{GLIBC[1]} the {PACKAGE} wheel needs"
            )
    elif libc:
        raise RuntimeUnavailable(f"the {PACKAGE} wheel needs glibc; the device has {' '.join(libc)}")
    return machine


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-edge" / PACKAGE


def fetch_cached(version: str, machine: str, cache: Path, python: str = "3.11") -> tuple[Path, bool]:
    """The cached wheel, downloaded first if missing (pip, binary only, no dependencies). The
    wheel's tag fits any Python 3, but its `Requires-Python` does not: pip is told the device's."""
    name = wheel_name(version, machine)
    cached = cache / name
    if cached.is_file():
        return cached, True
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s for %s into %s", PACKAGE, version, machine, cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as scratch:
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--platform",
            f"manylinux_{GLIBC[0]}_{GLIBC[1]}_{machine}",
            "--python-version",
            python,
            "--dest",
            scratch,
            f"{PACKAGE}=={version}",
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise RuntimeUnavailable(f"pip could not download {PACKAGE}=={version} within {FETCH_TIMEOUT_S} s") from error
        fetched = Path(scratch) / name
        if done.returncode != 0 or not fetched.is_file():
            tail = " | ".join(line for line in done.stderr.strip().splitlines()[-2:] if "WARNING" not in line)
            raise RuntimeUnavailable(f"pip could not download {name}: {tail or 'no such wheel'}")
        os.replace(fetched, cached)
    return cached, False


def runtime_for_device(requirements: Path, device: dict, out_dir: Path, out_record: Path, cache: Path | None = None) -> dict:
    """Put the litert-lm-api wheel for `device` (its probed facts) in `out_dir` and describe it in
    `out_record`; a device it cannot run on gets `available: false` and the reason."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        version = pinned_version(requirements)
        machine = check_device(device)
        python = ".".join((device.get("python") or "3.11").split(".")[:2])
        cached, was_cached = fetch_cached(version, machine, cache or default_cache(), python)
    except (RuntimeUnavailable, OSError) as error:
        log.warning("LiteRT-LM will be reported as not available on this device: %s", error)
        record = {"engine": "litert", "available": False, "reason": str(error), "machine": device.get("machine")}
        write_json(out_record, record)
        return record
    wheel = out_dir / cached.name
    with atomic_output(wheel) as tmp:
        shutil.copy2(cached, tmp)
    record = {
        "engine": "litert",
        "available": True,
        "kind": "wheel",
        "binary": str(wheel),
        "sha256": sha256_file(wheel),
        "size_bytes": wheel.stat().st_size,
        "package": PACKAGE,
        "version": version,
        "machine": machine,
        "cached": was_cached,
    }
    write_json(out_record, record)
    log.info(
        "%s %s for %s: %s (%.1f MB, %s)",
        PACKAGE,
        version,
        machine,
        wheel,
        record["size_bytes"] / 1e6,
        "from the cache" if was_cached else "downloaded",
    )
    return record
