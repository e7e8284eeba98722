"""The device package on a device: uploaded whole to <workdir>/runner and run there with the
device's Python, or run on this host for the `local` target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gemma_edge.device import device_bench
from gemma_edge.reach import ssh
from gemma_edge.reach.target import DeviceError, Layout

# What a device runs: this package's __init__ and its device subpackage, uploaded whole
# (tests/test_layers.py checks that it imports nothing beyond the standard library, torch,
# executorch, litert_lm and itself).
DEVICE_PACKAGE = Path(device_bench.__file__).resolve().parent
IMPORT_ROOT = DEVICE_PACKAGE.parent.parent


def local_facts() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "gemma_edge.device.device_bench", "facts", "--out", "-"],
        capture_output=True,
        text=True,
        env=local_env(),
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def local_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(IMPORT_ROOT)}


def runner_files() -> list[Path]:
    """Every file the device runs: gemma_edge/__init__.py and the whole gemma_edge/device/."""
    return [DEVICE_PACKAGE.parent / "__init__.py", *sorted(DEVICE_PACKAGE.glob("*.py"))]


def upload_runner(client, layout: Layout, timeout: float) -> None:
    """The device package goes to <workdir>/runner, replacing whatever an earlier version put there
    (the device's lock is held: no benchmark runs from it meanwhile)."""
    package = f"{layout.runner}/gemma_edge"
    ssh.run(client, ["rm", "-rf", "--", package], timeout)
    ssh.run(client, ["mkdir", "-p", f"{package}/device"], timeout)
    for local in runner_files():
        ssh.upload_atomically(client, local, f"{layout.runner}/{local.relative_to(IMPORT_ROOT).as_posix()}", timeout)


def runner_argv(layout: Layout, python: str, *args: str) -> list[str]:
    """`python -m gemma_edge.device.device_bench ARGS` with the uploaded runner importable, run from the
    remote home: relative workdir, venv and .pte paths all stay relative to it."""
    return ["env", f"PYTHONPATH={layout.runner}", python, "-m", "gemma_edge.device.device_bench", *args]


def remote_facts(client, layout: Layout, timeout: float, python: str | None = None) -> dict:
    """The device's facts and runtime versions, as the uploaded runner reports them."""
    python = python or layout.python
    status, out, err = ssh.run(client, runner_argv(layout, python, "facts", "--out", "-"), timeout, check=False)
    if status != 0:
        raise DeviceError(f"the device's Python ({python}) cannot run the benchmark runner: {err.strip()[-1500:]}")
    return json.loads(out)
