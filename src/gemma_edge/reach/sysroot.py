"""The emulated Pi 5's root: Debian bookworm's own arm64 packages (the Python 3.11.2 that Raspberry
Pi OS Bookworm ships), resolved and unpacked by Debian's bootstrapper (`mmdebstrap
--variant=extract --architectures=arm64`: apt resolves the closure with a state folder of its own,
so the host's dpkg database is never touched, and nothing is configured or run), and a Pi 5
/proc/cpuinfo."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

from gemma_edge.device.files import atomic_output, sha256_file
from gemma_edge.reach.qemu import QEMU_CPU, EmulatorError, find_qemu, find_tool

log = logging.getLogger(__name__)


SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# What a Raspberry Pi OS Bookworm Python has to hand; apt adds the rest of the dependency closure.
# libatomic1: the aarch64 executorch wheel's LLM runner extension (_llm_runner) links
# libatomic.so.1. Raspberry Pi OS Bookworm (Lite and desktop) has it: pi-gen's stage 2, which makes
# the Lite image, installs build-essential, whose gcc-12 depends on libgcc-12-dev, which depends on
# libatomic1. A Pi set up without build-essential (or after removing it) lacks it, and the bench's
# pre-flight then names the fix (facts.runner_preflight).
PACKAGES = (
    "python3.11",
    "python3",
    "python3.11-venv",
    "python3-pip-whl",
    "python3-setuptools-whl",
    "libc6",
    "libstdc++6",
    "libgcc-s1",
    "libgomp1",
    "libatomic1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libexpat1",
    "libbz2-1.0",
    "liblzma5",
    "libzstd1",
    "libsqlite3-0",
    "libuuid1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libcrypt1",
    "ca-certificates",
)


PI5_FEATURES = ("fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp").split()


def sysroot_of(root: Path) -> Path:
    return Path(root) / "sysroot"


def pi5_cpuinfo(cores: int) -> str:
    """A Raspberry Pi 5 /proc/cpuinfo with `cores` Cortex-A76 processors."""
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {' '.join(PI5_FEATURES)}\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n"
        for i in range(cores)
    ]
    return "\n".join(blocks) + f"\nModel\t\t: Raspberry Pi 5 Model B (emulated: QEMU user-mode, {QEMU_CPU})\n"


APT_SOURCES = Path("/etc/apt")


def host_apt_uris(suite: str, sources: Path = APT_SOURCES) -> list[str]:
    """The archive URIs the host's own apt configuration uses for `suite` (deb822 .sources files
    and one-line .list files), so the sysroot comes from the mirror this machine is set up with."""
    uris = []
    for path in sorted(sources.glob("sources.list.d/*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ")):
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and suite in fields.get("suites", []):
                uris += fields.get("uris", [])
    for path in [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    uris.append(words[1])
    return list(dict.fromkeys(uris))


def _mirrors() -> dict:
    """Where the arm64 packages come from: GEMMA_EDGE_DEBIAN_MIRROR / GEMMA_EDGE_DEBIAN_SECURITY,
    else the host's own apt sources for the suite (None where neither names one)."""
    main = os.environ.get("GEMMA_EDGE_DEBIAN_MIRROR") or next(iter(host_apt_uris(SUITE)), None)
    security = os.environ.get("GEMMA_EDGE_DEBIAN_SECURITY") or next(iter(host_apt_uris(f"{SUITE}-security")), None)
    return {"debian": main, "security": security}


def _request() -> dict:
    """What a sysroot is built from; a stamp that records the same request is up to date."""
    return {"packages": list(PACKAGES), "suite": SUITE, "architecture": "arm64", "mirrors": _mirrors(), "by": "mmdebstrap"}


def read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / "sysroot.json").read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def disk_bytes(folder: Path) -> int:
    """Bytes allocated on disk under `folder` (like du; symlinks are not followed)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _failure(stderr: str) -> EmulatorError:
    """One sentence for a failed mmdebstrap run, from apt's messages it passes on."""
    unknown = sorted(set(re.findall(r"Unable to locate package (\S+)", stderr)))
    if unknown:
        return EmulatorError(
            f"{SUITE} has no arm64 package named {', '.join(unknown)}: remove it from gemma_edge.reach.sysroot.PACKAGES"
        )
    names = sorted(set(re.findall(r"Failed to fetch \S*/([^/_\s]+)_", stderr)))
    if names:
        return EmulatorError(
            f"apt could not download the arm64 package(s) {', '.join(names)}: "
            f"check that {_mirrors()['debian']} is reachable and carries {SUITE} arm64"
        )
    errors = [line for line in stderr.strip().splitlines() if line.startswith("E: ")] or stderr.strip().splitlines()
    return EmulatorError(f"mmdebstrap could not build the arm64 sysroot ({(errors or ['(no output)'])[-1]})")


def bootstrap(staging: Path) -> list[dict]:
    """Unpack PACKAGES and their arm64 dependency closure into `staging` (which must not exist);
    return each package's name, version, file, size and sha256 (its .deb, then removed)."""
    mmdebstrap = find_tool("mmdebstrap", "apt-get install mmdebstrap")
    if not Path(DEBIAN_KEYRING).exists():
        raise EmulatorError(f"{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring")
    mirrors = _mirrors()
    if not mirrors["debian"]:
        raise EmulatorError(f"the host's apt sources name no Debian {SUITE} archive: set GEMMA_EDGE_DEBIAN_MIRROR to one")
    sources = [f"deb {mirrors['debian']} {SUITE} main", f"deb {mirrors['debian']} {SUITE}-updates main"]
    if mirrors["security"]:
        sources.append(f"deb {mirrors['security']} {SUITE}-security main")
    command = [
        mmdebstrap,
        "--variant=extract",
        "--architectures=arm64",
        f"--include={','.join(PACKAGES)}",
        f"--keyring={DEBIAN_KEYRING}",
        "--skip=cleanup/apt/cache",  # the .debs, read for the stamp below, then removed
        "--format=directory",
        SUITE,
        str(staging),
        *sources,
    ]
    log.info("unpacking %d %s arm64 packages and their dependencies from %s", len(PACKAGES), SUITE, mirrors["debian"])
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        raise _failure(result.stderr)
    packages = []
    for deb in sorted((staging / "var/cache/apt/archives").glob("*.deb")):
        name, version, architecture = unquote(deb.stem).split("_")
        size, digest = deb.stat().st_size, sha256_file(deb)
        deb.unlink()
        packages.append(
            {"package": name, "version": version, "architecture": architecture, "file": deb.name, "bytes": size, "sha256": digest}
        )
    for cache in (staging / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    # The device nodes a bootstrapped system needs: QEMU falls back to the host's /dev for a sysroot without one.
    shutil.rmtree(staging / "dev")
    return packages


def _finish_sysroot(sysroot: Path, cores: int) -> None:
    """The bits dpkg maintainer scripts or the Pi would provide: python3, cpuinfo, an isolated site."""
    python3 = sysroot / "usr/bin/python3"
    if not python3.exists() and not python3.is_symlink():
        python3.symlink_to("python3.11")
    (sysroot / "proc").mkdir(exist_ok=True)
    _write_atomically(sysroot / "proc/cpuinfo", pi5_cpuinfo(cores))
    # A guest started as /usr/bin/python3.11 (its own view) would otherwise pick up the host's x86
    # dist-packages through QEMU's fall-back-to-host path lookup; started by its sysroot path, as
    # on the device's PATH, its site folders are already inside the sysroot.
    for site in ("usr/lib/python3/dist-packages", "usr/local/lib/python3.11/dist-packages"):
        (sysroot / site).mkdir(parents=True, exist_ok=True)


def build_sysroot(root: Path) -> dict:
    """Build ROOT/sysroot from Debian's arm64 packages (idempotent, atomic); return the stamp."""
    root = Path(root)
    sysroot, stamp_path = sysroot_of(root), root / "sysroot.json"
    cores = os.cpu_count() or 1
    stamp = read_stamp(root)
    if stamp and stamp.get("request") == _request() and (sysroot / "usr/bin/python3.11").exists():
        if stamp.get("cores") != cores:
            _finish_sysroot(sysroot, cores)
            stamp["cores"] = cores
            _write_atomically(stamp_path, json.dumps(stamp, indent=2) + "\n")
        log.info(
            "sysroot %s is up to date (%d packages, built %s); nothing to do", sysroot, len(stamp["packages"]), stamp.get("built")
        )
        return {**stamp, "unchanged": True}
    find_qemu()
    start = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        staging = work / "sysroot"
        packages = bootstrap(staging)
        downloaded = sum(package["bytes"] for package in packages)
        _finish_sysroot(staging, cores)
        size = disk_bytes(staging)
        log.info("unpacked %d packages (%.1f MB of .debs) into %.1f MB", len(packages), downloaded / 1e6, size / 1e6)
        stamp_path.unlink(missing_ok=True)
        if sysroot.exists():
            sysroot.rename(work / "old-sysroot")
        staging.rename(sysroot)
        stamp = {
            "request": _request(),
            "packages": packages,
            "cores": cores,
            "download_bytes": downloaded,
            "disk_bytes": size,
            "elapsed_s": round(time.monotonic() - start, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sysroot": str(sysroot),
        }
        _write_atomically(stamp_path, json.dumps(stamp, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("sysroot ready at %s in %.0f s", sysroot, stamp["elapsed_s"])
    return {**stamp, "unchanged": False}
