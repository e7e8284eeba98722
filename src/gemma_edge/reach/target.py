"""A target as the device steps reach it, resolved once from its config entry (`Target.of`): its
SSH connection, its folders on the device, its timeouts and housekeeping, its lock, and the one
error a device step raises (DeviceError)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
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


@dataclass(frozen=True)
class Timeouts:
    """Seconds each kind of remote work may take (the schema's targets.<name>.*_timeout_s)."""

    connect_s: float = 10.0
    command_s: float = 120.0  # any short remote command
    transfer_s: float = 1800.0  # without progress, before an upload is abandoned
    install_s: float = 3600.0  # the runtime's installation
    bench_s: float = 3600.0  # the whole benchmark run


@dataclass(frozen=True)
class Layout:
    """The workflow's folders on a device, under its workdir, and the Python that runs the benchmark."""

    work: str
    python: str  # <work>/venv/bin/python, or the device's own Python when create_venv is off

    @property
    def runner(self) -> str:
        return f"{self.work}/runner"

    @property
    def models(self) -> str:
        return f"{self.work}/models"

    @property
    def peers(self) -> str:
        return f"{self.work}/peers"

    @property
    def wheelhouse(self) -> str:
        return f"{self.work}/wheelhouse"

    @property
    def venv(self) -> str:
        return f"{self.work}/venv"


@dataclass(frozen=True)
class Target:
    """One configured target, its settings read once. Defaults are the schema's (a test holds them equal)."""

    name: str
    kind: str  # "ssh" or "local"
    ssh: ssh.SshTarget | None = None  # how to reach it (None for a local target)
    workdir: str = "gemma-edge"
    python: str = "python3"  # the device's own Python: makes the virtualenv, runs the probe
    create_venv: bool = True
    emulated: bool = False
    threads: int | None = None
    timeouts: Timeouts = Timeouts()
    house: Housekeeping = Housekeeping()

    @classmethod
    def of(cls, name: str, settings: dict, house: Housekeeping | None = None) -> Target:
        """The target `settings` (a config entry; housekeeping keys there are used unless `house` is given)."""
        timeouts = Timeouts(
            **{f"{key}_s": settings[f"{key}_timeout_s"] for key in TIMEOUT_KEYS if f"{key}_timeout_s" in settings}
        )
        plain = {key: settings[key] for key in PLAIN_KEYS if key in settings}
        reach = None
        if settings.get("host"):
            explicit = {key: settings[key] for key in SSH_KEYS if key in settings}
            reach = ssh.SshTarget(host=settings["host"], **explicit, connect_timeout_s=timeouts.connect_s)
        return cls(name=name, ssh=reach, **plain, timeouts=timeouts, house=house or Housekeeping.of(settings))

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def layout(self) -> Layout:
        work = self.workdir.rstrip("/")
        return Layout(work=work, python=f"{work}/venv/bin/python" if self.create_venv else self.python)

    def is_emulated(self, facts: dict) -> bool:
        """An emulated device (QEMU user mode) is a correctness check, never a performance figure."""
        return bool(self.emulated or facts.get("emulator"))


TIMEOUT_KEYS = ("connect", "command", "transfer", "install", "bench")
PLAIN_KEYS = tuple(f.name for f in fields(Target) if f.name not in ("name", "ssh", "timeouts", "house"))
# A target's SSH settings, as ssh.SshTarget names them (its defaults are the schema's too).
SSH_KEYS = ("port", "user", "key_file", "known_hosts", "ssh_config", "trust_on_first_use")


def local_lock_file() -> Path:
    """The `local` target's lock: this machine, whichever working directory times it."""
    cache = Path(os.environ.get("GEMMA_EDGE_CACHE", Path.home() / ".cache/gemma-edge"))
    return cache / "locks" / "local.lock"


@contextmanager
def holding_device(client, target: Target, step: str, remove: bool = False):
    """This device to this step alone, across working directories (gemma_edge.reach.device_lock)."""
    try:
        with device_lock.held_over_ssh(
            client, target.name, target.python, target.layout.work, step, target.house.lock_timeout_s, remove
        ):
            yield
    except device_lock.HolderFailed as err:  # raised on entry only: the device's Python cannot run
        raise DeviceError(str(err)) from None


@contextmanager
def connection(target: Target):
    client = ssh.connect(target.ssh)
    try:
        yield client
    finally:
        client.close()
