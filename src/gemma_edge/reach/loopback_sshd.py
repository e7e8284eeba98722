"""A real OpenSSH server on loopback, with its own host key, client key, known_hosts and port.

Used by the tests as a stand-in device and by `gemma_edge.reach.emulator serve` as the front door of
the emulated Raspberry Pi. `environment` entries become one sshd_config `SetEnv` line, which
sshd applies to every session after its own defaults (so they can override PATH).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def _key(path: Path) -> str:
    """The public half of `path`, generating the pair only if it does not exist yet."""
    public = path.with_suffix(".pub")
    if path.exists() and public.exists():
        return public.read_text().strip()
    return keygen(path)


def setenv_lines(environment: dict) -> str:
    """The sshd_config SetEnv line for `environment` (values quoted). It must be one line: sshd
    keeps only the first SetEnv directive it reads."""
    if not environment:
        return ""
    lines = []
    for name, value in environment.items():
        name, value = str(name), str(value)
        if not name.replace("_", "").isalnum() or name[0].isdigit():
            raise ValueError(f"{name!r} is not a valid environment variable name")
        if any(ch in value for ch in '"\n\r'):
            raise ValueError(f"the value of {name} contains a quote or newline, which sshd_config SetEnv cannot carry")
        lines.append(f'{name}="{value}"')
    return "SetEnv " + " ".join(lines) + "\n"


def kill_tree(pid: int) -> bool:
    """Kill `pid` and every process it forked; False if it was already gone."""
    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return False
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=10)
    return True


def unavailable() -> str | None:
    """Why a loopback sshd cannot be started here, or None if it can."""
    for tool, path in (("sshd", SSHD), ("ssh-keygen", shutil.which("ssh-keygen"))):
        if not path or not Path(path).exists():
            return f"{tool} is not installed (Debian: openssh-server, openssh-client)"
    if os.geteuid() != 0:
        return "sshd's privilege separation directory /run/sshd and root logins need root"
    return None


@dataclass
class SshServer:
    folder: Path
    port: int
    host_public_key: str
    client_key: Path
    known_hosts: Path
    process: subprocess.Popen | None = None
    environment: dict = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, port: int | None = None, environment: dict | None = None) -> SshServer:
        """Write keys (reusing any already in `folder`), known_hosts and sshd_config."""
        folder.mkdir(parents=True, exist_ok=True)
        host_pub = _key(folder / "host_key")
        client_pub = _key(folder / "client_key")
        (folder / "authorized_keys").write_text(client_pub + "\n")
        server = cls(
            folder,
            port or free_port(),
            host_pub,
            folder / "client_key",
            folder / "known_hosts",
            environment=dict(environment or {}),
        )
        server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {' '.join(host_pub.split()[:2])}\n")
        # A HOME of the device's own is where SFTP starts too, so relative remote paths agree with the shell's.
        sftp = f"internal-sftp -d {server.environment['HOME']}" if "HOME" in server.environment else "internal-sftp"
        (folder / "sshd_config").write_text(
            f"Port {server.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            f"Subsystem sftp {sftp}\n"
            "LogLevel ERROR\nMaxStartups 100\n" + setenv_lines(server.environment)
        )
        return server

    def start(self) -> SshServer:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        with open(self.folder / "sshd.log", "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.folder / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        """Stop the listener and every session it forked (drops connections mid-transfer)."""
        if self.process is None:
            return
        kill_tree(self.process.pid)
        self.process.wait(timeout=10)
        self.process = None

    def target(self, workdir: Path, **overrides) -> dict:
        """Settings of a workflow target that reaches this server."""
        settings = {
            "kind": "ssh",
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "key_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "ssh_config": None,
            "trust_on_first_use": False,
            "workdir": str(workdir),
            "python": sys.executable,
            "create_venv": False,
            "threads": 2,
            "connect_timeout_s": 5,
            "command_timeout_s": 60,
            "transfer_timeout_s": 120,
            "install_timeout_s": 600,
            "bench_timeout_s": 600,
        }
        settings.update(overrides)
        return settings
