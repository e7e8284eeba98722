"""An emulated Raspberry Pi 5 on an x86 host: Debian's arm64 Python in a sysroot, run by
user-mode QEMU as a Cortex-A76, behind a real OpenSSH server on loopback.

    python -m gemma_edge.emulator setup    # build the sysroot, register binfmt_misc, check the guest
    python -m gemma_edge.emulator serve    # start the loopback sshd; ssh -F ROOT/ssh/ssh_config pi5-emulated
    python -m gemma_edge.emulator check | stop

The sysroot is extracted from Debian bookworm's own arm64 packages (the same Python 3.11.2 that
Raspberry Pi OS Bookworm ships), resolved by apt with a private state folder so the host's dpkg
database is never touched. QEMU is pointed at it with QEMU_LD_PREFIX: every absolute path the
guest opens is looked up in the sysroot first and falls back to the host, which is also how the
guest gets a Pi 5 /proc/cpuinfo (sysroot/proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from . import loopback_sshd
from .artifacts import atomic_output, sha256_file
from .loopback_sshd import SshServer, kill_tree

log = logging.getLogger(__name__)

QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a76"
SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HOST_ALIAS = "pi5-emulated"
# What a Raspberry Pi OS Bookworm Python has to hand; apt adds the rest of the dependency closure.
# libatomic1: the aarch64 executorch wheel's LLM runner extension (_llm_runner) links
# libatomic.so.1. Raspberry Pi OS Bookworm (Lite and desktop) has it: pi-gen's stage 2, which makes
# the Lite image, installs build-essential, whose gcc-12 depends on libgcc-12-dev, which depends on
# libatomic1. A Pi set up without build-essential (or after removing it) lacks it, and the bench's
# pre-flight then names the fix (device_bench.runner_preflight).
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
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_TEMPLATE = Path("/usr/share/binfmts/qemu-aarch64")
AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


class EmulatorError(RuntimeError):
    """The emulated device cannot be built or run; the message says what to do."""


def default_root() -> Path:
    """Where the emulator lives: $GEMMA_EDGE_EMULATOR, else a per-user cache shared by every clone."""
    env = os.environ.get("GEMMA_EDGE_EMULATOR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma-edge" / "emulator"


def sysroot_of(root: Path) -> Path:
    return Path(root) / "sysroot"


def find_tool(name: str, hint: str) -> str:
    """The absolute path of a host program, or EmulatorError saying how to get it."""
    found = shutil.which(name)
    if not found:
        raise EmulatorError(f"{name} is not installed: {hint}")
    return found


def find_qemu() -> str:
    return find_tool(QEMU, "apt-get install qemu-user-static")


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
    return {"packages": list(PACKAGES), "suite": SUITE, "architecture": "arm64", "mirrors": _mirrors()}


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


def _apt_options(apt: Path) -> list[str]:
    """apt-get options for an arm64-only resolver whose state lives in `apt`, not the host's."""
    options = {
        "APT::Architecture": "arm64",
        "APT::Architectures": "arm64",
        "Dir::State": apt / "state",
        "Dir::State::status": apt / "status",
        "Dir::Cache": apt / "cache",
        "Dir::Etc::SourceList": apt / "sources.list",
        "Dir::Etc::SourceParts": apt / "empty",
        "Dir::Etc::Preferences": apt / "empty/preferences",
        "Dir::Etc::PreferencesParts": apt / "empty",
        "Debug::NoLocking": "1",
        "APT::Install-Recommends": "0",
        "APT::Install-Suggests": "0",
    }
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _apt(apt: Path, *args: str, what: str) -> str:
    command = [find_tool("apt-get", "this needs a Debian or Ubuntu host with apt"), "-q", *_apt_options(apt), *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        unknown = sorted(set(re.findall(r"Unable to locate package (\S+)", result.stderr)))
        if unknown:
            raise EmulatorError(
                f"{SUITE} has no arm64 package named {', '.join(unknown)}: remove it from gemma_edge.emulator.PACKAGES"
            )
        names = sorted(set(re.findall(r"Failed to fetch \S*/([^/_\s]+)_", result.stderr)))
        if names:
            raise EmulatorError(
                f"apt could not {what} the arm64 package(s) {', '.join(names)}: "
                f"check that {_mirrors()['debian']} is reachable and carries {SUITE} arm64"
            )
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EmulatorError(f"apt-get could not {what} arm64 packages ({last}): check network access to {_mirrors()['debian']}")
    return result.stdout


def download_packages(apt: Path) -> list[Path]:
    """Resolve PACKAGES' arm64 dependency closure against an empty dpkg status and download it."""
    if not Path(DEBIAN_KEYRING).exists():
        raise EmulatorError(f"{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring")
    for sub in ("state/lists/partial", "cache/archives/partial", "empty"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    mirrors = _mirrors()
    if not mirrors["debian"]:
        raise EmulatorError(f"the host's apt sources name no Debian {SUITE} archive: set GEMMA_EDGE_DEBIAN_MIRROR to one")
    lines = [
        f"deb [signed-by={DEBIAN_KEYRING}] {mirrors['debian']} {SUITE} main",
        f"deb [signed-by={DEBIAN_KEYRING}] {mirrors['debian']} {SUITE}-updates main",
    ]
    if mirrors["security"]:
        lines.append(f"deb [signed-by={DEBIAN_KEYRING}] {mirrors['security']} {SUITE}-security main")
    (apt / "sources.list").write_text("\n".join(lines) + "\n")
    log.info("reading the %s arm64 package lists from %s", SUITE, mirrors["debian"])
    _apt(apt, "update", what="list")
    log.info("resolving and downloading %d packages and their dependencies", len(PACKAGES))
    out = _apt(apt, "install", "--download-only", "-y", *PACKAGES, what="download")
    need = re.search(r"Need to get (.+?) of archives", out)
    debs = sorted((apt / "cache/archives").glob("*.deb"))
    log.info("downloaded %d packages (%s)", len(debs), need.group(1) if need else "already cached")
    return debs


def _deb_field(dpkg_deb: str, deb: Path, name: str) -> str:
    return subprocess.run([dpkg_deb, "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


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
    dpkg_deb = find_tool("dpkg-deb", "this needs a Debian or Ubuntu host with dpkg")
    start = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        debs = download_packages(work / "apt")
        staging = work / "sysroot"
        staging.mkdir()
        packages, downloaded = [], 0
        for deb in debs:
            name = _deb_field(dpkg_deb, deb, "Package")
            result = subprocess.run([dpkg_deb, "-x", str(deb), str(staging)], capture_output=True, text=True)
            if result.returncode != 0:
                raise EmulatorError(
                    f"could not unpack {name} ({deb.name}): {result.stderr.strip()}; delete {root} and run setup again"
                )
            packages.append(
                {
                    "package": name,
                    "version": _deb_field(dpkg_deb, deb, "Version"),
                    "architecture": _deb_field(dpkg_deb, deb, "Architecture"),
                    "file": deb.name,
                    "bytes": deb.stat().st_size,
                    "sha256": sha256_file(deb),
                }
            )
            downloaded += deb.stat().st_size
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


def device_environment(root: Path) -> dict:
    """Environment every process on the emulated device needs: QEMU reads both variables at start,
    and they are inherited by the aarch64 children that binfmt_misc launches."""
    return {"QEMU_LD_PREFIX": str(sysroot_of(root)), "QEMU_CPU": QEMU_CPU}


def device_path(root: Path) -> str:
    """PATH on the device: the sysroot's python3 first, then the host's tools."""
    return f"{sysroot_of(root) / 'usr/bin'}:/usr/local/bin:/usr/bin:/bin"


def session_environment(root: Path, home: Path) -> dict:
    """Everything an SSH session on the emulated Pi gets (sshd SetEnv): the QEMU variables, PATH
    with the sysroot's python3 first, and a device HOME of its own, so the host user's shell
    start-up files cannot put another python3 ahead on PATH."""
    return {**device_environment(root), "PATH": device_path(root), "HOME": str(home)}


GUEST_PROBE = """
import json, os, platform, sys
info = {"machine": platform.machine(), "python": platform.python_version(), "executable": sys.executable,
        "cpu_count": os.cpu_count(), "features": None, "cpu_part": None, "model": None}
for line in open("/proc/cpuinfo"):
    key, _, value = (part.strip() for part in line.partition(":"))
    field = {"Features": "features", "CPU part": "cpu_part", "Model": "model"}.get(key)
    if field and info[field] is None:
        info[field] = value
print(json.dumps(info))
"""


def check_emulator(root: Path) -> dict:
    """Run the sysroot's Python under QEMU and return what the guest sees; EmulatorError if it is
    not an aarch64 Cortex-A76 with the Pi 5's features."""
    qemu = find_qemu()
    python = sysroot_of(root) / "usr/bin/python3.11"
    if not python.exists():
        raise EmulatorError(f"there is no sysroot at {sysroot_of(root)}: run `python -m gemma_edge.emulator setup` first")
    env = {**os.environ, **device_environment(root)}
    result = subprocess.run([qemu, str(python), "-c", GUEST_PROBE], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise EmulatorError(
            f"the emulated Python failed ({result.returncode}): {result.stderr.strip()[-800:]}; "
            "rebuild with `setup` after deleting the sysroot"
        )
    seen = json.loads(result.stdout)
    missing = [f for f in PI5_FEATURES if f not in (seen["features"] or "").split()]
    if seen["machine"] != "aarch64" or missing or seen["cpu_part"] != "0xd0b":
        raise EmulatorError(
            f"the guest does not look like a Pi 5 (machine {seen['machine']}, CPU part {seen['cpu_part']}, "
            f"missing features {missing}): check that {sysroot_of(root)}/proc/cpuinfo exists and QEMU honours QEMU_LD_PREFIX"
        )
    seen["binfmt"] = None
    if binfmt_ready():  # the same Python launched by the kernel, as ssh sessions and venvs do
        direct = subprocess.run(
            [str(python), "-c", "import platform; print(platform.machine())"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        seen["binfmt"] = direct.stdout.strip() if direct.returncode == 0 else f"failed: {direct.stderr.strip()[-300:]}"
    return seen


def _ssh_folder(root: Path) -> Path:
    return Path(root) / "ssh"


def running_port(root: Path) -> int | None:
    """The port of this root's loopback sshd if it is running, else None."""
    folder = _ssh_folder(root)
    try:
        pid = int((folder / "sshd.pid").read_text().split()[0])
        proc = psutil.Process(pid)
        if str(folder / "sshd_config") not in " ".join(proc.cmdline()):
            return None
        match = re.search(r"^Port (\d+)$", (folder / "sshd_config").read_text(), re.M)
        return int(match.group(1)) if match else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def serve(root: Path, port: int | None = None) -> int:
    """Start the emulated Pi's loopback sshd (detached) and write ROOT/ssh/ssh_config; return its port.

    Device sessions get QEMU_LD_PREFIX/QEMU_CPU, PATH with the sysroot's python3 first, and
    HOME=ROOT/home (a fresh device home, so the host user's shell start-up files cannot put
    another python3 ahead on PATH)."""
    root = Path(root)
    running = running_port(root)
    if running:
        if port and port != running:
            log.warning("the emulated Pi is already serving on port %d, not %d; stop it first to change port", running, port)
        log.info("the emulated Pi is already serving on 127.0.0.1:%d", running)
        return running
    if not (sysroot_of(root) / "usr/bin/python3.11").exists():
        raise EmulatorError(f"there is no sysroot at {sysroot_of(root)}: run `python -m gemma_edge.emulator setup` first")
    if missing := loopback_sshd.unavailable():
        raise EmulatorError(f"the emulated Pi's sshd cannot start: {missing}")
    if not binfmt_ready():
        raise EmulatorError("binfmt_misc does not run aarch64 binaries yet: run `python -m gemma_edge.emulator setup` as root")
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / ".bashrc").exists():
        (home / ".bashrc").write_text(
            '# Home of the emulated Raspberry Pi 5 (gemma_edge.emulator): sessions start here.\ncd "$HOME" 2>/dev/null\n'
        )
    folder = _ssh_folder(root)
    if port is None and (folder / "sshd_config").exists():  # keep the port known_hosts already names
        match = re.search(r"^Port (\d+)$", (folder / "sshd_config").read_text(), re.M)
        port = int(match.group(1)) if match else None
    environment = session_environment(root, home)
    try:
        server = SshServer.create(folder, port=port, environment=environment).start()
    except RuntimeError as err:
        raise EmulatorError(
            f"the emulated Pi's sshd did not start ({str(err).strip()[-300:]}): "
            f"if port {port} is taken, serve again with --port N"
        ) from err
    server.process.returncode = 0  # detached on purpose: the sshd outlives this process
    (folder / "ssh_config").write_text(
        f"Host {HOST_ALIAS}\n    HostName 127.0.0.1\n    Port {server.port}\n    User root\n"
        f"    IdentityFile {server.client_key}\n    UserKnownHostsFile {server.known_hosts}\n"
        "    IdentitiesOnly yes\n    StrictHostKeyChecking yes\n    BatchMode yes\n"
    )
    log.info("the emulated Pi 5 is serving on 127.0.0.1:%d: ssh -F %s %s", server.port, folder / "ssh_config", HOST_ALIAS)
    return server.port


def stop(root: Path) -> bool:
    """Stop this root's loopback sshd and its sessions; False if it was not running."""
    folder = _ssh_folder(root)
    if not running_port(root):
        log.info("the emulated Pi is not running")
        return False
    pid = int((folder / "sshd.pid").read_text().split()[0])
    kill_tree(pid)
    (folder / "sshd.pid").unlink(missing_ok=True)
    log.info("stopped the emulated Pi's sshd (pid %d)", pid)
    return True


def setup(root: Path) -> dict:
    """build_sysroot + register_binfmt + check_emulator; returns all three results."""
    start = time.monotonic()
    stamp = build_sysroot(root)
    binfmt = register_binfmt()
    seen = check_emulator(root)
    return {"stamp": stamp, "binfmt": binfmt, "guest": seen, "elapsed_s": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_edge.emulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["setup", "serve", "stop", "check"])
    parser.add_argument(
        "--root", type=Path, default=None, help="emulator folder (default: $GEMMA_EDGE_EMULATOR or ~/.cache/gemma-edge/emulator)"
    )
    parser.add_argument("--port", type=int, default=None, help="port for serve (default: the previous one, else a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = (args.root or default_root()).expanduser().resolve()
    try:
        if args.command == "setup":
            result = setup(root)
            stamp, guest = result["stamp"], result["guest"]
            build = "skipped, up to date" if stamp["unchanged"] else f"{stamp['elapsed_s']:.0f} s"
            print(
                f"emulated Pi 5 ready in {result['elapsed_s']:.0f} s (sysroot build {build}): "
                f"{len(stamp['packages'])} packages, {stamp['disk_bytes'] / 1e6:.0f} MB at {sysroot_of(root)}; "
                f"guest {guest['machine']} Python {guest['python']}, {guest['cpu_count']} cores, binfmt {guest['binfmt']}"
            )
        elif args.command == "check":
            print(json.dumps(check_emulator(root), indent=2))
        elif args.command == "serve":
            port = serve(root, args.port)
            print(f"emulated Pi 5 on 127.0.0.1:{port}: ssh -F {_ssh_folder(root) / 'ssh_config'} {HOST_ALIAS}")
        else:
            print("stopped" if stop(root) else "not running")
    except EmulatorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
