"""User-mode QEMU as a Cortex-A76, and the binfmt_misc entry that makes the kernel run arm64
programs through it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a76"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_TEMPLATE = Path("/usr/share/binfmts/qemu-aarch64")
AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


class EmulatorError(RuntimeError):
    """The emulated device cannot be built or run; the message says what to do."""


def find_tool(name: str, hint: str) -> str:
    """The absolute path of a host program, or EmulatorError saying how to get it."""
    found = shutil.which(name)
    if not found:
        raise EmulatorError(f"{name} is not installed: {hint}")
    return found


def find_qemu() -> str:
    return find_tool(QEMU, "apt-get install qemu-user-static")


def _binfmt_entries() -> dict:
    """binfmt_misc entries by name, each as its parsed key/value lines."""
    entries = {}
    for path in BINFMT.iterdir():
        if path.name in ("register", "status"):
            continue
        lines = path.read_text().splitlines()
        entry = {"enabled": bool(lines) and lines[0] == "enabled"}
        for line in lines[1:]:
            key, _, value = line.partition(" ")
            entry[key.rstrip(":")] = value
        entries[path.name] = entry
    return entries


def _is_aarch64(entry: dict) -> bool:
    return entry.get("magic", "").startswith("7f454c460201010000000000000000000200b7")


def register_binfmt() -> dict:
    """Make the kernel run aarch64 ELF files with qemu-aarch64-static (flag F, so it works in any
    mount namespace). Idempotent; returns the entry's name, interpreter, flags and what was done."""
    qemu = find_qemu()
    if not (BINFMT / "register").exists():
        if os.geteuid() != 0:
            raise EmulatorError(f"binfmt_misc is not mounted at {BINFMT} and mounting it needs root: run setup with sudo")
        result = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(
                f"could not mount binfmt_misc ({result.stderr.strip()}): in a container, run it with --privileged "
                "or register qemu-aarch64 on the host (apt-get install qemu-user-static binfmt-support)"
            )
        log.info("mounted binfmt_misc at %s", BINFMT)
    if (BINFMT / "status").read_text().strip() != "enabled":
        _write_binfmt(BINFMT / "status", "1")
    for name, entry in _binfmt_entries().items():
        if _is_aarch64(entry) and entry["enabled"]:
            log.info("binfmt_misc already runs aarch64 binaries with %s (flags %s)", entry.get("interpreter"), entry.get("flags"))
            return {"name": name, "interpreter": entry.get("interpreter"), "flags": entry.get("flags"), "action": "none"}
    name = "qemu-aarch64"
    if (BINFMT / name).exists():  # registered but disabled
        _write_binfmt(BINFMT / name, "1")
        entry = _binfmt_entries()[name]
        log.info("enabled the existing binfmt_misc entry %s", name)
        return {"name": name, "interpreter": entry.get("interpreter"), "flags": entry.get("flags"), "action": "enabled"}
    # Debian's wrapper name ends in -binfmt-P, which tells QEMU that argv[0] is preserved (flag P).
    wrapper = Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
    interpreter, flags = (str(wrapper), "PF") if wrapper.exists() else (qemu, "F")
    if BINFMT_TEMPLATE.exists():
        template = dict(line.split(" ", 1) for line in BINFMT_TEMPLATE.read_text().splitlines() if " " in line)
        magic, mask = template.get("magic", AARCH64_MAGIC), template.get("mask", AARCH64_MASK)
    else:
        magic, mask = AARCH64_MAGIC, AARCH64_MASK
    _write_binfmt(BINFMT / "register", f":{name}:M:0:{magic}:{mask}:{interpreter}:{flags}")
    log.info("registered binfmt_misc %s -> %s (flags %s)", name, interpreter, flags)
    return {"name": name, "interpreter": interpreter, "flags": flags, "action": "registered"}


def _write_binfmt(path: Path, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as err:
        hint = "run setup as root" if os.geteuid() != 0 else "the kernel refused it (is binfmt_misc read-only in this container?)"
        raise EmulatorError(f"could not write {path} ({err.strerror}): {hint}") from err


def binfmt_ready() -> bool:
    """Whether an enabled binfmt_misc entry runs aarch64 binaries."""
    try:
        return (BINFMT / "status").read_text().strip() == "enabled" and any(
            _is_aarch64(e) and e["enabled"] for e in _binfmt_entries().values()
        )
    except OSError:
        return False
