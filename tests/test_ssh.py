"""The SSH transport against a real OpenSSH server on loopback: every failure provoked for real."""

import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import PINS, require
from gemma_edge.device.files import sha256_file
from gemma_edge.reach import deploy, loopback_sshd, provision, ssh
from gemma_edge.reach.target import DeviceError, Target
from sshd import SshServer


def client_for(server, **overrides):
    return ssh.connect(Target.of("loopback", server.target(Path("/tmp"), **overrides)).ssh)


def test_commands_are_quoted_and_report_their_output(sshd, tmp_path):
    client = client_for(sshd)
    try:
        odd = tmp_path / "a folder; with $(spaces) & 'quotes'"
        ssh.run(client, ["mkdir", "-p", str(odd)], 10)
        assert odd.is_dir()
        status, out, _ = ssh.run(client, ["printf", "%s", "$HOME `id`"], 10)
        assert (status, out) == (0, "$HOME `id`")
    finally:
        client.close()


def test_output_lines_are_seen_while_the_command_runs(sshd):
    client = client_for(sshd)
    seen = []
    try:
        _, out, _ = ssh.run(
            client,
            ["sh", "-c", "echo prompt 16 done; sleep 2; printf 'prompt 64 done\\n'"],
            30,
            on_line=lambda line: seen.append((line, time.monotonic())),
        )
        finished = time.monotonic()
    finally:
        client.close()
    assert [line for line, _ in seen] == ["prompt 16 done", "prompt 64 done"]
    assert out == "prompt 16 done\nprompt 64 done\n"
    assert finished - seen[0][1] > 1.0  # the first line was logged before the command ended


def test_failing_remote_command_gives_its_stderr(sshd):
    client = client_for(sshd)
    try:
        with pytest.raises(ssh.RemoteError, match=r"failed on the device \(exit 3\): broken on purpose"):
            ssh.run(client, ["sh", "-c", "echo broken on purpose >&2; exit 3"], 10)
    finally:
        client.close()


def test_remote_command_is_stopped_at_its_timeout(sshd):
    client = client_for(sshd)
    try:
        started = time.monotonic()
        with pytest.raises(ssh.RemoteError, match=r"timed out after 1 s"):
            ssh.run(client, ["sleep", "30"], 1)
        assert time.monotonic() - started < 10
    finally:
        client.close()


def device_processes(marker: str) -> list:
    """Processes on the loopback device (this machine) with `marker` as an argument of their own."""
    return [proc for proc in psutil.process_iter(["cmdline"]) if marker in (proc.info["cmdline"] or [])]


def wait_until_gone(marker: str, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while device_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return device_processes(marker)


def hanging_argv(marker: str) -> list[str]:
    """A command that hangs in a child of the remote shell, as a stuck benchmark would."""
    return ["sh", "-c", 'python3 -c "import time; time.sleep(600)" "$0"; echo never', marker]


def test_timed_out_command_leaves_nothing_running_on_the_device(sshd):
    marker = f"hang-{uuid.uuid4().hex}"
    client = client_for(sshd)
    try:
        with pytest.raises(ssh.RemoteError, match=r"timed out after 2 s"):
            ssh.run(client, hanging_argv(marker), 2)
    finally:
        client.close()
    assert wait_until_gone(marker, 5) == []


@pytest.mark.needs_sshd
def test_command_whose_connection_drops_is_stopped_by_its_remote_deadline(tmp_path):
    require(loopback_sshd.unavailable())  # a server of its own
    server = SshServer.create(tmp_path / "sshd").start()
    marker = f"hang-{uuid.uuid4().hex}"
    client = client_for(server)
    failures = []

    def run_until_dropped():
        try:
            ssh.run(client, hanging_argv(marker), 2)
        except ssh.RemoteError as error:
            failures.append(str(error))

    runner = threading.Thread(target=run_until_dropped)
    try:
        runner.start()
        deadline = time.monotonic() + 20
        while not device_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device_processes(marker), "the remote command never started"
        # The network goes away under the session: the host can no longer kill anything.
        client.get_transport().sock.shutdown(socket.SHUT_RDWR)
        runner.join(30)
        assert failures and "connection dropped" in failures[0]
        assert device_processes(marker), "still running right after the drop: nothing but the deadline can stop it"
        assert wait_until_gone(marker, 2 + ssh.REMOTE_DEADLINE_GRACE_S + 10) == []
    finally:
        client.close()
        server.stop()


def test_wrong_key_is_refused(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(ssh.RemoteError, match="authentication to root@127.0.0.1:.* failed"):
        client_for(sshd, key_file=str(stranger))


def test_changed_host_key_is_refused(sshd, tmp_path):
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(ssh.RemoteError, match="does not match the one in"):
        client_for(sshd, known_hosts=str(known))


def test_unknown_host_is_refused_unless_trusted_on_first_use(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    with pytest.raises(ssh.RemoteError, match="is not in .*known_hosts: check its fingerprint"):
        client_for(sshd, known_hosts=str(known))
    assert not known.exists()
    client_for(sshd, known_hosts=str(known), trust_on_first_use=True).close()
    assert "ssh-ed25519" in known.read_text()
    client_for(sshd, known_hosts=str(known)).close()  # now known: strict checking passes


def test_closed_port_is_reported_unreachable(sshd):
    port = sshd.port + 1 if sshd.port < 65000 else sshd.port - 1
    with pytest.raises(ssh.RemoteError, match="is unreachable"):
        client_for(sshd, port=port)


def test_ssh_config_alias_is_honoured(sshd, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host pi5-test\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    alias = Target.of("pi5", {"kind": "ssh", "host": "pi5-test", "ssh_config": str(config)}).ssh
    client = ssh.connect(alias)
    try:
        assert ssh.run(client, ["echo", "ok"], 10)[1].strip() == "ok"
    finally:
        client.close()


def test_upload_is_atomic_checked_and_skipped_when_present(sshd, tmp_path):
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(3_000_000))
    remote = tmp_path / "remote" / "payload.bin"
    remote.parent.mkdir()
    client = client_for(sshd)
    try:
        first = ssh.upload_atomically(client, local, str(remote), 30)
        second = ssh.upload_atomically(client, local, str(remote), 30)
    finally:
        client.close()
    assert first["uploaded"] and not second["uploaded"]
    assert sha256_file(remote) == sha256_file(local)
    assert list(remote.parent.iterdir()) == [remote]


@pytest.mark.needs_sshd
def test_dropped_upload_says_what_to_do_and_the_next_deploy_clears_it(tmp_path):
    require(loopback_sshd.unavailable())  # a server of its own
    server = SshServer.create(tmp_path / "sshd").start()
    pte, tokenizer = tmp_path / "model.pte", tmp_path / "tokenizer.json"
    with open(pte, "wb") as handle:
        for _ in range(40):
            handle.write(os.urandom(8_000_000))
    tokenizer.write_text("{}")
    workdir = tmp_path / "remote" / "gemma-edge"
    target = Target.of("dropped", server.target(workdir))

    def stop_when_transfer_starts():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(workdir.rglob("*.tmp-*")):
            time.sleep(0.01)
        server.stop()  # sshd and its sessions die mid-transfer

    killer = threading.Thread(target=stop_when_transfer_starts)
    killer.start()
    try:
        with pytest.raises(ssh.RemoteError) as failure:
            deploy.deploy(target, pte, tokenizer, tmp_path / "deployed.json")
    finally:
        killer.join()
    message = str(failure.value)
    assert f"uploading model.pte to root@127.0.0.1:{server.port}:" in message
    assert "re-run the same command, which removes the partial upload first" in message
    assert "failed ()" not in message  # the cause is named even when paramiko's message is empty
    folder = workdir / "models" / sha256_file(pte)[:16]
    assert not (folder / "model.pte").exists() and not (tmp_path / "deployed.json").exists()
    assert list(folder.glob("model.pte.tmp-*")), "the connection was cut: the partial file is still on the device"

    server.start()
    try:
        record = deploy.deploy(target, pte, tokenizer, tmp_path / "deployed.json")
    finally:
        server.stop()
    assert record["files"]["pte"]["sha256"] == sha256_file(folder / "model.pte")
    assert list(workdir.rglob("*.tmp-*")) == []


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_remote_disk_is_refused_before_uploading(sshd, tmp_path, small_filesystem):
    local = tmp_path / "model.pte"
    local.write_bytes(os.urandom(5_000_000))
    client = client_for(sshd)
    try:
        with pytest.raises(ssh.RemoteError, match=r"has 2.1 MB free in .* but model.pte needs 5.0 MB"):
            ssh.upload_atomically(client, local, str(small_filesystem / "model.pte"), 30)
    finally:
        client.close()
    assert list(small_filesystem.iterdir()) == []


def test_missing_remote_python_is_reported(sshd, tmp_path):
    target = Target.of("broken", sshd.target(tmp_path / "remote", python="/nonexistent/python3"))
    said = r"^broken: the device's Python \(/nonexistent/python3\) cannot run \(exit 127\): .*No such file"
    with pytest.raises(DeviceError, match=said):
        provision.provision(target, tmp_path / "device.json")
    assert not (tmp_path / "device.json").exists()


def test_runtime_versions_must_match_the_host_release():
    host = {"executorch": "1.5.1", "torch": "2.13.0"}
    provision.check_versions({"executorch": "1.5.1", "torch": "2.13.0+cpu"}, host)  # same release, other wheel tag
    with pytest.raises(DeviceError, match=r"torch 2.12.0 \(host 2.13.0\); re-run provisioning"):
        provision.check_versions({"executorch": "1.5.1", "torch": "2.12.0"}, host)
    with pytest.raises(DeviceError, match=r"executorch None"):
        provision.check_versions({"executorch": None, "torch": "2.13.0"}, host)
    assert provision.host_runtime_versions()["torch"] == PINS["torch"]
