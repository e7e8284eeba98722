"""One device, one step at a time, across working directories and hosts: a lock file on the device.

Snakemake's device_<target> resource keeps two steps of one run apart; two runs (two working
directories, or two people sharing a Pi) would still time each other. So every step that changes
or times a device holds `<workdir>/.lock` on the device while it runs: an flock(2) taken by a
small standard-library Python process on the device, which holds it until its standard input
closes. The kernel releases an flock when its process dies, and sshd ends that process when the
connection goes (the host step finished, was killed or lost its network), so a dead run never
keeps the device. The file records who holds it, for the line a waiting run prints; a record
left behind with the flock free is a run that ended without releasing, and is taken over.

Hand-written rather than `flock(1)`: the device's Python (which every target has, before
provisioning too) gives the wait, the holder's record and the takeover in one process.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
EXIT_TIMED_OUT = 3

# Runs on the device: argv = lock path, this run's record (JSON), seconds to wait. Prints
# WAITING <holder record> once if the lock is held, then LOCKED <record found> or TIMEOUT <holder>.
HOLDER = r"""
import fcntl, os, sys, time
path, owner, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
folder = os.path.dirname(path)
if folder:
    os.makedirs(folder, exist_ok=True)
lock = open(path, "a+")
def record():
    lock.seek(0)
    return lock.read().strip() or "{}"
started, told = time.monotonic(), False
while True:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except OSError:
        if not told:
            print("WAITING " + record(), flush=True)
            told = True
        if time.monotonic() - started >= wait:
            print("TIMEOUT " + record(), flush=True)
            sys.exit(3)
        time.sleep(0.5)
found = record()
lock.seek(0)
lock.truncate()
lock.write(owner)
lock.flush()
print("LOCKED " + found, flush=True)
sys.stdin.read()
lock.seek(0)
lock.truncate()
lock.flush()
"""


class DeviceBusy(RuntimeError):
    """Another run held the device for longer than this run would wait; the message says who."""


def owner_record(step: str) -> dict:
    """Who takes the lock: this host, process, working directory and step, and since when."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "workdir": os.getcwd(),
        "step": step,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe(record: dict) -> str:
    if not record:
        return "another run"
    where = f"{record.get('workdir', '?')} on {record.get('host', '?')}"
    return f"{record.get('step', 'a step')} of {where} (pid {record.get('pid', '?')}, since {record.get('since', '?')})"


def _parse(line: str) -> tuple[str, dict]:
    word, _, rest = line.strip().partition(" ")
    try:
        return word, json.loads(rest or "{}")
    except json.JSONDecodeError:
        return word, {}


def wait_for_lock(name: str, lines, wait_s: float) -> None:
    """Read the holder process's lines until it holds the lock; log the wait and any takeover,
    raise DeviceBusy with one sentence when it gave up."""
    for line in lines:
        word, record = _parse(line)
        if word == "WAITING":
            log.info("%s is in use by %s; waiting up to %.0f s for it", name, describe(record), wait_s)
        elif word == "LOCKED":
            if record:
                log.warning("%s: took over the lock %s left when it ended without releasing it", name, describe(record))
            return
        elif word == "TIMEOUT":
            raise DeviceBusy(
                f"{name} is still in use by {describe(record)} after {wait_s:.0f} s (targets.<name>.lock_timeout_s): "
                "re-run when it is free"
            )
    raise DeviceBusy(f"{name}: the device lock could not be taken (the device's Python ended without a word)")


@contextmanager
def held_over_ssh(client, name: str, python: str, workdir: str, step: str, wait_s: float):
    """Hold the device's lock for the block, through `client` (paramiko) and the device's `python`."""
    argv = [python, "-c", HOLDER, f"{workdir.rstrip('/')}/{LOCK_NAME}", json.dumps(owner_record(step)), str(wait_s)]
    channel = client.get_transport().open_session()
    channel.settimeout(wait_s + 120)  # the holder answers within wait_s; this bounds a silent device
    channel.exec_command(shlex.join(argv))
    stdout = channel.makefile("r")
    try:
        wait_for_lock(name, stdout, wait_s)
        yield
    finally:
        channel.shutdown_write()  # the holder reads end of input and lets the lock go
        channel.close()


@contextmanager
def held_here(name: str, lock_file: Path, step: str, wait_s: float):
    """The same lock for a device that is this machine (the `local` target): the same holder
    process, run with this Python."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", HOLDER, str(lock_file), json.dumps(owner_record(step)), str(wait_s)]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_for_lock(name, holder.stdout, wait_s)
        yield
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
