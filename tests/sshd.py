"""A real OpenSSH server on loopback, with its own host key, client key, known_hosts and port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
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


@dataclass
class SshServer:
    folder: Path
    port: int
    host_public_key: str
    client_key: Path
    known_hosts: Path
    process: subprocess.Popen | None = None

    @classmethod
    def create(cls, folder: Path) -> "SshServer":
        folder.mkdir(parents=True, exist_ok=True)
        host_pub = keygen(folder / "host_key")
        client_pub = keygen(folder / "client_key")
        (folder / "authorized_keys").write_text(client_pub + "\n")
        server = cls(folder, free_port(), host_pub, folder / "client_key", folder / "known_hosts")
        server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {' '.join(host_pub.split()[:2])}\n")
        (folder / "sshd_config").write_text(
            f"Port {server.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
            "LogLevel ERROR\nMaxStartups 100\n"
        )
        return server

    def start(self) -> "SshServer":
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                        stderr=open(self.folder / "sshd.log", "ab"), start_new_session=True)
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
        try:
            family = psutil.Process(self.process.pid).children(recursive=True) + [psutil.Process(self.process.pid)]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=10)
        self.process = None

    def target(self, workdir: Path, **overrides) -> dict:
        """Settings of a workflow target that reaches this server."""
        import sys

        settings = {
            "kind": "ssh", "host": "127.0.0.1", "port": self.port, "user": "root",
            "key_file": str(self.client_key), "known_hosts": str(self.known_hosts), "ssh_config": None,
            "trust_on_first_use": False, "workdir": str(workdir), "python": sys.executable,
            "create_venv": False, "threads": 2, "connect_timeout_s": 5, "command_timeout_s": 60,
            "transfer_timeout_s": 120, "install_timeout_s": 600, "bench_timeout_s": 600,
        }
        settings.update(overrides)
        return settings
