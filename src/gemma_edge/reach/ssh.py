"""Strict SSH to a device with paramiko: known_hosts checking, quoted commands, timeouts on
everything, and uploads that land atomically after a sha256 check on the device.

Every failure is raised as RemoteError with one sentence saying what happened and, where the
device said something, its stderr.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from gemma_edge.device.files import atomic_output, sha256_file

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """Talking to the device failed; the message says how."""


@dataclass
class SshTarget:
    """Where and how to reach a device; unset fields are taken from ~/.ssh/config for `host`."""

    host: str
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = "~/.ssh/config"
    trust_on_first_use: bool = False
    connect_timeout_s: float = 10.0
    resolved: dict = field(default_factory=dict, repr=False)

    def resolve(self) -> dict:
        """Merge explicit settings over what ssh_config says for this host alias."""
        settings = {}
        config_path = Path(os.path.expanduser(self.ssh_config)) if self.ssh_config else None
        if config_path and config_path.exists():
            parsed = paramiko.SSHConfig.from_path(str(config_path)).lookup(self.host)
            settings = {
                "hostname": parsed.get("hostname", self.host),
                "port": int(parsed["port"]) if "port" in parsed else None,
                "user": parsed.get("user"),
                "key_file": (parsed.get("identityfile") or [None])[0],
                "known_hosts": (parsed.get("userknownhostsfile") or "").split()[0] if parsed.get("userknownhostsfile") else None,
            }
        resolved = {
            "hostname": settings.get("hostname", self.host),
            "port": self.port or settings.get("port") or 22,
            "user": self.user or settings.get("user") or getpass.getuser(),
            "key_file": self.key_file or settings.get("key_file"),
            "known_hosts": self.known_hosts or settings.get("known_hosts") or "~/.ssh/known_hosts",
        }
        for key in ("key_file", "known_hosts"):
            if resolved[key]:
                resolved[key] = os.path.expanduser(resolved[key])
        return resolved


def connect(target: SshTarget) -> paramiko.SSHClient:
    """Open an SSH connection, refusing hosts whose key is not already in known_hosts."""
    where = target.resolve()
    label = f"{where['user']}@{where['hostname']}:{where['port']}"
    client = paramiko.SSHClient()
    known_hosts = Path(where["known_hosts"])
    if known_hosts.exists():
        client.load_host_keys(str(known_hosts))
    if target.trust_on_first_use:
        log.warning("trust_on_first_use is on: an unknown host key for %s will be accepted and saved to %s", label, known_hosts)
        client.set_missing_host_key_policy(_SaveNewHostKey(known_hosts))
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            where["hostname"],
            port=where["port"],
            username=where["user"],
            key_filename=where["key_file"],
            look_for_keys=where["key_file"] is None,
            allow_agent=True,
            timeout=target.connect_timeout_s,
            banner_timeout=target.connect_timeout_s,
            auth_timeout=target.connect_timeout_s,
        )
    except paramiko.BadHostKeyException as error:
        client.close()
        raise RemoteError(
            f"the host key of {label} does not match the one in {known_hosts}: refusing to connect "
            "(if the device was re-imaged, remove its old entry with `ssh-keygen -R` and check the new fingerprint)"
        ) from error
    except paramiko.AuthenticationException as error:
        client.close()
        raise RemoteError(
            f"authentication to {label} failed: the key {where['key_file'] or '(agent/default keys)'} was not accepted"
        ) from error
    except paramiko.SSHException as error:
        client.close()
        if "not found in known_hosts" in str(error):
            raise RemoteError(
                f"{label} is not in {known_hosts}: check its fingerprint and add it (ssh-keyscan -p {where['port']} "
                f"{where['hostname']} >> {known_hosts}), or set trust_on_first_use for this target"
            ) from error
        raise RemoteError(f"SSH to {label} failed: {error}") from error
    except TimeoutError as error:
        client.close()
        raise RemoteError(f"{label} is unreachable: no answer within {target.connect_timeout_s:.0f} s") from error
    except (paramiko.ssh_exception.NoValidConnectionsError, OSError) as error:
        client.close()
        raise RemoteError(f"{label} is unreachable: {error}") from error
    transport = client.get_transport()
    transport.set_keepalive(5)
    log.info("connected to %s", label)
    return client


class _SaveNewHostKey(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(self.known_hosts))
        log.warning("trusted new host key %s %s for %s on first use", key.get_name(), key.get_fingerprint().hex(), hostname)


def run(client: paramiko.SSHClient, argv: list[str], timeout_s: float, check: bool = True, on_line=None) -> tuple[int, str, str]:
    """Run `argv` on the device (each word shell-quoted); kill it and raise after `timeout_s`.
    `on_line(line)` sees each line of its standard output as it arrives (progress of long steps)."""
    command = shlex.join(str(a) for a in argv)
    return run_shell(client, command, timeout_s, check, shown=command, on_line=on_line)


# A remote command runs as `timeout`'s child: GNU timeout puts itself in a process group of its own
# (pgid = its pid, which the wrapper reports first on stderr) and kills that whole group at the
# remote deadline. The host kills the group itself when its own timeout fires or the step is
# interrupted; the remote deadline, a little later, is the backstop when the connection is gone.
REMOTE_DEADLINE_GRACE_S = 15
_GROUP_MARK = b"gemma-edge-pgid "


def remote_command(command: str, timeout_s: float) -> str:
    """`command` wrapped so that it runs in its own process group with a deadline on the device."""
    deadline = math.ceil(timeout_s) + REMOTE_DEADLINE_GRACE_S
    return f"echo {_GROUP_MARK.decode()}$$ >&2; exec timeout -k 5 {deadline} sh -c {shlex.quote(command)}"


def run_shell(
    client: paramiko.SSHClient, command: str, timeout_s: float, check: bool = True, shown: str | None = None, on_line=None
):
    """Run a shell command line built only from shlex-quoted parts; same timeout and errors as run()."""
    shown = shown or command
    try:
        channel = client.get_transport().open_session(timeout=timeout_s)
        channel.exec_command(remote_command(command, timeout_s))
    except (paramiko.SSHException, OSError, EOFError) as error:
        raise RemoteError(f"could not start `{shown}` on the device: {error}") from error
    stdout, stderr = bytearray(), bytearray()
    group = None
    shown_up_to = 0
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        while True:
            while channel.recv_ready():
                stdout += channel.recv(65536)
            if on_line and b"\n" in stdout[shown_up_to:]:
                end = stdout.rindex(b"\n") + 1
                for line in stdout[shown_up_to:end].decode(errors="replace").splitlines():
                    on_line(line)
                shown_up_to = end
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            if group is None:
                group, stderr = _take_group(stderr)
            if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                break
            if channel.closed and not channel.exit_status_ready():
                raise RemoteError(f"the connection dropped while running `{shown}`")
            if time.monotonic() > deadline:
                raise RemoteError(f"`{shown}` timed out after {timeout_s:.0f} s on the device and was stopped")
            if not client.get_transport().is_active():
                raise RemoteError(f"the connection dropped while running `{shown}`")
            time.sleep(0.02)
        status = channel.recv_exit_status()
        if status == -1:  # paramiko's status when the session ended without one: the transport died
            raise RemoteError(f"the connection dropped while running `{shown}`")
        finished = True
    finally:
        channel.close()
        if not finished:
            stop_group(client, group)
    if group is None:
        _, stderr = _take_group(stderr)
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    if check and status != 0:
        raise RemoteError(f"`{shown}` failed on the device (exit {status}): {err.strip()[-2000:] or out.strip()[-2000:]}")
    return status, out, err


def _take_group(stderr: bytearray) -> tuple[int | None, bytearray]:
    """The process group id the wrapper printed as stderr's first line, and stderr without it."""
    if not stderr.startswith(_GROUP_MARK) or b"\n" not in stderr:
        return None, stderr
    line, _, rest = stderr.partition(b"\n")
    return int(line[len(_GROUP_MARK) :]), bytearray(rest)


def stop_group(client: paramiko.SSHClient, group: int | None) -> None:
    """Kill a remote command's process group (TERM, then KILL after 2 s) if the connection allows;
    otherwise its remote deadline stops it."""
    transport = client.get_transport()
    if group is None or transport is None or not transport.is_active():
        return
    script = (
        f"kill -TERM -- -{group} 2>/dev/null || exit 0; i=0; while [ $i -lt 20 ]; do "
        f"kill -0 -- -{group} 2>/dev/null || exit 0; sleep 0.1; i=$((i+1)); done; kill -KILL -- -{group} 2>/dev/null; exit 0"
    )
    try:
        channel = transport.open_session(timeout=10)
        try:
            channel.exec_command(script)
            channel.status_event.wait(10)
        finally:
            channel.close()
    except (paramiko.SSHException, OSError, EOFError):
        log.warning("could not stop remote process group %d; its remote deadline will", group)


def remote_sha256(client, path: str, timeout_s: float) -> str | None:
    status, out, _ = run_shell(client, f"sha256sum -- {shlex.quote(path)} 2>/dev/null", timeout_s, check=False)
    return out.split()[0] if status == 0 and out.strip() else None


def remote_free_bytes(client, directory: str, timeout_s: float) -> int:
    _, out, _ = run(client, ["df", "-Pk", directory], timeout_s)
    return int(out.strip().splitlines()[-1].split()[3]) * 1024


def upload_atomically(client, local: Path, remote_path: str, timeout_s: float) -> dict:
    """Put `local` at `remote_path` only whole: temp name, sha256 checked on the device, rename.

    Skipped when the device already holds a file with the same sha256. Refuses to start when the
    device has less free disk than the file needs.
    """
    local = Path(local)
    digest = sha256_file(local)
    size = local.stat().st_size
    if remote_sha256(client, remote_path, timeout_s) == digest:
        log.info("%s already on the device with the same sha256; not uploading", remote_path)
        return {"path": remote_path, "sha256": digest, "size_bytes": size, "uploaded": False, "seconds": 0.0}
    directory = os.path.dirname(remote_path) or "."
    free = remote_free_bytes(client, directory, timeout_s)
    if free < size:
        raise RemoteError(
            f"the device has {free / 1e6:.1f} MB free in {directory} but {local.name} needs {size / 1e6:.1f} MB: "
            "free space there first"
        )
    temporary = f"{remote_path}.tmp-{os.getpid()}"
    peer = peer_label(client)
    started = time.monotonic()
    try:
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(timeout_s)
        try:
            sftp.put(str(local), temporary, callback=_progress(local.name, size), confirm=True)
        finally:
            sftp.close()
        uploaded = remote_sha256(client, temporary, timeout_s)
        if uploaded != digest:
            raise RemoteError(f"{local.name} arrived corrupted on the device (sha256 {uploaded} != {digest})")
        run(client, ["mv", "-f", temporary, remote_path], timeout_s)
    except (OSError, EOFError, paramiko.SSHException, RemoteError) as error:
        removed = _try_remove(client, temporary, timeout_s)
        raise RemoteError(
            f"uploading {local.name} to {peer}:{remote_path} failed ({str(error) or type(error).__name__}); check that the "
            f"device is up and re-run the same command" + ("" if removed else ", which removes the partial upload first")
        ) from error
    seconds = time.monotonic() - started
    log.info("uploaded %s (%.1f MB) in %.1f s, sha256 verified on the device", local.name, size / 1e6, seconds)
    return {"path": remote_path, "sha256": digest, "size_bytes": size, "uploaded": True, "seconds": seconds}


def _try_remove(client, path: str, timeout_s: float) -> bool:
    """Remove `path` on the device if the connection still allows; whether it did."""
    try:
        if client.get_transport() and client.get_transport().is_active():
            run(client, ["rm", "-f", path], timeout_s)
            return True
    except RemoteError:
        pass
    return False  # the connection is gone: remove_stale_uploads() clears it on the next run


def peer_label(client) -> str:
    """user@host:port of the device this client talks to, for messages."""
    transport = client.get_transport()
    try:
        host, port = transport.getpeername()[:2]
        return f"{transport.get_username()}@{host}:{port}"
    except (AttributeError, OSError):
        return "the device"


def remove_stale_uploads(client, directory: str, timeout_s: float) -> None:
    """Delete temporary upload files an interrupted earlier run left anywhere under `directory`."""
    run_shell(client, f"find {shlex.quote(directory)} -name '*.tmp-*' -type f -delete", timeout_s, check=False)


def _progress(name: str, total: int):
    state = {"next": 0.0}

    def report(done: int, _total: int) -> None:
        fraction = done / total if total else 1.0
        if fraction >= state["next"]:
            log.info("uploading %s: %3.0f%% of %.1f MB", name, 100 * fraction, total / 1e6)
            state["next"] = fraction + 0.25

    return report


def download_file(client, remote_path: str, local: Path, timeout_s: float) -> None:
    """Fetch `remote_path` into `local` atomically."""
    with atomic_output(local) as tmp:
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(timeout_s)
            try:
                sftp.get(remote_path, str(tmp))
            finally:
                sftp.close()
        except (OSError, EOFError, paramiko.SSHException) as error:
            raise RemoteError(f"fetching {remote_path} from the device failed: {error}") from error
