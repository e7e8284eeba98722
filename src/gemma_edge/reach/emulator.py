"""An emulated Raspberry Pi 5 on an x86 host: Debian's arm64 Python in a sysroot, run by
user-mode QEMU as a Cortex-A76, behind a real OpenSSH server on loopback.

    python -m gemma_edge.reach.emulator setup    # build the sysroot, register binfmt_misc, check the guest
    python -m gemma_edge.reach.emulator serve    # start the loopback sshd; ssh -F ROOT/ssh/ssh_config pi5-emulated
    python -m gemma_edge.reach.emulator check | stop

The sysroot is extracted from Debian bookworm's own arm64 packages (the same Python 3.11.2 that
Raspberry Pi OS Bookworm ships), resolved by apt with a private state folder so the host's dpkg
database is never touched. QEMU is pointed at it with QEMU_LD_PREFIX: every absolute path the
guest opens is looked up in the sysroot first and falls back to the host, which is also how the
guest gets a Pi 5 /proc/cpuinfo (sysroot/proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from gemma_edge.reach import loopback_sshd
from gemma_edge.reach.loopback_sshd import SshServer, kill_tree
from gemma_edge.reach.qemu import QEMU_CPU, EmulatorError, binfmt_ready, find_qemu, register_binfmt
from gemma_edge.reach.sysroot import PI5_FEATURES, build_sysroot, sysroot_of

log = logging.getLogger(__name__)


HOST_ALIAS = "pi5-emulated"


def default_root() -> Path:
    """Where the emulator lives: $GEMMA_EDGE_EMULATOR, else a per-user cache shared by every clone."""
    env = os.environ.get("GEMMA_EDGE_EMULATOR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma-edge" / "emulator"


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
        raise EmulatorError(f"there is no sysroot at {sysroot_of(root)}: run `python -m gemma_edge.reach.emulator setup` first")
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
        raise EmulatorError(f"there is no sysroot at {sysroot_of(root)}: run `python -m gemma_edge.reach.emulator setup` first")
    if missing := loopback_sshd.unavailable():
        raise EmulatorError(f"the emulated Pi's sshd cannot start: {missing}")
    if not binfmt_ready():
        raise EmulatorError(
            "binfmt_misc does not run aarch64 binaries yet: run `python -m gemma_edge.reach.emulator setup` as root"
        )
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / ".bashrc").exists():
        (home / ".bashrc").write_text(
            '# Home of the emulated Raspberry Pi 5 (gemma_edge.reach.emulator): sessions start here.\ncd "$HOME" 2>/dev/null\n'
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
    parser = argparse.ArgumentParser(prog="python -m gemma_edge.reach.emulator", description=__doc__.split("\n\n")[0])
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
