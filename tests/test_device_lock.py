"""One device, one step at a time, across working directories: the lock on the device, through a
real OpenSSH server on loopback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psutil
import pytest

from conftest import snakemake_argv, write_config
from gemma_edge.device.files import read_json
from gemma_edge.reach import device_lock
from gemma_edge.reach.target import Housekeeping, Target, connection, holding_device

VARIANT = "tiny/int4-g128/xnnpack-auto"


@contextmanager
def holding(settings: dict, step: str, wait_s: float = 3600):
    """The loopback device held by `step`, through a connection of its own, as a device step holds it."""
    target = Target.of("loopback", settings, Housekeeping(lock_timeout_s=wait_s))
    with connection(target) as client, holding_device(client, target, step):
        yield


def test_a_second_holder_waits_says_who_holds_the_device_then_gives_up_in_one_sentence(sshd, tmp_path, caplog):
    settings = sshd.target(tmp_path / "device")
    caplog.set_level(logging.INFO, logger="gemma_edge.reach.device_lock")
    with holding(settings, "bench A"):
        started = time.monotonic()
        with pytest.raises(device_lock.DeviceBusy) as refused, holding(settings, "bench B", wait_s=2):
            pass
        waited = time.monotonic() - started
    assert 2 <= waited < 20
    message = str(refused.value)
    assert message.startswith("loopback is still in use by bench A of ") and "after 2 s" in message
    assert os.getcwd() in message and "\n" not in message
    assert any("loopback is in use by bench A" in record.message for record in caplog.records)
    # Released: the next one takes it at once.
    started = time.monotonic()
    with holding(settings, "bench C", wait_s=0):
        pass
    assert time.monotonic() - started < 10


def test_a_waiting_holder_gets_the_device_when_the_first_lets_go(sshd, tmp_path):
    settings = sshd.target(tmp_path / "device")
    order = []

    def second():
        with holding(settings, "B"):
            order.append("B")

    with holding(settings, "A"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(3)
        order.append("A done")
    waiter.join(timeout=60)
    assert order == ["A done", "B"]


def test_a_holder_that_removes_the_lock_file_hands_the_device_to_a_waiter_still(sshd, tmp_path):
    """clean removes the lock file as it lets go; a run waiting on that file must take the new one,
    not an unlinked file nobody else sees (two holders at once)."""
    settings = sshd.target(tmp_path / "device")
    lock = tmp_path / "device" / device_lock.LOCK_NAME
    seen = []

    def second():
        with holding(settings, "B"):
            seen.append(json.loads(lock.read_text())["step"])
            with pytest.raises(device_lock.DeviceBusy), holding(settings, "C", wait_s=1):
                pass

    target = Target.of("loopback", settings)
    with connection(target) as client:
        with holding_device(client, target, "clean", remove=True):
            waiter = threading.Thread(target=second)
            waiter.start()
            time.sleep(3)
        waiter.join(timeout=60)
    assert seen == ["B"]
    assert lock.read_text() == ""  # B's file, released; the held C was refused while B held it
    with connection(target) as client, holding_device(client, target, "clean", remove=True):
        pass
    assert not lock.exists()


HOLD_IN_ANOTHER_PROCESS = """
import json, sys, time
from gemma_edge.reach.target import Target, connection, holding_device
settings = json.loads(sys.argv[1])
target = Target.of("loopback", settings)
with connection(target) as c, holding_device(c, target, "doomed"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(settings: dict) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_ANOTHER_PROCESS, json.dumps(settings)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def take(settings: dict, wait_s: float) -> float:
    target = Target.of("loopback", settings, Housekeeping(lock_timeout_s=wait_s))
    started = time.monotonic()
    with connection(target) as client, holding_device(client, target, "next"):
        pass
    return time.monotonic() - started


def test_a_run_killed_on_the_host_lets_the_device_go(sshd, tmp_path):
    """SIGKILL the host process holding the device (the OOM killer, a closed laptop): its
    connection closes, sshd ends the holder on the device, and the next run gets the device."""
    settings = sshd.target(tmp_path / "device")
    holder = hold_in_another_process(settings)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert take(settings, 60) < 30


def test_a_lock_whose_holder_died_on_the_device_is_taken_over_and_said_so(sshd, tmp_path, caplog):
    """The holder on the device killed (a power cut, the device's OOM killer): the kernel lets the
    flock go but the record stays; the next run takes the lock over and names whose it was."""
    settings = sshd.target(tmp_path / "device")
    lock = str(tmp_path / "device" / device_lock.LOCK_NAME)
    holder = hold_in_another_process(settings)
    try:
        on_device = [p for p in psutil.process_iter(["cmdline"]) if lock in (p.info["cmdline"] or [])]
        assert len(on_device) == 1
        on_device[0].kill()
        caplog.set_level(logging.INFO, logger="gemma_edge.reach.device_lock")
        assert take(settings, 60) < 30
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert any("took over the lock doomed of" in record.message for record in caplog.records)
    assert (tmp_path / "device" / device_lock.LOCK_NAME).read_text() == ""  # released cleanly this time


def test_the_local_target_is_locked_on_this_machine(tmp_path):
    lock = tmp_path / "local.lock"
    with device_lock.held_here("local", lock, "bench A", 10):
        assert json.loads(lock.read_text())["step"] == "bench A"
        busy = pytest.raises(device_lock.DeviceBusy, match=r"^local is still in use by bench A of .* after 1 s")
        with busy, device_lock.held_here("local", lock, "bench B", 1):
            pass
    assert lock.read_text() == ""


def test_two_working_directories_never_time_one_device_at_once(workflow, sshd, tmp_path):
    """Two snakemake runs, from two copies of a finished workflow folder, deploy to and benchmark
    one loopback device at the same time: the device lock keeps their benchmarks apart."""
    remote = tmp_path / "shared-device"
    target = sshd.target(remote)
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        shutil.copytree(workflow["workdir"], workdir, symlinks=True)
        config = write_config(
            workdir / "shared.yaml",
            {
                "targets": {"loopback": target},
                "bench": {
                    "prompt_lengths": [8],
                    "new_tokens": 4,
                    "repetitions": 2,
                    "warmup": 1,
                    "peers": {"llamacpp": [], "litert": []},
                },
            },
        )
        command = snakemake_argv(
            workdir,
            "--cores",
            "1",
            f"results/loopback/{VARIANT}/bench.json",
            "--configfile",
            str(workdir / workflow["config"].name),
            str(config),
        )
        runs.append((workdir, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    spans = []
    for workdir, run in runs:
        output, _ = run.communicate(timeout=1200)
        assert run.returncode == 0, output[-4000:]
        clock = read_json(workdir / f"results/loopback/{VARIANT}/bench.json")["wall_clock"]
        spans.append((clock["started"], clock["finished"]))
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert a_end <= b_start, f"the two benchmarks overlapped: {spans}"
    logs = [path.read_text() for workdir, _ in runs for path in (workdir / "logs/targets/loopback").rglob("*.log")]
    assert any("loopback is in use by" in text for text in logs), "neither run ever waited for the other"
