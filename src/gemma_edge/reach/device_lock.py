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

import paramiko

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
def record(lock):
    lock.seek(0)
    return lock.read().strip() or "{}"
def same_file(lock):
    try:
        return os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
started, told = time.monotonic(), False
while True:
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not told:
            print("WAITING " + record(lock), flush=True)
            told = True
        if time.monotonic() - started >= wait:
            print("TIMEOUT " + record(lock), flush=True)
            sys.exit(3)
        lock.close()
        time.sleep(0.5)
        continue
    if same_file(lock):
        break
    lock.close()  # its holder removed the file as it let go: take the one there now
found = record(lock)
lock.seek(0)
lock.truncate()
lock.write(owner)
lock.flush()
print("LOCKED " + found, flush=True)
if sys.stdin.read().strip() == "REMOVE":
    os.unlink(path)  # while still held: a waiter that opened this file sees it gone and reopens
else:
    lock.seek(0)
    lock.truncate()
    lock.flush()
"""


class DeviceBusy(RuntimeError):
    """Another run held the device for longer than this run would wait; the message says who."""


class HolderFailed(RuntimeError):
    """The device's Python could not run the holder; the message has what it printed."""


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
    raise HolderFailed(f"{name}: the device lock could not be taken (the device's Python ended without a word)")


@contextmanager
def held_over_ssh(client, name: str, python: str, workdir: str, step: str, wait_s: float, remove: bool = False):
    """Hold the device's lock for the block, through `client` (paramiko) and the device's `python`.
    With `remove`, the lock file goes as the block ends well (clean leaves nothing of ours)."""
    argv = [python, "-c", HOLDER, f"{workdir.rstrip('/')}/{LOCK_NAME}", json.dumps(owner_record(step)), str(wait_s)]
    channel = client.get_transport().open_session()
    channel.settimeout(wait_s + 120)  # the holder answers within wait_s; this bounds a silent device
    channel.exec_command(shlex.join(argv))
    stdout = channel.makefile("r")
    try:
        try:
            wait_for_lock(name, stdout, wait_s)
        except HolderFailed:
            said = channel.makefile_stderr("r").read().decode(errors="replace").strip().splitlines()
            raise HolderFailed(
                f"{name}: the device's Python ({python}) cannot run (exit {channel.recv_exit_status()}): "
                f"{said[-1] if said else 'it printed nothing'}"
            ) from None
        yield
        if remove:
            channel.sendall(b"REMOVE\n")
    finally:
        try:
            channel.shutdown_write()  # the holder reads end of input and lets the lock go
            channel.status_event.wait(30)  # it has let go (and removed the file if asked) before we go on
            channel.close()
        except (EOFError, OSError, paramiko.SSHException):
            pass  # the connection is gone (the block's own error says so): sshd ended the holder, the lock with it


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
