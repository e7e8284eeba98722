"""A target as the device steps reach it: its SSH connection, its folders, its lock, the
housekeeping settings, and the one error a device step raises (DeviceError)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gemma_edge.reach import device_lock, ssh
from gemma_edge.workflow.config import HOUSEKEEPING_KEYS


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
    """This device to this step alone, across working directories (gemma_edge.reach.device_lock)."""
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


def is_emulated(settings: dict, facts: dict) -> bool:
    """An emulated device (QEMU user mode) is a correctness check, never a performance figure."""
    return bool(settings.get("emulated") or facts.get("emulator"))
